"""Atomic file writes: a reader (or a process killed mid-write) never sees a partial file.

Used by the data caches (images, packed text rows) and by the experiments' run records and
reports. Each write goes to a private temporary file in the target's folder, renamed over the
target at the end, so processes (hosts) that write the same file at once each write their own
temporary file and the last rename wins.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Callable, IO

import numpy as np


def atomic_write(path: str | os.PathLike, fill: Callable[[IO], None], *,
                 binary: bool = False) -> None:
  """Calls ``fill(f)`` on a private temporary file, then renames it over ``path``.

  Args:
    path: the file; its folder is created if needed.
    fill: writes the contents to the open file ``f``.
    binary: open the temporary file in binary mode (text mode is UTF-8).
  """
  path = os.fspath(path)
  folder = os.path.dirname(path) or "."
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8")) as f:
      fill(f)
    os.chmod(tmp, 0o644)  # mkstemp creates files readable by their owner only
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` (UTF-8) to ``path`` atomically."""
  atomic_write(path, lambda f: f.write(text))


def atomic_write_json(path: str | os.PathLike, data: Any, *, indent: int = 1) -> None:
  """Writes ``data`` as JSON (sorted keys, UTF-8 kept, NumPy scalars as floats) atomically."""
  atomic_write(path, lambda f: json.dump(data, f, indent=indent, sort_keys=True,
                                         ensure_ascii=False, default=float))


def atomic_savez(path: str | os.PathLike, *, compressed: bool = False, **arrays) -> None:
  """Writes ``arrays`` (by name) to ``path`` as ``.npz`` atomically.

  Args:
    path: the ``.npz`` file; its folder is created if needed.
    compressed: ``np.savez_compressed`` instead of ``np.savez``.
    **arrays: the arrays, by name.
  """
  atomic_write(path, lambda f: (np.savez_compressed if compressed else np.savez)(f, **arrays),
               binary=True)
