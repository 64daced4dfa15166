"""Fault injection as a wrapper around any experiment (for :mod:`experiments.faults` and tests).

Production experiments carry no test hooks; a run that should see a NaN wraps
its experiment in gin::

    import experiments.runner.fault_injection
    train_and_evaluate.experiment = @NanAtStep()
    NanAtStep.experiment = @SyntheticExperiment()
    NanAtStep.step = 12
    NanAtStep.task = 3

At training step ``step`` (0-based: the step that takes the state from
``step`` to ``step + 1``) the loss of task ``task``, and so its gradients, is
NaN; every other step's batch and loss equal the wrapped experiment's, and
evaluation is the wrapped experiment's.
"""

from typing import Any

import gin
import numpy as np

from experiments.families import base

_POISON = "fault_injection_poison"


@gin.configurable
class NanAtStep(base.Experiment):
  """Makes one task's loss NaN at one training step of ``experiment``.

  The experiment's batches must be dicts (all families' are); the wrapper adds
  an ``[N]`` entry that is 0, or NaN for the poisoned task, and multiplies
  each task loss by ``1 + entry``. Lean mode uses ``vmap`` of
  :meth:`task_loss` (the wrapped ``grouped_losses`` would not see the entry).
  """

  grouped_losses = None

  def __init__(self, experiment: base.Experiment = gin.REQUIRED, step: int = gin.REQUIRED,
               task: int = 0):
    self.inner = experiment
    if not 0 <= int(task) < experiment.num_tasks:
      raise ValueError(f"NanAtStep.task must be in [0, {experiment.num_tasks}), got {task}.")
    self.step, self.task = int(step), int(task)
    self.task_names = experiment.task_names
    self.main_metric = experiment.main_metric
    self.higher_is_better = experiment.higher_is_better
    self.reuse_refresh_grads = experiment.reuse_refresh_grads

  @property
  def task_sizes(self):
    return self.inner.task_sizes

  def init_params(self, rng):
    return self.inner.init_params(rng)

  def task_loss(self, params, task_batch, rng):
    task_batch = dict(task_batch)
    poison = task_batch.pop(_POISON)
    loss, aux = self.inner.task_loss(params, task_batch, rng)
    return loss * (1.0 + poison), aux

  def train_batch(self, step: int) -> Any:
    batch = dict(self.inner.train_batch(step))
    poison = np.zeros((self.num_tasks,), np.float32)
    if int(step) == self.step:
      poison[self.task] = np.nan
    batch[_POISON] = poison
    return batch

  def evaluate(self, params):
    return self.inner.evaluate(params)
