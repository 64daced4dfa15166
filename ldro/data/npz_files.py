"""Atomic ``.npz`` writes for the data caches (images, packed text rows)."""

from __future__ import annotations

import os
import tempfile

import numpy as np


def atomic_savez(path: str | os.PathLike, *, compressed: bool = False, **arrays) -> None:
  """Writes ``arrays`` to ``path`` as ``.npz`` so that a reader never sees a partial file.

  The arrays go to a private temporary file in the same folder, renamed over
  ``path`` at the end. Processes (hosts) that fill the same cache at once each
  write their own temporary file; the last rename wins, with equal contents.

  Args:
    path: the ``.npz`` file; its folder is created if needed.
    compressed: ``np.savez_compressed`` instead of ``np.savez``.
    **arrays: the arrays, by name.
  """
  folder = os.path.dirname(os.fspath(path)) or "."
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      (np.savez_compressed if compressed else np.savez)(f, **arrays)
    os.chmod(tmp, 0o644)  # mkstemp creates files readable by their owner only
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
