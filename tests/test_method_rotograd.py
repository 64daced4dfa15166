"""RotoGrad (ldro/rotograd.py): orthogonal rotations, the identity with one task, the magnitude
rescaling by hand, the rotations' alignment, the reference norms, and an image run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.linalg

import ldro
from ldro import rotograd
from ldro import train as ldro_train
from ldro.models import cnn

PIL_Image = pytest.importorskip("PIL.Image")


# The library's rotation layer at one set of shapes (N = 2 tasks, b = 3 rows, d = 3), compiled
# once for the tests below (expm and its gradient dominate the compile time).
N, B, D = 2, 3, 3
EYE_BLOCKS = jnp.broadcast_to(jnp.eye(D), (N, B, D))  # z[k] = I: the output block k is R_k^T


@jax.jit
def _rotation_grads(z, generators, reference, cotangent):
  """``(r, (dz, d_generators, observed_norms))`` of rotate_tasks for a given cotangent."""
  r, vjp = jax.vjp(rotograd.rotate_tasks, z, generators, reference)
  return r, vjp(cotangent)


def _rotations(generators):
  r, _ = _rotation_grads(EYE_BLOCKS, generators, jnp.zeros(N), EYE_BLOCKS)
  return np.swapaxes(np.asarray(r), 1, 2)


def test_rotations_stay_orthogonal_after_updates():
  params = {rotograd.GENERATORS: jnp.zeros((N, D, D)), rotograd.REFERENCE_NORMS: jnp.zeros(N)}
  tx = rotograd.rotograd_optimizer(optax.sgd(0.1), optax.adam(0.2), burn_in_period=2)
  state = tx.init(params)
  z = jax.random.normal(jax.random.PRNGKey(0), (N, B, D))
  for i in range(6):  # the rotations' own optimizer on their rotation-loss gradient
    u = jax.random.normal(jax.random.PRNGKey(i + 1), (N, B, D))
    _, (_, d_gens, norms) = _rotation_grads(z, params[rotograd.GENERATORS],
                                            params[rotograd.REFERENCE_NORMS], u)
    grads = {rotograd.GENERATORS: d_gens, rotograd.REFERENCE_NORMS: norms}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  rot = _rotations(params[rotograd.GENERATORS])
  assert np.abs(rot - np.eye(D)).max() > 0.1  # they moved
  np.testing.assert_allclose(np.einsum("nji,njk->nik", rot, rot),
                             np.broadcast_to(np.eye(D), (N, D, D)), atol=1e-5)
  np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-5)
  np.testing.assert_allclose(rot, scipy.linalg.expm(np.asarray(
      params[rotograd.GENERATORS] - jnp.swapaxes(params[rotograd.GENERATORS], 1, 2))), atol=1e-5)


def test_one_task_is_the_unwrapped_model():
  model = cnn.ConvNet(num_classes=3, features=4, num_conv=1, mlp_width=6, mlp_layers=1,
                      conv_impl="xla")
  wrapped = cnn.ConvNet(num_classes=3, features=4, num_conv=1, mlp_width=6, mlp_layers=1,
                        conv_impl="xla", rotograd=True, num_tasks=1)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 4, 4, 2))
  labels = jnp.array([[0, 2, 1, 1, 0]])
  params = jax.jit(model.init)(jax.random.PRNGKey(1), x[0])
  # The same trunk and head, and the rotation layer's initial parameters (identity, unset).
  rot_params = jax.eval_shape(wrapped.init, jax.random.PRNGKey(1), x)["params"]["rotograd"]
  assert set(rot_params) == {rotograd.GENERATORS, rotograd.REFERENCE_NORMS}
  wparams = {"params": {**params["params"], "rotograd": {
      rotograd.GENERATORS: jnp.zeros((1, 6, 6)), rotograd.REFERENCE_NORMS: jnp.zeros(1)}}}

  def loss(m, p):
    logits = m.apply(p, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

  (l0, y0), g0 = jax.jit(jax.value_and_grad(lambda p: loss(model, p), has_aux=True))(params)
  (l1, y1), g1 = jax.jit(jax.value_and_grad(lambda p: loss(wrapped, p), has_aux=True))(wparams)
  np.testing.assert_allclose(y1, y0, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(l1, l0, rtol=1e-6)
  for name in params["params"]:  # trunk and head: the unwrapped model's gradient
    for k in params["params"][name]:
      np.testing.assert_allclose(g1["params"][name][k], g0["params"][name][k],
                                 rtol=1e-5, atol=1e-7)
  rot_grads = g1["params"]["rotograd"]
  np.testing.assert_allclose(rot_grads[rotograd.GENERATORS], 0.0, atol=1e-7)
  assert float(rot_grads[rotograd.REFERENCE_NORMS][0]) > 0  # the observed ||G_1||


def test_magnitude_rescaling_by_hand():
  # R = I; task 1's rows G_1 = [(3, 0, 0), 0, 0] (norm 3), task 2's G_2 = [(0, 1, 0), 0, 0]
  # (norm 1).
  z = jnp.zeros((N, B, D))
  gens = jnp.zeros((N, D, D))
  u = jnp.zeros((N, B, D)).at[0, 0, 0].set(3.0).at[1, 0, 1].set(1.0)
  # References unset (first step): ratios 1, alpha = (1/2, 1/2), C = (3 + 1) / 2 = 2.
  _, (dz, _, norms) = _rotation_grads(z, gens, jnp.zeros(N), u)
  np.testing.assert_allclose(norms, [3.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(dz, 2 * u / np.array([3.0, 1.0])[:, None, None], rtol=1e-6)
  # References (3, 2): ratios (1, 1/2), alpha = (2/3, 1/3), C = 2/3 * 3 + 1/3 * 1 = 7/3:
  # the slower-converging task 1 sets the common magnitude.
  _, (dz, _, _) = _rotation_grads(z, gens, jnp.array([3.0, 2.0]), u)
  np.testing.assert_allclose(dz[0, 0], [7 / 3, 0, 0], rtol=1e-6)
  np.testing.assert_allclose(dz[1, 0], [0, 7 / 3, 0], rtol=1e-6)
  np.testing.assert_allclose(dz[:, 1:], 0.0)
  alpha, c = rotograd.magnitude_weights(jnp.array([3.0, 1.0]), jnp.array([3.0, 2.0]))
  np.testing.assert_allclose(alpha, [2 / 3, 1 / 3], rtol=1e-6)
  np.testing.assert_allclose(c, 7 / 3, rtol=1e-6)
  # A task without gradient stays without gradient and does not count.
  _, (dz, _, _) = _rotation_grads(z, gens, jnp.zeros(N), u.at[1].set(0.0))
  np.testing.assert_allclose(dz, u.at[1].set(0.0), rtol=1e-6)
  # With rotations, the gradient w.r.t. z is R_k^T u_k before rescaling (norms unchanged).
  gens = gens.at[0, 0, 1].set(0.3)
  _, (dz, _, norms) = _rotation_grads(z, gens, jnp.zeros(N), u)
  rot = _rotations(gens)
  np.testing.assert_allclose(norms, [3.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(dz[0, 0], 2 / 3 * rot[0].T @ np.array([3.0, 0, 0]), rtol=1e-5)


def test_rotation_update_aligns_task_gradients_with_the_common_direction():
  # Fixed toy problem: linear heads, so U_k = w_k on every row and G_k = R_k^T w_k; the two
  # task gradients start in conflict (cosine -0.5).
  w = np.array([[1.0, 0.0, 0.0], [-0.5, 0.5 * np.sqrt(3.0), 0.0]])
  u = jnp.asarray(np.broadcast_to(w[:, None, :], (N, B, D)), jnp.float32)
  z = jnp.zeros((N, B, D))

  def cosines(gens):  # cos(g_k, v), with the rotations by scipy
    g = np.einsum("nij,ni->nj", scipy.linalg.expm(gens - np.swapaxes(gens, 1, 2)), w)
    v = (g / np.linalg.norm(g, axis=1, keepdims=True)).mean(0)
    return g @ v / (np.linalg.norm(g, axis=1) * np.linalg.norm(v))

  gens = jnp.zeros((N, D, D))
  history = [cosines(np.asarray(gens, np.float64))]
  for _ in range(4):
    _, (_, d_gens, _) = _rotation_grads(z, gens, jnp.zeros(N), u)
    gens = gens - 0.1 * d_gens
    history.append(cosines(np.asarray(gens, np.float64)))
  history = np.stack(history)  # [steps + 1, N]: every task's cosine rises at every step
  assert np.all(np.diff(history, axis=0) > 0), history
  assert np.all(history[-1] > history[0] + 0.05), history

  # The generators' "gradient" is that of L_rot = sum_k mean_b ||R_k v - u_kb||^2 (v fixed):
  # central differences in float64 through scipy's expm, at the rotations reached.
  gens = np.asarray(gens, np.float64)
  u64 = np.asarray(u, np.float64)
  expm = lambda a: scipy.linalg.expm(a - np.swapaxes(a, 1, 2))
  gbar = np.einsum("nij,nbi->nbj", expm(gens), u64).mean(1)
  v = (gbar * np.linalg.norm(gbar.mean(0)) / np.linalg.norm(gbar, axis=1, keepdims=True)).mean(0)
  l_rot = lambda a: np.sum(np.mean(np.sum((np.einsum("nij,j->ni", expm(a), v)[:, None]
                                           - u64) ** 2, -1), 1))
  numeric = np.zeros_like(gens)
  for idx in np.ndindex(*gens.shape):
    e = np.zeros_like(gens)
    e[idx] = 1e-6
    numeric[idx] = (l_rot(gens + e) - l_rot(gens - e)) / 2e-6
  _, (_, d_gens, _) = _rotation_grads(z, jnp.asarray(gens, jnp.float32), jnp.zeros(N), u)
  np.testing.assert_allclose(d_gens, numeric, atol=1e-4)
  assert np.abs(numeric).max() > 0.1


def test_reference_norms_are_set_not_stepped():
  tx = rotograd.reference_norms_update(burn_in_period=3)
  ref = jnp.zeros(2)
  state = tx.init(ref)
  seen = []
  for step_norms in ([3.0, 0.0], [5.0, 2.0], [4.0, 4.0], [6.0, 1.0], [7.0, 7.0]):
    upd, state = tx.update(jnp.array(step_norms), state, ref)
    ref = optax.apply_updates(ref, upd)
    seen.append(np.asarray(ref).tolist())
  # Step 0 sets task 0 (task 1 had no gradient: still unset); step 1 sets task 1; step 2
  # (= burn_in - 1) unsets both; step 3 (= burn_in) is the new reference, kept after.
  assert seen == [[3.0, 0.0], [3.0, 2.0], [0.0, 0.0], [6.0, 1.0], [6.0, 1.0]]
  labels = rotograd.rotograd_labels({"rotograd": {rotograd.GENERATORS: 0,
                                                  rotograd.REFERENCE_NORMS: 0},
                                     "head": {"kernel": 0}})
  assert labels == {"rotograd": {rotograd.GENERATORS: "rotation",
                                 rotograd.REFERENCE_NORMS: "reference"},
                    "head": {"kernel": "model"}}
  assert ldro.rotograd_optimizer is rotograd.rotograd_optimizer  # the package exports
  assert ldro.TaskRotations is rotograd.TaskRotations


def test_layer_input_errors_and_row_form():
  layer = rotograd.TaskRotations(2)
  z = jnp.arange(12.0).reshape(2, 2, 3)
  gens = jnp.stack([jnp.zeros((3, 3)), jnp.array([[0, 0.4, 0], [0, 0, 0], [0, 0, 0.]])])
  variables = {"params": {rotograd.GENERATORS: gens, rotograd.REFERENCE_NORMS: jnp.zeros(2)}}
  grouped, rows = jax.jit(lambda v: (layer.apply(v, z), layer.apply(
      v, z.reshape(4, 3), tasks=jnp.array([0, 0, 1, 1]))))(variables)
  np.testing.assert_allclose(rows, grouped.reshape(4, 3), rtol=1e-6)
  assert not np.allclose(grouped[1], z[1])  # task 1 rotated
  with pytest.raises(ValueError, match="task-grouped representation has 3 tasks"):
    layer.apply(variables, jnp.zeros((3, 2, 3)))
  with pytest.raises(ValueError, match="tasks \\[B\\]"):
    layer.apply(variables, jnp.zeros((4, 3)))
  model = cnn.ConvNet(num_classes=2, features=2, num_conv=1, mlp_width=3, mlp_layers=1,
                      rotograd=True, num_tasks=2)
  with pytest.raises(ValueError, match="needs each image's task"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 3)))


def _decode_with_pil(image_dir, splits):
  """``ldro.data.images._decode_image_folder`` by PIL (sorted classes and files), no TensorFlow.

  The test is about RotoGrad, not decoding: this spares it TensorFlow's import (seconds).
  """
  classes = sorted({c.name for s in image_dir.iterdir() if s.is_dir()
                    for c in s.iterdir() if c.is_dir()})
  arrays = {}
  for split in splits:
    files = [(i, f) for i, c in enumerate(classes)
             for f in sorted((image_dir / split / c).iterdir())]
    arrays[f"{split}_images"] = np.stack([np.asarray(PIL_Image.open(f).convert("RGB"))
                                          for _, f in files]).astype(np.uint8)
    arrays[f"{split}_labels"] = np.array([i for i, _ in files], np.int32)
  return classes, arrays


def test_image_run_with_rotograd(tmp_path, monkeypatch, gin_config, image_folder):
  """End to end on tiny images: method 'equal', lean mode, the rotations trained and orthogonal."""
  from experiments.families import image as image_experiment  # pylint: disable=g-import-not-at-top
  from experiments.runner import loop  # pylint: disable=g-import-not-at-top
  from ldro.data import images as images_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(images_lib, "_decode_image_folder", _decode_with_pil)
  root = image_folder(n_train=4, n_test=2)
  base = [f"DATA_DIR = {str(root)!r}", "MODEL = 'tiny'", "NUM_STEPS = 2", "EVAL_EVERY = 2",
          "ImageClassificationExperiment.batch_size = 4",
          "ImageClassificationExperiment.eval_batch_size = 8",
          "ImageClassificationExperiment.pairs = [['cat', 'dog'], ['bird', 'frog']]"]
  files = ["gin_configs/cifar10_mtl/base.gin", "gin_configs/methods/rotograd.gin"]
  gin_config(files, base)
  exp = image_experiment.ImageClassificationExperiment()
  assert exp.rotograd and exp.model.rotograd and exp.model.num_tasks == 2
  transform = loop.build_transform(exp, None, "grouped", None, None)
  assert transform.mode == "lean" and not transform.needs_val
  with pytest.raises(ValueError, match="microbatches = 2: ImageClassificationExperiment: "
                                       "RotoGrad's backward pass"):
    loop.build_transform(exp, None, "grouped", None, None, microbatches=2)
  prog = loop.build_program(exp, transform, seed=0, mesh_shape=None)
  state = prog.state
  for step in range(2):
    state, metrics = prog.step_fn(state, loop.step_batch(exp, prog, step))
  assert bool(metrics["finite"])
  np.testing.assert_allclose(metrics["task_weights"], [0.5, 0.5])
  rg = jax.device_get(state.params["params"]["rotograd"])
  rot = np.asarray(rotograd.rotation_matrices(rg[rotograd.GENERATORS]))
  assert rot.shape == (2, 16, 16) and np.abs(rot - np.eye(16)).max() > 1e-6  # Adam moved them
  np.testing.assert_allclose(np.einsum("nji,njk->nik", rot, rot),
                             np.broadcast_to(np.eye(16), rot.shape), atol=1e-5)
  assert np.all(rg[rotograd.REFERENCE_NORMS] > 0)  # set at the first step
  ev = exp.evaluate(jax.device_get(state.params))  # each test image through its task's R_k
  assert len(ev["task_accuracy"]) == 2
  # Jacobian mode (vmap of task_loss over tasks) cannot see the other tasks: one clear error,
  # when the step is traced.
  jac_step = ldro_train.make_train_step(exp.task_loss, transform.tx, mode="jacobian")
  with pytest.raises(ValueError, match="RotoGrad .* use lean mode"):
    jax.eval_shape(jac_step, state, exp.train_batch(0))
