"""Worst-group image benchmark (Spurious-CIFAR, worst-group spec section 3) as an Experiment.

One gin-configurable experiment, :class:`WorstGroupImageExperiment`, runs every method of the
worst-group paper on :mod:`ldro.data.spurious` with the runner
(:func:`experiments.runner.loop.train_and_evaluate`). The four groups (label x cue) are the
experiment's tasks; ``task_accuracy`` is the per-group TEST accuracy, so the runner's
``avg_accuracy`` / ``worst_accuracy`` are the group-balanced test average and the worst-group
accuracy. The methods are options, selected in gin:

* **ERM**: ``sampling='iid'``, ``alpha_aux = alpha_reg = 0``, runner ``mode='plain'``
  (:func:`ldro.train.make_plain_step`), i.i.d. batches (no group labels used).
* **Regularized MTL** (paper Eq. 9): ``sampling='iid'``, ``mode='plain'``, one scalar loss
  ``L_end + alpha_aux L_aux + alpha_reg (mean|h_end| + mean|h_aux|)``, the auxiliary task a
  masked-patch reconstruction (60 % of the 4x4 patches zeroed, the clean image reconstructed at
  16x16x3 by a linear head on ``h``, MSE; :func:`ldro.worst_group.random_patch_mask`,
  :func:`ldro.worst_group.masked_reconstruction_loss`). Ablations: ``alpha_aux = 0`` (+l1 only:
  no auxiliary pass, l1 on ``h_end``), ``alpha_reg = 0`` (+aux only).
* **Group DRO with groups as tasks**: ``sampling='groups'`` (group-grouped ``[4, b, ...]``
  batches, :class:`ldro.data.images.GroupedBatcher`) with a weighting method in lean mode, e.g.
  ``gin_configs/methods/dro.gin`` (:func:`ldro.group_dro`) or ``ldro.gin`` (L-DRO over groups);
  any registered method works. With ``alpha_aux``/``alpha_reg`` the group losses carry the MTL
  terms too (regularized MTL + DRO, beyond the paper).
* **Pre-training of the auxiliary task** (spec section 3: one checkpoint, trained once on data
  disjoint from the end task's): ``sampling='pretrain'`` trains the encoder and the
  reconstruction head alone (no end task, no cue) on the pool of CIFAR-10 training images that
  no seed in ``pool_seeds`` uses (:func:`ldro.data.spurious.shared_pool_index`). Any method
  then starts from it with ``pretrained_workdir`` (encoder and reconstruction head restored,
  end head freshly initialised per seed); without it, from scratch (the control).
* **JTT**: stage 1 is an ERM run; stage 2 (``sampling='jtt'``, ``jtt_stage1_workdir``,
  ``jtt_up_weight``) re-initializes the model and trains on the training set with stage 1's
  misclassified examples duplicated ``lambda_up`` times
  (:func:`ldro.worst_group.jtt_batch_indices`: a pure function of (seed, step), so stage 2
  resumes exactly).

The model (:class:`WorstGroupNet`) is a SmallCNN-like encoder (``num_conv`` x SameConv(32) +
max-pool from :mod:`ldro.models.cnn`, spatial mean, ``mlp_layers`` x Dense(128) + ReLU; ``h`` =
the last 128-d activation), an end head Dense(2) and a reconstruction head Dense(16*16*3).
``head_weight_decay`` adds ``wd/2 (||W_end||^2 + ||W_aux||^2)`` (``W_aux`` only when
``alpha_aux > 0``) to the loss (spec: otherwise
the activation l1 is dodged by shrinking ``h`` and growing the heads).

Each evaluation records, besides the runner's fields: ``val_group_accuracy`` [4],
``val_worst_accuracy``, ``val_average_accuracy`` (pooled; model selection: Val-GP / No-GP),
``test_average_accuracy`` (pooled), ``test_worst_group``, ``flip_rate`` (test predictions that
change when the cue is swapped), ``mean_abs_h`` (test), ``end_head_norm``, ``aux_head_norm``.
"""

import ast
import json
import os
from typing import Any, Optional, Sequence

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from experiments.families import base as experiment_lib
from experiments.runner import paths
from experiments.runner import workdir as workdir_lib
from ldro import worst_group
from ldro.data import images as images_lib
from ldro.data import spurious
from ldro.data import streams
from ldro.models import cnn

