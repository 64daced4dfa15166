"""Copies the small files of finished and failed sweep runs from a workdir tree into results/.

A run directory ``<src>/<run>/seed<k>/`` counts once it holds ``DONE`` or ``FAILED``
(:mod:`experiments.sweep`); its record files (:data:`RUN_FILES`: metrics, the
command, the config, the wall-clock, the DONE/FAILED marker) go to
``<dst>/<run>/seed<k>/``. Checkpoints, logs and TensorBoard events stay behind.
A ``FAILED`` copied before is removed first, so that a run retried since
(``--retry_failed``) is not reported as failed. The ``sync.sh`` scripts under
``results/`` call this, then regenerate their reports::

  python -m experiments.sync_runs --src=workdirs/cifar10_regime/regime \\
      --dst=results/cifar10_regime/runs/regime
"""

import glob
import os
import shutil
from typing import Sequence

from absl import app
from absl import flags

RUN_FILES = ("metrics.jsonl", "run.json", "command.txt", "config.gin", "run_config.json",
             "wall_clock.json", "DONE", "FAILED")


def sync_runs(src: str, dst: str) -> list[str]:
  """Copies every finished or failed run under ``src`` to ``dst``.

  Args:
    src: a sweep's root (its runs are ``<run>/seed<k>/``).
    dst: where the copies go (created as needed).

  Returns:
    The copied runs as ``'<run>/seed<k>'``, sorted.

  Raises:
    FileNotFoundError: ``src`` is not a directory.
  """
  if not os.path.isdir(src):
    raise FileNotFoundError(f"--src: directory not found: {src!r}")
  runs = sorted({os.path.dirname(p) for marker in ("DONE", "FAILED")
                 for p in glob.glob(os.path.join(src, "*", "seed*", marker))})
  copied = []
  for run in runs:
    rel = os.path.relpath(run, src)
    out = os.path.join(dst, rel)
    os.makedirs(out, exist_ok=True)
    stale = os.path.join(out, "FAILED")
    if os.path.exists(stale):
      os.remove(stale)
    for name in RUN_FILES:
      if os.path.isfile(os.path.join(run, name)):
        shutil.copy2(os.path.join(run, name), out)
    copied.append(rel)
  return copied


def define_flags() -> None:
  flags.DEFINE_string("src", None, "A sweep's root under workdirs/.")
  flags.DEFINE_string("dst", None, "Its copy under results/.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  fv = flags.FLAGS
  if not fv.src or not fv.dst:
    raise app.UsageError("--src and --dst are required.")
  try:
    copied = sync_runs(fv.src, fv.dst)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None
  print(f"{len(copied)} finished or failed runs copied from {fv.src} to {fv.dst}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
