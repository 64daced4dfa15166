"""Ctrl-C (SIGINT) and SIGTERM: stop at a step boundary, checkpoint, say how to resume.

While :func:`experiments.runner.loop.train_and_evaluate` runs, the first
SIGINT or SIGTERM only sets a flag; the loop sees it before its next step,
saves a checkpoint at the step reached (waiting for it, and for any save in
flight, to be finished) and raises :class:`Interrupted`, which the entry point
prints as one line::

    interrupted (SIGINT) at step 37 of 1000; checkpoint 37 saved; re-run the same command to resume from step 37.

A second signal while it finishes exits at once (status 130/143), leaving at
most a half-written checkpoint, which orbax writes under a temporary name: it
is never restored and is removed by the next run (the resume then starts from
the previous checkpoint). Signals before the loop (parsing, loading data,
compiling) end the program with one line from the entry point.
"""

import os
import signal
import sys
import threading
from typing import Optional

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}


def signal_name(signum: int) -> str:
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f"signal {signum}"


class Interrupted(KeyboardInterrupt):
  """The run stopped on a signal at ``step``; ``checkpoint`` is where it resumes from."""

  def __init__(self, signum: int, step: int, num_steps: int, checkpoint: Optional[int]):
    self.signum, self.step, self.num_steps, self.checkpoint = signum, step, num_steps, checkpoint
    if checkpoint:
      saved = f"checkpoint {checkpoint} saved; re-run the same command to resume from step {checkpoint}"
    else:
      saved = "no checkpoint yet; re-running the same command starts from step 0"
    super().__init__(f"interrupted ({signal_name(signum)}) at step {step} of {num_steps}; "
                     f"{saved}.")

  @property
  def exit_status(self) -> int:
    return EXIT_STATUS.get(self.signum, 130)


class SignalBeforeTraining(KeyboardInterrupt):
  """SIGTERM (or SIGINT) before the loop took over the signals."""

  def __init__(self, signum: int):
    self.signum = signum
    super().__init__(signal_name(signum))


class StopOnSignal:
  """Turns the first SIGINT/SIGTERM into a flag (``signum``); restores the handlers on close.

  Only in the main thread (Python delivers signals there); elsewhere it does
  nothing and signals keep their previous handlers.
  """

  def __init__(self):
    self.signum: Optional[int] = None
    self._previous = {}
    if threading.current_thread() is not threading.main_thread():
      return
    for s in (signal.SIGINT, signal.SIGTERM):
      self._previous[s] = signal.getsignal(s)
      signal.signal(s, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self.signum is None:
      self.signum = signum
      return
    # A second signal: do not wait for the checkpoint being written (it stays a
    # temporary directory that is never restored and is removed on resume).
    print(f"interrupted again ({signal_name(signum)}): exiting without finishing the "
          f"checkpoint; re-run the same command to resume from the last finished one.",
          file=sys.stderr, flush=True)
    os._exit(EXIT_STATUS.get(signum, 130))  # pylint: disable=protected-access

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def close(self) -> None:
    for s, handler in self._previous.items():
      signal.signal(s, handler if handler is not None else signal.SIG_DFL)
    self._previous = {}
