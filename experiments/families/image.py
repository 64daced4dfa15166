"""Multitask image classification (paper section 5.1, Appendix B.3) as an Experiment.

Two data sets, both with one softmax shared by all tasks:

* ``'cifar100'`` (TFDS): the 20 coarse classes are 20 five-way tasks over the
  100 fine labels (section 5.1).
* ``'cifar10_pairs'`` (an ImageFolder on disk, e.g. the offline CIFAR-10 JPEGs):
  each task is a binary "class A vs class B" problem, with the softmax over
  all 10 classes.

Gin use::

    train_and_evaluate.experiment = @ImageClassificationExperiment()
    ImageClassificationExperiment.dataset = 'cifar10_pairs'
    ImageClassificationExperiment.data_dir = '../shared/data/cifar10_images'
"""

import functools
from typing import Any, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.families import base as experiment_lib
from experiments.runner import paths
from experiments.runner import validation
from ldro.data import images as images_lib
from ldro.data import streams
from ldro.models import cnn
from ldro import rotograd as rotograd_lib

PyTree = Any

DATASETS = ("cifar100", "cifar10_pairs")
MODELS = {
    "small": cnn.SmallCNN,  # paper section 5.1
    "large": cnn.LargeCNN,  # paper App. B.3
    # Not from the paper: 2 x conv 8, MLP 1 x 16, for fast tests and smoke runs.
    "tiny": functools.partial(cnn.ConvNet, features=8, num_conv=2, mlp_width=16, mlp_layers=1),
}


def load_task_data(dataset: str, data_dir: Optional[str],
                   pairs: Optional[Sequence[Sequence[str]]] = None,
                   download: bool = True) -> images_lib.TaskImageData:
  """Loads the multitask data of ``dataset``, failing clearly on a missing folder.

  Args:
    dataset: ``'cifar100'`` (TFDS) or ``'cifar10_pairs'`` (ImageFolder).
    data_dir: for ``'cifar100'`` the TFDS data directory (None: the TFDS
      default); for ``'cifar10_pairs'`` the ImageFolder root (required).
    pairs: class pairs of the tasks (``'cifar10_pairs'`` only; None: the
      default five CIFAR-10 pairs).
    download: whether TFDS may download CIFAR-100 if it is not prepared.

  Returns:
    The :class:`ldro.data.images.TaskImageData`.

  Raises:
    FileNotFoundError: ``data_dir`` does not exist, or CIFAR-100 is not
      prepared there and ``download`` is False.
    ValueError: unknown dataset, missing ``data_dir`` for an ImageFolder, or
      ``pairs`` given for CIFAR-100.
  """
  if dataset not in DATASETS:
    raise ValueError(f"unknown dataset {dataset!r} (ImageClassificationExperiment.dataset); "
                     f"known: {', '.join(DATASETS)}.")
  if data_dir is not None:
    data_dir = paths.require_dir(
        paths.resolve(data_dir), "data directory",
        f"ImageClassificationExperiment.data_dir (DATA_DIR) for dataset {dataset!r}")
  if dataset == "cifar100":
    if pairs is not None:
      raise ValueError("ImageClassificationExperiment.pairs only applies to 'cifar10_pairs'; "
                       "CIFAR-100 tasks are the 20 coarse classes.")
    try:
      return images_lib.load_cifar100_tasks(data_dir=data_dir, download=download)
    except AssertionError as e:  # TFDS: dataset not prepared and download=False.
      where = data_dir or "the TFDS default data_dir"
      raise FileNotFoundError(f"TFDS cifar100 not found in {where!r} (download=False): "
                              f"{str(e).strip().splitlines()[0]}") from e
  if data_dir is None:
    raise ValueError("dataset 'cifar10_pairs' needs ImageClassificationExperiment.data_dir "
                     "(an ImageFolder root with train/ and test/ class folders).")
  pairs = images_lib.DEFAULT_CIFAR10_PAIRS if pairs is None else [tuple(p) for p in pairs]
  return images_lib.load_imagefolder_pair_tasks(data_dir, pairs)


