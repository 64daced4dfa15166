"""Multitask image-classification data: loaders, task-grouped batcher, eval.

All tasks share a single softmax over the union of their classes (Section 5.1
of the Lookahead-DRO paper): labels are global class ids, and each example
additionally carries the id of the task it belongs to.

Two datasets are provided:

* `load_cifar100_tasks`: multitask CIFAR-100 from TFDS; the 20 coarse
  (super-)classes are 20 five-way tasks over the 100 fine labels.
* `load_imagefolder_pair_tasks`: "multitask CIFAR-10" (or any TFDS
  `ImageFolder` layout); each task is a binary classification between a pair
  of classes, with a shared softmax over all classes of the folder.

Training batches come from `GroupedBatcher` (a pure function of `(seed,
step)`, grouped by task for per-task gradients), evaluation batches from
`eval_batches`. Both normalise images with `normalize_images`.

TensorFlow / TFDS are only imported inside the two loaders, so the batcher
and `TaskImageData` work with numpy alone.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from typing import Iterator, Sequence

import numpy as np

from ldro.data import fileio
from ldro.data import streams

__all__ = [
    "DEFAULT_CIFAR10_PAIRS",
    "TaskImageData",
    "normalize_images",
    "load_cifar100_tasks",
    "load_imagefolder_pair_tasks",
    "GroupedBatcher",
    "eval_batches",
    "flip_task_labels",
    "train_subset",
]

DEFAULT_CIFAR10_PAIRS: tuple[tuple[str, str], ...] = (
    ("cat", "dog"),
    ("automobile", "truck"),
    ("airplane", "ship"),
    ("deer", "horse"),
    ("bird", "frog"),
)

_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # As tfds ImageFolder.
_CACHE_FORMAT_VERSION = 1


def normalize_images(images: np.ndarray) -> np.ndarray:
  """Maps uint8 images to float32 in [-0.5, 0.5] (`x / 255 - 0.5`).

  A fixed, data-independent normalisation, so that training and evaluation
  (and different datasets) agree without carrying statistics around.

  Args:
    images: uint8 array of any shape.

  Returns:
    float32 array of the same shape.
  """
  return images.astype(np.float32) * np.float32(1.0 / 255.0) - np.float32(0.5)


@dataclasses.dataclass
class TaskImageData:
  """In-memory multitask image classification data with a shared label space.

  Attributes:
    task_names: Name of each task; task ids index this list.
    class_names: Name of each class of the shared softmax; labels index it.
    train_images: uint8 [M, H, W, C] training images (32x32x3 for CIFAR).
    train_labels: int32 [M] global (shared-softmax) class ids.
    train_tasks: int32 [M] task id of each training example.
    test_images: uint8 [K, H, W, C] test images.
    test_labels: int32 [K] global class ids.
    test_tasks: int32 [K] task ids.

  Raises (on construction):
    ValueError: on inconsistent shapes/dtypes, out-of-range labels or task
      ids, or if some task has no training or no test example.
  """

  task_names: list[str]
  class_names: list[str]
  train_images: np.ndarray
  train_labels: np.ndarray
  train_tasks: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  test_tasks: np.ndarray

  def __post_init__(self) -> None:
    self.task_names = [str(t) for t in self.task_names]
    self.class_names = [str(c) for c in self.class_names]
    if not self.task_names:
      raise ValueError("TaskImageData needs at least one task.")
    image_shape = None
    for split in ("train", "test"):
      images = np.asarray(getattr(self, f"{split}_images"))
      if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"{split}_images must be uint8 [M, H, W, C], got {images.dtype} "
            f"{images.shape}.")
      if image_shape is not None and images.shape[1:] != image_shape:
        raise ValueError(
            f"train and test images differ in shape: {image_shape} vs "
            f"{images.shape[1:]}.")
      image_shape = images.shape[1:]
      setattr(self, f"{split}_images", images)
      for field, size in (("labels", self.num_classes),
                          ("tasks", self.num_tasks)):
        values = np.asarray(getattr(self, f"{split}_{field}"))
        if values.shape != (len(images),):
          raise ValueError(
              f"{split}_{field} must have shape ({len(images)},), got "
              f"{values.shape}.")
        if not np.issubdtype(values.dtype, np.integer):
          raise ValueError(f"{split}_{field} must be integers, got "
                           f"{values.dtype}.")
        if values.size and (values.min() < 0 or values.max() >= size):
          raise ValueError(
              f"{split}_{field} must lie in [0, {size}), got range "
              f"[{values.min()}, {values.max()}].")
        setattr(self, f"{split}_{field}", values.astype(np.int32, copy=False))
      counts = np.bincount(getattr(self, f"{split}_tasks"),
                           minlength=self.num_tasks)
      empty = [self.task_names[t] for t in np.flatnonzero(counts == 0)]
      if empty:
        raise ValueError(f"Task(s) {empty} have no {split} examples.")

  @property
  def num_tasks(self) -> int:
    """Number of tasks."""
    return len(self.task_names)

  @property
  def num_classes(self) -> int:
    """Number of classes of the shared softmax."""
    return len(self.class_names)


# --------------------------------------------------------------------------
# CIFAR-100 (TFDS).
# --------------------------------------------------------------------------


def load_cifar100_tasks(data_dir: str | os.PathLike | None = None,
                        download: bool = True) -> TaskImageData:
  """Loads multitask CIFAR-100: 20 coarse classes = 20 five-way tasks.

  Labels are the 100 fine labels (one softmax shared by all tasks); the task
  of an example is its coarse label, and task names are the TFDS coarse class
  names. Paper: Section 5.1 (following Rosenbaum et al. 2018, Yu et al. 2020).

  Args:
    data_dir: TFDS data directory (None: the TFDS default, ~/tensorflow_datasets).
    download: Whether TFDS may download and prepare the dataset if missing.

  Returns:
    A `TaskImageData` with 50000 train and 10000 test examples, in TFDS
    order.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  # Batches of 10k rather than `batch_size=-1`, which relies on the split
  # sizes recorded in the dataset info (absent under `tfds.testing.mock_data`).
  datasets, info = tfds.load(
      "cifar100", split=["train", "test"], data_dir=data_dir,
      download=download, shuffle_files=False, with_info=True)
  arrays = {}
  for name, ds in zip(("train", "test"), datasets):
    chunks = list(tfds.as_numpy(ds.batch(10_000)))
    for field, key, dtype in (("images", "image", np.uint8),
                              ("labels", "label", np.int32),
                              ("tasks", "coarse_label", np.int32)):
      arrays[f"{name}_{field}"] = np.concatenate(
          [c[key] for c in chunks]).astype(dtype, copy=False)
  return TaskImageData(
      task_names=list(info.features["coarse_label"].names),
      class_names=list(info.features["label"].names),
      **arrays)


