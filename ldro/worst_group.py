"""Worst-group learning: the losses, re-weighting and metrics of regularized MTL, JTT, group DRO.

Pure functions (no I/O, no global state) for the worst-group paper, Kulkarni, Dery et al.,
"Multitask Learning Can Improve Worst-Group Outcomes" (TMLR 2024; ``papers/mtl_worst_group``):

* :func:`l1_activation` and :func:`masked_reconstruction_loss` (+ the patch-mask sampler
  :func:`random_patch_mask`, :func:`apply_patch_mask`): the pieces of its Eq. 9,
  ``L_end + alpha_aux L_aux + alpha_reg (||h_end||_1 + ||h_aux||_1)`` (sections 2, 4).
* :func:`jtt_error_set`, :func:`jtt_upweighted_indices`, :func:`jtt_batch_indices`: the
  re-weighting of Just Train Twice (Liu et al., 2021; the paper's baseline, section 4.3).
* :func:`make_group_ids`, :func:`group_correct_counts` (jittable), :func:`per_group_accuracy`
  (validating): per-group, worst-group and pooled average accuracy (the paper's metrics,
  section 4.2; "average" is pooled accuracy, as in its official code).

Group DRO itself is the optax transformation :func:`ldro.group_dro` with groups as tasks.
"""

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


# --------------------------------------------------------------------------------------------
# Regularized MTL (paper Eq. 9)
# --------------------------------------------------------------------------------------------

def l1_activation(h: Array) -> Array:
  """The activation l1 penalty of the paper's Eq. 9: ``mean |h|`` over every element.

  .. math:: R(h) = \\frac{1}{|h|} \\sum_{j} |h_j|

  The paper writes ``||h||_1`` "normalized by the number of parameters in the shared
  representation" (section 4.1); its official code takes the mean absolute value over the
  whole pre-head output (all examples, all tokens, all units). Apply it to both the end-task
  pass and the auxiliary pass (``alpha_reg * (l1_activation(h_end) + l1_activation(h_aux))``).

  Args:
    h: shared pre-output activations, any shape (e.g. ``[batch, features]``).

  Returns:
    Scalar ``mean(|h|)`` in ``h``'s dtype (float32 for integer inputs).
  """
  h = jnp.asarray(h)
  if h.size == 0:
    raise ValueError("l1_activation: h is empty (no activations to penalize).")
  if not jnp.issubdtype(h.dtype, jnp.floating):
    h = h.astype(jnp.float32)
  return jnp.mean(jnp.abs(h))


def random_patch_mask(key: Array, image_shape: Sequence[int], patch: int = 4,
                      ratio: float = 0.6) -> Array:
  """SimMIM-style random patch mask: exactly ``round(ratio * P)`` of the ``P`` patches masked.

  The image is cut into non-overlapping ``patch x patch`` squares; each image of the batch gets
  its own uniformly random subset of ``k = round(ratio * P)`` masked patches (SimMIM, Xie et
  al., 2022, as in the paper's official code with ratio 0.6; the spec's CPU stand-in uses
  4x4 patches on 32x32 images).

  Args:
    key: PRNG key.
    image_shape: ``batch_shape + (H, W, C)`` (``batch_shape`` may be empty); ``H`` and ``W``
      must be multiples of ``patch``.
    patch: patch side in pixels.
    ratio: fraction of patches masked, in ``[0, 1]``.

  Returns:
    Boolean ``batch_shape + (H, W)``, ``True`` on masked pixels.
  """
  image_shape = tuple(int(d) for d in image_shape)
  if len(image_shape) < 3:
    raise ValueError(f"image_shape must be batch_shape + (H, W, C), got {image_shape}.")
  *batch, height, width, _ = image_shape
  if patch < 1 or height % patch or width % patch:
    raise ValueError(f"patch={patch} must be >= 1 and divide the image size {height}x{width}.")
  if not 0.0 <= ratio <= 1.0:
    raise ValueError(f"ratio={ratio} must lie in [0, 1].")
  gh, gw = height // patch, width // patch
  num_patches = gh * gw
  k = int(round(ratio * num_patches))
  scores = jax.random.uniform(key, (*batch, num_patches))
  ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
  masked = (ranks < k).reshape(*batch, gh, 1, gw, 1)
  masked = jnp.broadcast_to(masked, (*batch, gh, patch, gw, patch))
  return masked.reshape(*batch, height, width)


