"""What the runner needs from an experiment, and the synthetic experiment.

An experiment bundles tasks, data, model and evaluation. The runner
(:mod:`experiments.train`) only uses this interface, so the same loop serves
the synthetic, image-classification and language-modelling experiments.
"""

import abc
from typing import Any, Callable, Optional

import gin
import jax
import jax.numpy as jnp
import numpy as np

from ldro.data import synthetic

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

  @abc.abstractmethod
  def train_batch(self, step: int) -> PyTree:
    """Task-grouped training batch for ``step`` (pure function of the step)."""

  def plain_loss(self, params: PyTree, batch: PyTree, rng: jax.Array):
    """``(loss, {'task_losses': [N]})`` on an ordinary batch (``mode='plain'``)."""
    raise NotImplementedError(f"{type(self).__name__} does not support mode='plain'.")

  @abc.abstractmethod
  def evaluate(self, params: PyTree) -> dict:
    """Evaluation: ``{'task_<main_metric>': [N] list, ...}`` (JSON-able)."""


@gin.configurable
class SyntheticExperiment(Experiment):
  """The 2-D proof of concept of the paper's section 4 (Figure 2).

  Defaults: 10 cluster tasks around (-1, 0) with spread 0.15, the outlier at
  (1, 0), ``R = 1.25``, start ``theta0 = (r, phi) = (1.5, 2.6)``, i.e. ``f = (-2.0, 1.8)``, up and
  left of the cluster, where the outlier is the worst task: DRO then heads
  for the outlier and stalls on the disc at an angle far from the cluster,
  which makes the average-loss, DRO and L-DRO trajectories separate visibly. ``loss_noise``/``grad_noise`` > 0 give the
  noisy variant of Figure 2c.

  Test hook (fault injection, see :mod:`experiments.faults`): with
  ``nan_at_step=s`` the loss of task ``nan_task`` is NaN (and so are its
  gradients) at training step ``s`` (0-based; the step that takes the state
  from ``s`` to ``s + 1``). Evaluation is unaffected. Default ``None``: off,
  and the batch and loss are exactly those without the hook.
  """

  main_metric = "loss"
  higher_is_better = False

  def __init__(self, num_cluster: int = 10, spread: float = 0.15, radius: float = 1.25,
               start_r: float = 1.5, start_phi: float = 2.6, loss_noise: float = 0.0,
               grad_noise: float = 0.0, seed: int = 0, nan_at_step: Optional[int] = None,
               nan_task: int = 0):
    self.tasks = synthetic.make_tasks(num_cluster, spread, radius, seed=seed)
    self.task_names = [f"cluster{i}" for i in range(num_cluster)] + ["outlier"]
    if nan_at_step is not None and not 0 <= int(nan_task) < len(self.task_names):
      raise ValueError(f"SyntheticExperiment.nan_task must be in [0, {len(self.task_names)}), "
                       f"got {nan_task}.")
    self.nan_at_step = None if nan_at_step is None else int(nan_at_step)
    self.nan_task = int(nan_task)
    self.start = (float(start_r), float(start_phi))
    self.loss_noise, self.grad_noise = float(loss_noise), float(grad_noise)
    self._points = jnp.asarray(self.tasks.points)
    self._eval = jax.jit(self._eval_losses)

  def init_params(self, rng):
    del rng
    return {"r": jnp.asarray(self.start[0], jnp.float32),
            "phi": jnp.asarray(self.start[1], jnp.float32)}

  def task_loss(self, params, task_batch, rng):
    outlier = jnp.asarray(self.tasks.outlier)
    if self.loss_noise or self.grad_noise:
      loss = synthetic.noisy_task_loss(params, task_batch["point"], outlier, self.tasks.radius,
                                       rng, self.loss_noise, self.grad_noise)
    else:
      loss = synthetic.task_loss(params, task_batch["point"], outlier, self.tasks.radius)
    if "poison" in task_batch:  # fault-injection hook: 0, or NaN for the poisoned task
      loss = loss * (1.0 + task_batch["poison"])
    return loss, {}

  def train_batch(self, step):
    batch = {"point": self.tasks.points}
    if self.nan_at_step is not None:
      poison = np.zeros((self.num_tasks,), np.float32)
      if int(step) == self.nan_at_step:
        poison[self.nan_task] = np.nan
      batch["poison"] = poison
    return batch

  def _eval_losses(self, params):
    outlier = jnp.asarray(self.tasks.outlier)
    losses = jax.vmap(lambda p: synthetic.task_loss(params, p, outlier, self.tasks.radius))(
        self._points)
    return losses, synthetic.predict(params, outlier, self.tasks.radius)

  def evaluate(self, params):
    losses, pred = jax.device_get(self._eval(params))
    return {"task_loss": [float(x) for x in losses],
            "prediction": [float(x) for x in pred],
            "theta": [float(params["r"]), float(params["phi"])]}
