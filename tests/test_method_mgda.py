"""MGDA (Sener & Koltun, 2018) on the task-weighting core."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

import ldro
from ldro import gradient_balancing as gb

import method_helpers

mgda_coefficients = jax.jit(gb.mgda_coefficients,
                            static_argnames=("normalization", "max_iter", "apply_to"))


def min_norm_reference(H):
  """min_{a in simplex} a^T H a in float64 (SLSQP, several starts)."""
  n = len(H)
  best = None
  for s in range(4):
    x0 = np.full(n, 1 / n) if s == 0 else np.random.default_rng(s).dirichlet(np.ones(n))
    res = minimize(lambda a: a @ H @ a, x0, jac=lambda a: 2 * H @ a, bounds=[(0, 1)] * n,
                   constraints=({"type": "eq", "fun": lambda a: a.sum() - 1},), method="SLSQP",
                   options={"ftol": 1e-15, "maxiter": 500})
    best = res if best is None or res.fun < best.fun else best
  return best.x, best.fun


@pytest.mark.parametrize("g1,g2", [
    ([1.0, 0.0, 0.0], [-0.5, 1.0, 0.0]),     # interior solution
    ([0.2, 0.1, 0.0], [1.0, 0.5, 2.0]),      # g1 . g2 >= g1 . g1: vertex g1
    ([3.0, -1.0, 2.0], [-1.0, 2.0, 0.5]),
])
def test_two_tasks_closed_form(g1, g2):
  g1, g2 = np.array(g1), np.array(g2)
  # argmin_gamma ||gamma g1 + (1 - gamma) g2||^2 over [0, 1]
  gamma = np.clip((g2 - g1) @ g2 / np.sum((g1 - g2) ** 2), 0, 1)
  J = np.stack([g1, g2])
  c, info = mgda_coefficients(jnp.asarray(J @ J.T, jnp.float32))
  np.testing.assert_allclose(c, [gamma, 1 - gamma], atol=1e-6)
  assert bool(info.converged)
  d = J.T @ np.asarray(c, np.float64)
  assert np.all(J @ d >= -1e-6)


def test_three_tasks_hand_checked():
  # Hull of (1,0), (0,1), (1,1): min-norm point (0.5, 0.5) on the first edge.
  J = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  c, info = mgda_coefficients(jnp.asarray(J @ J.T, jnp.float32))
  np.testing.assert_allclose(c, [0.5, 0.5, 0.0], atol=1e-6)
  assert bool(info.converged) and float(info.residual) < 1e-6


@pytest.mark.parametrize("normalization", gb.MGDA_NORMALIZATIONS)
def test_common_descent_and_min_norm(normalization):
  rng = np.random.default_rng(1)
  n, p = 6, 12
  J = rng.normal(size=(n, p)) * np.exp(rng.normal(size=(n, 1))) + 0.3 * rng.normal(size=p)
  losses = rng.uniform(0.5, 3.0, n)
  norms = {"none": np.ones(n), "l2": np.linalg.norm(J, axis=1), "loss": losses,
           "loss+": losses * np.linalg.norm(J, axis=1)}[normalization]
  Hn = J @ J.T / np.outer(norms, norms)
  _, best = min_norm_reference(Hn / np.trace(Hn))
  c, info = mgda_coefficients(
      jnp.asarray(J @ J.T, jnp.float32), jnp.asarray(losses, jnp.float32),
      normalization=normalization)
  alpha = np.asarray(c, np.float64) * norms
  np.testing.assert_allclose(alpha.sum(), 1.0, atol=1e-5)
  assert np.all(alpha >= 0)
  # The min-norm value, up to the reported Frank-Wolfe gap.
  value = alpha @ (Hn / np.trace(Hn)) @ alpha
  assert best - 1e-7 <= value <= best + float(info.residual) + 1e-6
  # d = sum_i c_i g_i: d . g_i >= 0 for every task (paper, Theorem 1), G c >= -tol.
  G = J @ J.T
  assert np.all(G @ np.asarray(c, np.float64) >= -1e-4 * np.max(np.diag(G)))
  # apply_to='raw' (the authors' script): the same alpha, on the raw gradients.
  raw, _ = mgda_coefficients(jnp.asarray(G, jnp.float32), jnp.asarray(losses, jnp.float32),
                             normalization=normalization, apply_to="raw")
  np.testing.assert_allclose(raw, alpha, rtol=1e-4, atol=1e-6)


def test_pareto_stationary_gives_zero_update():
  J = np.array([[1.0, 2.0], [-1.0, -2.0], [0.5, -1.0]])
  c, _ = mgda_coefficients(jnp.asarray(J @ J.T, jnp.float32))
  np.testing.assert_allclose(J.T @ np.asarray(c), 0.0, atol=1e-6)


def test_mask_excludes_absent_tasks():
  rng = np.random.default_rng(2)
  J = rng.normal(size=(5, 8))
  J[2] = 0.0  # absent: zero gradient; it must not become the min-norm vertex
  mask = jnp.array([True, True, False, True, True])
  c, _ = mgda_coefficients(jnp.asarray(J @ J.T, jnp.float32), mask=mask)
  keep = [0, 1, 3, 4]
  c_ref, _ = mgda_coefficients(jnp.asarray(J[keep] @ J[keep].T, jnp.float32))
  assert float(c[2]) == 0.0
  np.testing.assert_allclose(np.asarray(c)[keep], c_ref, atol=1e-6)


def test_apply_to_is_checked():
  with pytest.raises(ValueError, match="apply_to"):
    ldro.mgda(3, apply_to="both")


def test_losses_needed_only_for_loss_normalizations():
  assert "losses" in ldro.method_info("mgda").needs
  assert ldro.method_info("mgda").label == "MGDA"
  assert ldro.method_info("mgda").defaults["normalization"] == "loss+"  # the authors' config
  J = {"w": jnp.eye(3)}
  for normalization in ("none", "l2"):
    tx = ldro.mgda(3, normalization=normalization)
    jax.jit(tx.update)(J, tx.init({"w": jnp.zeros(3)}))  # no task_losses needed
  tx = ldro.mgda(3, normalization="loss+")
  with pytest.raises(ValueError, match="task_losses"):
    jax.jit(tx.update)(J, tx.init({"w": jnp.zeros(3)}))
  with pytest.raises(ValueError, match="normalization"):
    ldro.mgda(3, normalization="l1")
  with pytest.raises(ValueError, match="max_iter"):
    ldro.mgda(3, max_iter=2.5)


def test_modes_agree_and_state():
  make = functools.partial(ldro.get_method, "mgda", num_tasks=4, normalization="loss+")
  for states, grads, _ in method_helpers.modes_agree(make, lr=0.05, loss_offset=0.1,
                                                   pass_losses=True):
    for s in states[1:]:
      np.testing.assert_allclose(ldro.task_weights(s), ldro.task_weights(states[0]), rtol=1e-4,
                                 atol=1e-6)
    info = states[0].method_state
    assert isinstance(info, gb.SolverInfo) and info.converged.dtype == bool
    u = ldro.task_weights(states[0]) @ grads["w"]
    assert np.all(np.asarray(grads["w"] @ u) >= -1e-5)