# --------------------------------------------------------------------------
# Pairwise tasks from an ImageFolder (multitask CIFAR-10).
# --------------------------------------------------------------------------


def _scan_image_folder(image_dir: pathlib.Path,
                       splits: Sequence[str]) -> dict[str, dict[str, list[str]]]:
  """Lists `{split: {class: [sorted image file names]}}`, validating layout."""
  if not image_dir.is_dir():
    raise FileNotFoundError(f"Image directory not found: {str(image_dir)!r}.")
  available = sorted(p.name for p in image_dir.iterdir() if p.is_dir())
  listing = {}
  for split in splits:
    if split not in available:
      raise ValueError(
          f"Split {split!r} missing in {str(image_dir)!r} (expected layout "
          f"<image_dir>/<split>/<class>/<image>; found splits {available}).")
    classes = {}
    for class_dir in sorted(p for p in (image_dir / split).iterdir()
                            if p.is_dir()):
      classes[class_dir.name] = sorted(
          f.name for f in class_dir.iterdir()
          if f.name.lower().endswith(_IMAGE_EXTENSIONS))
    if not any(classes.values()):
      raise ValueError(
          f"No images ({'/'.join(_IMAGE_EXTENSIONS)}) found under "
          f"{str(image_dir / split)!r}/<class>/.")
    listing[split] = classes
  return listing