def apply_patch_mask(images: Array, mask: Array, fill: float = 0.0) -> Array:
  """``images`` with the masked pixels set to ``fill`` in every channel.

  Args:
    images: ``[..., H, W, C]``.
    mask: boolean ``[..., H, W]`` (:func:`random_patch_mask`), True where masked.
    fill: the masked pixels' value.

  Returns:
    ``images``' shape and dtype.
  """
  images = jnp.asarray(images)
  mask = jnp.asarray(mask, bool)
  if mask.shape != images.shape[:-1]:
    raise ValueError(f"mask shape {mask.shape} must equal the image shape without channels "
                     f"{images.shape[:-1]}.")
  return jnp.where(mask[..., None], jnp.asarray(fill, images.dtype), images)


def masked_reconstruction_loss(pred: Array, target: Array, mask: Optional[Array] = None) -> Array:
  """Mean squared reconstruction error over the masked elements (or all of them).

  .. math:: L = \\frac{\\sum_j m_j (\\hat x_j - x_j)^2}{\\max(1, \\sum_j m_j)}

  With ``mask=None`` every element counts (plain MSE): the spec's stand-in reconstructs the
  whole clean image from the masked one. With a mask (SimMIM), only masked pixels count; an
  all-``False`` mask gives 0 (no masked pixel, nothing to reconstruct), never NaN.

  Args:
    pred: reconstruction, e.g. ``[B, H, W, C]``.
    target: clean image, same shape.
    mask: ``None``, or boolean/0-1 of ``pred``'s shape or of ``pred.shape[:-1]`` (per pixel,
      broadcast over channels: each masked pixel counts ``C`` elements).

  Returns:
    Scalar float32 loss (``pred`` and ``target`` are cast to float32).
  """
  pred, target = jnp.asarray(pred), jnp.asarray(target)
  if pred.shape != target.shape:
    raise ValueError(f"pred shape {pred.shape} != target shape {target.shape}.")
  if pred.size == 0:
    raise ValueError("masked_reconstruction_loss: empty prediction.")
  sq = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
  if mask is None:
    return jnp.mean(sq)
  mask = jnp.asarray(mask)
  if mask.shape == pred.shape[:-1]:
    mask = mask[..., None]
  elif mask.shape != pred.shape:
    raise ValueError(f"mask shape {mask.shape} must be pred's {pred.shape} or "
                     f"{pred.shape[:-1]} (per pixel).")
  m = jnp.broadcast_to(mask.astype(jnp.float32), pred.shape)
  return jnp.sum(m * sq) / jnp.maximum(jnp.sum(m), 1.0)


# --------------------------------------------------------------------------------------------
# JTT (Liu et al., 2021)
# --------------------------------------------------------------------------------------------

def jtt_error_set(preds: Array, labels: Array) -> np.ndarray:
  """JTT's error set (Liu et al., ICML 2021, stage 1): the examples stage 1 misclassified.

  Args:
    preds: stage 1's predicted labels ``[n]`` or logits ``[n, K]`` (argmax).
    labels: ``[n]`` training labels.

  Returns:
    Boolean ``[n]``, True where ``pred != label``.
  """
  preds, labels = np.asarray(preds), np.asarray(labels)
  if preds.ndim == labels.ndim + 1:
    preds = preds.argmax(-1)
  if preds.shape != labels.shape or labels.ndim != 1:
    raise ValueError(f"preds {preds.shape} and labels {labels.shape} must be [n] (or [n, K] "
                     "logits and [n] labels).")
  return preds != labels


def _check_errors(errors, up_weight, on_empty):
  e = np.asarray(errors)
  if e.ndim != 1 or e.size == 0:
    raise ValueError(f"errors must be a non-empty 1-D boolean array over the training set, "
                     f"got shape {e.shape}.")
  if e.dtype != bool:
    if not np.all((e == 0) | (e == 1)):
      raise ValueError("errors must be boolean (or 0/1): True where stage 1 misclassified.")
    e = e.astype(bool)
  if int(up_weight) != up_weight or up_weight < 1:
    raise ValueError(f"up_weight must be an integer >= 1 (JTT's lambda_up), got {up_weight}.")
  if on_empty not in ("error", "erm"):
    raise ValueError(f"on_empty must be 'error' or 'erm', got {on_empty!r}.")
  if not e.any() and on_empty == "error":
    raise ValueError(
        f"JTT error set is empty: stage 1 classified all {e.size} training examples correctly, "
        "so stage 2 would be plain ERM (shorten stage 1, or pass on_empty='erm' to accept it).")
  return e


