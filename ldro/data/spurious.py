"""Spurious-CIFAR: a worst-group image benchmark that runs offline (worst-group spec, section 3).

A binary label ``y`` built from CIFAR-10 classes (0 = vehicles {airplane, automobile, ship,
truck}, 1 = animals {bird, cat, deer, dog, frog, horse}; class-balanced within each label), and
a colour cue ``s`` (0 = red, 1 = green) painted on the image, correlated with ``y`` in training
(``P(s = y) = majority_fraction``, 0.95 by default: groups 47.5 / 2.5 / 2.5 / 47.5 %) and
balanced at test. Group id ``g = 2 y + s`` (:func:`ldro.worst_group.make_group_ids`):
0 vehicle/red (majority), 1 vehicle/green (minority), 2 animal/red (minority), 3 animal/green
(majority).

Two cue variants:

* ``'A'`` (low pixel variance): a 4x4 square in the top-left corner;
* ``'B'`` (high pixel variance): a 2-pixel frame around the image (240 of 1024 pixels, ~23%).

Each cue's colour is red ``(220, 30, 30)`` or green ``(30, 220, 30)`` plus a per-image,
per-channel jitter drawn uniformly from ``[-20, 20]`` (of 255) -- the "jitter" is colour jitter
(spec: "colour jitter +-20/255"); the square's position is fixed.

Splits of the CIFAR-10 training set, per seed (:func:`make_spurious_data`):

* train: ``n_train`` images (4800, Waterbirds-sized), half vehicles, half animals, each label
  spread as evenly as possible over its classes, ``round((1 - majority_fraction) * n_y)``
  minority-cue examples per label;
* val: ``n_val`` images (2000) from the training distribution (~50 per minority group);
* pre-training pool: every other training image, without a cue (the auxiliary task's
  pre-training set, disjoint from the end task's images).

Test: the CIFAR-10 test set, ``test_per_group`` (2000) images per group: ``2 * test_per_group``
per label, class-balanced, half of each label with each cue. The test images are also kept with
the cue swapped (``test_flipped``) for the counterfactual flip rate (spec section 3).

Everything is a pure function of ``(source images, seed, options)``. Every split's group counts
are checked (:func:`ldro.worst_group.check_groups`): a cue that leaves a group empty (e.g.
``majority_fraction=1``) is one error naming the group and the split.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from ldro import worst_group

__all__ = ["VEHICLES", "ANIMALS", "LABEL_NAMES", "CUE_NAMES", "GROUP_NAMES", "VARIANTS",
           "SpuriousData", "make_spurious_data", "paint_cue", "load_spurious_cifar10",
           "shared_pool_index", "group_names"]

VEHICLES = ("airplane", "automobile", "ship", "truck")
ANIMALS = ("bird", "cat", "deer", "dog", "frog", "horse")
LABEL_NAMES = ("vehicle", "animal")
CUE_NAMES = ("red", "green")
VARIANTS = ("A", "B")
CUE_COLOURS = np.array([[220, 30, 30], [30, 220, 30]], np.int32)
JITTER = 20


def group_names() -> list[str]:
  """``['vehicle/red', 'vehicle/green', 'animal/red', 'animal/green']`` (id ``2 y + s``)."""
  return [f"{y}/{s}" for y in LABEL_NAMES for s in CUE_NAMES]


GROUP_NAMES = tuple(group_names())


@dataclasses.dataclass
class SpuriousData:
  """The splits of Spurious-CIFAR (uint8 images, int32 ids).

  Attributes:
    variant: ``'A'`` or ``'B'``.
    train, val, test: ``{'image': uint8 [n, H, W, 3], 'label': y [n], 'cue': s [n],
      'group': 2 y + s [n], 'class': CIFAR-10 class id [n], 'index': row in the source
      split [n], 'jitter': the cue colour's jitter [n, 3]}``; ``test`` also holds ``'image_flipped'`` (the same images, cue swapped).
    pool_index: rows of the source training images in the pre-training pool (no cue).
    pool_images: uint8 ``[n_pool, H, W, 3]``, the pool's images (only when loaded with
      ``pool_seeds``; else None).
    class_names: the source's class names (CIFAR-10 class ids index it).
    counts: ``{split: [4] examples per group}``.
  """
  variant: str
  train: dict
  val: dict
  test: dict
  pool_index: np.ndarray
  class_names: list
  counts: dict
  pool_images: Optional[np.ndarray] = None

  @property
  def num_groups(self) -> int:
    return 4


def paint_cue(images: np.ndarray, cue: np.ndarray, variant: str,
              jitter: np.ndarray) -> np.ndarray:
  """A copy of ``images`` (uint8 ``[n, H, W, 3]``) with cue ``s`` (0 red, 1 green) painted.

  Each image's colour is the cue's base colour plus its own ``jitter`` (int ``[n, 3]``, drawn
  in ``[-JITTER, JITTER]`` by :func:`make_spurious_data`), clipped to ``[0, 255]``.
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown cue variant {variant!r}; known: {', '.join(VARIANTS)}.")
  images = np.array(images, np.uint8, copy=True)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be uint8 [n, H, W, 3], got {images.shape}.")
  n, h, w, _ = images.shape
  if h < 8 or w < 8:
    raise ValueError(f"images of {h}x{w} are too small for the cue (need at least 8x8).")
  cue = np.asarray(cue)
  if cue.shape != (n,) or not np.isin(cue, (0, 1)).all():
    raise ValueError(f"cue must be 0/1 of shape ({n},), got shape {cue.shape}.")
  jitter = np.asarray(jitter)
  if jitter.shape != (n, 3):
    raise ValueError(f"jitter must be [n, 3] = ({n}, 3), got {jitter.shape}.")
  colour = np.clip(CUE_COLOURS[cue] + jitter, 0, 255).astype(np.uint8)[:, None, None, :]
  if variant == "A":
    images[:, :4, :4, :] = colour
  else:
    images[:, :2, :, :] = colour
    images[:, -2:, :, :] = colour
    images[:, :, :2, :] = colour
    images[:, :, -2:, :] = colour
  return images


