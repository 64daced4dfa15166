"""The runner's ``metrics.jsonl`` (one JSON record per evaluation): writer and reader.

:class:`MetricsWriter` appends records (and TensorBoard scalars); the reader is
shared by the sweep, Pareto, monolingual and Table 1 scripts and by the
runner's resume truncation, so that all of them read the file the same way:
blank lines and a torn last line (a run killed mid-write) are skipped, other
damaged lines are skipped with one warning naming the file and line.
"""

import json
import os
import sys
from typing import Optional, Sequence

import numpy as np

from ldro.data import fileio


def read_metrics(path: str, warn: bool = True, note: str = "") -> list[dict]:
  """The records of a ``metrics.jsonl`` in file order (``[]`` if it does not exist).

  A record is a JSON object with an integer ``step``. Blank lines and a torn
  last line (no newline: a run killed, or still running, mid-write) are
  skipped silently; any other line that is not a record (not UTF-8, not JSON,
  not an object with a ``step``) is skipped with one warning line on stderr
  for the whole file, naming it, the number of such lines and the first one
  (``warn=False``: silently). ``note`` is appended to that warning.
  """
  out = []
  if not os.path.exists(path):
    return out
  with open(path, "rb") as f:
    lines = f.read().split(b"\n")
  damaged = []
  for number, raw in enumerate(lines, 1):
    if not raw.strip():
      continue
    try:
      record = json.loads(raw.decode("utf-8"))
      if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not a record")
      if not isinstance(record.get("step"), int) or isinstance(record.get("step"), bool):
        raise ValueError("no integer 'step'")
    except UnicodeDecodeError:
      damaged.append((number, "not UTF-8"))
      continue
    except ValueError as e:  # json.JSONDecodeError is a ValueError
      if number == len(lines):  # a torn last line of a running or killed run
        continue
      why = "not JSON" if isinstance(e, json.JSONDecodeError) else str(e)
      damaged.append((number, why))
      continue
    out.append(record)
  if damaged and warn:
    number, why = damaged[0]
    more = f"; {len(damaged) - 1} more" if len(damaged) > 1 else ""
    print(f"warning: {path}: skipped {len(damaged)} damaged line(s) (line {number}: {why}{more})"
          f"{note}", file=sys.stderr, flush=True)
  return out


def best_record(records: Sequence[dict]) -> Optional[dict]:
  """The evaluation with the lowest average validation loss (paper section 5.2.1).

  Ties go to the earlier step; records without ``task_loss`` are ignored.
  """
  scored = [r for r in records if r.get("task_loss")]
  if not scored:
    return None
  return min(scored, key=lambda r: (float(np.mean(r["task_loss"])), r["step"]))


class MetricsWriter:
  """Appends evaluation records to ``metrics.jsonl`` (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True, purge_step: Optional[int] = None):
    """``purge_step``: on resume, TensorBoard drops older events at steps >= it."""
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self._tb = None
    if enabled:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge_step)
      except ImportError:  # TensorBoard logging is optional
        self._tb = None

  def truncate_after(self, step: int) -> None:
    """Drops records with ``step > step`` (written after the checkpoint we resume from)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    note = f"; dropped from the file, whose records after step {step} are rewritten"
    keep = [r for r in read_metrics(self.path, warn=step >= 0, note=note) if r["step"] <= step]
    fileio.atomic_write_text(self.path, "".join(self._line(r) for r in keep))  # write()'s lines

  @staticmethod
  def _line(record: dict) -> str:
    return json.dumps(record, sort_keys=True) + "\n"

  def write(self, record: dict) -> None:
    """Appends one record (readers see it at once); on disk for good at the next :meth:`sync`."""
    if not self.enabled:
      return
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(self._line(record))
    if self._tb is not None:
      step = record["step"]
      for k, v in record.items():
        if isinstance(v, (int, float)) and k != "step":
          self._tb.add_scalar(k, v, step)
      for k in ("task_weights",):
        for i, x in enumerate(record.get(k, [])):
          self._tb.add_scalar(f"{k}/{i}", x, step)

  def sync(self) -> None:
    """Makes the records written so far durable (``fsync``) and flushes TensorBoard's events.

    The runner calls it before each checkpoint and at the end. A resumed run drops
    the records after its checkpoint's step, so syncing there keeps every record
    a resume keeps, even through a machine crash, without an ``fsync`` per record
    (which would cost a small model more than its training step). A killed
    process loses nothing it wrote.
    """
    if not self.enabled:
      return
    if os.path.exists(self.path):
      with open(self.path, "a", encoding="utf-8") as f:
        os.fsync(f.fileno())
    if self._tb is not None:
      self._tb.flush()

  def close(self):
    self.sync()
    if self._tb is not None:
      self._tb.close()
