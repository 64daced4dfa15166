"""Reading the runner's ``metrics.jsonl`` (one JSON record per evaluation).

Shared by the sweep, Pareto, monolingual and Table 1 scripts and by the runner's
resume truncation, so that all of them read the file the same way: blank lines
and a torn last line (a run killed mid-write) are skipped.
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