def _check_classes_in_every_split(
    image_dir: pathlib.Path, listing: dict[str, dict[str, list[str]]],
    pairs: Sequence[tuple[str, str]]) -> None:
  """Every class of every pair has images in every split (else one task is half-evaluated).

  Raises:
    ValueError: naming the class, its task and the folder that is missing or
      has no images.
  """
  for split, classes in listing.items():
    for pair in pairs:
      for c in pair:
        if not classes.get(c):
          state = "has no images" if c in classes else "is missing"
          raise ValueError(
              f"Class folder {str(image_dir / split / c)!r} {state}: class {c!r} of task "
              f"'{pair[0]}/{pair[1]}' needs images in every split "
              f"({', '.join(listing)}).")


def _first_bad_image(split_dir: pathlib.Path) -> str | None:
  """Why the first image of ``split_dir/<class>/`` that cannot be used fails, or None.

  Run only after decoding the split failed (it decodes every image again, one
  by one): an image that does not decode, or whose height and width differ
  from the first image's, named by its path.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  first = None
  for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
    for f in sorted(class_dir.iterdir()):
      if not f.name.lower().endswith(_IMAGE_EXTENSIONS):
        continue
      try:
        shape = tuple(tf.io.decode_image(tf.io.read_file(str(f)), channels=3,
                                         expand_animations=False).shape[:2])
      except (tf.errors.InvalidArgumentError, tf.errors.OpError) as e:
        reason = re.sub(r"\{\{.*?\}\}|\[Op:.*", "", str(getattr(e, "message", e))).strip()
        reason = reason.splitlines()[0] if reason else type(e).__name__
        return f"Cannot decode image {str(f)!r} ({reason}); replace or remove it."
      if first is None:
        first = (f, shape)
      elif shape != first[1]:
        return (f"Image {str(f)!r} is {shape[0]}x{shape[1]}, but {str(first[0])!r} is "
                f"{first[1][0]}x{first[1][1]}: all images must have the same height and width.")
  return None


def _default_cache_dir() -> pathlib.Path:
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
  return pathlib.Path(root).expanduser() / "ldro" / "imagefolder"


def _decode_image_folder(image_dir: pathlib.Path, splits: Sequence[str]
                         ) -> tuple[list[str], dict[str, np.ndarray]]:
  """Decodes every image of `splits` with tfds ImageFolder.

  Returns:
    (class_names, arrays) with `arrays['{split}_images']` uint8 [M, H, W, 3]
    and `arrays['{split}_labels']` int32 [M], in ImageFolder's (deterministic)
    example order.
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  builder = tfds.folder_dataset.ImageFolder(str(image_dir))
  class_names = list(builder.info.features["label"].names)
  arrays = {}
  for split in splits:
    ds = builder.as_dataset(split=split, shuffle_files=False)
    ds = ds.map(lambda ex: (ex["image"], ex["label"]),
                num_parallel_calls=tf.data.AUTOTUNE).batch(4096)
    images, labels = [], []
    try:
      for image, label in tfds.as_numpy(ds):
        images.append(image)
        labels.append(label)
    except tf.errors.InvalidArgumentError as e:
      bad = _first_bad_image(image_dir / split)
      if bad is not None:
        raise ValueError(bad) from None
      raise ValueError(
          f"Could not batch the images of {str(image_dir / split)!r}: all "
          f"images must have the same height and width.\n{e}") from e
    arrays[f"{split}_images"] = np.concatenate(images).astype(np.uint8)
    arrays[f"{split}_labels"] = np.concatenate(labels).astype(np.int32)
  return class_names, arrays


