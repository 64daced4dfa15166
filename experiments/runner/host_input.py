"""Per-host input and evaluation: each process reads and evaluates only its share.

Multi-process runs (``jax.process_count() > 1``) with an experiment that
implements the per-process protocol of :class:`experiments.families.base.Experiment`:

* **Training batches.** The global batch of a step is a pure function of the
  step (resume stays exact). The runner splits its leading axes (``[N, b]``
  tasks x examples per task, or ``[B]`` rows) over the processes as the mesh
  splits the batch (:func:`experiments.runner.sharding.process_blocks`), asks
  the experiment for this process's block only
  (``experiment.train_batch_part(step, block)``) and assembles the global
  ``jax.Array`` with ``jax.make_array_from_process_local_data``. A batch that
  does not divide into disjoint, equal per-process parts is an error, raised
  before the first step (:func:`check`).
* **Evaluation.** Each process evaluates its share of the evaluation set
  (``experiment.evaluate_part(params, index, count)``, per-task sums); the
  sums are added over processes (:func:`experiments.runner.sharding.sum_over_processes`)
  and turned into the same per-task metrics as one process computes
  (``experiment.evaluate_from_sums``).

Single-process runs, and experiments without the protocol, use
``experiment.train_batch(step)`` (every process builds the whole batch and
keeps its part) and ``experiment.evaluate(params)``, as before.
"""

from typing import Any, Optional

import jax

from experiments.runner import sharding

PyTree = Any


def batch_prefix(exp, task_grouped: bool) -> Optional[tuple]:
  """The leading batch shape the per-host path splits, or None (whole-batch path)."""
  if jax.process_count() == 1:
    return None
  prefix = getattr(exp, "train_batch_prefix", lambda: None)()
  if prefix is None:
    return None
  prefix = tuple(int(s) for s in prefix)
  if len(prefix) != (2 if task_grouped else 1):
    raise ValueError(f"{type(exp).__name__}.train_batch_prefix() is {prefix}, but the runner's "
                     f"mode needs {'(N, b)' if task_grouped else '(B,)'}.")
  return prefix


def check(exp, mesh, task_grouped: bool) -> None:
  """Raises the per-host sizing error (if any) before training starts."""
  prefix = batch_prefix(exp, task_grouped)
  if prefix is not None:
    sharding.process_blocks(prefix, mesh, task_grouped)


def train_batch(exp, step: int, mesh, task_grouped: bool) -> PyTree:
  """The global batch of ``step`` on ``mesh``; this process reads only its part when it can."""
  prefix = batch_prefix(exp, task_grouped)
  if prefix is None:  # every process describes the whole batch and keeps its slice
    return sharding.shard_batch(exp.train_batch(step), mesh, task_grouped=task_grouped)
  block = sharding.process_block(prefix, mesh, task_grouped)
  local = exp.train_batch_part(int(step), block)
  return sharding.assemble_batch(local, prefix, mesh, task_grouped)


def evaluate(exp, params: PyTree) -> dict:
  """``exp.evaluate(params)``, split across processes when the experiment can."""
  if jax.process_count() == 1 or not getattr(exp, "supports_split_evaluation", False):
    return exp.evaluate(params)
  sums = exp.evaluate_part(params, jax.process_index(), jax.process_count())
  return exp.evaluate_from_sums(sharding.sum_over_processes(sums))
