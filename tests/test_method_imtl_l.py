"""IMTL-L (learned loss scales) and the full IMTL = IMTL-L + IMTL-G (Liu et al., ICLR 2021)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ldro

import method_helpers

J = np.array([[1.0, 0.0, 2.0, 0.0, 1.0],
              [-1.0, 1.0, 0.5, 0.3, 0.0],
              [0.5, -2.0, 1.0, 0.0, -1.0]])  # g_i, rows, linearly independent
LOSSES = np.array([0.5, 2.0, 4.0])


def run(tx, losses_seq, grads=J, mask=None):
  """Updates of tx on fixed gradients under jit; returns the updates and final state."""
  _, outs, state = method_helpers.run_fixed(tx, losses_seq, grads, mask)
  return outs, state


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_scales_after_k_steps_match_a_hand_loop(reduction):
  lr, k, n = 0.1, 6, 3
  outs, state = run(ldro.imtl_l(n, lr=lr, reduction=reduction), [LOSSES] * k)
  s = np.zeros(n)
  for t in range(k):
    c = np.exp(s) / (n if reduction == "mean" else 1)
    np.testing.assert_allclose(outs[t], c @ J, rtol=1e-5, atol=1e-6)
    s = s - lr * (np.exp(s) * LOSSES - 1.0)  # d/ds (e^s l - s)
  np.testing.assert_allclose(state.method_state.log_scales, s, rtol=1e-5, atol=1e-6)


def test_fixed_point_scales_every_loss_to_one():
  tx = ldro.imtl_l(3, lr=0.1)
  g = {"w": jnp.asarray(J, jnp.float32)}
  losses = jnp.asarray(LOSSES, jnp.float32)
  state = jax.jit(lambda s: jax.lax.fori_loop(
      0, 400, lambda i, s: tx.update(g, s, None, task_losses=losses)[1], s))(tx.init(None))
  s = np.asarray(state.method_state.log_scales)
  np.testing.assert_allclose(s, -np.log(LOSSES), atol=1e-5)
  np.testing.assert_allclose(np.exp(s) * LOSSES, 1.0, atol=1e-5)


def imtl_g_paper(grads):
  """IMTL-G's closed form (paper section 3.2; LibMTL IMTL.py) on explicit gradients, float64."""
  u = grads / np.linalg.norm(grads, axis=1, keepdims=True)
  D = grads[0:1] - grads[1:]
  U = u[0:1] - u[1:]
  a = grads[0] @ U.T @ np.linalg.inv(D @ U.T)
  return np.concatenate([[1.0 - a.sum()], a])


def test_imtl_is_imtl_g_on_the_scaled_gradients():
  lr, k = 0.1, 3
  losses_seq = [LOSSES, LOSSES * 0.8, LOSSES * [1.0, 0.5, 1.2]]
  outs, state = run(ldro.imtl(3, lr=lr), losses_seq)
  s = np.zeros(3)
  for t in range(k):
    lam = np.exp(s)  # the scaled losses' gradients are e^{s_i} g_i
    scaled = lam[:, None] * J
    alpha = imtl_g_paper(scaled)
    d = alpha @ scaled
    np.testing.assert_allclose(outs[t], d, rtol=1e-4, atol=1e-5, err_msg=f"step {t}")
    # Equal projections of the update on every unit task gradient.
    proj = (scaled / np.linalg.norm(scaled, axis=1, keepdims=True)) @ d
    np.testing.assert_allclose(proj, proj[0], rtol=1e-5)
    s = s - lr * (np.exp(s) * losses_seq[t] - 1.0)
  ms = state.method_state
  np.testing.assert_allclose(ms.loss_state.log_scales, s, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ldro.task_weights(state), 3 * ms.loss_weights * ms.gradient_coefficients,
                             rtol=1e-6)
  # At s = 0 (first step) IMTL is IMTL-G itself.
  np.testing.assert_allclose(outs[0], imtl_g_paper(J) @ J, rtol=1e-4, atol=1e-5)


def test_absent_task_gets_zero_and_keeps_its_scale():
  _, state = run(ldro.imtl_l(3, lr=0.1), [LOSSES] * 2, mask=jnp.array([True, False, True]))
  assert state.method_state.log_scales[1] == 0.0
  assert ldro.task_weights(state)[1] == 0.0