PyTree = Any
SAMPLINGS = ("iid", "groups", "jtt", "pretrain")
RECON_SIZE = 16  # the clean image is reconstructed at 16x16x3 (2x2 average pooling)


class WorstGroupNet(nn.Module):
  """Shared encoder ``x -> h`` with an end head (logits) and a reconstruction head.

  Attributes:
    num_classes: end-task classes.
    recon_dim: outputs of the reconstruction head (``16 * 16 * 3``).
    features, num_conv, mlp_width, mlp_layers: the encoder (SmallCNN-like: 4 x conv 32,
      2 x Dense 128 by default).
    conv_impl: :func:`ldro.models.cnn.resolve_conv_impl`.
  """
  num_classes: int = 2
  recon_dim: int = RECON_SIZE * RECON_SIZE * 3
  features: int = 32
  num_conv: int = 4
  mlp_width: int = 128
  mlp_layers: int = 2
  conv_impl: str = "auto"

  def setup(self):
    self.convs = [cnn.SameConv(self.features, (3, 3), pool_2x2=True, conv_impl=self.conv_impl,
                               name=f"conv_{i}") for i in range(self.num_conv)]
    self.denses = [nn.Dense(self.mlp_width, name=f"dense_{i}") for i in range(self.mlp_layers)]
    self.end_head = nn.Dense(self.num_classes, name="end_head")
    self.aux_head = nn.Dense(self.recon_dim, name="aux_head")

  def encode(self, x):
    """``h [B, mlp_width]``: the shared pre-output activations."""
    for conv in self.convs:
      x = nn.relu(conv(x))
    x = jnp.mean(x, axis=(1, 2))
    for dense in self.denses:
      x = nn.relu(dense(x))
    return x

  def __call__(self, x):
    """``(logits [B, K], h)``."""
    h = self.encode(x)
    return self.end_head(h), h

  def reconstruct(self, x):
    """``(reconstruction [B, recon_dim], h)``."""
    h = self.encode(x)
    return self.aux_head(h), h

  def init_all(self, x):
    return self(x), self.reconstruct(x)