def build_model(model: str, num_classes: int, conv_impl: str = "auto",
                model_kwargs: Optional[dict] = None, rotograd_tasks: int = 0):
  """The CNN ``MODELS[model]`` with optional field overrides (e.g. ``{'features': 8}``).

  ``rotograd_tasks > 0``: with RotoGrad's rotations for that many tasks
  between the trunk and the head (``ldro.models.cnn.ConvNet.rotograd``).

  Raises:
    ValueError: unknown model or field.
  """
  if model not in MODELS:
    raise ValueError(f"unknown model {model!r} (ImageClassificationExperiment.model); known: "
                     f"{', '.join(MODELS)}.")
  kwargs = dict(model_kwargs or {})
  allowed = ("features", "num_conv", "mlp_width", "mlp_layers")
  bad = sorted(set(kwargs) - set(allowed))
  if bad:
    raise ValueError(f"unknown CNN field(s) {bad} (ImageClassificationExperiment.model_kwargs); "
                     f"known: {', '.join(allowed)}.")
  if rotograd_tasks > 0:
    kwargs.update(rotograd=True, num_tasks=int(rotograd_tasks))
  return MODELS[model](num_classes=num_classes, conv_impl=conv_impl, **kwargs)


# RotoGrad's optimizer around the model's (gin_configs/methods/rotograd.gin):
# ldro.rotograd_optimizer.model_tx = @optax.sgd(), .rotation_tx = ..., .burn_in_period = ...
gin.external_configurable(rotograd_lib.rotograd_optimizer, module="ldro")


#: Why Jacobian mode (``vmap`` of ``task_loss`` over tasks) cannot run RotoGrad.
ROTOGRAD_NEEDS_LEAN = (
    "RotoGrad (ImageClassificationExperiment.rotograd) rescales and aligns the task gradients "
    "across tasks in one backward pass over the whole task-grouped batch, which Jacobian mode's "
    "vmap of task_loss over tasks splits apart: use lean mode (train_and_evaluate.mode = 'lean', "
    "or None with method 'equal').")


def apply_label_noise(data: images_lib.TaskImageData, label_noise: Optional[dict],
                      seed: int) -> images_lib.TaskImageData:
  """``data`` with ``label_noise = {'task': i, 'fraction': f[, 'to': 'task' | 'any']}`` applied
  (None: unchanged).

  ``task`` may be an index or a task name (e.g. ``'cat/dog'``); ``to`` (default ``'task'``)
  picks the classes the flipped labels go to; see :func:`ldro.data.images.flip_task_labels`.

  Raises:
    ValueError: malformed ``label_noise`` or an unknown task.
  """
  if not label_noise:
    return data
  where = "(ImageClassificationExperiment.label_noise)"
  if not isinstance(label_noise, dict) or not (
      {"task", "fraction"} <= set(label_noise) <= {"task", "fraction", "to"}):
    raise ValueError(f"label_noise must be {{'task': ..., 'fraction': ...[, 'to': 'task' or "
                     f"'any']}}, got {label_noise!r} {where}.")
  task = label_noise["task"]
  if isinstance(task, str):
    if task not in data.task_names:
      raise ValueError(f"label_noise task {task!r} unknown; tasks: {data.task_names} {where}.")
    task = data.task_names.index(task)
  try:
    return images_lib.flip_task_labels(data, int(task), float(label_noise["fraction"]), seed,
                                       to=label_noise.get("to", "task"))
  except ValueError as e:
    raise ValueError(f"{e} {where}") from None


