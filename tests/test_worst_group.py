"""ldro.worst_group: activation l1, masked reconstruction, patch masks, JTT indices, group metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ldro
from ldro import worst_group as wg


# ----- l1 of activations ---------------------------------------------------------------------

def test_l1_activation_is_the_mean_absolute_value():
  h = jnp.array([[1.0, -2.0], [3.0, -4.0]])
  assert float(wg.l1_activation(h)) == pytest.approx(10.0 / 4)
  assert float(wg.l1_activation(jnp.array([[-1, 1, 0]]))) == pytest.approx(2.0 / 3)  # ints
  g = jax.grad(wg.l1_activation)(h)
  np.testing.assert_allclose(g, np.sign(h) / 4)
  assert ldro.l1_activation is wg.l1_activation


def test_l1_activation_refuses_an_empty_array():
  with pytest.raises(ValueError, match="empty"):
    wg.l1_activation(jnp.zeros((0, 3)))


# ----- masked reconstruction -----------------------------------------------------------------

def test_masked_reconstruction_loss_hand_values():
  target = jnp.array([[1.0, 2.0], [3.0, 4.0]])[None, :, :, None]  # [1, 2, 2, 1]
  pred = jnp.zeros_like(target)
  assert float(wg.masked_reconstruction_loss(pred, target)) == pytest.approx(30.0 / 4)
  mask = jnp.array([[[True, False], [False, True]]])                 # per pixel [1, 2, 2]
  assert float(wg.masked_reconstruction_loss(pred, target, mask)) == pytest.approx(17.0 / 2)
  # A per-pixel mask counts every channel: 2 channels, errors (1, 3) and (4, 0) at the masked
  # pixels -> (1 + 9 + 16 + 0) / 4.
  t2 = jnp.concatenate([target, jnp.array([[3.0, 0.0], [0.0, 0.0]])[None, :, :, None]], -1)
  assert float(wg.masked_reconstruction_loss(jnp.zeros_like(t2), t2, mask)) == pytest.approx(
      26.0 / 4)
  # Full-shape mask too; an empty mask gives 0, not NaN.
  assert float(wg.masked_reconstruction_loss(pred, target, mask[..., None])) == pytest.approx(8.5)
  assert float(wg.masked_reconstruction_loss(pred, target, jnp.zeros((1, 2, 2), bool))) == 0.0


def test_masked_reconstruction_loss_bad_shapes():
  x = jnp.zeros((1, 2, 2, 3))
  with pytest.raises(ValueError, match="target shape"):
    wg.masked_reconstruction_loss(x, jnp.zeros((1, 2, 2, 1)))
  with pytest.raises(ValueError, match="mask shape"):
    wg.masked_reconstruction_loss(x, x, jnp.zeros((2, 2), bool))


def test_random_patch_mask_masks_whole_patches_in_the_right_number():
  key = jax.random.PRNGKey(0)
  m = np.asarray(wg.random_patch_mask(key, (3, 32, 32, 3), patch=4, ratio=0.6))
  assert m.shape == (3, 32, 32) and m.dtype == bool
  patches = m.reshape(3, 8, 4, 8, 4).transpose(0, 1, 3, 2, 4).reshape(3, 64, 16)
  assert np.all(patches.all(-1) | ~patches.any(-1))          # constant within each patch
  np.testing.assert_array_equal(patches.all(-1).sum(-1), [38, 38, 38])  # round(0.6 * 64)
  assert not np.array_equal(m[0], m[1])                        # per-image draws
  np.testing.assert_array_equal(m, wg.random_patch_mask(key, (3, 32, 32, 3), 4, 0.6))
  single = wg.random_patch_mask(key, (8, 8, 3), patch=4, ratio=0.5)
  assert single.shape == (8, 8) and int(single.sum()) == 2 * 16
  masked = wg.apply_patch_mask(jnp.ones((8, 8, 3)), single)
  assert float(masked.sum()) == 3 * (64 - 32)


def test_random_patch_mask_bad_input():
  key = jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match="divide"):
    wg.random_patch_mask(key, (10, 10, 3), patch=4)
  with pytest.raises(ValueError, match="ratio"):
    wg.random_patch_mask(key, (8, 8, 3), patch=4, ratio=1.5)
  with pytest.raises(ValueError, match="batch_shape"):
    wg.random_patch_mask(key, (8, 8), patch=4)


# ----- JTT -----------------------------------------------------------------------------------

ERRORS = np.array([False, True, False, True, False])


def test_jtt_indices_duplicate_errors_up_weight_times():
  idx = wg.jtt_upweighted_indices(ERRORS, up_weight=3, seed=0, epoch=0)
  assert idx.shape == (5 + 2 * 2,)
  np.testing.assert_array_equal(np.bincount(idx, minlength=5), [1, 3, 1, 3, 1])
  plain = wg.jtt_upweighted_indices(ERRORS, up_weight=1, seed=0, epoch=0)
  np.testing.assert_array_equal(np.sort(plain), np.arange(5))


def test_jtt_indices_are_a_pure_function_of_seed_and_epoch():
  errors = np.arange(200) % 7 == 0
  a = wg.jtt_upweighted_indices(errors, 6, seed=3, epoch=4)
  np.testing.assert_array_equal(a, wg.jtt_upweighted_indices(errors, 6, seed=3, epoch=4))
  assert not np.array_equal(a, wg.jtt_upweighted_indices(errors, 6, seed=3, epoch=5))
  assert not np.array_equal(a, wg.jtt_upweighted_indices(errors, 6, seed=4, epoch=4))
  # Batches by step: resuming at any step gives the same batch as an uninterrupted run.
  length = 200 + 5 * int(errors.sum())                          # 345
  per_epoch = length // 32                                      # 10 full batches, rest dropped
  run = [wg.jtt_batch_indices(errors, 6, 3, step, 32) for step in range(3 * per_epoch)]
  for epoch in range(3):
    np.testing.assert_array_equal(
        np.concatenate(run[epoch * per_epoch:(epoch + 1) * per_epoch]),
        wg.jtt_upweighted_indices(errors, 6, 3, epoch)[:per_epoch * 32])
  np.testing.assert_array_equal(wg.jtt_batch_indices(errors, 6, 3, 25, 32), run[25])


def test_jtt_error_set_and_empty_error_set():
  errors = wg.jtt_error_set(np.array([[2.0, 1.0], [0.0, 1.0], [0.0, 3.0]]), np.array([0, 0, 1]))
  np.testing.assert_array_equal(errors, [False, True, False])
  none = np.zeros(4, bool)
  with pytest.raises(ValueError, match="JTT error set is empty.*all 4 training examples"):
    wg.jtt_upweighted_indices(none, 6, seed=0, epoch=0)
  with pytest.raises(ValueError, match="JTT error set is empty"):
    wg.jtt_batch_indices(none, 6, seed=0, step=0, batch_size=2)
  erm = wg.jtt_upweighted_indices(none, 6, seed=0, epoch=0, on_empty="erm")
  np.testing.assert_array_equal(np.sort(erm), np.arange(4))


@pytest.mark.parametrize("errors, up, match", [
    (ERRORS, 0, "up_weight"), (ERRORS, 2.5, "up_weight"), (np.zeros(0, bool), 2, "non-empty"),
    (np.array([0, 2, 1]), 2, "boolean"), (np.ones((2, 2), bool), 2, "1-D")])
def test_jtt_bad_input(errors, up, match):
  with pytest.raises(ValueError, match=match):
    wg.jtt_upweighted_indices(errors, up, seed=0, epoch=0)


# ----- per-group accuracy --------------------------------------------------------------------

PREDS = np.array([0, 1, 1, 0, 1, 1])
LABELS = np.array([0, 1, 0, 0, 1, 0])
GROUPS = np.array([0, 0, 1, 1, 2, 2])


def test_per_group_accuracy_hand_values():
  r = wg.per_group_accuracy(PREDS, LABELS, GROUPS, 3)
  np.testing.assert_allclose(r.per_group, [1.0, 0.5, 0.5])
  assert r.worst == 0.5 and r.worst_group == 1 and r.average == pytest.approx(4 / 6)
  np.testing.assert_array_equal(r.counts, [2, 2, 2])
  # Pooled average, not the mean over groups, when groups are unbalanced.
  r = wg.per_group_accuracy(np.array([1, 1, 1, 0]), np.array([1, 1, 1, 1]),
                            np.array([0, 0, 0, 1]), 2)
  assert r.average == 0.75 and r.worst == 0.0 and r.worst_group == 1
  # Logits [n, K] (argmax) and one binary logit per example (class 1 iff > 0) agree.
  logits = np.stack([-PREDS.astype(float), PREDS.astype(float)], -1)
  assert wg.per_group_accuracy(logits, LABELS, GROUPS, 3).worst == 0.5
  assert wg.per_group_accuracy(2.0 * PREDS - 1.0, LABELS, GROUPS, 3).average == pytest.approx(
      4 / 6)


def test_group_correct_counts_jits_and_group_ids():
  c, n = jax.jit(wg.group_correct_counts, static_argnums=3)(PREDS, LABELS, GROUPS, 3)
  np.testing.assert_array_equal(c, [2, 1, 1])
  np.testing.assert_array_equal(n, [2, 2, 2])
  np.testing.assert_array_equal(wg.make_group_ids(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]),
                                                  2), [0, 1, 2, 3])


def test_per_group_accuracy_names_an_empty_group():
  with pytest.raises(ValueError, match=r"val split: group 3 \(y=1,s=1\) has no examples"):
    wg.per_group_accuracy(PREDS, LABELS, GROUPS, 4, split="val",
                          group_names=["y=0,s=0", "y=0,s=1", "y=1,s=0", "y=1,s=1"])
  with pytest.raises(ValueError, match="group 3 has no examples"):
    wg.per_group_accuracy(PREDS, LABELS, GROUPS, 4)


@pytest.mark.parametrize("groups, match", [
    (np.array([0, 0, 1, 1, 2, 3]), r"unknown group id\(s\) \[3\]: valid ids are 0..2"),
    (np.array([0, -1, 1, 1, 2, 2]), r"unknown group id\(s\) \[-1\]"),
    (np.array([0.0, 0, 1, 1, 2, 2]), "integers"),
    (np.array([0, 1, 2]), "shape")])
def test_per_group_accuracy_bad_group_ids(groups, match):
  with pytest.raises(ValueError, match=match):
    wg.per_group_accuracy(PREDS, LABELS, groups, 3)
