"""The runner's workdir: one run at a time (lock), the operative config written atomically."""

import os
from typing import Any, Optional

import gin


_WORKDIR_LOCKS: dict[str, Any] = {}


def lock(workdir: str) -> str:
  """Takes an exclusive lock on ``<workdir>/.lock`` (released when the process dies).

  Two runs writing one workdir (e.g. a killed sweep's orphaned run and its
  restart) would corrupt its checkpoints and metrics; the second one stops.
  """
  import fcntl  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.abspath(workdir), ".lock")
  old = _WORKDIR_LOCKS.pop(path, None)
  if old is not None:  # left by an earlier call of this process that raised
    old.close()
  f = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    holder = f.read().strip() or "another process"
    f.close()
    raise BlockingIOError(f"workdir {workdir} is in use by a running training process "
                          f"({holder}); two runs must not share a workdir.") from None
  f.seek(0)
  f.truncate()
  f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
  f.flush()
  _WORKDIR_LOCKS[path] = f
  return path


def unlock(path: Optional[str]) -> None:
  f = _WORKDIR_LOCKS.pop(path, None) if path else None
  if f is not None:
    f.close()


def write_config(workdir: str) -> None:
  """Writes gin's operative config to ``<workdir>/config.gin`` (atomically: a kill never tears it)."""
  path = os.path.join(workdir, "config.gin")
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.write(gin.operative_config_str())
  os.replace(path + ".tmp", path)