def task_cross_entropy(model: Any, params: PyTree, task_batch: PyTree):
  """Mean cross-entropy of one task's examples under the shared softmax.

  The loss of :meth:`ImageClassificationExperiment.task_loss`, as a function of
  the model (reused by ``experiments.benchmark``).

  Args:
    model: the Flax CNN (e.g. ``MODELS['small'](num_classes=100)``).
    params: its variables.
    task_batch: ``{'image': [b, H, W, C] float32, 'label': [b] int32}``
      (global class ids).

  Returns:
    ``(loss, {'accuracy': train accuracy on the slice})``.
  """
  logits = model.apply(params, task_batch["image"]).astype(jnp.float32)
  labels = task_batch["label"]
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  return loss, {"accuracy": acc}


def grouped_cross_entropy(model: Any, params: PyTree, batch: PyTree):
  """All task losses of a grouped batch from one model application.

  The losses of :meth:`ImageClassificationExperiment.grouped_losses`, as a
  function of the model (reused by ``experiments.benchmark``); equal to
  ``vmap`` of :func:`task_cross_entropy` over the task axis.

  Args:
    model: the Flax CNN.
    params: its variables.
    batch: ``{'image': [N, b, H, W, C], 'label': [N, b]}``.

  Returns:
    ``(losses [N], {'accuracy': [N]})``.
  """
  images, labels = batch["image"], batch["label"]
  if getattr(model, "rotograd", False):  # the grouping tells each row's task and rotation
    logits = model.apply(params, images)
  else:
    logits = model.apply(params, images.reshape((-1,) + images.shape[2:]))
  logits = logits.astype(jnp.float32).reshape(labels.shape + logits.shape[-1:])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(axis=1)
  acc = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32), axis=1)
  return losses, {"accuracy": acc}


