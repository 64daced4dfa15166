"""IMTL-G (Liu et al., 2021) on the task-weighting core."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ldro
from ldro import gradient_balancing as gb

import method_helpers

imtl_g_coefficients = jax.jit(gb.imtl_g_coefficients)


def paper_alpha(J):
  """The paper's closed form (section 3.2), task 1 as reference, float64."""
  u = J / np.linalg.norm(J, axis=1, keepdims=True)
  D = J[0:1] - J[1:]
  U = u[0:1] - u[1:]
  a = J[0] @ U.T @ np.linalg.inv(D @ U.T)
  return np.concatenate([[1 - a.sum()], a])


@pytest.mark.parametrize("n,p,seed", [(2, 5, 0), (4, 10, 1), (6, 30, 2)])
def test_matches_paper_formula_and_equal_projections(n, p, seed):
  rng = np.random.default_rng(seed)
  J = rng.normal(size=(n, p)) * np.exp(rng.normal(size=(n, 1))) + 0.5 * rng.normal(size=p)
  c = np.asarray(imtl_g_coefficients(jnp.asarray(J @ J.T, jnp.float32)), np.float64)
  np.testing.assert_allclose(c, paper_alpha(J), rtol=2e-3, atol=2e-4)
  np.testing.assert_allclose(c.sum(), 1.0, atol=1e-5)
  d = J.T @ c
  proj = J @ d / np.linalg.norm(J, axis=1)  # d . u_i
  np.testing.assert_allclose(proj, proj.mean(), rtol=1e-3)
  assert proj.mean() > 0


def test_scale_invariant_and_degenerate_inputs():
  rng = np.random.default_rng(3)
  J = rng.normal(size=(3, 7))
  G = jnp.asarray(J @ J.T, jnp.float32)
  np.testing.assert_allclose(imtl_g_coefficients(1e-6 * G), imtl_g_coefficients(G), rtol=1e-4)
  # One task: the gradient itself.
  np.testing.assert_allclose(imtl_g_coefficients(jnp.array([[4.0]])), [1.0])
  # Identical tasks: any split with equal projections; the pseudo-inverse gives the even one.
  same = np.stack([J[0], J[0]])
  np.testing.assert_allclose(imtl_g_coefficients(jnp.asarray(same @ same.T, jnp.float32)),
                             [0.5, 0.5], atol=1e-5)
  # All-zero Gram matrix: no direction, zero coefficients (finite).
  np.testing.assert_array_equal(imtl_g_coefficients(jnp.zeros((3, 3))), np.zeros(3))


def test_mask_excludes_absent_tasks():
  rng = np.random.default_rng(4)
  J = rng.normal(size=(4, 9))
  J[1] = 0.0
  c = imtl_g_coefficients(jnp.asarray(J @ J.T, jnp.float32), jnp.array([True, False, True, True]))
  keep = [0, 2, 3]
  assert float(c[1]) == 0.0
  np.testing.assert_allclose(np.asarray(c)[keep], paper_alpha(J[keep]), rtol=2e-3, atol=2e-4)


def test_modes_agree_and_registry():
  info = ldro.method_info("imtl_g")
  assert info.label == "IMTL-G" and info.needs == {"gram"} and "lean" in info.modes
  make = functools.partial(ldro.get_method, "imtl_g", num_tasks=4)
  for states, grads, _ in method_helpers.modes_agree(make):
    np.testing.assert_allclose(ldro.task_weights(states[0]),
                               paper_alpha(np.asarray(grads["w"], np.float64)),
                               rtol=5e-3, atol=5e-4)
