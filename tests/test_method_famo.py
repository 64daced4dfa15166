"""FAMO (Liu et al., NeurIPS 2023): weight logits from the change of the log losses."""

import jax.numpy as jnp
import numpy as np
import pytest

import ldro

import method_helpers

J = np.array([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.5], [0.5, -2.0, 1.0]])
SEQ = np.array([[2.0, 1.0, 4.0], [1.5, 0.9, 3.0], [1.0, 0.85, 2.5], [0.6, 0.8, 2.4],
                [0.5, 0.7, 2.0]])


def run(tx, losses_seq, mask=None):
  return method_helpers.run_fixed(tx, losses_seq, J, mask)


def softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def famo_by_hand(seq, w_lr, gamma, optimizer):
  """The official loop (famo.py) with update() one step later, float64."""
  xi, m, v, k = np.zeros(3), np.zeros(3), np.zeros(3), 0
  cs, xis = [], []
  for t, l in enumerate(seq):
    if t > 0:
      delta = np.log(seq[t - 1]) - np.log(l)
      z = softmax(xi)
      jac = np.diag(z) - np.outer(z, z)  # d softmax / d xi (symmetric)
      g = jac @ delta + gamma * xi  # torch.optim.Adam(weight_decay=gamma): L2 in the gradient
      if optimizer == "adam":
        k += 1
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        xi = xi - w_lr * (m / (1 - 0.9 ** k)) / (np.sqrt(v / (1 - 0.999 ** k)) + 1e-8)
      else:
        xi = xi - w_lr * g
    z = softmax(xi)
    c = (z / l) / np.sum(z / l)
    cs.append(c)
    xis.append(xi.copy())
  return cs, xis


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_logit_updates_on_a_loss_sequence_match_a_hand_computation(optimizer):
  w_lr, gamma = 0.3, 0.01
  weights, outs, state = run(ldro.famo(3, w_lr=w_lr, gamma=gamma, logit_optimizer=optimizer),
                             SEQ)
  cs, xis = famo_by_hand(SEQ, w_lr, gamma, optimizer)
  for t in range(len(SEQ)):  # float32 Adam (ratios of small moments): ~1e-5 relative
    np.testing.assert_allclose(weights[t], cs[t], rtol=5e-5, err_msg=f"step {t}")
    np.testing.assert_allclose(outs[t], cs[t] @ J, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(state.method_state.logits, xis[-1], rtol=5e-5, atol=1e-7)
  assert int(state.method_state.skipped) == 0
  np.testing.assert_allclose(np.sum(weights[-1]), 1.0, rtol=1e-6)  # on the simplex
  # Task 0's log loss fell fastest: its logit went down.
  assert xis[-1][0] < xis[-1][2]


def test_coefficients_are_the_normalised_gradient_of_the_log_loss():
  # The official get_weighted_loss: grad_l [sum_i z_i log l_i] / sum_j (z_j / l_j), float64.
  xi, l = np.array([0.3, -0.2, 0.1]), np.array([0.5, 2.0, 1e-30])
  z = softmax(xi)
  expected = (z / l) / np.sum(z / l)
  np.testing.assert_allclose(ldro.loss_balancing.famo_coefficients(jnp.asarray(xi, jnp.float32),
                                                                   jnp.asarray(l, jnp.float32)),
                             expected, rtol=1e-5, atol=1e-30)


def test_non_positive_loss_skips_the_step():
  tx = ldro.famo(3, w_lr=0.3)
  weights, outs, state = run(tx, [SEQ[0], SEQ[1], [1.0, 0.0, 2.0], SEQ[3]])
  np.testing.assert_allclose(weights[2], weights[1])  # previous coefficients reused
  np.testing.assert_allclose(outs[2], weights[1] @ J, rtol=1e-5, atol=1e-6)
  assert int(state.method_state.skipped) == 1
  assert np.all(np.isfinite(weights[3]))
  # The skipped step changed nothing: step 3 compares its losses with step 1's.
  _, _, two = run(tx, [SEQ[0], SEQ[1], SEQ[3]])
  np.testing.assert_allclose(state.method_state.logits, two.method_state.logits, rtol=1e-6)
  _, _, neg = run(tx, [SEQ[0], [-1.0, 1.0, 1.0]])
  assert int(neg.method_state.skipped) == 1


def test_absent_task_gets_zero_and_no_loss_change():
  mask = jnp.array([True, False, True])
  seq = SEQ[:3].copy()
  seq[:, 1] = 0.0  # the core zeroes absent tasks' losses anyway
  weights, _, state = run(ldro.famo(3, w_lr=0.3), seq, mask=mask)
  assert weights[-1][1] == 0.0
  np.testing.assert_allclose(np.sum(weights[-1]), 1.0, rtol=1e-6)
  assert int(state.method_state.skipped) == 0


def test_bad_hyperparameters_are_refused():
  with pytest.raises(ValueError, match="gamma must be in"):
    ldro.famo(3, gamma=-0.1)
  with pytest.raises(ValueError, match="unknown logit_optimizer"):
    ldro.famo(3, logit_optimizer="rmsprop")