def load_imagefolder_pair_tasks(
    image_dir: str | os.PathLike,
    pairs: Sequence[tuple[str, str]] = DEFAULT_CIFAR10_PAIRS,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
) -> TaskImageData:
  """Loads binary "class A vs class B" tasks from an ImageFolder layout.

  The layout is `image_dir/{train,test}/<class>/<image>.{jpg,jpeg,png}` (as
  `tfds.folder_dataset.ImageFolder`). Every class folder defines one class of
  the shared softmax, with ids given by the sorted class names (the
  ImageFolder label ids), even classes that appear in no pair. Task `i` holds
  all examples of `pairs[i]`; its name is `"a/b"`. A class may appear in
  several pairs, in which case its examples are duplicated across tasks.

  Decoding is slow (~60k JPEGs for CIFAR-10), so the decoded uint8 arrays of
  the whole folder (all classes, independent of `pairs`) are cached as an
  `.npz` in `cache_dir`, keyed by the absolute path of `image_dir` and the
  list of its image files (adding/removing/renaming files invalidates the
  cache; editing a file in place does not, so delete the cache then). The
  cache is written atomically (temporary file + `os.replace`).

  Args:
    image_dir: Root of the ImageFolder (must contain `train/` and `test/`).
    pairs: The (class_a, class_b) pair of each task.
    cache_dir: Cache folder (None: `$XDG_CACHE_HOME/ldro/imagefolder`, i.e.
      `~/.cache/ldro/imagefolder` by default).
    use_cache: If False, neither read nor write the cache.

  Returns:
    A `TaskImageData` with `len(pairs)` tasks.

  Raises:
    FileNotFoundError: `image_dir` does not exist.
    ValueError: a split folder is missing or has no images, a pair is
      malformed or names a class absent from the folder, a class of a pair
      has no images in some split (naming the folder), an image does not
      decode or has another size (naming the first such file), or a task has
      no train or test example.
  """
  splits = ("train", "test")
  image_dir = pathlib.Path(image_dir).expanduser().resolve()
  pairs = [tuple(p) for p in pairs]
  if not pairs:
    raise ValueError("`pairs` must contain at least one pair of classes.")
  listing = _scan_image_folder(image_dir, splits)
  # ImageFolder's label ids: sorted class folders of *all* split folders.
  available = sorted({c.name for s in image_dir.iterdir() if s.is_dir()
                      for c in s.iterdir() if c.is_dir()})
  for pair in pairs:
    if len(pair) != 2 or pair[0] == pair[1]:
      raise ValueError(f"Each pair needs two distinct classes, got {pair}.")
    missing = [c for c in pair if c not in available]
    if missing:
      raise ValueError(
          f"Class(es) {missing} of pair {pair} not found in "
          f"{str(image_dir)!r}; available classes: {available}.")
  _check_classes_in_every_split(image_dir, listing, pairs)

  cache_path = None
  if use_cache:
    key = hashlib.sha256(json.dumps(
        [_CACHE_FORMAT_VERSION, str(image_dir), listing]).encode()).hexdigest()
    cache_dir = (pathlib.Path(cache_dir).expanduser() if cache_dir is not None
                 else _default_cache_dir())
    cache_path = cache_dir / f"{image_dir.name}-{key[:16]}.npz"
  if cache_path is not None and cache_path.exists():
    with np.load(cache_path, allow_pickle=False) as npz:
      class_names = [str(c) for c in npz["class_names"]]
      arrays = {k: npz[k] for k in npz.files if k != "class_names"}
  else:
    class_names, arrays = _decode_image_folder(image_dir, splits)
    if cache_path is not None:
      fileio.atomic_savez(cache_path, class_names=np.asarray(class_names), **arrays)
  if class_names != available:  # Sanity check of the label-id convention.
    raise ValueError(f"ImageFolder classes {class_names} differ from the "
                     f"class folders {available} of {str(image_dir)!r}.")

  out = {}
  for split in splits:
    images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    index, tasks = [], []
    for task, pair in enumerate(pairs):
      ids = [class_names.index(c) for c in pair]
      idx = np.flatnonzero(np.isin(labels, ids))
      index.append(idx)
      tasks.append(np.full(len(idx), task, np.int32))
    index = np.concatenate(index)
    out[f"{split}_images"] = images[index]
    out[f"{split}_labels"] = labels[index].astype(np.int32)
    out[f"{split}_tasks"] = np.concatenate(tasks)
  return TaskImageData(task_names=[f"{a}/{b}" for a, b in pairs],
                       class_names=class_names, **out)