def downsample(images):
  """``[B, H, W, C] -> [B, H/2, W/2, C]`` by 2x2 average pooling (the reconstruction target)."""
  b, h, w, c = images.shape
  return images.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _whole(value, name, low):
  """``value`` as an int >= ``low`` (one line naming the gin binding otherwise)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise ValueError(f"WorstGroupImageExperiment.{name} must be an integer >= {low}, "
                     f"got {value!r}.")
  return int(value)


def _as_group_data(split: dict) -> images_lib.TaskImageData:
  """A :class:`TaskImageData` whose tasks are the four groups (for :class:`GroupedBatcher`)."""
  return images_lib.TaskImageData(
      task_names=list(spurious.GROUP_NAMES), class_names=list(spurious.LABEL_NAMES),
      train_images=split["image"], train_labels=split["label"], train_tasks=split["group"],
      test_images=split["image"], test_labels=split["label"],  # unused by the batcher
      test_tasks=split["group"])


def restore_params(workdir: str, setting: str = "WorstGroupImageExperiment.jtt_stage1_workdir",
                   what: str = "JTT's stage 1 (an ERM run)") -> tuple[PyTree, int]:
  """``(params, step)`` of the newest checkpoint of a runner workdir (e.g. JTT's stage 1).

  Raises:
    FileNotFoundError: no checkpoint there (the message names ``setting`` and ``what`` to run).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt_dir = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(ckpt_dir):
    raise FileNotFoundError(f"no checkpoints in {workdir!r} ({setting}): run {what} there "
                            "first.")
  mngr = ocp.CheckpointManager(ckpt_dir, item_handlers=ocp.StandardCheckpointHandler())
  try:
    step = mngr.latest_step()
    if step is None:
      raise FileNotFoundError(f"no finished checkpoint in {ckpt_dir!r}.")
    restored = mngr.restore(step, args=ocp.args.StandardRestore())
  finally:
    mngr.close()
  params = restored["params"] if isinstance(restored, dict) else restored.params
  return jax.tree_util.tree_map(jnp.asarray, params), int(step)


def _recorded_bindings(workdir: str) -> dict:
  """The gin bindings a runner workdir was made with (its fingerprint file; {} if absent)."""
  path = os.path.join(workdir, workdir_lib.FINGERPRINT_FILE)
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return json.load(f).get("bindings", {})


#: Seeds whose train/val images a pre-training pool leaves out by default (the 5 seeds).
POOL_SEEDS = (0, 1, 2, 3, 4)
#: Parameters restored from a pre-training checkpoint (the end head is initialised afresh).
PRETRAINED_MODULES = ("conv_", "dense_", "aux_head")


def load_pretrained(fresh: PyTree, workdir: str, seed: int, n_train: int, n_val: int,
                    num_steps: Optional[int]) -> tuple[PyTree, int]:
  """``fresh`` with the encoder and reconstruction head of the pre-training run at ``workdir``.

  Checks that the run was a pre-training run (``sampling='pretrain'``) whose pool excludes
  this seed's training and validation images (``seed`` in its ``pool_seeds``, same split
  sizes), that it finished (checkpoint step ``num_steps``, when given), and that its encoder
  has this model's shapes.

  Returns:
    ``(params, pretraining step)``.

  Raises:
    ValueError, FileNotFoundError: one line naming the mismatch.
  """
  setting = "WorstGroupImageExperiment.pretrained_workdir"
  rec = _recorded_bindings(workdir)
  prefix = "WorstGroupImageExperiment."
  if rec.get(prefix + "sampling") != "'pretrain'":
    raise ValueError(f"{workdir!r} ({setting}) is not a pre-training run: its run_config.json "
                     f"records sampling={rec.get(prefix + 'sampling', '(none)')}.")
  pool_seeds = tuple(ast.literal_eval(rec.get(prefix + "pool_seeds", repr(POOL_SEEDS))))
  if seed not in pool_seeds:
    raise ValueError(f"seed {seed} is not among the pre-training run's pool_seeds "
                     f"{pool_seeds} ({setting}={workdir!r}): its training images may be in "
                     "the pre-training pool.")
  for key, value in (("n_train", n_train), ("n_val", n_val)):
    if prefix + key in rec and int(rec[prefix + key]) != value:
      raise ValueError(f"the pre-training run at {workdir!r} used {key}={rec[prefix + key]}, "
                       f"this run {key}={value}: its pool is not disjoint from this run's data.")
  params, step = restore_params(workdir, setting, "the pre-training (pretrain.gin)")
  if num_steps is not None and step != num_steps:
    raise ValueError(f"the pre-training run at {workdir!r} stopped at step {step}, not "
                     f"{num_steps} (WorstGroupImageExperiment.pretrained_steps): resume it "
                     "first.")
  out = jax.tree_util.tree_map(lambda x: x, fresh)
  for name, sub in params["params"].items():
    if not name.startswith(PRETRAINED_MODULES):
      continue
    if name not in out["params"]:
      raise ValueError(f"pre-trained module {name!r} is not in this model ({setting}).")
    shapes = jax.tree_util.tree_map(jnp.shape, sub)
    want = jax.tree_util.tree_map(jnp.shape, out["params"][name])
    if shapes != want:
      raise ValueError(f"pre-trained {name} has shapes {shapes}, this model {want} "
                       f"(model_kwargs must match the pre-training run's).")
    out["params"][name] = sub
  return out, step


@gin.configurable
class WorstGroupImageExperiment(experiment_lib.Experiment):
  """Spurious-CIFAR with the worst-group paper's methods (see the module docstring).

  Attributes:
    data: the :class:`ldro.data.spurious.SpuriousData`.
    model: the :class:`WorstGroupNet`.
    steps_per_epoch: ``n_train // batch_size`` (i.i.d. and JTT) or the grouped batcher's epoch
      (the largest group seen once).
  """

  main_metric = "accuracy"
  higher_is_better = True

  def __init__(self, data_dir: Optional[str] = None, variant: str = "A", seed: int = 0,
               n_train: int = 4800, n_val: int = 2000, majority_fraction: float = 0.95,
               test_per_group: int = 2000, batch_size: int = 64, sampling: str = "iid",
               alpha_aux: float = 0.0, alpha_reg: float = 0.0, mask_ratio: float = 0.6,
               mask_patch: int = 4, head_weight_decay: float = 0.0,
               jtt_stage1_workdir: Optional[str] = None, jtt_up_weight: int = 20,
               pretrained_workdir: Optional[str] = None, pretrained_steps: Optional[int] = None,
               pool_seeds: Sequence[int] = POOL_SEEDS,
               model_kwargs: Optional[dict] = None, conv_impl: str = "auto",
               eval_batch_size: int = 1000, data: Optional[spurious.SpuriousData] = None):
    """Builds the data, the model and the batches.

    Args:
      data_dir: the CIFAR-10 ImageFolder (``DATA_DIR``); unused if ``data`` is given.
      variant: cue variant ``'A'`` (4x4 square) or ``'B'`` (2-px frame).
      seed: the data seed (split, cue assignment, jitter, batch order).
      n_train, n_val, majority_fraction, test_per_group: see
        :func:`ldro.data.spurious.make_spurious_data`.
      batch_size: training batch (``sampling='groups'``: ``batch_size // 4`` per group).
      sampling: ``'iid'`` (ERM, MTL; runner ``mode='plain'``), ``'groups'`` (group-grouped
        batches for a weighting method, e.g. group DRO), ``'jtt'`` (JTT stage 2,
        ``mode='plain'``) or ``'pretrain'`` (the reconstruction alone on the pool,
        ``mode='plain'``).
      alpha_aux: weight of the reconstruction loss (0: no auxiliary pass).
      alpha_reg: weight of the activation l1 ``mean|h|`` (of both passes).
      mask_ratio, mask_patch: the masked-patch auxiliary input.
      head_weight_decay: ``wd`` of ``wd/2 ||W||^2`` on both heads' kernels.
      jtt_stage1_workdir: JTT stage 1's workdir (an ERM run); its newest checkpoint defines
        the error set.
      jtt_up_weight: JTT's ``lambda_up``.
      pretrained_workdir: a finished ``sampling='pretrain'`` run: the encoder and the
        reconstruction head start from its checkpoint (None: from scratch).
      pretrained_steps: the pre-training's length; its checkpoint must be at this step
        (None: not checked).
      pool_seeds: ``sampling='pretrain'``: the seeds whose train and val images are left out
        of the pool (the fine-tuning runs' seeds).
      model_kwargs: overrides of :class:`WorstGroupNet`'s encoder fields.
      conv_impl: convolution kernels (:mod:`ldro.models.cnn`).
      eval_batch_size: examples per evaluation batch.
      data: a prepared :class:`SpuriousData` (tests); else loaded from ``data_dir``.

    Raises:
      ValueError: a bad option (naming its gin binding), an empty group, an empty JTT error set,
        a pre-training run that does not fit this run.
      FileNotFoundError: missing data, JTT stage-1 or pre-training checkpoints.
    """
    name = "WorstGroupImageExperiment."
    self.seed = _whole(seed, "seed", 0)
    self.batch_size = _whole(batch_size, "batch_size", 1)
    self.eval_batch_size = _whole(eval_batch_size, "eval_batch_size", 1)
    if sampling not in SAMPLINGS:
      raise ValueError(f"{name}sampling must be one of {', '.join(SAMPLINGS)}, got {sampling!r}.")
    self.sampling = sampling
    for key, v in (("alpha_aux", alpha_aux), ("alpha_reg", alpha_reg),
                   ("head_weight_decay", head_weight_decay)):
      if not float(v) >= 0.0:
        raise ValueError(f"{name}{key} must be >= 0, got {v}.")
    self.alpha_aux, self.alpha_reg = float(alpha_aux), float(alpha_reg)
    self.head_weight_decay = float(head_weight_decay)
    self.mask_ratio, self.mask_patch = float(mask_ratio), int(mask_patch)
    if sampling == "pretrain" and (self.alpha_aux or self.alpha_reg):
      raise ValueError(f"{name}sampling='pretrain' trains the reconstruction alone: "
                       f"alpha_aux and alpha_reg must be 0, got {alpha_aux}, {alpha_reg}.")
    self.pool_seeds = tuple(_whole(s, "pool_seeds", 0) for s in pool_seeds)
    if data is None:
      if data_dir is None:
        raise ValueError(f"{name}data_dir (DATA_DIR) is required: the CIFAR-10 ImageFolder.")
      data_dir = paths.require_dir(paths.resolve(data_dir), "data directory",
                                   f"{name}data_dir (DATA_DIR)")
      data = spurious.load_spurious_cifar10(
          data_dir, variant=variant, seed=self.seed, n_train=n_train, n_val=n_val,
          majority_fraction=majority_fraction, test_per_group=test_per_group,
          pool_seeds=self.pool_seeds if sampling == "pretrain" else None)
    if sampling == "pretrain" and data.pool_images is None:
      raise ValueError(f"{name}sampling='pretrain' needs the data's pool_images.")
    self.data = data
    self.task_names = list(spurious.GROUP_NAMES)
    kwargs = dict(model_kwargs or {})
    bad = sorted(set(kwargs) - {"features", "num_conv", "mlp_width", "mlp_layers"})
    if bad:
      raise ValueError(f"unknown encoder field(s) {bad} ({name}model_kwargs).")
    try:
      cnn.resolve_conv_impl(conv_impl)
    except ValueError as e:
      raise ValueError(f"{e} ({name}conv_impl)") from None
    self.model = WorstGroupNet(num_classes=2, conv_impl=conv_impl, **kwargs)
    self._image_shape = tuple(data.train["image"].shape[1:])
    h, w = self._image_shape[:2]
    if h % 2 or w % 2 or h % self.mask_patch or w % self.mask_patch:
      raise ValueError(f"images of {h}x{w} must be even and divisible by mask_patch="
                       f"{self.mask_patch} ({name}mask_patch).")
    self.model = self.model.clone(recon_dim=(h // 2) * (w // 2) * 3)
    n = len(data.pool_images if sampling == "pretrain" else data.train["label"])
    if sampling == "groups":
      self.batcher = images_lib.GroupedBatcher(_as_group_data(data.train), self.batch_size,
                                               self.seed)
      self.steps_per_epoch = self.batcher.steps_per_epoch
    else:
      if self.batch_size > n:
        raise ValueError(f"{name}batch_size={batch_size} exceeds the {n} training examples"
                         f"{' of the pool' if sampling == 'pretrain' else ''}.")
      self.batcher = None
      self._stream = streams.EpochStream(n, self.seed, 0)
      self.steps_per_epoch = n // self.batch_size
    self._eval_fn = jax.jit(self._eval_batch)
    self._recon_fn = jax.jit(self._reconstruction)
    self.pretrained_workdir = (None if pretrained_workdir is None else
                               paths.resolve(pretrained_workdir))
    self.pretrained_steps = (None if pretrained_steps is None else
                             _whole(pretrained_steps, "pretrained_steps", 1))
    self.pretrained_step = None  # set by init_params
    self._n_split = (int(n_train), int(n_val))
    if self.pretrained_workdir is not None and sampling == "pretrain":
      raise ValueError(f"{name}pretrained_workdir is for fine-tuning; a pre-training run "
                       "(sampling='pretrain') starts from scratch.")
    self.jtt_errors = None
    self.jtt_up_weight = _whole(jtt_up_weight, "jtt_up_weight", 1)
    if sampling == "jtt":
      if jtt_stage1_workdir is None:
        raise ValueError(f"{name}sampling='jtt' needs {name}jtt_stage1_workdir (an ERM run).")
      params, step = restore_params(paths.resolve(jtt_stage1_workdir))
      preds = self._predict(params, data.train["image"])
      self.jtt_errors = worst_group.jtt_error_set(preds, data.train["label"])
      self.jtt_stage1_step = step
      # Checks the error set now (an empty one is an error, naming the fix).
      worst_group.jtt_batch_indices(self.jtt_errors, self.jtt_up_weight, self.seed, 0,
                                    self.batch_size)

  # -- Model and losses. --

  def init_params(self, rng: jax.Array) -> PyTree:
    """Fresh parameters, or the pre-trained encoder and reconstruction head with a fresh end
    head (``pretrained_workdir``)."""
    x = jnp.zeros((1,) + self._image_shape, jnp.float32)
    params = self.model.init(rng, x, method=WorstGroupNet.init_all)
    if self.pretrained_workdir is None:
      return params
    params, self.pretrained_step = load_pretrained(
        params, self.pretrained_workdir, self.seed, *self._n_split, self.pretrained_steps)
    return params

  def _head_penalty(self, params):
    if self.head_weight_decay == 0.0:
      return 0.0
    p = params["params"]
    sq = jnp.sum(jnp.square(p["end_head"]["kernel"]))
    if self.alpha_aux > 0:  # the reconstruction head is trained only with the auxiliary task
      sq = sq + jnp.sum(jnp.square(p["aux_head"]["kernel"]))
    return 0.5 * self.head_weight_decay * sq

  def _example_losses(self, params, images, labels, rng):
    """Per-example end-task loss ``[B]`` plus the batch's scalar MTL terms and stats."""
    logits, h_end = self.model.apply(params, images)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
    extra = jnp.asarray(0.0)
    stats = {"mean_abs_h": worst_group.l1_activation(h_end)}
    if self.alpha_reg > 0:
      extra = extra + self.alpha_reg * worst_group.l1_activation(h_end)
    if self.alpha_aux > 0:
      recon, h_aux = self._reconstruction(params, images, rng)
      extra = extra + self.alpha_aux * recon
      stats["recon_loss"] = recon
      if self.alpha_reg > 0:
        extra = extra + self.alpha_reg * worst_group.l1_activation(h_aux)
    return ce, extra + self._head_penalty(params), stats

  def _reconstruction(self, params, images, rng):
    """``(MSE of the masked input's reconstruction, h of the masked pass)``."""
    mask = worst_group.random_patch_mask(rng, images.shape, self.mask_patch, self.mask_ratio)
    pred, h_aux = self.model.apply(params, worst_group.apply_patch_mask(images, mask),
                                   method=WorstGroupNet.reconstruct)
    target = downsample(images).reshape(pred.shape)
    return worst_group.masked_reconstruction_loss(pred, target), h_aux

  def plain_loss(self, params, batch, rng):
    """Eq. 9 on an i.i.d. batch: ``(loss, {'task_losses': per-group CE [4] (0 if absent)})``.

    ``sampling='pretrain'``: the reconstruction loss alone (logged as every ``task_losses``
    entry: there is no end task).
    """
    if self.sampling == "pretrain":
      recon, h_aux = self._reconstruction(params, batch["image"], rng)
      return recon, {"recon_loss": recon, "mean_abs_h": worst_group.l1_activation(h_aux)}
    if self.sampling == "groups":
      raise ValueError("WorstGroupImageExperiment.sampling='groups' needs a weighting method "
                       "(train_and_evaluate.mode 'lean' or 'jacobian'), not mode='plain'.")
    ce, extra, stats = self._example_losses(params, batch["image"], batch["label"], rng)
    sums = jax.ops.segment_sum(ce, batch["group"], num_segments=4)
    counts = jax.ops.segment_sum(jnp.ones_like(ce), batch["group"], num_segments=4)
    loss = ce.mean() + extra
    return loss, {"task_losses": sums / jnp.maximum(counts, 1.0), **stats}

  def _check_grouped(self):
    if self.sampling != "groups":
      raise ValueError(f"WorstGroupImageExperiment.sampling={self.sampling!r} runs with "
                       "train_and_evaluate.mode='plain'; a weighting method needs "
                       "sampling='groups' (group-grouped batches).")

  def task_loss(self, params, task_batch, rng):
    """One group's loss (its CE + the MTL terms on its slice)."""
    self._check_grouped()
    ce, extra, _ = self._example_losses(params, task_batch["image"], task_batch["label"], rng)
    return ce.mean() + extra, {}

  def grouped_losses(self, params, batch, rng):
    """All four group losses from one application on the flattened batch (lean mode).

    With ``alpha_aux``/``alpha_reg`` > 0 the MTL terms are computed per group (``vmap``),
    as :meth:`task_loss`; without them one model application serves every group.
    """
    self._check_grouped()
    if self.alpha_aux > 0 or self.alpha_reg > 0:
      keys = jax.random.split(rng, batch["label"].shape[0])
      return jax.vmap(self.task_loss, in_axes=(None, 0, 0))(params, batch, keys)
    images, labels = batch["image"], batch["label"]
    ce, extra, _ = self._example_losses(params, images.reshape((-1,) + images.shape[2:]),
                                        labels.reshape(-1), rng)
    return ce.reshape(labels.shape).mean(axis=1) + extra, {}

  # -- Batches. --

  def _rows(self, step: int) -> np.ndarray:
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    if self.sampling == "jtt":
      return worst_group.jtt_batch_indices(self.jtt_errors, self.jtt_up_weight, self.seed, step,
                                           self.batch_size)
    b = self.batch_size  # epochs of n // b full batches (remainder dropped)
    epoch, pos = divmod(int(step), self.steps_per_epoch)
    return self._stream.permutation(epoch)[pos * b:(pos + 1) * b]

  def train_batch(self, step: int) -> PyTree:
    """``sampling='groups'``: ``[4, b, ...]`` group-grouped; else ``[B, ...]`` with groups."""
    if self.batcher is not None:
      return self.batcher.batch(step)
    rows = self._rows(step)
    if self.sampling == "pretrain":
      return {"image": images_lib.normalize_images(self.data.pool_images[rows])}
    tr = self.data.train
    return {"image": images_lib.normalize_images(tr["image"][rows]), "label": tr["label"][rows],
            "group": tr["group"][rows]}

  def train_batch_prefix(self) -> tuple:
    if self.batcher is not None:
      return (4, self.batcher.per_task_batch)
    return (self.batch_size,)

  # -- Evaluation. --

  def _eval_batch(self, params, images, labels, groups):
    logits, h = self.model.apply(params, images)
    pred = jnp.argmax(logits, -1)
    correct, counts = worst_group.group_correct_counts(pred, labels, groups, 4)
    return correct, counts, pred, jnp.sum(jnp.abs(h))

  def _run(self, params, images, labels, groups):
    correct, counts, preds, abs_h = np.zeros(4), np.zeros(4), [], 0.0
    for i in range(0, len(labels), self.eval_batch_size):
      sl = slice(i, i + self.eval_batch_size)
      c, k, p, a = jax.device_get(self._eval_fn(
          params, images_lib.normalize_images(images[sl]), labels[sl], groups[sl]))
      correct += c
      counts += k
      preds.append(p)
      abs_h += float(a)
    return correct, counts, np.concatenate(preds), abs_h

  def _predict(self, params, images) -> np.ndarray:
    n = len(images)
    zeros = np.zeros(n, np.int32)
    return self._run(params, images, zeros, zeros)[2]

  def _val_reconstruction(self, params) -> float:
    """Mean reconstruction loss on the validation images, with fixed masks (a monitor of the
    auxiliary task, comparable across evaluations and runs)."""
    images, total = self.data.val["image"], 0.0
    for k, i in enumerate(range(0, len(images), self.eval_batch_size)):
      batch = images_lib.normalize_images(images[i:i + self.eval_batch_size])
      loss, _ = self._recon_fn(params, batch, jax.random.PRNGKey(k))
      total += float(loss) * len(batch)
    return total / len(images)

  def evaluate(self, params: PyTree) -> dict:
    """Per-group test accuracy (``task_accuracy``) and the other fields (module docstring)."""
    te, va = self.data.test, self.data.val
    correct, counts, preds, abs_h = self._run(params, te["image"], te["label"], te["group"])
    worst_group.check_groups(te["group"], 4, "test", spurious.GROUP_NAMES)
    test_acc = correct / counts
    flipped = self._predict(params, te["image_flipped"])
    v_correct, v_counts, _, _ = self._run(params, va["image"], va["label"], va["group"])
    val_acc = v_correct / v_counts
    width = self.model.mlp_width
    p = params["params"]
    extra = {}
    if self.sampling == "pretrain" or self.alpha_aux > 0:
      extra["val_recon_loss"] = self._val_reconstruction(params)
    if self.pretrained_step is not None:
      extra["pretrained_step"] = self.pretrained_step
    return {
        **extra,
        "task_accuracy": [float(x) for x in test_acc],
        "test_average_accuracy": float(correct.sum() / counts.sum()),
        "test_worst_group": spurious.GROUP_NAMES[int(np.argmin(test_acc))],
        "val_group_accuracy": [float(x) for x in val_acc],
        "val_worst_accuracy": float(val_acc.min()),
        "val_average_accuracy": float(v_correct.sum() / v_counts.sum()),
        "flip_rate": float(np.mean(preds != flipped)),
        "mean_abs_h": abs_h / (len(te["label"]) * width),
        "end_head_norm": float(jnp.linalg.norm(p["end_head"]["kernel"])),
        "aux_head_norm": float(jnp.linalg.norm(p["aux_head"]["kernel"])),
    }
