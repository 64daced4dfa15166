"""MOML (ldro/meta_weighting.py): the one-step meta-gradient rule, its state, the
validation gradient of the train step, and an image run with a held-out split."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ldro
from ldro import train as ldro_train
from ldro.data import images as images_lib


def test_hand_checked_step_and_state():
  # z <- z + beta * eta * (g_val . g_i); w = softmax(z). Two tasks, g_1 = (1, 0), g_2 = (0, 2),
  # g_val = (3, 1): dots (3, 2); beta = 2, eta = 0.5: z = (3, 2) after one step.
  tx = ldro.moml(2, meta_lr=2.0, inner_lr=0.5)
  grads = {"w": jnp.array([[1.0, 0.0], [0.0, 2.0]])}
  val = {"w": jnp.array([3.0, 1.0])}
  state = tx.init({"w": jnp.zeros(2)})
  out, state = tx.update(grads, state, val_grads=val)
  want = np.exp([3.0, 2.0]) / np.exp([3.0, 2.0]).sum()
  np.testing.assert_allclose(ldro.task_weights(state), want, rtol=1e-6)
  np.testing.assert_allclose(out["w"], [want[0], 2 * want[1]], rtol=1e-6)
  # k steps on the same inputs: z = k * (3, 2).
  for _ in range(3):
    _, state = tx.update(grads, state, val_grads=val)
  np.testing.assert_allclose(state.method_state.logits, [12.0, 8.0], rtol=1e-6)
  # An absent task keeps its logit and gets weight 0.
  _, s2 = tx.update(grads, state, val_grads=val, task_mask=jnp.array([True, False]))
  np.testing.assert_allclose(s2.method_state.logits, [15.0, 8.0], rtol=1e-6)
  np.testing.assert_allclose(ldro.task_weights(s2), [1.0, 0.0])


def test_missing_or_misshapen_validation_gradient_is_a_clear_error():
  tx = ldro.moml(2)
  grads = {"w": jnp.ones((2, 3))}
  state = tx.init({"w": jnp.zeros(3)})
  with pytest.raises(ValueError, match="val_grads"):
    tx.update(grads, state)
  with pytest.raises(ValueError, match="structure and shapes of the parameters"):
    tx.update(grads, state, val_grads={"w": jnp.ones(4)})


def _toy():
  """Two regression tasks that disagree; the validation data follow task 0."""
  rng = np.random.default_rng(0)
  d = 3
  w0, w1 = np.array([1.0, -1.0, 0.5]), np.array([-1.0, 1.0, 0.0])
  x = rng.normal(size=(2, 16, d)).astype(np.float32)
  y = np.stack([x[0] @ w0, x[1] @ w1]).astype(np.float32)
  xv = rng.normal(size=(2, 16, d)).astype(np.float32)
  yv = np.stack([xv[0] @ w0, xv[1] @ w0]).astype(np.float32)

  def task_loss(p, tb, rng):
    del rng
    r = tb["x"] @ p["w"] - tb["y"]
    return 0.5 * jnp.mean(r * r), {}

  return task_loss, {"train": {"x": x, "y": y}, "val": {"x": xv, "y": yv}}, {"w": jnp.zeros(d)}


def test_weight_of_the_task_validation_prefers_grows_in_both_modes():
  task_loss, batch, params = _toy()
  got = {}
  for mode in ("jacobian", "lean"):
    tx = optax.chain(ldro.moml(2, meta_lr=5.0, inner_lr=0.1), optax.sgd(0.1))
    state = ldro_train.init_train_state(params, tx, jax.random.key(0))
    step = jax.jit(ldro_train.make_train_step(task_loss, tx, mode=mode, val_grads=True))
    weights = []
    for _ in range(20):
      state, metrics = step(state, batch)
      weights.append(float(metrics["task_weights"][0]))
    assert weights[-1] > 0.9 and weights[-1] > weights[0]
    got[mode] = (state.params["w"], ldro.task_weights(state.opt_state))
  # Lean mode's g_i . g_val (transposed VJP) equals Jacobian mode's (per-task gradients).
  np.testing.assert_allclose(got["lean"][0], got["jacobian"][0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got["lean"][1], got["jacobian"][1], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="'train': ..., 'val'"):
    ldro_train.make_train_step(task_loss, optax.chain(ldro.moml(2), optax.sgd(0.1)),
                               val_grads=True)(
        ldro_train.init_train_state(params, optax.chain(ldro.moml(2), optax.sgd(0.1)),
                                    jax.random.key(0)), batch["train"])


def test_combined_with_a_gradient_method():
  task_loss, batch, params = _toy()
  tx = optax.chain(ldro.combine(ldro.moml(2), ldro.pcgrad(2)), optax.sgd(0.1))
  state = ldro_train.init_train_state(params, tx, jax.random.key(0))
  state, metrics = jax.jit(ldro_train.make_train_step(task_loss, tx, val_grads=True))(state, batch)
  assert np.all(np.isfinite(metrics["task_weights"]))


def test_hold_out_validation_split():
  n = 10
  data = images_lib.TaskImageData(
      task_names=["a", "b"], class_names=["x", "y", "z", "w"],
      train_images=np.arange(2 * n, dtype=np.uint8).reshape(-1, 1, 1, 1) * np.ones(
          (1, 2, 2, 3), np.uint8),
      train_labels=np.repeat([0, 2], n).astype(np.int32),
      train_tasks=np.repeat([0, 1], n).astype(np.int32),
      test_images=np.zeros((2, 2, 2, 3), np.uint8), test_labels=np.array([1, 3], np.int32),
      test_tasks=np.array([0, 1], np.int32))
  train, val = images_lib.hold_out_validation(data, 3, seed=1)
  assert np.bincount(val.train_tasks).tolist() == [3, 3]
  assert np.bincount(train.train_tasks).tolist() == [7, 7]
  ids = lambda d: set(d.train_images[:, 0, 0, 0].tolist())  # pylint: disable=unnecessary-lambda-assignment
  assert not ids(train) & ids(val) and ids(train) | ids(val) == set(range(2 * n))
  again, _ = images_lib.hold_out_validation(data, 3, seed=1)
  np.testing.assert_array_equal(again.train_images, train.train_images)  # deterministic
  with pytest.raises(ValueError, match="task 'a' has 10 training examples"):
    images_lib.hold_out_validation(data, 10)


def test_image_run_with_a_validation_split(tmp_path, image_folder, gin_config):
  """MOML end to end on tiny images (Jacobian mode, its registered preference)."""
  from experiments.runner import loop  # pylint: disable=g-import-not-at-top
  root = image_folder()
  base = [f"DATA_DIR = {str(root)!r}", "MODEL = 'tiny'", "NUM_STEPS = 3", "EVAL_EVERY = 3",
          "ImageClassificationExperiment.batch_size = 4",
          "ImageClassificationExperiment.pairs = [['cat', 'dog'], ['bird', 'frog']]"]
  gin_config(["gin_configs/cifar10_mtl/base.gin", "gin_configs/methods/moml.gin"],
             base + ["ImageClassificationExperiment.val_per_task = 4"])
  recs = loop.train_and_evaluate(str(tmp_path / "run"), quiet=True)
  assert [r["step"] for r in recs] == [0, 3]
  w = recs[-1]["task_weights"]
  assert np.isclose(sum(w), 1.0, atol=1e-5) and not np.allclose(w, 0.5)
  # Lean mode cannot transpose the CNN's custom VJPs on CPU: it says so.
  gin_config(["gin_configs/cifar10_mtl/base.gin", "gin_configs/methods/moml.gin"],
             base + ["ImageClassificationExperiment.val_per_task = 4", "MODE = 'lean'"])
  with pytest.raises(ValueError, match="use Jacobian mode"):
    loop.train_and_evaluate(str(tmp_path / "run_lean"), quiet=True)
  # Without a validation split: one clear line before training.
  gin_config(["gin_configs/cifar10_mtl/base.gin", "gin_configs/methods/moml.gin"], base)
  with pytest.raises(ValueError, match="needs a validation batch.*val_per_task"):
    loop.train_and_evaluate(str(tmp_path / "run2"), quiet=True)