@gin.configurable
class ImageClassificationExperiment(experiment_lib.Experiment):
  """Multitask image classification with a shared softmax (paper section 5.1).

  Every task's loss is the mean softmax cross-entropy over its examples, with
  the softmax over all classes of all tasks (the paper's shared output layer);
  accuracy is the argmax over all classes. Training batches are task-grouped
  (``[N, batch_size // N, 32, 32, 3]``, :class:`ldro.data.images.GroupedBatcher`),
  a pure function of the step, so resumed runs see the same data.

  Attributes:
    data: the loaded :class:`ldro.data.images.TaskImageData`.
    batcher: the training-batch generator.
    model: the Flax CNN (``SmallCNN``: section 5.1; ``LargeCNN``: App. B.3).
    steps_per_epoch: steps for the largest task to see all its examples once.
  """

  main_metric = "accuracy"
  higher_is_better = True

  def __init__(self, dataset: str = "cifar100", data_dir: Optional[str] = None,
               model: str = "small", batch_size: int = 128, seed: int = 0,
               eval_batch_size: int = 1000,
               pairs: Optional[Sequence[Sequence[str]]] = None, download: bool = True,
               conv_impl: str = "auto", model_kwargs: Optional[dict] = None,
               label_noise: Optional[dict] = None, train_eval_size: int = 0,
               val_per_task: int = 0, rotograd: bool = False):
    """Loads the data and builds the model.

    Args:
      dataset: ``'cifar100'`` (TFDS, 20 coarse-class tasks) or
        ``'cifar10_pairs'`` (ImageFolder, one binary task per class pair).
      data_dir: TFDS data directory (cifar100; None: TFDS default) or the
        ImageFolder root (cifar10_pairs; required). Never hard-coded: set it
        in gin.
      model: ``'small'`` (section 5.1), ``'large'`` (Appendix B.3) or
        ``'tiny'`` (not from the paper; for tests and smoke runs).
      batch_size: nominal training batch size; each task gets
        ``batch_size // N`` examples per step (128 -> 6 x 20 = 120 on CIFAR-100).
      seed: seed of the per-task data order.
      eval_batch_size: examples per evaluation batch.
      pairs: class pairs (cifar10_pairs only; None: the default five pairs).
      download: let TFDS download CIFAR-100 if needed.
      conv_impl: the CNN's convolution/pooling kernels: ``'auto'`` (the
        CPU-tuned custom VJPs on CPU, XLA's own ops on GPU/TPU),
        ``'custom_vjp'`` or ``'xla'`` (:func:`ldro.models.cnn.resolve_conv_impl`).
      model_kwargs: overrides of the CNN's fields (``features``,
        ``num_conv``, ``mlp_width``, ``mlp_layers``), e.g. a narrower CNN
        than the paper's (:func:`build_model`).
      label_noise: ``{'task': i, 'fraction': f}``: flip a fraction ``f`` of
        task ``i``'s training labels (deterministic per ``seed``; test labels
        untouched), a task much harder than the others (paper section 2.3;
        :func:`apply_label_noise`).
      train_eval_size: if > 0, :meth:`evaluate` also reports per-task loss
        and accuracy on a fixed subset of this many training examples per
        task (``task_train_loss``, ``task_train_accuracy``; with
        ``label_noise``, on the noisy labels the methods train on).
      val_per_task: if > 0, hold out this many training examples of each
        task as a validation split (removed from training; deterministic per
        ``seed``), drawn from by :meth:`val_batch` with the training batch's
        per-task size: the validation gradient of MOML
        (:func:`ldro.data.images.hold_out_validation`).
      rotograd: RotoGrad (Javaloy & Valera, ICLR 2022): per-task rotations
        ``R_k`` of the CNN's representation before the shared head
        (:mod:`ldro.rotograd`), whose backward pass gives every task's
        gradient into the trunk the same magnitude (relative-convergence
        weights) and trains the rotations to align the task gradients. An
        architecture, run with equal task weights (method ``'equal'``) in
        lean mode (:meth:`grouped_losses`, one backward pass over the whole
        grouped batch; Jacobian mode raises a ValueError). Its optimizer
        wraps the model's, :func:`ldro.rotograd.rotograd_optimizer` (the
        rotations' own optimizer and learning rate, the burn-in period of
        the reference norms): ``gin_configs/methods/rotograd.gin``.


    Raises:
      FileNotFoundError: the data directory is missing.
      ValueError: unknown dataset or model, or a bad batch size.
    """
    if model not in MODELS:
      raise ValueError(f"unknown model {model!r} (ImageClassificationExperiment.model); known: "
                       f"{', '.join(MODELS)}.")
    name = "ImageClassificationExperiment."
    eval_batch_size = validation.whole_number(eval_batch_size, name + "eval_batch_size", 1)
    batch_size = validation.whole_number(batch_size, name + "batch_size", 1)
    seed = validation.seed(seed, name + "seed")
    try:
      # The custom VJPs keep their speed inside lax.cond on CPU (XLA's own
      # convolution gradients do not): lean-mode L-DRO may then reuse a
      # refresh step's N gradients for its update.
      self.reuse_refresh_grads = True if cnn.fast_backward_under_cond(conv_impl) else None
    except ValueError as e:
      raise ValueError(f"{e} (ImageClassificationExperiment.conv_impl)") from None
    self.dataset = dataset
    self.data = apply_label_noise(load_task_data(dataset, data_dir, pairs, download),
                                  label_noise, int(seed))
    val_per_task = validation.whole_number(val_per_task, name + "val_per_task", 0)
    self._val_batcher = None
    if val_per_task > 0:
      try:
        self.data, val_data = images_lib.hold_out_validation(self.data, val_per_task, int(seed))
      except ValueError as e:
        raise ValueError(f"{e} ({name}val_per_task)") from None
      # Its own stream order (seed + 1): not the training batches' order.
      self._val_batcher = images_lib.GroupedBatcher(val_data, int(batch_size), int(seed) + 1)
    self.task_names = list(self.data.task_names)
    self.batcher = images_lib.GroupedBatcher(self.data, int(batch_size), int(seed))
    self.steps_per_epoch = self.batcher.steps_per_epoch
    if not isinstance(rotograd, bool):
      raise ValueError(f"{name}rotograd must be True or False, got {rotograd!r}.")
    self.rotograd = rotograd
    if rotograd:
      self.no_microbatches = ("RotoGrad's backward pass rescales and aligns the task gradients "
                              "of the whole batch, which do not add up over micro-batches")
    self.model = build_model(model, self.data.num_classes, conv_impl, model_kwargs,
                             rotograd_tasks=len(self.task_names) if rotograd else 0)
    self.eval_batch_size = int(eval_batch_size)
    if int(train_eval_size) < 0:
      raise ValueError(f"train_eval_size must be >= 0, got {train_eval_size} "
                       "(ImageClassificationExperiment.train_eval_size).")
    self._train_eval = (images_lib.train_subset(self.data, int(train_eval_size))
                        if int(train_eval_size) > 0 else None)
    self._image_shape = tuple(self.data.train_images.shape[1:])
    self._eval_batch = jax.jit(self._eval_counts)

  @property
  def task_sizes(self) -> list[float]:
    """Number of training examples of each task (``|D_i|``)."""
    counts = np.bincount(self.data.train_tasks, minlength=self.num_tasks)
    return [float(c) for c in counts]

  def init_params(self, rng: jax.Array) -> PyTree:
    """Initial CNN variables for 32x32x3 (or the data's) images."""
    dummy = jnp.zeros((1,) + self._image_shape, jnp.float32)
    kwargs = {"tasks": jnp.zeros((1,), jnp.int32)} if self.rotograd else {}
    # Jitted: op by op, every layer's initialiser compiles on its own (about twice the time
    # on CPU, more with RotoGrad's expm); the values are bitwise those of the eager init.
    return jax.jit(lambda r, x: self.model.init(r, x, **kwargs))(rng, dummy)

  def task_loss(self, params: PyTree, task_batch: PyTree, rng: jax.Array):
    """Mean cross-entropy of one task's examples under the shared softmax.

    Args:
      params: model variables.
      task_batch: ``{'image': [b, H, W, C] float32, 'label': [b] int32}``
        (global class ids).
      rng: unused (the CNNs are deterministic).

    Returns:
      ``(loss, {'accuracy': train accuracy on the slice})``.

    Raises:
      ValueError: with ``rotograd`` (one task's slice cannot run RotoGrad's
        cross-task backward pass; use lean mode).
    """
    del rng
    if self.rotograd:
      raise ValueError(ROTOGRAD_NEEDS_LEAN)
    return task_cross_entropy(self.model, params, task_batch)

  def grouped_losses(self, params: PyTree, batch: PyTree, rng: jax.Array):
    """All task losses of a grouped batch from one model application.

    Equal to ``vmap`` of :meth:`task_loss` over the task axis (same aux), but
    the backward pass is one ordinary pass over ``N * b`` images (lean mode's
    step then costs what a plain step costs; see ``results/benchmark``).

    Args:
      params: model variables.
      batch: ``{'image': [N, b, H, W, C], 'label': [N, b]}``.
      rng: unused.

    Returns:
      ``(losses [N], {'accuracy': [N]})``.
    """
    del rng
    return grouped_cross_entropy(self.model, params, batch)

  def train_batch(self, step: int) -> PyTree:
    """The task-grouped batch of ``step``: ``{'image': [N, b, ...], 'label': [N, b]}``."""
    return self.batcher.batch(step)

  @property
  def has_validation_split(self) -> bool:
    return self._val_batcher is not None

  def val_batch(self, step: int) -> PyTree:
    """The task-grouped validation batch of ``step`` (``val_per_task > 0``)."""
    if self._val_batcher is None:
      raise ValueError("no validation split: set ImageClassificationExperiment.val_per_task.")
    return self._val_batcher.batch(step)

  def _eval_counts(self, params, image, label, task):
    if self.rotograd:  # each example through its task's rotation
      logits = self.model.apply(params, image, tasks=task).astype(jnp.float32)
    else:
      logits = self.model.apply(params, image).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, label)
    correct = (jnp.argmax(logits, -1) == label).astype(jnp.float32)
    seg = lambda x: jax.ops.segment_sum(x, task, num_segments=self.num_tasks)
    return seg(correct), seg(loss), seg(jnp.ones_like(loss))

  def evaluate(self, params: PyTree) -> dict:
    """Per-task test accuracy and loss over every test example.

    Args:
      params: model variables.

    Returns:
      ``{'task_accuracy': [N], 'task_test_loss': [N]}`` (accuracy of the
      argmax over all classes; mean cross-entropy).
    """
    acc, loss = self._accuracy_and_loss(
        params, images_lib.eval_batches(self.data, "test", self.eval_batch_size))
    out = {"task_accuracy": acc, "task_test_loss": loss}
    if self._train_eval is not None:
      sub = self._train_eval
      batches = ({"image": images_lib.normalize_images(sub["image"][i:i + self.eval_batch_size]),
                  "label": sub["label"][i:i + self.eval_batch_size],
                  "task": sub["task"][i:i + self.eval_batch_size]}
                 for i in range(0, len(sub["label"]), self.eval_batch_size))
      out["task_train_accuracy"], out["task_train_loss"] = self._accuracy_and_loss(params, batches)
    return out

  def _accuracy_and_loss(self, params: PyTree, batches) -> tuple[list[float], list[float]]:
    n = self.num_tasks
    correct, loss, count = np.zeros(n), np.zeros(n), np.zeros(n)
    for b in batches:
      c, l, k = jax.device_get(self._eval_batch(params, b["image"], b["label"], b["task"]))
      correct += c
      loss += l
      count += k
    return [float(x) for x in correct / count], [float(x) for x in loss / count]

  # -- Per-host input and split evaluation (experiments.runner.host_input). --

  def train_batch_prefix(self) -> tuple:
    """``(N, b)``: the task-grouped batch's tasks x examples per task."""
    return (self.num_tasks, self.batcher.per_task_batch)

  def train_batch_part(self, step: int, block: tuple) -> PyTree:
    """This process's tasks x example positions of batch ``step``, reading only those.

    Each task's examples are this part's slice of the task's per-epoch
    permutation (:meth:`ldro.data.images.GroupedBatcher.batch_part`).
    """
    tasks, positions = block
    return self.batcher.batch_part(step, tasks, positions)

  supports_split_evaluation = True

  def _eval_sets(self) -> dict:
    sets = {"test": {"image": self.data.test_images, "label": self.data.test_labels,
                     "task": self.data.test_tasks}}
    if getattr(self, "_train_eval", None) is not None:
      sets["train"] = self._train_eval
    return sets

  def evaluate_part(self, params: PyTree, index: int, count: int) -> dict:
    """Per-task sums (correct, loss, count) over part ``index`` of ``count`` of each eval set.

    Part ``p`` is the contiguous ``p``-th of the examples
    (:func:`ldro.data.streams.part_slice`); the sums of all parts give
    :meth:`evaluate`'s metrics (:meth:`evaluate_from_sums`).
    """
    out = {}
    for name, arrays in self._eval_sets().items():
      part = streams.part_slice(len(arrays["label"]), index, count)
      n = self.num_tasks
      sums = np.zeros((3, n))
      for start in range(part.start, part.stop, self.eval_batch_size):
        sl = slice(start, min(start + self.eval_batch_size, part.stop))
        c, l, k = jax.device_get(self._eval_batch(
            params, images_lib.normalize_images(arrays["image"][sl]), arrays["label"][sl],
            arrays["task"][sl]))
        sums += np.stack([c, l, k])
      out[name] = sums
    return out

  def evaluate_from_sums(self, sums: dict) -> dict:
    """:meth:`evaluate`'s record from the summed :meth:`evaluate_part` of all parts."""
    keys = {"test": ("task_accuracy", "task_test_loss"),
            "train": ("task_train_accuracy", "task_train_loss")}
    out = {}
    for name, (correct, loss, count) in sums.items():
      acc_key, loss_key = keys[name]
      out[acc_key] = [float(x) for x in correct / count]
      out[loss_key] = [float(x) for x in loss / count]
    return out
