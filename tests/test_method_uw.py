"""UW (Kendall et al., CVPR 2018): learned log-variances, and a loss weighting combined."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ldro

import method_helpers

J = np.array([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.5], [0.5, -2.0, 1.0]])  # g_i, rows
LOSSES = np.array([0.5, 2.0, 4.0])


def run(tx, losses_seq, grads=J, mask=None):
  """Updates of tx on fixed gradients under jit; returns the updates and final state."""
  _, outs, state = method_helpers.run_fixed(tx, losses_seq, grads, mask)
  return outs, state


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_variances_after_k_steps_match_a_hand_loop(reduction):
  lr, k, n = 0.1, 6, 3
  outs, state = run(ldro.uw(n, lr=lr, reduction=reduction), [LOSSES] * k)
  s = np.zeros(n)
  for t in range(k):
    c = np.exp(-s) / (n if reduction == "mean" else 1)  # this step's coefficients use s_t
    np.testing.assert_allclose(outs[t], c @ J, rtol=1e-5, atol=1e-6)
    s = s - lr * (1.0 - np.exp(-s) * LOSSES)
  np.testing.assert_allclose(state.method_state.log_variances, s, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ldro.task_weights(state), c, rtol=1e-5)


def test_fixed_point_is_log_loss():
  n = 3
  tx = ldro.uw(n, lr=0.2, reduction="sum")
  g = {"w": jnp.asarray(J, jnp.float32)}
  losses = jnp.asarray(LOSSES, jnp.float32)

  @jax.jit
  def many(state):
    return jax.lax.fori_loop(0, 300, lambda i, s: tx.update(g, s, None, task_losses=losses)[1],
                             state)
  state = many(tx.init(None))
  np.testing.assert_allclose(state.method_state.log_variances, np.log(LOSSES), atol=1e-5)
  # At the fixed point every weighted loss exp(-s_i) l_i is 1 (UW follows grad sum log l_i).
  np.testing.assert_allclose(np.exp(-np.asarray(state.method_state.log_variances)) * LOSSES,
                             1.0, atol=1e-5)


def test_absent_task_gets_zero_and_keeps_its_log_variance():
  mask = jnp.array([True, False, True])
  _, state = run(ldro.uw(3, lr=0.1), [LOSSES] * 2, mask=mask)
  s = np.asarray(state.method_state.log_variances)
  assert s[1] == 0.0 and s[0] != 0.0
  assert ldro.task_weights(state)[1] == 0.0


def test_zero_loss_drives_the_log_variance_to_its_bound_not_to_overflow():
  _, state = run(ldro.uw(2, lr=5.0), [np.zeros(2)] * 6, grads=J[:2])
  np.testing.assert_allclose(state.method_state.log_variances,
                             -ldro.loss_balancing.LOG_SCALE_BOUND)
  assert np.all(np.isfinite(ldro.task_weights(state)))


def test_bad_hyperparameters_are_refused():
  with pytest.raises(ValueError, match="lr must be in"):
    ldro.uw(3, lr=-1.0)
  with pytest.raises(ValueError, match="unknown reduction"):
    ldro.uw(3, reduction="avg")


def test_uw_then_pcgrad_in_jacobian_and_lean_mode():
  # A loss weighting of this module combined with a gradient method (RLW paper, Table 4).
  A = jnp.asarray(J, jnp.float32)
  losses_fn = lambda p: 0.5 * (A @ p["w"]) ** 2 + jnp.array([0.1, 0.2, 0.3])
  theta0 = {"w": jnp.array([0.3, -0.7, 0.2])}
  tx = ldro.combine(ldro.uw(3, lr=0.3), ldro.pcgrad(3))

  def trajectory(mode):
    @jax.jit
    def step(theta, state, key):
      grads_fn = lambda: jax.jacrev(losses_fn)(theta)
      if mode == "jacobian":
        return tx.update(grads_fn(), state, theta, task_losses=losses_fn(theta), key=key)
      losses, vjp = jax.vjp(losses_fn, theta)
      return tx.update(None, state, theta, task_losses=losses, key=key, task_vjp=vjp,
                       gram_fn=lambda: ldro.task_gram(grads_fn()))

    theta, state = theta0, tx.init(theta0)
    for t in range(3):
      u, state = step(theta, state, jax.random.key(t))
      theta = optax.apply_updates(theta, jax.tree.map(lambda x: -0.1 * x, u))
    return theta["w"], state

  ref, state = trajectory("jacobian")
  # Lean mode (one VJP, Gram matrix from gram_fn; the contract test covers task_grads_fn).
  got, s = trajectory("lean")
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(s.method_state.loss_state.log_variances,
                             state.method_state.loss_state.log_variances, rtol=1e-5)
  ms = state.method_state
  np.testing.assert_allclose(ldro.task_weights(state), 3 * ms.loss_weights * ms.gradient_coefficients,
                             rtol=1e-6)
  # The loss weights are UW's own: exp(-s) / N with the log-variances before the last step.
  assert not np.allclose(ms.loss_state.log_variances, 0.0)
