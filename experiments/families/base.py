"""What the runner needs from an experiment family: the :class:`Experiment` contract.

An experiment bundles tasks, data, model and evaluation. The runner
(:func:`experiments.runner.loop.train_and_evaluate`) only uses this interface,
so one loop serves every family in :mod:`experiments.families` (synthetic,
image classification, language modelling, toy). A new family is one module
here with a gin-configurable subclass; its gin base file imports that module.
"""

import abc
from typing import Any, Callable, Optional

import jax

PyTree = Any


class Experiment(abc.ABC):
  """Interface of an experiment.

  Attributes:
    task_names: one name per task.
    main_metric: name of the per-task metric summarised by ``avg_``/``worst_``.
    higher_is_better: whether larger ``main_metric`` is better.
  """
  task_names: list[str]
  main_metric: str = "loss"
  higher_is_better: bool = False

  @property
  def num_tasks(self) -> int:
    return len(self.task_names)

  @property
  def task_sizes(self) -> Optional[list[float]]:
    """``|D_i|`` per task for static mixing (None if not meaningful)."""
    return None

  @abc.abstractmethod
  def init_params(self, rng: jax.Array) -> PyTree:
    """Initial model parameters."""

  @abc.abstractmethod
  def task_loss(self, params: PyTree, task_batch: PyTree, rng: jax.Array):
    """``(loss, aux)`` of one task on its slice of a task-grouped batch."""

  #: Optional ``grouped_losses(params, batch, rng) -> (losses [N], aux)``: all
  #: task losses of a task-grouped batch in one call (e.g. one model application
  #: on the flattened batch), with the same values and ``aux`` structure as
  #: ``vmap`` of :meth:`task_loss` over tasks. Lean mode then uses it for the
  #: step's forward/backward pass (``ldro.train.make_train_step(losses_fn=)``),
  #: which is then as cheap as an ordinary step. ``None``: ``vmap`` of
  #: :meth:`task_loss`.
  grouped_losses: Optional[Callable[..., Any]] = None

  #: Whether lean-mode L-DRO with the ``grouped`` strategy takes a refresh
  #: step's update from its ``N`` gradients
  #: (``ldro.train.make_train_step(reuse_refresh_grads=)``); ``None``: that
  #: function's default (on GPU/TPU, not on CPU). An experiment whose model's
  #: backward pass stays fast inside ``lax.cond`` on CPU says ``True``.
  reuse_refresh_grads: Optional[bool] = None

  #: Why ``train_and_evaluate.microbatches > 1`` cannot be used, or None: the task-grouped
  #: batch's leaves are ``[N, b, ...]`` with ``b`` examples per task (what micro-batches
  #: cut) and the step's gradients add up over micro-batches.
  no_microbatches: Optional[str] = None

  @abc.abstractmethod
  def train_batch(self, step: int) -> PyTree:
    """Task-grouped training batch for ``step`` (pure function of the step)."""

  def plain_loss(self, params: PyTree, batch: PyTree, rng: jax.Array):
    """``(loss, {'task_losses': [N]})`` on an ordinary batch (``mode='plain'``)."""
    raise NotImplementedError(f"{type(self).__name__} does not support mode='plain'.")

  @abc.abstractmethod
  def evaluate(self, params: PyTree) -> dict:
    """Evaluation: ``{'task_<main_metric>': [N] list, ...}`` (JSON-able)."""

  # -- Per-host input and evaluation (multi-process runs; experiments.runner.host_input). --

  def train_batch_prefix(self) -> Optional[tuple]:
    """Leading shape of :meth:`train_batch`: ``(N, b)`` (task-grouped) or ``(B,)``.

    ``None`` (the default): the experiment cannot read part of a batch, and
    every process builds the whole batch and keeps its own slice.
    """
    return None

  def train_batch_part(self, step: int, block: tuple) -> PyTree:
    """The part ``train_batch(step)[np.ix_(*block)]`` of the batch, reading only that part.

    ``block`` holds one sorted index array per axis of :meth:`train_batch_prefix`
    (tasks and examples per task, or rows). The default slices the whole batch.
    """
    import numpy as np  # pylint: disable=g-import-not-at-top
    ix = np.ix_(*block)
    return jax.tree_util.tree_map(lambda x: np.asarray(x)[ix], self.train_batch(step))

  #: Whether :meth:`evaluate_part` / :meth:`evaluate_from_sums` are implemented.
  supports_split_evaluation: bool = False

  def evaluate_part(self, params: PyTree, index: int, count: int) -> PyTree:
    """Sums (numpy, e.g. per-task loss sums and counts) over part ``index`` of ``count``."""
    raise NotImplementedError

  def evaluate_from_sums(self, sums: PyTree) -> dict:
    """The :meth:`evaluate` record from the sums of every part added up."""
    raise NotImplementedError

  # -- A validation split of the training data (methods that need 'val_grads'). --

  #: Whether :meth:`val_batch` gives batches of held-out training data.
  has_validation_split: bool = False

  def val_batch(self, step: int) -> PyTree:
    """The task-grouped validation batch of ``step`` (held-out training data, never test)."""
    raise NotImplementedError
