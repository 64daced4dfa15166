"""GradVac (Wang et al., ICLR 2021): against a direct numpy implementation on vectors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ldro
from ldro import gradient_vaccine


def gradvac_numpy(grads, targets, orders, beta):
  """Algorithm 1 of the paper on explicit float64 gradient vectors."""
  n = len(grads)
  targets = targets.copy()
  out = np.zeros_like(grads)
  for i in range(n):
    gi = grads[i].copy()
    for j in orders[i]:
      if j == i:
        continue
      gj = grads[j]
      ni, nj = np.linalg.norm(gi), np.linalg.norm(gj)
      phi = gi @ gj / (ni * nj) if ni * nj > 0 else 0.0
      t = targets[i, j]
      if phi < t and ni * nj > 0:
        gi = gi + ni * (t * np.sqrt(1 - phi**2) - phi * np.sqrt(1 - t**2)) / (
            nj * np.sqrt(1 - t**2)) * gj
      targets[i, j] = (1 - beta) * t + beta * phi
    out[i] = gi
  return out, targets


def orders(key, n):
  return np.asarray(gradient_vaccine.visiting_orders(key, n))


def test_coefficients_match_numpy_with_given_targets():
  rng = np.random.default_rng(0)
  n = 5
  grads = rng.normal(size=(n, 7)) * np.array([1.0, 0.1, 5.0, 1.0, 2.0])[:, None]
  targets = rng.uniform(-0.6, 0.9, size=(n, n))
  key = jax.random.key(3)
  C, new_t = jax.jit(gradient_vaccine.gradvac_coefficients)(
      jnp.asarray(grads @ grads.T, jnp.float32), jnp.asarray(targets, jnp.float32), key, 0.3)
  want, want_t = gradvac_numpy(grads, targets, orders(key, n), 0.3)
  np.testing.assert_allclose(np.asarray(C, np.float64) @ grads, want, rtol=1e-4, atol=1e-4)
  off = ~np.eye(n, dtype=bool)
  np.testing.assert_allclose(np.asarray(new_t)[off], want_t[off], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_transformation_matches_numpy_over_steps_and_keeps_ema_state(reduction):
  rng = np.random.default_rng(1)
  n, d, beta, steps = 4, 6, 0.5, 4
  base = rng.normal(size=(d,))
  # Positively correlated gradients (the targets grow above 0), then a conflict.
  grads = [base + 0.7 * rng.normal(size=(n, d)) for _ in range(steps - 1)]
  grads.append(rng.normal(size=(n, d)))
  tx = ldro.gradvac(n, beta=beta, reduction=reduction)
  params = {"w": jnp.zeros(d)}
  step = jax.jit(lambda g, s, k: tx.update({"w": g}, s, params, key=k))
  state = tx.init(params)
  targets = np.zeros((n, n))
  for t, A in enumerate(grads):
    key = jax.random.key(10 + t)
    out, state = step(jnp.asarray(A, jnp.float32), state, key)
    pc, targets = gradvac_numpy(A, targets, orders(key, n), beta)
    want = pc.sum(0) / (n if reduction == "mean" else 1)
    np.testing.assert_allclose(out["w"], want, rtol=1e-4, atol=1e-5, err_msg=f"step {t}")
    off = ~np.eye(n, dtype=bool)
    np.testing.assert_allclose(np.asarray(state.method_state.targets)[off], targets[off],
                               rtol=1e-4, atol=1e-5, err_msg=f"step {t}")
    np.testing.assert_allclose(np.asarray(ldro.task_weights(state)) @ A, want, rtol=1e-4,
                               atol=1e-5)
    if t == steps - 2:  # the correlated steps moved the targets above 0
      assert np.min(targets[off]) > 0.2


def test_first_step_is_pcgrad_and_beta_zero_stays_pcgrad():
  rng = np.random.default_rng(2)
  n = 4
  A = rng.normal(size=(n, 5))
  params = {"w": jnp.zeros(5)}
  pc = ldro.pcgrad(n)
  pc_step = jax.jit(lambda g, s, k: pc.update(g, s, params, key=k))
  # beta is traced: one compilation for both values.
  step = jax.jit(lambda g, s, k, b: ldro.gradvac(n, beta=b).update(g, s, params, key=k))
  for beta in (0.01, 0.0):
    s, s_pc = ldro.gradvac(n).init(params), pc.init(params)
    for t in range(2 if beta == 0.0 else 1):
      key = jax.random.key(t)
      g = {"w": jnp.asarray(A + t, jnp.float32)}
      u, s = step(g, s, key, beta)
      u_pc, s_pc = pc_step(g, s_pc, key)
      np.testing.assert_allclose(u["w"], u_pc["w"], rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(ldro.task_weights(s), ldro.task_weights(s_pc), rtol=1e-5,
                                 atol=1e-6)


def test_absent_task_gets_zero_and_keeps_its_targets():
  rng = np.random.default_rng(3)
  n = 3
  A = rng.normal(size=(n, 4))
  targets = jnp.asarray(rng.uniform(-0.5, 0.5, size=(n, n)), jnp.float32)
  present = jnp.array([True, False, True])
  G = jnp.asarray(A @ A.T, jnp.float32)
  coefficients = jax.jit(gradient_vaccine.gradvac_coefficients)
  C, new_t = coefficients(G, targets, jax.random.key(0), 0.2, present)
  assert np.all(np.asarray(C)[1] == 0) and np.all(np.asarray(C)[:, 1] == 0)
  np.testing.assert_array_equal(np.asarray(new_t)[1], np.asarray(targets)[1])
  np.testing.assert_array_equal(np.asarray(new_t)[:, 1], np.asarray(targets)[:, 1])
  # The present pair is what the two-task problem gives.
  C2, _ = coefficients(G[np.ix_([0, 2], [0, 2])], targets[np.ix_([0, 2], [0, 2])],
                       jax.random.key(0), 0.2)
  np.testing.assert_allclose(np.asarray(C)[np.ix_([0, 2], [0, 2])], C2, rtol=1e-5, atol=1e-6)


def test_registry_and_validation():
  info = ldro.method_info("gradvac")
  assert dict(info.defaults) == {"beta": 0.01, "reduction": "mean"}
  assert info.needs == {"gram", "key"} and info.modes == ("jacobian", "lean")
  with pytest.raises(ValueError, match="beta must be in"):
    ldro.gradvac(3, beta=1.5)
  with pytest.raises(ValueError, match="unknown reduction"):
    ldro.gradvac(3, reduction="max")
