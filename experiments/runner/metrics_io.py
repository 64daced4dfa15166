"""The runner's ``metrics.jsonl`` (one JSON record per evaluation): writer and reader.

:class:`MetricsWriter` appends records (and TensorBoard scalars); the reader is
shared by the sweep, Pareto, monolingual and Table 1 scripts and by the
runner's resume truncation, so that all of them read the file the same way:
blank lines and a torn last line (a run killed mid-write) are skipped.
"""

import json
import os
from typing import Optional, Sequence

import numpy as np


def read_metrics(path: str) -> list[dict]:
  """The records of a ``metrics.jsonl`` in file order (``[]`` if it does not exist)."""
  out = []
  if not os.path.exists(path):
    return out
  with open(path, encoding="utf-8") as f:
    for line in f:
      line = line.strip()
      if not line:
        continue
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:  # a torn last line of a running or killed run
        continue
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
    keep = [r for r in read_metrics(self.path) if r["step"] <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:  # the same lines write() made
      f.write("".join(self._line(r) for r in keep))
    os.replace(tmp, self.path)

  @staticmethod
  def _line(record: dict) -> str:
    return json.dumps(record, sort_keys=True) + "\n"

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(self._line(record))
      f.flush()
      os.fsync(f.fileno())
    if self._tb is not None:
      step = record["step"]
      for k, v in record.items():
        if isinstance(v, (int, float)) and k != "step":
          self._tb.add_scalar(k, v, step)
      for k in ("task_weights",):
        for i, x in enumerate(record.get(k, [])):
          self._tb.add_scalar(f"{k}/{i}", x, step)
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()
