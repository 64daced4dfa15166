"""DWA (Liu et al., CVPR 2019): weights from the last two epochs' average losses."""

import jax
import numpy as np
import pytest

import ldro

import method_helpers

J = np.array([[1.0, 0.0, 2.0], [-1.0, 1.0, 0.5], [0.5, -2.0, 1.0]])


def run(tx, losses_seq, mask_seq=None):
  return method_helpers.run_fixed(tx, losses_seq, J, mask_seq)


def softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


def test_weights_from_a_loss_history_across_epochs():
  rng = np.random.default_rng(0)
  spe, epochs, T = 3, 4, 2.0
  history = rng.uniform(0.5, 3.0, size=(epochs * spe, 3))
  weights, outs, state = run(ldro.dwa(3, temperature=T, steps_per_epoch=spe), history)
  avg = history.reshape(epochs, spe, 3).mean(axis=1)  # L_i(e), float64
  for t in range(epochs * spe):
    e = t // spe
    if e < 2:  # the first two epochs: uniform (w_i = 1, c = w / N)
      expected = np.full(3, 1 / 3)
    else:  # w = N softmax(r / T), r_i = L_i(e-1) / L_i(e-2); c = w / N
      expected = 3 * softmax(avg[e - 1] / avg[e - 2] / T) / 3
    np.testing.assert_allclose(weights[t], expected, rtol=1e-5, err_msg=f"step {t}")
    np.testing.assert_allclose(outs[t], expected @ J, rtol=1e-5, atol=1e-6)
  ms = state.method_state
  assert int(ms.epochs) == epochs and int(ms.epoch_step) == 0
  np.testing.assert_allclose(ms.last, avg[-1], rtol=1e-6)
  np.testing.assert_allclose(ms.before_last, avg[-2], rtol=1e-6)


def test_per_step_variant_and_the_loss_going_down_faster_gets_less_weight():
  # steps_per_epoch = 1: the ratio of the last two steps' losses.
  losses = [[1.0, 1.0, 1.0], [0.5, 0.9, 1.0], [0.2, 0.8, 1.0]]
  weights, _, _ = run(ldro.dwa(3, steps_per_epoch=1), losses + [[1.0, 1.0, 1.0]])
  expected = softmax(np.array([0.5, 0.9, 1.0]) / 2.0)
  np.testing.assert_allclose(weights[2], expected, rtol=1e-5)
  np.testing.assert_allclose(weights[3], softmax(np.array([0.4, 0.8 / 0.9, 1.0]) / 2.0),
                             rtol=1e-5)
  assert weights[3][0] < weights[3][1] < weights[3][2]


def test_absent_task_is_left_out_of_its_epoch_average():
  losses = [[1.0, 2.0, 3.0], [3.0, 0.0, 5.0], [2.0, 4.0, 1.0], [2.0, 6.0, 1.0]]
  masks = [[True] * 3, [True, False, True], [True] * 3, [True] * 3]
  weights, _, state = run(ldro.dwa(3, steps_per_epoch=2), losses, masks)
  np.testing.assert_allclose(state.method_state.before_last, [2.0, 2.0, 4.0], rtol=1e-6)
  np.testing.assert_allclose(state.method_state.last, [2.0, 5.0, 1.0], rtol=1e-6)
  assert weights[1][1] == 0.0  # absent: coefficient 0


def test_bad_hyperparameters_are_refused():
  with pytest.raises(ValueError, match="temperature must be in"):
    ldro.dwa(3, temperature=0.0)
  with pytest.raises(ValueError, match="steps_per_epoch must be a whole number"):
    ldro.dwa(3, steps_per_epoch=2.5)


@pytest.mark.parametrize("name", ["dwa", "famo", "uw", "imtl_l", "imtl", "gradnorm"])
def test_state_leaves_are_distinct_buffers(name):
  # The train step donates the optimizer state: one array in two fields fails at run time.
  leaves = jax.tree.leaves(ldro.get_method(name, num_tasks=3).init(None))
  assert len({id(x) for x in leaves}) == len(leaves)