def _label_of_class(class_names: Sequence[str]) -> np.ndarray:
  """``[C]``: 0 for a vehicle class, 1 for an animal, -1 for others; both labels required."""
  names = list(class_names)
  for group, label in ((VEHICLES, "vehicle"), (ANIMALS, "animal")):
    if not any(c in names for c in group):
      raise ValueError(f"no {label} class ({', '.join(group)}) among the classes {names}.")
  return np.array([0 if c in VEHICLES else 1 if c in ANIMALS else -1 for c in names], np.int32)


def _spread(n: int, k: int) -> list[int]:
  """``n`` split over ``k`` parts as evenly as possible (larger parts first)."""
  return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _balanced_pick(rng, classes, class_ids, n, available, what):
  """``n`` rows of ``classes`` among ``available`` (bool), spread evenly over ``class_ids``."""
  picked = []
  for c, m in zip(class_ids, _spread(n, len(class_ids))):
    rows = np.flatnonzero((classes == c) & available)
    if len(rows) < m:
      raise ValueError(f"{what}: class id {c} has {len(rows)} images left, {m} needed "
                       f"({n} images spread over classes {list(class_ids)}).")
    picked.append(rng.permutation(rows)[:m])
  return np.sort(np.concatenate(picked))


def _check_fraction(x, name):
  x = float(x)
  if not 0.0 < x <= 1.0:
    raise ValueError(f"{name} must lie in (0, 1], got {x}.")
  return x


