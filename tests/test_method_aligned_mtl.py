"""Aligned-MTL (Senushkin et al., 2023) on the task-weighting core."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ldro
from ldro import gradient_balancing as gb

import method_helpers

aligned = jax.jit(gb.aligned_mtl_coefficients, static_argnames=("scale_mode",))


def svd_reference(J, p, scale_mode="min"):
  """c = sigma U S^{-1} U^T p from the SVD of the explicit gradients J [N, P], float64."""
  U, S, _ = np.linalg.svd(J, full_matrices=False)
  r = int(np.sum(S ** 2 > S[0] ** 2 * len(J) * np.finfo(np.float32).eps))
  U, S = U[:, :r], S[:r]
  lam = S ** 2
  scale = {"min": lam.min(), "median": np.sort(lam)[(r - 1) // 2], "rmse": lam.mean()}[scale_mode]
  return np.sqrt(scale) * U @ np.diag(1 / S) @ U.T @ p


@pytest.mark.parametrize("scale_mode", gb.ALIGNED_MTL_SCALE_MODES)
@pytest.mark.parametrize("n,p", [(4, 10), (5, 3)])  # full rank; rank 3 < N
def test_matches_svd_formula(scale_mode, n, p):
  rng = np.random.default_rng(n + p)
  J = rng.normal(size=(n, p)) * np.exp(0.5 * rng.normal(size=(n, 1)))
  pref = np.full(n, 1 / n)
  c = aligned(jnp.asarray(J @ J.T, jnp.float32), scale_mode=scale_mode)
  np.testing.assert_allclose(c, svd_reference(J, pref, scale_mode), rtol=2e-3, atol=1e-5)


def test_aligned_system_has_equal_singular_values():
  rng = np.random.default_rng(7)
  J = rng.normal(size=(4, 12)) * np.array([[10.0], [1.0], [0.1], [3.0]])
  G = jnp.asarray(J @ J.T, jnp.float32)
  pref = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
  # B from its action on the basis vectors: B e_k = aligned coefficients for p = e_k.
  B = np.stack([np.asarray(aligned(G, pref_vector=e), np.float64) for e in np.eye(4)], axis=1)
  s = np.linalg.svd(B @ J, compute_uv=False)  # the aligned gradient matrix J_hat = B J
  np.testing.assert_allclose(s, s.min(), rtol=2e-3)
  np.testing.assert_allclose(s.min(), np.linalg.svd(J, compute_uv=False).min(), rtol=2e-3)
  np.testing.assert_allclose(aligned(G, pref_vector=pref), B @ pref, rtol=1e-5, atol=1e-7)


def test_degenerate_and_mask():
  np.testing.assert_allclose(aligned(jnp.zeros((3, 3))), np.full(3, 1 / 3))  # B = I
  np.testing.assert_allclose(aligned(jnp.array([[9.0]])), [1.0], rtol=1e-6)
  rng = np.random.default_rng(8)
  J = rng.normal(size=(4, 6))
  J[2] = 0.0
  c = aligned(jnp.asarray(J @ J.T, jnp.float32), jnp.array([True, True, False, True]))
  keep = [0, 1, 3]
  assert float(c[2]) == 0.0
  np.testing.assert_allclose(np.asarray(c)[keep], svd_reference(J[keep], np.full(3, 1 / 3)),
                             rtol=2e-3, atol=1e-5)


def test_modes_agree_and_registry():
  info = ldro.method_info("aligned_mtl")
  assert info.label == "Aligned-MTL" and info.needs == {"gram"}
  assert dict(info.defaults) == {"pref_vector": None, "scale_mode": "min"}
  with pytest.raises(ValueError, match="scale_mode"):
    ldro.aligned_mtl(3, scale_mode="max")
  with pytest.raises(ValueError, match="pref_vector"):
    ldro.aligned_mtl(3, pref_vector=[1.0, 2.0])
  n = 4
  make = functools.partial(ldro.get_method, "aligned_mtl", num_tasks=n)
  for states, grads, _ in method_helpers.modes_agree(make):
    np.testing.assert_allclose(ldro.task_weights(states[0]),
                               svd_reference(np.asarray(grads["w"], np.float64), np.full(n, 1 / n)),
                               rtol=5e-3, atol=1e-5)
