"""CAGrad (Liu et al., 2021) on the task-weighting core."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy.optimize import minimize

import ldro
from ldro import gradient_balancing as gb

import method_helpers

cagrad_coefficients = jax.jit(gb.cagrad_coefficients, static_argnames=("max_iter",))


def dual_objective(w, G, c):
  b = np.full(len(G), 1 / len(G))
  return w @ G @ b + c * np.sqrt(b @ G @ b) * np.sqrt(max(w @ G @ w, 0.0))


def reference_w(G, c):
  """The official code's solver (SLSQP from uniform weights) plus a 3-task grid, float64."""
  n = len(G)
  res = minimize(lambda w: dual_objective(w, G, c), np.full(n, 1 / n), bounds=[(0, 1)] * n,
                 constraints=({"type": "eq", "fun": lambda w: 1 - w.sum()},), method="SLSQP",
                 options={"ftol": 1e-14, "maxiter": 1000})
  best_w, best = res.x, res.fun
  if n == 3:  # brute force on a grid of the simplex
    a, b = np.meshgrid(np.linspace(0, 1, 401), np.linspace(0, 1, 401))
    W = np.stack([a.ravel(), b.ravel(), 1 - a.ravel() - b.ravel()], axis=1)
    W = W[W[:, 2] >= 0]
    mean = np.full(n, 1 / n)
    f = W @ G @ mean + c * np.sqrt(mean @ G @ mean) * np.sqrt(
        np.maximum(np.einsum("ki,ij,kj->k", W, G, W), 0.0))
    if f.min() < best:
      best_w, best = W[np.argmin(f)], f.min()
  return best_w, best


def test_c_zero_is_the_mean_gradient_exactly():
  rng = np.random.default_rng(0)
  J = rng.normal(size=(8, 7))
  for rescale in (0, 1, 2):
    c, info = cagrad_coefficients(jnp.asarray(J @ J.T, jnp.float32), c=0.0, rescale=rescale)
    np.testing.assert_array_equal(c, np.full(8, 1 / 8, np.float32))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_three_tasks_against_scipy_and_grid(seed):
  rng = np.random.default_rng(seed)
  J = rng.normal(size=(3, 4)) * np.exp(rng.normal(size=(3, 1)))
  G = J @ J.T
  w_ref, f_ref = reference_w(G, 0.5)
  coef, info = cagrad_coefficients(jnp.asarray(G, jnp.float32), c=0.5, rescale=0)
  assert bool(info.converged)
  # Recover w from the coefficients: coef = b + (r / ||g_w||) w, w on the simplex.
  lam_w = np.asarray(coef, np.float64) - 1 / 3
  w = lam_w / lam_w.sum()
  assert dual_objective(w, G, 0.5) <= f_ref + 1e-6 * abs(f_ref) + 1e-7
  # The update formula in float64 from the reference solution.
  g0 = J.mean(0)
  gw = J.T @ w_ref
  d_ref = g0 + 0.5 * np.linalg.norm(g0) / np.linalg.norm(gw) * gw
  np.testing.assert_allclose(J.T @ np.asarray(coef, np.float64), d_ref, rtol=2e-3,
                             atol=2e-3 * np.linalg.norm(d_ref))


def test_primal_properties_and_rescale():
  rng = np.random.default_rng(5)
  n = 8
  J = rng.normal(size=(n, 20)) + 0.2 * rng.normal(size=20)
  G = jnp.asarray(J @ J.T, jnp.float32)
  c0, info = cagrad_coefficients(G, c=0.5, rescale=0)
  assert bool(info.converged) and float(info.residual) <= 1e-6
  d = J.T @ np.asarray(c0, np.float64)
  g0 = J.mean(0)
  # d is on the ball ||d - g0|| = c ||g0|| and improves the worst task over g0.
  np.testing.assert_allclose(np.linalg.norm(d - g0), 0.5 * np.linalg.norm(g0), rtol=1e-4)
  assert (J @ d).min() >= (J @ g0).min()
  # ... and it is the primal optimum: no point of the ball does better (sampled).
  dirs = rng.normal(size=(2000, 20))
  dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
  others = g0 + 0.5 * np.linalg.norm(g0) * dirs
  assert (others @ J.T).min(axis=1).max() <= (J @ d).min() + 1e-4
  c1, _ = cagrad_coefficients(G, c=0.5, rescale=1)
  c2, _ = cagrad_coefficients(G, c=0.5, rescale=2)
  np.testing.assert_allclose(c1, c0 / 1.25, rtol=1e-6)
  np.testing.assert_allclose(c2, c0 / 1.5, rtol=1e-6)


def test_degenerate_inputs_and_mask():
  # Opposite gradients: 0 is in the hull; finite, and the mean is 0.
  J = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 0.0]])
  c, _ = cagrad_coefficients(jnp.asarray(J @ J.T, jnp.float32))
  assert np.all(np.isfinite(c))
  c, _ = cagrad_coefficients(jnp.zeros((3, 3)))
  np.testing.assert_allclose(c, np.full(3, 1 / 3) / 1.25)
  rng = np.random.default_rng(6)
  J = rng.normal(size=(4, 6))
  J[3] = 0.0
  mask = jnp.array([True, True, True, False])
  c, _ = cagrad_coefficients(jnp.asarray(J @ J.T, jnp.float32), mask)
  c_ref, _ = cagrad_coefficients(jnp.asarray(J[:3] @ J[:3].T, jnp.float32))
  assert float(c[3]) == 0.0
  np.testing.assert_allclose(np.asarray(c)[:3], c_ref, rtol=1e-5)


def test_modes_agree_inject_hyperparams_and_registry():
  info = ldro.method_info("cagrad")
  assert info.label == "CAGrad" and info.needs == {"gram"}
  assert info.defaults["c"] == 0.5 and info.defaults["rescale"] == 1
  with pytest.raises(ValueError, match="c must be"):
    ldro.cagrad(3, c=-1.0)
  with pytest.raises(ValueError, match="rescale"):
    ldro.cagrad(3, rescale=3)
  n = 4
  injected = optax.inject_hyperparams(ldro.cagrad, static_args=("num_tasks",))(num_tasks=n, c=0.5)
  make = functools.partial(ldro.get_method, "cagrad", num_tasks=n)
  for states, _, _ in method_helpers.modes_agree(make, extra_txs=[injected]):
    assert bool(states[0].method_state.converged)