def make_spurious_data(train_images: np.ndarray, train_classes: np.ndarray,
                       test_images: np.ndarray, test_classes: np.ndarray,
                       class_names: Sequence[str], *, variant: str = "A", seed: int = 0,
                       n_train: int = 4800, n_val: int = 2000,
                       majority_fraction: float = 0.95, test_per_group: int = 2000,
                       val_majority_fraction: Optional[float] = None) -> SpuriousData:
  """Spurious-CIFAR splits from a labelled image source (see the module docstring).

  Args:
    train_images, test_images: uint8 ``[n, H, W, 3]`` source images (CIFAR-10 train / test).
    train_classes, test_classes: int ``[n]`` class ids into ``class_names``.
    class_names: the source's class names (must include vehicle and animal classes; others
      are ignored).
    variant: ``'A'`` (4x4 corner square) or ``'B'`` (2-px frame).
    seed: the selection, the cue assignment and the colour jitter derive from it.
    n_train, n_val: images in the training and validation splits (even: half per label).
    majority_fraction: ``P(s = y)`` in train and val (0.95: groups 47.5/2.5/2.5/47.5 %;
      0.9 for the synthetic's 10 % minority).
    test_per_group: test images per group (the test set is group-balanced).
    val_majority_fraction: ``P(s = y)`` in val (None: ``majority_fraction``).

  Returns:
    :class:`SpuriousData`.

  Raises:
    ValueError: bad sizes or fractions, too few images of a class, or a group with no
      example in some split (naming the group and the split).
  """
  if variant not in VARIANTS:
    raise ValueError(f"unknown cue variant {variant!r}; known: {', '.join(VARIANTS)}.")
  for name, v in (("n_train", n_train), ("n_val", n_val), ("test_per_group", test_per_group)):
    if int(v) != v or v < 2 or (name != "test_per_group" and v % 2):
      raise ValueError(f"{name} must be an {'even ' if name != 'test_per_group' else ''}"
                       f"integer >= 2, got {v}.")
  majority_fraction = _check_fraction(majority_fraction, "majority_fraction")
  val_majority_fraction = majority_fraction if val_majority_fraction is None else _check_fraction(
      val_majority_fraction, "val_majority_fraction")
  label_of = _label_of_class(class_names)
  train_classes = np.asarray(train_classes, np.int64)
  test_classes = np.asarray(test_classes, np.int64)
  if len(train_classes) != len(train_images) or len(test_classes) != len(test_images):
    raise ValueError("images and class ids differ in length.")
  vehicles = [i for i, c in enumerate(class_names) if c in VEHICLES]
  animals = [i for i, c in enumerate(class_names) if c in ANIMALS]
  rng = np.random.default_rng((int(seed), 14))  # 14: the issue; one stream per seed

  def build(images, classes, index, fraction, per_label_minority, split):
    label = label_of[classes[index]]
    cue = label.copy()
    for y in (0, 1):
      rows = np.flatnonzero(label == y)
      k = (per_label_minority if per_label_minority is not None
           else int(round((1.0 - fraction) * len(rows))))
      flip = rng.permutation(rows)[:k]
      cue[flip] = 1 - y
    groups = np.asarray(worst_group.make_group_ids(label, cue, 2))
    counts = worst_group.check_groups(groups, 4, split, GROUP_NAMES)
    jitter = rng.integers(-JITTER, JITTER + 1, size=(len(index), 3))
    return {"image": paint_cue(images[index], cue, variant, jitter), "jitter": jitter,
            "label": label.astype(np.int32),
            "cue": cue.astype(np.int32), "group": groups.astype(np.int32),
            "class": classes[index].astype(np.int32), "index": index.astype(np.int64)}, counts

  available = np.ones(len(train_classes), bool)
  splits, counts = {}, {}
  for split, n, fraction in (("train", n_train, majority_fraction),
                             ("val", n_val, val_majority_fraction)):
    index = np.sort(np.concatenate([
        _balanced_pick(rng, train_classes, vehicles, n // 2, available, f"{split} vehicles"),
        _balanced_pick(rng, train_classes, animals, n // 2, available, f"{split} animals")]))
    available[index] = False
    splits[split], counts[split] = build(train_images, train_classes, index, fraction, None,
                                         split)
  pool_index = np.flatnonzero(available & (label_of[train_classes] >= 0))

  all_test = np.ones(len(test_classes), bool)
  index = np.sort(np.concatenate([
      _balanced_pick(rng, test_classes, vehicles, 2 * test_per_group, all_test, "test vehicles"),
      _balanced_pick(rng, test_classes, animals, 2 * test_per_group, all_test, "test animals")]))
  # Balanced cue: test_per_group examples of each label carry the other label's cue.
  test, counts["test"] = build(test_images, test_classes, index, None, int(test_per_group), "test")
  # The counterfactual: the same images and colour jitter, the cue swapped.
  test["image_flipped"] = paint_cue(test_images[index], 1 - test["cue"], variant, test["jitter"])
  splits["test"] = test
  return SpuriousData(variant=variant, train=splits["train"], val=splits["val"], test=test,
                      pool_index=pool_index, class_names=list(class_names), counts=counts)


def shared_pool_index(train_images: np.ndarray, train_classes: np.ndarray,
                      test_images: np.ndarray, test_classes: np.ndarray,
                      class_names: Sequence[str], seeds: Sequence[int], **kwargs) -> np.ndarray:
  """Rows of the source training images that no seed in ``seeds`` puts in train or val.

  The pre-training pool of one checkpoint shared by runs at several seeds (spec section 3:
  pre-trained once, on data disjoint from the end task's): with 4800 + 2000 images per seed,
  five seeds leave about half of CIFAR-10's 50,000 training images. ``kwargs`` are
  :func:`make_spurious_data`'s split options (``n_train``, ``n_val``, ...), which must be
  those of the runs that fine-tune from the checkpoint.

  Raises:
    ValueError: no seeds.
  """
  seeds = [int(s) for s in seeds]
  if not seeds:
    raise ValueError("pool seeds must be a non-empty list of seeds.")
  pool = None
  for seed in seeds:
    index = make_spurious_data(train_images, train_classes, test_images, test_classes,
                               class_names, seed=seed, **kwargs).pool_index
    pool = index if pool is None else np.intersect1d(pool, index)
  return pool


def load_spurious_cifar10(data_dir: str | os.PathLike,
                          pool_seeds: Optional[Sequence[int]] = None,
                          **kwargs) -> SpuriousData:
  """:func:`make_spurious_data` on the CIFAR-10 ImageFolder at ``data_dir`` (offline JPEGs).

  The decoded images come from :func:`ldro.data.images.load_imagefolder_pair_tasks` (and its
  ``.npz`` cache), with the five default pairs, which hold each of the ten classes once.

  Args:
    data_dir: the ImageFolder.
    pool_seeds: if given, ``pool_index`` is :func:`shared_pool_index` over these seeds (the
      pool of a pre-training run shared by fine-tuning runs at those seeds) and
      ``pool_images`` holds its images; else ``pool_images`` is None.
    **kwargs: :func:`make_spurious_data`'s options.

  Returns:
    The :class:`SpuriousData`.
  """
  from ldro.data import images as images_lib  # pylint: disable=g-import-not-at-top
  pairs = images_lib.DEFAULT_CIFAR10_PAIRS
  data = images_lib.load_imagefolder_pair_tasks(data_dir, pairs)
  names = data.class_names
  missing = sorted(set(VEHICLES + ANIMALS) - set(names))
  if missing:
    raise ValueError(f"classes {missing} not found in {str(data_dir)!r}; found {names}.")
  # Each class appears in exactly one default pair: train_images holds every image once, in a
  # fixed order (tasks, then ImageFolder order).
  source = (data.train_images, data.train_labels, data.test_images, data.test_labels, names)
  out = make_spurious_data(*source, **kwargs)
  if pool_seeds is not None:
    split_options = {k: v for k, v in kwargs.items() if k != "seed"}
    out.pool_index = shared_pool_index(*source, seeds=pool_seeds, **split_options)
    out.pool_images = data.train_images[out.pool_index]
  return out
