"""Orbax checkpoints of the runner: manager, restore (skipping damaged ones), save args.

A run's whole state (:class:`ldro.train.TrainState`: params, optimizer state
with the task weights and interaction matrix, PRNG key, step) is one orbax
item under ``<workdir>/checkpoints``; batches are a pure function of the step,
so restoring it resumes the run bit-exactly.
"""

import logging
import os
import sys
import time
from typing import Optional

import jax

from ldro import train as ldro_train


def manager(workdir: str, keep: int):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # cleanup_tmp_directories: remove checkpoints half-written by a killed run
  # (``<step>.orbax-checkpoint-tmp-*``); they are never restored from.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         cleanup_tmp_directories=True)
  # The standard handler, named up front, also lets item_metadata() read shapes.
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options, item_handlers=ocp.StandardCheckpointHandler())


def restore(mngr, state: ldro_train.TrainState, shardings=None) -> tuple[ldro_train.TrainState, int]:
  """Restores the newest readable checkpoint (``(state, 0)`` if there is none).

  Half-written checkpoints (orbax's tmp directories) are never listed. A
  finalized checkpoint that cannot be read (damaged files) is skipped with a
  warning in favour of the previous one, and moved to
  ``<workdir>/checkpoints_unreadable/`` so the run can save that step again;
  this happens only if an older checkpoint restores, so a config that does not
  match the checkpoints (e.g. another model) is an error and moves nothing.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return state, 0

  def abstract(x, s=None):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s if s is not None else x.sharding)

  if shardings is not None:
    target = jax.tree_util.tree_map(abstract, state, shardings)
  else:
    target = jax.tree_util.tree_map(abstract, state)
  failed = []
  # Before reading metadata or arrays: the noise is printed while a read fails.
  quiet_failed_restore_noise(str(mngr.directory))
  for step in steps:
    mismatch = shape_mismatch(mngr, step, target)
    if mismatch:  # decided from metadata: a failing orbax restore leaves noisy threads
      failed.append((step, ValueError(mismatch)))
      continue
    try:
      restored = mngr.restore(step, args=ocp.args.StandardRestore(target))
      if int(restored.step) != int(step):
        raise ValueError(f"checkpoint {step} holds a state at step {int(restored.step)}")
    except Exception as e:  # pylint: disable=broad-except
      failed.append((step, e))
      continue
    if failed and jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(str(mngr.directory)), "checkpoints_unreadable")
      os.makedirs(aside, exist_ok=True)
      for bad, e in failed:
        src = os.path.join(str(mngr.directory), str(bad))
        dst = os.path.join(aside, f"{bad}-{time.strftime('%Y%m%d-%H%M%S')}")
        if os.path.isdir(src):
          os.replace(src, dst)
        print(f"warning: checkpoint {bad} is unreadable ({type(e).__name__}: "
              f"{first_line(e)[:200]}); moved to {dst}; resuming from checkpoint {step}",
              file=sys.stderr, flush=True)
      mngr.reload()
    return restored, int(step)
  step, e = failed[0]
  raise ValueError(
      f"no checkpoint in {mngr.directory} (steps {steps}) can be restored into this run's state; "
      f"was the workdir written with another config? Checkpoint {step}: {type(e).__name__}: "
      f"{first_line(e)[:300]}")


def quiet_failed_restore_noise(directory: str) -> None:
  """Drops the tracebacks a failed orbax restore leaves behind (for the rest of the process).

  When a restore fails (a damaged checkpoint), orbax closes its asyncio event
  loop while tensorstore still has reads of that checkpoint in flight; as each
  completes, tensorstore's thread calls ``loop.call_soon_threadsafe`` on the
  closed loop and reports the ``RuntimeError('Event loop is closed')`` as an
  unraisable exception (11-18 tracebacks, during the attempt and later), and
  asyncio logs each orphaned read's error as "Task exception was never
  retrieved". Called before the checkpoints' metadata or arrays are read, this
  installs, for the rest of the process, a ``sys.unraisablehook`` that drops
  exactly ``RuntimeError('Event loop is closed')`` and a filter on the ``asyncio`` logger that drops records
  naming ``directory`` (the checkpoints); everything else passes. The failure
  itself is reported in one warning line by :func:`restore`. (Validating the
  files up front cannot replace this: a damaged byte inside an array is only
  found by reading it, i.e. by the restore.)
  """
  def closed_loop(exc_type, exc) -> bool:
    return exc_type is RuntimeError and str(exc) == "Event loop is closed"

  previous = sys.unraisablehook
  if not getattr(previous, "_drops_closed_loop", False):
    def unraisable(info):
      if not closed_loop(info.exc_type, info.exc_value):
        previous(info)
    unraisable._drops_closed_loop = True  # pylint: disable=protected-access
    sys.unraisablehook = unraisable
  logger = logging.getLogger("asyncio")
  if not any(getattr(f, "directory", None) == directory for f in logger.filters):
    logger.addFilter(_OrphanedReadFilter(directory))


class _OrphanedReadFilter(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" records about ``directory``."""

  def __init__(self, directory: str):
    super().__init__()
    self.directory = directory

  def filter(self, record: logging.LogRecord) -> bool:
    try:
      text = record.getMessage()
      if record.exc_info and record.exc_info[1] is not None:
        text += str(record.exc_info[1])
    except Exception:  # pylint: disable=broad-except
      return True
    return not ("never retrieved" in text and self.directory in text)


def shape_mismatch(mngr, step: int, target) -> Optional[str]:
  """Why checkpoint ``step`` cannot hold ``target`` (array shapes/dtypes), else None.

  Compares the multisets of (shape, dtype) of the checkpoint's metadata and of
  the target, so tree naming does not matter; unreadable metadata returns None
  (the restore then decides).
  """
  try:
    meta = mngr.item_metadata(step)
    got = sorted((tuple(m.shape), str(m.dtype)) for m in jax.tree_util.tree_leaves(meta))
  except Exception:  # pylint: disable=broad-except
    return None
  want = sorted((tuple(x.shape), str(x.dtype)) for x in jax.tree_util.tree_leaves(target))
  if got == want:
    return None
  only_run = [x for x in want if x not in got][:3]
  only_ckpt = [x for x in got if x not in want][:3]
  return (f"this run's state is not compatible with the stored shapes: arrays (shape, dtype) "
          f"only in this run {only_run}, only in the checkpoint {only_ckpt}")


def first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else repr(e)


def save_args(state):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.args.StandardSave(state)