# --------------------------------------------------------------------------
# Batching.
# --------------------------------------------------------------------------


class GroupedBatcher:
  """Task-grouped training batches, a pure deterministic function of step.

  Each batch holds `per_task_batch = batch_size // num_tasks` examples of
  every task (e.g. batch_size 128 with 20 tasks gives 6 per task, i.e. 120
  examples per step; the remainder is dropped). Task `i` reads an infinite
  stream of its examples made of consecutive epochs, epoch `e` being the
  permutation `np.random.default_rng((seed, i, e)).permutation(n_i)`; step
  `s` takes stream positions `[s * b, (s + 1) * b)`, wrapping across epoch
  boundaries. Hence `batch(step)` depends only on `(seed, step)` (training
  resumes exactly from any step, in any call order) and every example of a
  task is seen exactly once per epoch of that task (:mod:`ldro.data.streams`).

  Attributes:
    num_tasks: Number of tasks N.
    per_task_batch: Examples per task per step, b.
    steps_per_epoch: `ceil(max_i n_i / b)`: steps for the largest task to
      go through all its training examples once (smaller tasks cycle
      faster). For multitask CIFAR-100, 2500 / 6 -> 417.
  """

  def __init__(self, data: TaskImageData, batch_size: int, seed: int) -> None:
    """Splits the training set by task.

    Args:
      data: The multitask data; only the training split is used.
      batch_size: Total nominal batch size; must be >= data.num_tasks.
      seed: Seed of the per-task epoch permutations.
    """
    self.num_tasks = data.num_tasks
    self.per_task_batch = batch_size // data.num_tasks
    if self.per_task_batch < 1:
      raise ValueError(f"batch_size {batch_size} < number of tasks "
                       f"{data.num_tasks}: need at least 1 example per task.")
    self.seed = int(seed)
    self._images, self._labels, self._ids = [], [], []
    for task in range(data.num_tasks):
      idx = np.flatnonzero(data.train_tasks == task)
      self._ids.append(idx)  # training-set ids of the task's examples (batch_part_ids)
      self._images.append(np.ascontiguousarray(data.train_images[idx]))
      self._labels.append(data.train_labels[idx])
    self._sizes = [len(l) for l in self._labels]
    self.steps_per_epoch = -(-max(self._sizes) // self.per_task_batch)
    self._streams = [streams.EpochStream(n, self.seed, task)
                     for task, n in enumerate(self._sizes)]

  def task_indices(self, task: int, step: int) -> np.ndarray:
    """Indices (into the task's training examples) of `task` at `step`.

    Args:
      task: Task id.
      step: Non-negative training step.

    Returns:
      int array [per_task_batch].
    """
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    b = self.per_task_batch
    return self._streams[task].window(step * b, (step + 1) * b)

  def batch(self, step: int) -> dict[str, np.ndarray]:
    """The training batch of `step`.

    Args:
      step: Non-negative training step.

    Returns:
      {'image': float32 [N, b, H, W, C] normalised by `normalize_images`,
       'label': int32 [N, b] global class ids}; row i holds task i.
    """
    images, labels = [], []
    for task in range(self.num_tasks):
      idx = self.task_indices(task, step)
      images.append(self._images[task][idx])
      labels.append(self._labels[task][idx])
    return {"image": normalize_images(np.stack(images)),
            "label": np.stack(labels)}

  def _part_indices(self, step: int, tasks, positions) -> list[np.ndarray]:
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    b = self.per_task_batch
    positions = np.asarray(positions, np.int64)
    if positions.size and (positions.min() < 0 or positions.max() >= b):
      raise ValueError(f"positions must lie in [0, {b}), got {positions}.")
    return [self._streams[int(t)].indices(step * b + positions) for t in tasks]

  def batch_part(self, step: int, tasks, positions) -> dict[str, np.ndarray]:
    """Part of `batch(step)` (per-host input), reading only its examples.

    Equals `batch(step)[k][np.ix_(tasks, positions)]` for every key `k`:
    task `t`'s examples at stream positions `step * b + positions`, i.e. this
    part's slice of the task's per-epoch permutation. A process gathers and
    normalises only these examples.

    Args:
      step: Non-negative training step.
      tasks: Task ids (rows of the batch).
      positions: Example positions within a task's `b` (columns).

    Returns:
      {'image': float32 [len(tasks), len(positions), H, W, C], 'label': int32
       [len(tasks), len(positions)]}.
    """
    images, labels = [], []
    for task, idx in zip(tasks, self._part_indices(step, tasks, positions)):
      images.append(self._images[int(task)][idx])
      labels.append(self._labels[int(task)][idx])
    return {"image": normalize_images(np.stack(images)),
            "label": np.stack(labels)}

  def batch_part_ids(self, step: int, tasks, positions) -> np.ndarray:
    """Training-set example ids (rows of `data.train_*`) read by `batch_part`: int [T, P]."""
    return np.stack([self._ids[int(task)][idx] for task, idx in
                     zip(tasks, self._part_indices(step, tasks, positions))])


def eval_batches(data: TaskImageData, split: str = "test",
                 batch_size: int = 1024) -> Iterator[dict[str, np.ndarray]]:
  """Iterates once, in order, over every example of a split.

  The last batch is smaller when the split size is not a multiple of
  `batch_size` (no padding / mask), so a jitted eval function compiles at
  most twice.

  Args:
    data: The multitask data.
    split: 'test' or 'train'.
    batch_size: Maximum number of examples per batch.

  Yields:
    {'image': float32 [B, H, W, C] (`normalize_images`), 'label': int32 [B],
     'task': int32 [B]}.
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
  images = getattr(data, f"{split}_images")
  labels = getattr(data, f"{split}_labels")
  tasks = getattr(data, f"{split}_tasks")
  for start in range(0, len(images), batch_size):
    sl = slice(start, start + batch_size)
    yield {"image": normalize_images(images[sl]), "label": labels[sl],
           "task": tasks[sl]}


# --------------------------------------------------------------------------
# Controlled difficulty and training-set evaluation (results/cifar10_regime).
# --------------------------------------------------------------------------


def flip_task_labels(data: TaskImageData, task: int, fraction: float,
                     seed: int, to: str = "task") -> TaskImageData:
  """Returns a copy of `data` with a fraction of one task's training labels flipped.

  Exactly `round(fraction * n_task)` training examples of `task`, chosen by
  `np.random.default_rng((seed, task, 0x1ab31))` (deterministic per seed),
  get another class: with ``to='task'``, uniformly among the task's other
  classes (for a two-class pair task, the other class of the pair); with
  ``to='any'``, uniformly among all other classes of the shared softmax.
  Test labels are untouched. The task's training loss then has a floor, the
  "much harder task" of the paper's section 2.3: for a binary task and
  fraction `f < 0.5` flipped within the task, the noisy-label cross-entropy is
  at least the binary entropy `H(f)` (at most ln 2); flipped to any of the
  other `C - 1` classes of a `C`-way softmax, at least `H(f) + f ln(C - 1)`
  (1.79 nats at `f = 0.5`, `C = 10`), above what the clean tasks reach.

  Args:
    data: the multitask data (not modified).
    task: index of the task to corrupt.
    fraction: share of its training examples to flip, in [0, 1].
    seed: seed of the choice.
    to: ``'task'`` (the task's other classes) or ``'any'`` (every other class).

  Returns:
    A new `TaskImageData` (images shared with `data`, labels copied).

  Raises:
    ValueError: task out of range, fraction outside [0, 1], an unknown ``to``,
      or a task with a single class (nothing to flip to).
  """
  task, fraction = int(task), float(fraction)
  if to not in ("task", "any"):
    raise ValueError(f"label noise 'to' must be 'task' or 'any', got {to!r}.")
  if not 0 <= task < data.num_tasks:
    raise ValueError(f"label noise task {task} out of range: {data.num_tasks} tasks.")
  if not 0.0 <= fraction <= 1.0:
    raise ValueError(f"label noise fraction must lie in [0, 1], got {fraction}.")
  idx = np.flatnonzero(data.train_tasks == task)
  classes = (np.unique(data.train_labels[idx]) if to == "task"
             else np.arange(len(data.class_names), dtype=data.train_labels.dtype))
  if len(classes) < 2:
    raise ValueError(f"task {data.task_names[task]!r} has one class; no label to flip to.")
  rng = np.random.default_rng((int(seed), task, 0x1ab31))
  chosen = rng.choice(idx, size=int(round(fraction * len(idx))), replace=False)
  labels = data.train_labels.copy()
  old = labels[chosen]
  # Shift each chosen label by 1..k-1 positions among the k candidate classes.
  pos = np.searchsorted(classes, old)
  shift = rng.integers(1, len(classes), size=len(chosen))
  labels[chosen] = classes[(pos + shift) % len(classes)]
  return dataclasses.replace(data, train_labels=labels)


def _choose_per_task(data: TaskImageData, per_task: int, rng_seed: tuple) -> list[np.ndarray]:
  """Per task, ``min(per_task, n_i)`` of its training indices without replacement (sorted)."""
  rng = np.random.default_rng(rng_seed)
  out = []
  for task in range(data.num_tasks):
    idx = np.flatnonzero(data.train_tasks == task)
    out.append(np.sort(rng.choice(idx, size=min(per_task, len(idx)), replace=False)))
  return out


def train_subset(data: TaskImageData, per_task: int,
                 seed: int = 0) -> dict[str, np.ndarray]:
  """A fixed subset of the training split, `per_task` examples of each task.

  For measuring per-task training loss/accuracy on more than one batch (the
  plateau of the training curves). Labels are those of `data` (after
  `flip_task_labels`, the noisy ones: the objective the methods see).

  Args:
    data: the multitask data.
    per_task: examples per task (fewer if a task has fewer).
    seed: seed of the choice (`np.random.default_rng((seed, 0x7e5a))`).

  Returns:
    `{'image': uint8 [M, H, W, C], 'label': int32 [M], 'task': int32 [M]}`.
  """
  if per_task < 1:
    raise ValueError(f"per_task must be >= 1, got {per_task}.")
  index = np.concatenate(_choose_per_task(data, per_task, (int(seed), 0x7e5a)))
  return {"image": data.train_images[index], "label": data.train_labels[index],
          "task": data.train_tasks[index]}


def hold_out_validation(data: TaskImageData, per_task: int, seed: int = 0
                        ) -> tuple[TaskImageData, TaskImageData]:
  """Splits `per_task` training examples of each task off as a validation set.

  For methods that read a validation gradient (MOML): the validation set is
  held-out *training* data (never the test split), and the returned training
  data no longer contains it. The validation set is returned as the training
  split of a second `TaskImageData` (test split shared), so a
  `GroupedBatcher` can draw task-grouped validation batches from it.

  Args:
    data: the multitask data.
    per_task: validation examples per task; each task must keep at least one
      training example.
    seed: seed of the choice (`np.random.default_rng((seed, 0x5a11d))`).

  Returns:
    `(train_data, val_data)`.

  Raises:
    ValueError: `per_task < 1`, or a task with no more than `per_task`
      training examples (naming it).
  """
  if per_task < 1:
    raise ValueError(f"validation examples per task must be >= 1, got {per_task}.")
  for task in range(data.num_tasks):
    n = int(np.sum(data.train_tasks == task))
    if n <= per_task:
      raise ValueError(f"task {data.task_names[task]!r} has {n} training examples; "
                       f"holding out {per_task} for validation would leave none.")
  val = np.sort(np.concatenate(_choose_per_task(data, per_task, (int(seed), 0x5A11D))))
  keep = np.ones(len(data.train_labels), bool)
  keep[val] = False

  def subset(index):
    return dataclasses.replace(data, train_images=data.train_images[index],
                               train_labels=data.train_labels[index],
                               train_tasks=data.train_tasks[index])
  return subset(np.flatnonzero(keep)), subset(val)
