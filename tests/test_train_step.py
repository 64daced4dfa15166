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
