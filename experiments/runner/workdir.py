"""The runner's workdir: one run at a time (lock), the operative config written atomically."""

import json
import os
import sys
import time
from typing import Any, Optional

import gin

from ldro.data import fileio


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


def read_wall_clock(workdir: str) -> Optional[dict]:
  """``<workdir>/wall_clock.json`` (:func:`add_wall_clock`), or None if absent or unreadable."""
  try:
    with open(os.path.join(workdir, "wall_clock.json"), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def add_wall_clock(workdir: str, seconds: float, finished: bool) -> None:
  """Adds one attempt's wall-clock to ``<workdir>/wall_clock.json`` (summed over resumes)."""
  path = os.path.join(workdir, "wall_clock.json")
  info = {"wall_s": 0.0, "attempts": 0}
  info.update(read_wall_clock(workdir) or {})
  info["wall_s"] = round(float(info["wall_s"]) + seconds, 1)
  info["attempts"] = int(info["attempts"]) + 1
  info["finished"] = bool(finished)
  info["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
  fileio.atomic_write_json(path, info)  # a kill mid-write keeps the time of earlier attempts


def claim(workdir: str, block: bool = False):
  """Exclusively ``flock``s ``<workdir>/.claim`` for the driver that trains the run.

  Drivers that share a list of runs (sweep lanes, the monolingual baselines'
  processes) each take the runs no other holds; the training process itself
  locks ``.lock`` (:func:`lock`). The kernel drops the lock when its holder
  exits, so a crashed driver blocks nothing.

  Args:
    workdir: the run's directory (created if missing).
    block: wait for the holder to release it instead of giving up.

  Returns:
    The open claim file (close it to release the claim), or None if another
    process holds it and ``block`` is False.
  """
  import fcntl  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  f = open(os.path.join(workdir, ".claim"), "a", encoding="utf-8")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f, fcntl.LOCK_EX | (0 if block else fcntl.LOCK_NB))
  except BlockingIOError:
    f.close()
    return None
  return f


def unlock(path: Optional[str]) -> None:
  f = _WORKDIR_LOCKS.pop(path, None) if path else None
  if f is not None:
    f.close()


def write_config(workdir: str) -> None:
  """Writes gin's operative config to ``<workdir>/config.gin`` (atomically: a kill never tears it)."""
  fileio.atomic_write_text(os.path.join(workdir, "config.gin"), gin.operative_config_str())


# ------------------------------------------------------------ fingerprint ----

#: What a workdir remembers: ``<workdir>/run_config.json``.
FINGERPRINT_FILE = "run_config.json"

#: Bindings that do not change what a run computes, left out of the fingerprint:
#: the step budget (extending a run is resuming it) and when to log, evaluate and
#: checkpoint; the NaN policy (switching to 'skip' to get past a bad step is a
#: resume); the device mesh (a run resumes on another mesh); quiet.
EXCLUDED_RUNNER_PARAMS = ("num_steps", "eval_every", "log_every", "checkpoint_every",
                          "keep_checkpoints", "nonfinite", "mesh_shape", "quiet")
#: Parameter names, in any configurable, that say where data lives, not what it is
#: (a moved data folder or another cache is the same run), or how big an
#: evaluation batch is.
EXCLUDED_PARAM_NAMES = ("data_dir", "cache_dir", "tfds_data_dir", "download", "eval_batch_size")


def _render(value: Any) -> str:
  """A binding's value with macros replaced by their values (``%METHOD`` -> ``'ldro'``)."""
  if isinstance(value, gin.config.ConfigurableReference):
    if repr(value).startswith("%"):
      try:
        return _render(value.scoped_configurable_fn())
      except Exception:  # pylint: disable=broad-except  (an unbound macro)
        return repr(value)
    return repr(value)  # @Foo(): Foo's own bindings are fingerprinted separately
  if isinstance(value, dict):
    return "{" + ", ".join(f"{_render(k)}: {_render(v)}" for k, v in value.items()) + "}"
  if isinstance(value, (list, tuple)):
    inner = ", ".join(_render(v) for v in value)
    return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
  return repr(value)


def _short(selector: str) -> str:
  """``experiments.runner.loop.train_and_evaluate`` -> ``train_and_evaluate``; optax.* as is."""
  if selector.startswith(("experiments.", "ldro.")):
    return selector.rsplit(".", 1)[-1]
  return selector


def config_bindings() -> dict:
  """The parsed gin config as ``{binding: value}``, macros resolved, exclusions left out.

  This is what a run is made of: the experiment's, the method's, the
  optimizer's and the runner's bindings (everything bound, in files or
  ``--gin_bindings``), minus :data:`EXCLUDED_RUNNER_PARAMS` and
  :data:`EXCLUDED_PARAM_NAMES`. Macros are resolved where they are used, so a
  macro used only by an excluded binding (``NUM_STEPS``) is left out with it.
  """
  out = {}
  for (scope, selector), params in gin.config._CONFIG.items():  # pylint: disable=protected-access
    if selector == "gin.macro":
      continue
    short = _short(selector)
    for name, value in params.items():
      if name in EXCLUDED_PARAM_NAMES or (
          short == "train_and_evaluate" and name in EXCLUDED_RUNNER_PARAMS):
        continue
      out[f"{scope + '/' if scope else ''}{short}.{name}"] = _render(value)
  return dict(sorted(out.items()))


def check_fingerprint(workdir: str, invocation: Optional[dict] = None,
                      allow_change: bool = False) -> Optional[dict]:
  """Refuses a workdir made with another config; returns the record to write, if any.

  ``<workdir>/run_config.json`` holds :func:`config_bindings` of the run that
  made the workdir and the gin files/bindings it was started with. A run with
  other bindings is refused (one line naming both commands and the first
  differing bindings) unless ``allow_change``. A workdir without the file
  (new, or made before this check existed) is taken as is.

  Returns:
    The record for :func:`record_fingerprint` (called once the run's state
    has been restored, so that a run that fails before that changes nothing),
    or None if the workdir's record stands.

  Raises:
    ValueError: the workdir was made with another config (or its record is
      damaged).
  """
  path = os.path.join(workdir, FINGERPRINT_FILE)
  now = {"bindings": config_bindings(), "invocation": invocation or {}}
  if not os.path.exists(path):
    return now
  try:
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    if not isinstance(old, dict) or not isinstance(old.get("bindings"), dict):
      raise ValueError("not a run record")
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is damaged ({type(e).__name__}); it records the config the "
                     f"workdir was made with: restore it, or delete it to accept this "
                     f"run's config.") from None
  if old["bindings"] == now["bindings"]:
    return None  # the first command that made the workdir stays on record
  a, b = old["bindings"], now["bindings"]
  diff = [f"{k}: {a.get(k, '(unset)')} -> {b.get(k, '(unset)')}"
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
  summary = "; ".join(diff[:3]) + (f" (+{len(diff) - 3} more)" if len(diff) > 3 else "")
  if not allow_change:
    raise ValueError(
        f"workdir {workdir} was made with another config ({_describe(old.get('invocation'))}; "
        f"this run: {_describe(now['invocation'])}); they differ in {summary}. Use another "
        f"--workdir, or pass --allow_config_change to resume this one anyway.")
  now["replaces"] = summary
  return now


def record_fingerprint(workdir: str, record: Optional[dict]) -> None:
  """Writes :func:`check_fingerprint`'s record (atomically); an old one and its
  ``config.gin`` go to ``<workdir>/config_history/`` with a warning line."""
  if record is None:
    return
  path = os.path.join(workdir, FINGERPRINT_FILE)
  summary = record.pop("replaces", None)
  if summary is not None:
    history = os.path.join(workdir, "config_history")
    os.makedirs(history, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for name in (FINGERPRINT_FILE, "config.gin"):
      if os.path.exists(os.path.join(workdir, name)):
        os.replace(os.path.join(workdir, name), os.path.join(history, f"{stamp}-{name}"))
    print(f"warning: resuming workdir {workdir} with another config (--allow_config_change): "
          f"{summary}; the old config is in {history}", file=sys.stderr, flush=True)
  fileio.atomic_write_json(path, record)


def _describe(invocation: Optional[dict]) -> str:
  invocation = invocation or {}
  files = invocation.get("gin_files") or []
  bindings = invocation.get("gin_bindings") or []
  if not files and not bindings:
    return "gin files not recorded"
  parts = [f"--gin_file={f}" for f in files] + [f"--gin_bindings={b!r}" for b in bindings]
  return " ".join(parts)