def jtt_upweighted_indices(errors: Array, up_weight: int, seed: int, epoch: int,
                           on_empty: str = "error") -> np.ndarray:
  """JTT stage 2's index list for one epoch: error examples duplicated, shuffled per (seed, epoch).

  Every training example appears once; each example of the error set ``E`` (stage 1's
  misclassified training examples) appears ``lambda_up`` times in all (``lambda_up - 1``
  duplicates), so an epoch has ``n + (lambda_up - 1) |E|`` entries and an error example weighs
  ``lambda_up`` times a correct one, as in the JTT code (up-sampling by duplication). The list
  is shuffled with ``jax.random.permutation(fold_in(key(seed), epoch))``: a pure function of
  ``(errors, up_weight, seed, epoch)``, so a resumed run rebuilds exactly the same order.

  Not traceable (its length depends on the values of ``errors``): call it outside ``jit``.

  Args:
    errors: boolean ``[n]`` error set (:func:`jtt_error_set`).
    up_weight: ``lambda_up``, an integer >= 1 (1 gives a plain shuffled epoch).
    seed: run seed.
    epoch: stage-2 epoch (0-based).
    on_empty: ``'error'`` (default): an empty error set raises ``ValueError`` (stage 2 would
      silently be ERM); ``'erm'``: return the plain shuffled epoch.

  Returns:
    ``int32 [n + (up_weight - 1) * |E|]`` training-set indices.
  """
  e = _check_errors(errors, up_weight, on_empty)
  n = e.size
  err_idx = np.flatnonzero(e)
  idx = np.concatenate([np.arange(n), np.tile(err_idx, int(up_weight) - 1)]).astype(np.int32)
  key = jax.random.fold_in(jax.random.PRNGKey(int(seed)), int(epoch))
  return np.asarray(jax.random.permutation(key, jnp.asarray(idx)))


def jtt_batch_indices(errors: Array, up_weight: int, seed: int, step: int, batch_size: int,
                      on_empty: str = "error") -> np.ndarray:
  """The training-set indices of stage-2 batch number ``step``: a pure function of the step.

  Epoch ``e`` is :func:`jtt_upweighted_indices` ``(..., seed, e)`` cut into
  ``L // batch_size`` full batches (the remainder of each epoch is dropped), so
  ``epoch = step // (L // batch_size)``. Suits the runner's ``train_batch(step)``.

  Args:
    errors, up_weight, seed, on_empty: as :func:`jtt_upweighted_indices`.
    step: the global stage-2 step (0-based).
    batch_size: examples per batch, at most the epoch length ``L``.

  Returns:
    ``int32 [batch_size]`` training-set indices.
  """
  e = _check_errors(errors, up_weight, on_empty)
  length = e.size + (int(up_weight) - 1) * int(e.sum())
  if batch_size < 1 or batch_size > length:
    raise ValueError(f"batch_size={batch_size} must lie in [1, {length}] (the epoch length).")
  per_epoch = length // batch_size
  epoch, pos = divmod(int(step), per_epoch)
  idx = jtt_upweighted_indices(e, up_weight, seed, epoch, on_empty)
  return idx[pos * batch_size:(pos + 1) * batch_size]


# --------------------------------------------------------------------------------------------
# Per-group metrics
# --------------------------------------------------------------------------------------------

class GroupAccuracy(NamedTuple):
  """Per-group accuracy summary (numpy / Python values).

  Attributes:
    per_group: ``[G]`` accuracy of each group.
    worst: worst-group accuracy (min over groups).
    average: pooled accuracy over all examples (the paper's "average").
    counts: ``[G]`` examples per group.
    worst_group: id of the worst group (the first on ties).
  """
  per_group: np.ndarray
  worst: float
  average: float
  counts: np.ndarray
  worst_group: int


def make_group_ids(labels: Array, attributes: Array, num_attributes: int) -> Array:
  """Group id ``g = label * num_attributes + attribute`` (labels and attributes 0-based).

  Args:
    labels: integer labels ``[...]``.
    attributes: integer spurious attributes, ``labels``' shape.
    num_attributes: how many attribute values.

  Returns:
    Integer group ids in ``[0, num_labels * num_attributes)``.
  """
  return jnp.asarray(labels) * num_attributes + jnp.asarray(attributes)


def _predictions(logits_or_preds, labels):
  x = jnp.asarray(logits_or_preds)
  labels = jnp.asarray(labels)
  if x.ndim == labels.ndim + 1:
    return jnp.argmax(x, axis=-1)
  if x.shape != labels.shape:
    raise ValueError(f"predictions {x.shape} must be labels' {labels.shape} (predicted labels "
                     "or binary logits) or labels' shape + (K,) (logits).")
  if jnp.issubdtype(x.dtype, jnp.floating):
    return (x > 0).astype(labels.dtype)  # one binary logit: class 1 iff logit > 0
  return x


