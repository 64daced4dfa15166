"""UPGrad (Quinton & Rey, 2024) on the task-weighting core."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import nnls

import ldro
from ldro import gradient_balancing as gb

import method_helpers

upgrad_coefficients = jax.jit(gb.upgrad_coefficients, static_argnames=("max_iter",))


def nnls_reference(G, p, norm_eps=1e-4, reg_eps=1e-4):
  """torchjd's weights in float64: v_i = argmin_{v >= p_i e_i} v^T Gn v via NNLS on Gn = L L^T."""
  n = len(G)
  tr = np.trace(G)
  Gn = (np.zeros_like(G) if tr < norm_eps else G / tr) + reg_eps * np.eye(n)
  L = np.linalg.cholesky(Gn)
  out = np.zeros(n)
  for i in range(n):
    u = np.zeros(n)
    u[i] = p[i]
    z, _ = nnls(L.T, -L.T @ u)  # min ||L^T (u + z)||, z >= 0
    out += u + z
  return out


def test_two_tasks_hand_checked():
  # Dual cone of g1 = (1, 0), g2 = (-1, 1): {x1 >= 0, x2 >= x1}. pi(g1/2) = (1/4, 1/4),
  # pi(g2/2) = (0, 1/2); d = (1/4, 3/4) = 1.0 g1 + 0.75 g2.
  J = np.array([[1.0, 0.0], [-1.0, 1.0]])
  c, info = upgrad_coefficients(jnp.asarray(J @ J.T, jnp.float32), reg_eps=0.0)
  np.testing.assert_allclose(c, [1.0, 0.75], rtol=1e-6)
  assert bool(info.converged) and float(info.residual) == 0.0


@pytest.mark.parametrize("n,p,seed", [(3, 5, 0), (6, 4, 1), (8, 30, 2)])
def test_matches_qp_reference_and_is_non_conflicting(n, p, seed):
  rng = np.random.default_rng(seed)
  J = rng.normal(size=(n, p)) * np.exp(rng.normal(size=(n, 1))) - 0.3 * rng.normal(size=p)
  G = J @ J.T
  pref = np.full(n, 1 / n)
  c, info = upgrad_coefficients(jnp.asarray(G, jnp.float32))
  assert bool(info.converged)
  np.testing.assert_allclose(c, nnls_reference(G, pref), rtol=1e-3, atol=1e-5)
  # d . g_j >= 0 for every task (up to the ridge reg_eps and float32).
  assert np.all(G @ np.asarray(c, np.float64) >= -1e-4 * np.trace(G) / n)


def test_non_conflicting_gradients_give_the_preference_weights():
  rng = np.random.default_rng(3)
  J = np.abs(rng.normal(size=(5, 9)))  # all pairwise inner products >= 0
  G = jnp.asarray(J @ J.T, jnp.float32)
  c, _ = upgrad_coefficients(G)
  np.testing.assert_allclose(c, np.full(5, 0.2), rtol=1e-6)  # the mean
  pref = np.array([0.5, 0.1, 0.1, 0.2, 0.1], np.float32)
  c, _ = upgrad_coefficients(G, pref_vector=pref)
  np.testing.assert_allclose(c, pref, rtol=1e-6)


def test_norm_eps_threshold_as_torchjd():
  # trace(G) < norm_eps: torchjd does not normalise (Gn = reg_eps I) and returns the mean.
  J = 1e-3 * np.array([[1.0, 0.0], [-1.0, 0.5]])
  G = jnp.asarray(J @ J.T, jnp.float32)
  np.testing.assert_allclose(upgrad_coefficients(G)[0], [0.5, 0.5])
  c, _ = upgrad_coefficients(G, norm_eps=0.0)  # projected at any scale
  np.testing.assert_allclose(c, nnls_reference(np.asarray(G, np.float64), [0.5, 0.5], 0.0),
                             rtol=1e-4)


def test_degenerate_inputs_and_mask():
  for G in (jnp.zeros((3, 3)), jnp.ones((3, 3)), jnp.array([[2.0]]),
            jnp.diag(jnp.array([1e6, 1.0, 1.0]))):
    c, _ = upgrad_coefficients(G)
    assert np.all(np.isfinite(c))
  rng = np.random.default_rng(4)
  J = rng.normal(size=(4, 6))
  J[0] = 0.0
  c, _ = upgrad_coefficients(jnp.asarray(J @ J.T, jnp.float32),
                             jnp.array([False, True, True, True]))
  assert float(c[0]) == 0.0
  np.testing.assert_allclose(np.asarray(c)[1:], nnls_reference(J[1:] @ J[1:].T, np.full(3, 1 / 3)),
                             rtol=1e-3, atol=1e-5)


def test_modes_agree_and_registry():
  info = ldro.method_info("upgrad")
  assert info.label == "UPGrad" and info.needs == {"gram"}
  with pytest.raises(ValueError, match="pref_vector"):
    ldro.upgrad(3, pref_vector=[1.0, np.nan, 0.0])
  n = 4
  make = functools.partial(ldro.get_method, "upgrad", num_tasks=n)
  for states, grads, _ in method_helpers.modes_agree(make):
    g = np.asarray(grads["w"], np.float64)
    np.testing.assert_allclose(ldro.task_weights(states[0]),
                               nnls_reference(g @ g.T, np.full(n, 1 / n)), rtol=1e-3, atol=1e-5)
    assert bool(states[0].method_state.converged)
