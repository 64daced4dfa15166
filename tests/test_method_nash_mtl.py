"""Nash-MTL (Navon et al., ICML 2022): G alpha = 1/alpha, refresh schedule, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize

import ldro
from ldro import bargaining


def tree(A):
  return {"w": jnp.asarray(A, jnp.float32)}


def jit_update(tx, params):
  return jax.jit(lambda g, s: tx.update(g, s, params))


def scipy_nash(G):
  """Independent float64 reference: a root of G a - 1/a, in log space."""
  n = G.shape[0]
  x0 = -0.5 * np.log(np.diag(G))
  sol = scipy.optimize.root(lambda x: np.exp(x) * (G @ np.exp(x)) - 1.0, x0, tol=1e-13)
  assert sol.success
  return np.exp(sol.x)


def test_solution_satisfies_g_alpha_equals_one_over_alpha():
  rng = np.random.default_rng(0)
  A = rng.normal(size=(5, 8)) * np.array([1.0, 3.0, 0.2, 1.0, 10.0])[:, None]
  G = A @ A.T
  sol = jax.jit(ldro.nash_mtl_solve)(jnp.asarray(G, jnp.float32))
  alpha = np.asarray(sol.alpha, np.float64)
  assert np.all(alpha > 0)
  np.testing.assert_allclose(G @ alpha, 1.0 / alpha, rtol=1e-4)
  np.testing.assert_allclose(alpha, scipy_nash(G), rtol=1e-4)
  assert bool(sol.converged) and float(sol.residual) < 1e-4
  # ||d||^2 = alpha^T G alpha = N at the solution.
  np.testing.assert_allclose(alpha @ G @ alpha, 5.0, rtol=1e-4)


def test_orthogonal_gradients_give_inverse_norms():
  norms = np.array([0.5, 2.0, 30.0])
  A = np.diag(norms)  # orthogonal task gradients
  # max_norm is a traced hyper-parameter here: one compilation for both runs.
  params = tree(np.zeros(3))
  update = jax.jit(lambda g, m: ldro.nash_mtl(3, max_norm=m).update(
      g, ldro.nash_mtl(3).init(params), params))
  out, state = update(tree(A), 0.0)
  np.testing.assert_allclose(ldro.task_weights(state), 1.0 / norms, rtol=1e-5)
  np.testing.assert_allclose(out["w"], np.ones(3), rtol=1e-5)  # sum_i g_i / ||g_i||
  # With the default max_norm = 1 the update norm sqrt(N) is clipped to 1.
  out, state = update(tree(A), 1.0)
  np.testing.assert_allclose(ldro.task_weights(state), 1.0 / norms / np.sqrt(3), rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(out["w"]), 1.0, rtol=1e-5)


def test_update_is_invariant_to_task_loss_scales():
  rng = np.random.default_rng(1)
  A = rng.normal(size=(4, 6))
  s = np.array([1.0, 100.0, 0.01, 3.0])
  tx = ldro.nash_mtl(4)
  params = tree(np.zeros(6))
  update = jit_update(tx, params)
  out, st = update(tree(A), tx.init(params))
  out_s, st_s = update(tree(A * s[:, None]), tx.init(params))
  np.testing.assert_allclose(out_s["w"], out["w"], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ldro.task_weights(st_s)) * s, ldro.task_weights(st),
                             rtol=1e-4)


def test_refresh_every_k_keeps_alpha_between_refreshes():
  rng = np.random.default_rng(2)
  grads = [rng.normal(size=(3, 5)) for _ in range(6)]
  tx = ldro.nash_mtl(3, update_weights_every=3)
  params = tree(np.zeros(5))
  step = jax.jit(lambda g, s, m: tx.update(g, s, params, task_mask=m))
  state = tx.init(params)
  every = np.ones(3, bool)
  cs, alphas, outs = [], [], []
  for t, A in enumerate(grads):
    mask = np.array([True, False, True]) if t == 4 else every
    out, state = step(tree(A), state, mask)
    cs.append(np.asarray(ldro.task_weights(state)))
    alphas.append(np.asarray(state.method_state.alpha))
    outs.append(np.asarray(out["w"]))
  for t in (0, 3):  # refresh steps solve on that step's gradients
    G = grads[t] @ grads[t].T
    np.testing.assert_allclose(alphas[t], scipy_nash(G), rtol=1e-4)
    c = alphas[t] * min(1.0, 1.0 / np.sqrt(alphas[t] @ G @ alphas[t]))
    np.testing.assert_allclose(cs[t], c, rtol=1e-4)
  np.testing.assert_allclose(alphas[1], alphas[0])
  np.testing.assert_allclose(alphas[2], alphas[0])
  np.testing.assert_allclose(cs[1], cs[0])
  np.testing.assert_allclose(cs[2], cs[0])
  np.testing.assert_allclose(alphas[4], alphas[3])
  np.testing.assert_allclose(alphas[5], alphas[3])
  assert not np.allclose(alphas[3], alphas[0])
  # Ordinary steps combine the current gradients with the stored coefficients;
  # an absent task gets coefficient 0 there.
  np.testing.assert_allclose(outs[1], cs[0] @ grads[1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(cs[4], cs[3] * np.array([1.0, 0.0, 1.0]), rtol=1e-6)


def test_lean_mode_matches_jacobian_mode_with_refresh_schedule():
  rng = np.random.default_rng(3)
  B = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  params = {"w": jnp.asarray(rng.normal(size=(4,)), jnp.float32)}

  def losses_fn(p):
    z = B @ p["w"]
    return 0.5 * z * z + jnp.array([0.1, 0.2, 0.3])

  tx = ldro.nash_mtl(3, update_weights_every=2)

  @jax.jit
  def run_jacobian(p, s):
    u, s = tx.update(jax.jacrev(losses_fn)(p), s, p)
    return jax.tree.map(lambda a, b: a - 0.1 * b, p, u), s

  @jax.jit
  def run_lean(p, s):
    _, vjp = jax.vjp(losses_fn, p)
    u, s = tx.update(None, s, p, task_vjp=vjp, task_grads_fn=lambda: jax.jacrev(losses_fn)(p))
    return jax.tree.map(lambda a, b: a - 0.1 * b, p, u), s

  def run(mode):
    p, s = params, tx.init(params)
    for _ in range(4):
      p, s = (run_jacobian if mode == "jacobian" else run_lean)(p, s)
    return p["w"], ldro.task_weights(s)

  ref, got = run("jacobian"), run("lean")
  np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-6)


def test_zero_gradient_and_absent_tasks_are_left_out():
  rng = np.random.default_rng(4)
  A = rng.normal(size=(4, 6))
  A[1] = 0.0
  G = A @ A.T
  sol = jax.jit(ldro.nash_mtl_solve)(jnp.asarray(G, jnp.float32),
                                     present=jnp.array([True, True, True, False]))
  keep = [0, 2]
  assert float(sol.alpha[1]) == 0.0 and float(sol.alpha[3]) == 0.0
  np.testing.assert_allclose(np.asarray(sol.alpha)[keep], scipy_nash(G[np.ix_(keep, keep)]),
                             rtol=1e-4)
  assert bool(sol.converged)


def test_non_convergence_is_reported_with_finite_coefficients():
  # g_1 = -g_2: 0 is in the gradients' convex cone, G alpha = 1/alpha has no solution.
  A = np.array([[1.0, 2.0], [-1.0, -2.0]])
  tx = ldro.nash_mtl(2)
  params = tree(np.zeros(2))
  update = jit_update(tx, params)
  out, state = update(tree(A), tx.init(params))
  assert not bool(state.method_state.solver_converged)
  assert float(state.method_state.solver_residual) > 1e-3
  assert np.all(np.isfinite(ldro.task_weights(state))) and np.all(np.isfinite(out["w"]))
  # A well-posed problem reports convergence.
  _, state = update(tree(np.eye(2)), tx.init(params))
  assert bool(state.method_state.solver_converged)


def test_hyperparameters_are_validated():
  with pytest.raises(ValueError, match="optim_niter must be in"):
    ldro.nash_mtl(3, optim_niter=0)
  with pytest.raises(ValueError, match="max_norm must be in"):
    ldro.nash_mtl(3, max_norm=-1.0)
  with pytest.raises(ValueError, match="update_weights_every must be a whole number"):
    ldro.nash_mtl(3, update_weights_every=1.5)
  info = ldro.method_info("nash_mtl")
  assert dict(info.defaults) == {"update_weights_every": 1, "optim_niter": 20, "max_norm": 1.0}
  assert info.modes == ("jacobian", "lean")


def test_clip_scale_formula():
  G = jnp.asarray(np.diag([4.0, 9.0]), jnp.float32)
  alpha = jnp.array([0.5, 1.0 / 3.0])  # ||d||^2 = 2
  np.testing.assert_allclose(bargaining.clip_scale(G, alpha, 1.0), 1 / np.sqrt(2), rtol=1e-6)
  assert float(bargaining.clip_scale(G, alpha, 5.0)) == 1.0
  assert float(bargaining.clip_scale(G, alpha, 0.0)) == 1.0