def group_correct_counts(logits_or_preds: Array, labels: Array, groups: Array,
                         num_groups: int) -> tuple[Array, Array]:
  """Jittable core: ``(correct [G], counts [G])`` per group (ids outside ``[0, G)`` dropped).

  No validation: use inside ``jit``/``scan`` and check the counts once outside (or call
  :func:`per_group_accuracy`).

  Args:
    logits_or_preds: as in :func:`per_group_accuracy`: predicted labels, one binary
      logit per example, or logits ``[..., K]``.
    labels: integer labels.
    groups: integer group ids, ``labels``' shape.
    num_groups: ``G``.

  Returns:
    ``(correct, counts)``, float32 ``[G]`` each.
  """
  preds = _predictions(logits_or_preds, labels)
  correct = (preds == jnp.asarray(labels)).astype(jnp.float32).reshape(-1)
  groups = jnp.asarray(groups).reshape(-1)
  return (jax.ops.segment_sum(correct, groups, num_segments=num_groups),
          jax.ops.segment_sum(jnp.ones_like(correct), groups, num_segments=num_groups))


def _group_name(g, group_names):
  return f"group {g}" + (f" ({group_names[g]})" if group_names is not None else "")


def check_groups(groups: Array, num_groups: int, split: str = "",
                 group_names: Optional[Sequence[str]] = None) -> np.ndarray:
  """``counts [G]`` of a split's group ids; ``ValueError`` for an unknown id or an empty group.

  Args:
    groups: integer group ids.
    num_groups: ``G``; valid ids are ``0..G-1``.
    split: name used in the messages (e.g. ``'val'``).
    group_names: optional ``G`` names used in the messages.

  Returns:
    ``int [G]`` examples per group.

  Raises:
    ValueError: no examples, non-integer ids, an id outside ``[0, G)`` or an empty group.
  """
  where = f"{split} split: " if split else ""
  g = np.asarray(groups)
  if g.size == 0:
    raise ValueError(f"{where}no examples.")
  if not np.issubdtype(g.dtype, np.integer):
    raise ValueError(f"{where}group ids must be integers, got dtype {g.dtype}.")
  if group_names is not None and len(group_names) != num_groups:
    raise ValueError(f"{len(group_names)} group_names for num_groups={num_groups}.")
  bad = np.unique(g[(g < 0) | (g >= num_groups)])
  if bad.size:
    raise ValueError(f"{where}unknown group id(s) {bad.tolist()}: valid ids are "
                     f"0..{num_groups - 1} (num_groups={num_groups}).")
  counts = np.bincount(g.reshape(-1), minlength=num_groups)
  empty = np.flatnonzero(counts == 0)
  if empty.size:
    names = ", ".join(_group_name(int(e), group_names) for e in empty)
    raise ValueError(f"{where}{names} has no examples (examples per group: {counts.tolist()}); "
                     "its accuracy, and so the worst-group accuracy, is undefined.")
  return counts


def per_group_accuracy(logits_or_preds: Array, labels: Array, groups: Array, num_groups: int,
                       split: str = "",
                       group_names: Optional[Sequence[str]] = None) -> GroupAccuracy:
  """Per-group accuracy, worst-group accuracy and pooled average accuracy.

  .. math:: \\mathrm{acc}_g = \\frac{1}{n_g} \\sum_{i: g_i = g} [\\hat y_i = y_i], \\quad
     \\mathrm{WGA} = \\min_g \\mathrm{acc}_g, \\quad \\mathrm{avg} = \\frac{1}{n}\\sum_i
     [\\hat y_i = y_i]

  (paper section 4.2; on a group-balanced test set the pooled average equals the mean of the
  per-group accuracies, :func:`ldro.metrics.average_and_worst`).

  Args:
    logits_or_preds: logits ``[n, K]`` (argmax), one binary logit per example ``[n]`` float
      (class 1 iff > 0; labels 0/1), or predicted labels ``[n]`` integer/bool.
    labels: ``[n]`` integer labels.
    groups: ``[n]`` group ids in ``0..num_groups-1``.
    num_groups: ``G``.
    split: split name for the error messages.
    group_names: optional names for the error messages.

  Returns:
    :class:`GroupAccuracy`.

  Raises:
    ValueError: an unknown group id, or a group with no examples (named), or mismatched shapes.
  """
  labels_np = np.asarray(labels)
  if np.asarray(groups).shape != labels_np.shape:
    raise ValueError(f"groups {np.asarray(groups).shape} and labels {labels_np.shape} differ "
                     "in shape.")
  counts = check_groups(groups, num_groups, split, group_names)
  correct, _ = group_correct_counts(logits_or_preds, labels, groups, num_groups)
  correct = np.asarray(correct, np.float64)
  per_group = correct / counts
  worst_group = int(np.argmin(per_group))
  return GroupAccuracy(per_group=per_group, worst=float(per_group[worst_group]),
                       average=float(correct.sum() / counts.sum()), counts=counts,
                       worst_group=worst_group)
