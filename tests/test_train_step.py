"""ldro.train.make_train_step: the modes and Gram strategies give the same training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ldro
from ldro import train as ldro_train

N, B, D = 4, 3, 5


def _problem():
  rng = np.random.default_rng(0)
  batch = {"x": jnp.asarray(rng.normal(size=(N, B, D)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=(N, B)) * np.arange(1, N + 1)[:, None], jnp.float32)}
  params = {"w": jnp.zeros(D), "b": jnp.zeros([])}

  def task_loss(params, task_batch, rng):
    del rng
    r = task_batch["x"] @ params["w"] + params["b"] - task_batch["y"]
    return 0.5 * jnp.mean(r * r), {}

  def losses_fn(params, batch, rng):  # all task losses in one call (flat batch)
    del rng
    r = batch["x"].reshape(-1, D) @ params["w"] + params["b"] - batch["y"].reshape(-1)
    return 0.5 * jnp.mean((r * r).reshape(N, B), axis=1), {}

  return params, batch, task_loss, losses_fn


@pytest.mark.parametrize("method,kw", [("ldro", {"update_every": 3}),
                                       ("ldro_exact", {"update_every": 2})])
def test_modes_and_strategies_train_alike(method, kw):
  # Lean mode with the grouped strategy can reuse the refresh step's N
  # gradients for its update (task_grads_fn) or do a second backward pass, as
  # with pairwise; Jacobian mode has the N gradients every step. All train alike.
  params, batch, task_loss, losses_fn = _problem()
  results = {}
  for label, mode, strategy, lfn, reuse in [
      ("jacobian", "jacobian", "grouped", None, None),
      ("lean grouped, reuse", "lean", "grouped", losses_fn, True),
      ("lean grouped vmap, reuse", "lean", "grouped", None, True),
      ("lean grouped, second pass", "lean", "grouped", losses_fn, False),
      ("lean pairwise", "lean", "pairwise", losses_fn, None)]:
    tx = optax.chain(ldro.get_method(method, num_tasks=N, lookahead_lr=0.05, weight_lr=0.3,
                                     **kw), optax.sgd(0.05))
    step = jax.jit(ldro_train.make_train_step(task_loss, tx, mode=mode, gram_strategy=strategy,
                                              losses_fn=lfn, reuse_refresh_grads=reuse))
    state = ldro_train.init_train_state(params, tx, jax.random.key(0))
    for _ in range(7):
      state, metrics = step(state, batch)
      assert bool(metrics["finite"])
    results[label] = (state.params, ldro.task_weights(state.opt_state))
  # The exact variant's weights sit near a vertex of the simplex, where the
  # max-entropy solve resolves tiny weights (~1e-5) only to its float32 tolerance.
  tol, w_atol = (2e-3, 1e-4) if method == "ldro_exact" else (1e-5, 1e-5)
  ref_params, ref_w = results["jacobian"]
  for label, (p, w) in results.items():
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=tol, atol=1e-6,
                                                         err_msg=label), p, ref_params)
    np.testing.assert_allclose(w, ref_w, rtol=tol, atol=w_atol, err_msg=label)
  assert not np.allclose(ref_w, 1.0 / N)  # the weights did move


def test_gram_method_in_lean_mode_with_gradient_reuse():
  # A method that needs the Gram matrix every step (PCGrad) takes it, and its
  # update, from the train step's task_grads_fn in lean mode, as in Jacobian mode.
  params, batch, task_loss, losses_fn = _problem()
  out = {}
  for mode, reuse in (("jacobian", None), ("lean", True), ("lean", False)):
    tx = optax.chain(ldro.pcgrad(N), optax.sgd(0.1))
    step = jax.jit(ldro_train.make_train_step(task_loss, tx, mode=mode, losses_fn=losses_fn,
                                              reuse_refresh_grads=reuse))
    state = ldro_train.init_train_state(params, tx, jax.random.key(0))
    for _ in range(3):
      state, metrics = step(state, batch)
      assert bool(metrics["finite"])
    out[(mode, reuse)] = state.params["w"]
  for key, w in out.items():
    np.testing.assert_allclose(w, out[("jacobian", None)], rtol=1e-5, atol=1e-7,
                               err_msg=str(key))


@pytest.mark.parametrize("with_count", [False, True])
def test_microbatches_accumulate_the_whole_batch_step(with_count):
  """Gradient accumulation: 2 or 4 micro-batches give the whole batch's losses, weights and
  update in Jacobian and lean mode (refresh steps too); with aux counts the micro-batches
  are weighted by their examples (here some masked out)."""
  rng = np.random.default_rng(1)
  b = 4
  batch = {"x": jnp.asarray(rng.normal(size=(N, b, D)), jnp.float32),
           "y": jnp.asarray(rng.normal(size=(N, b)), jnp.float32),
           "m": jnp.asarray([[1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 1, 0], [1, 1, 1, 1]],
                            jnp.float32)}
  params = {"w": jnp.zeros(D), "b": jnp.zeros([])}

  def task_loss(p, tb, key):
    del key
    r = tb["x"] @ p["w"] + p["b"] - tb["y"]
    if not with_count:
      return 0.5 * jnp.mean(r * r), {}
    count = tb["m"].sum()
    # a per-task ratio in aux: combined with the micro-batches' example shares
    frac = jnp.sum(tb["m"] * (r > 0)) / jnp.maximum(count, 1.0)
    return 0.5 * jnp.sum(tb["m"] * r * r) / jnp.maximum(count, 1.0), {"count": count,
                                                                       "frac": frac}

  def run(mode, k, reuse=None):
    tx = optax.chain(ldro.get_method("ldro", num_tasks=N, lookahead_lr=0.05, weight_lr=0.3,
                                     update_every=2), optax.sgd(0.05))
    step = jax.jit(ldro_train.make_train_step(task_loss, tx, mode=mode, microbatches=k,
                                              reuse_refresh_grads=reuse))
    state = ldro_train.init_train_state(params, tx, jax.random.key(0))
    for _ in range(3):  # refresh, ordinary, refresh
      state, metrics = step(state, batch)
    return state, metrics

  ref, ref_m = run("jacobian", 1)
  cases = [("jacobian", 4, None), ("lean", 2, True), ("lean", 4, False)]
  for mode, k, reuse in cases if with_count else cases[1:]:
    got, got_m = run(mode, k, reuse)
    np.testing.assert_allclose(got_m["task_losses"], ref_m["task_losses"], rtol=1e-5,
                               err_msg=f"{mode} {k}")
    np.testing.assert_allclose(ldro.task_weights(got.opt_state),
                               ldro.task_weights(ref.opt_state), rtol=1e-5, atol=1e-7)
    for a, c in zip(jax.tree.leaves(got.params), jax.tree.leaves(ref.params)):
      np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-6, err_msg=f"{mode} {k}")
    if with_count:
      np.testing.assert_array_equal(got_m["count"], ref_m["count"])
      np.testing.assert_allclose(got_m["frac"], ref_m["frac"], rtol=1e-6)


def test_split_microbatches_is_strided():
  batch = {"x": jnp.arange(2 * 6).reshape(2, 6), "task": jnp.arange(2)}
  micro = ldro_train.split_microbatches(batch, 3)
  np.testing.assert_array_equal(micro["x"][0], [[0, 3], [6, 9]])  # examples 0, 3 per task
  np.testing.assert_array_equal(micro["x"][2], [[2, 5], [8, 11]])
  np.testing.assert_array_equal(micro["task"], [[0, 1]] * 3)  # per-task leaves: whole


def test_microbatches_bad_input():
  params, batch, task_loss, _ = _problem()  # B = 3 examples per task
  tx = optax.chain(ldro.get_method("ldro", num_tasks=N, lookahead_lr=0.05, weight_lr=0.3),
                   optax.sgd(0.05))
  step = ldro_train.make_train_step(task_loss, tx, microbatches=2)
  with pytest.raises(ValueError, match=r"divisible by 2; leaf \['x'\] has shape \(4, 3, 5\)"):
    step(ldro_train.init_train_state(params, tx, jax.random.key(0)), batch)
  with pytest.raises(ValueError, match="microbatches must be a whole number >= 1"):
    ldro_train.make_train_step(task_loss, tx, microbatches=0)
  with pytest.raises(ValueError, match="gram_strategy='grouped'.*'pairwise'"):
    ldro_train.make_train_step(task_loss, tx, mode="lean", gram_strategy="pairwise",
                               microbatches=2)


def test_runner_microbatches(tmp_path):
  """train_and_evaluate.microbatches: the toy experiment trains as with the whole batch; an
  experiment without an example axis (the synthetic tasks) is refused in one line."""
  import gin  # pylint: disable=g-import-not-at-top
  from experiments import train as train_lib  # pylint: disable=g-import-not-at-top
  from experiments.runner import loop  # pylint: disable=g-import-not-at-top

  def run(workdir, files, *bindings):
    gin.clear_config()
    train_lib.parse_gin(files, ["train_and_evaluate.num_steps = 6",
                                "train_and_evaluate.eval_every = 6", *bindings])
    return loop.train_and_evaluate(str(workdir), quiet=True)
  toy = ["gin_configs/toy/ldro.gin"]
  whole = run(tmp_path / "whole", toy)
  micro = run(tmp_path / "micro", toy, "train_and_evaluate.microbatches = 2")
  np.testing.assert_allclose(micro[-1]["task_loss"], whole[-1]["task_loss"], rtol=1e-4)
  with pytest.raises(ValueError, match="SyntheticExperiment: a task's batch is its fixed point"):
    run(tmp_path / "syn", ["gin_configs/synthetic/ldro.gin"], "train_and_evaluate.microbatches = 2")
  with pytest.raises(ValueError, match="train_and_evaluate.microbatches"):
    run(tmp_path / "zero", toy, "train_and_evaluate.microbatches = 0")
