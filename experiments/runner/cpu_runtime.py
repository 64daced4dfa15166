"""Process-level CPU settings for the experiment programs (set before JAX starts).

Two settings, each measured on the small CNN of Section 5.1 (N=20, batch 120,
2 cores; ``results/benchmark/README.md``):

* ``XLA_FLAGS += --xla_cpu_experimental_ynn_fusion_type=-individual_convolution``:
  XLA:CPU (jaxlib 0.10) runs convolutions through YNNPACK by default, which is
  ~2x slower than its Eigen kernels for these shapes (second conv layer:
  6.2 ms forward, 9.5 ms kernel gradient, against 3.2 ms and 6.0 ms). The flag
  hands convolutions back to Eigen and keeps YNNPACK for dots (the decoder's
  steps are unchanged). A plain step: ~42 ms -> ~31 ms.
* ``GLIBC_TUNABLES`` (glibc's malloc): XLA:CPU allocates each execution's
  temporaries afresh (one block of 50-100 MiB per small-CNN step). By default
  glibc serves such blocks by ``mmap`` (or, from XLA's worker threads, from
  64 MiB thread arenas that cannot hold them) and unmaps them after the step,
  so every step faults its whole temporary arena in again, 4 KiB at a time
  (~18k page faults per small-CNN step, a third of its CPU time in the
  kernel). The settings: ``mmap_max=0`` (no ``mmap``: big blocks come from
  the heap), ``arena_max=1`` (one heap for every thread),
  ``trim_threshold=4 GiB`` (freed memory stays with the process) and
  ``hugetlb=1`` (2 MiB pages where the kernel has transparent huge pages on
  ``madvise``): 0 page faults per step, and a step that refreshes nothing
  costs the same whatever the size of the (``lax.cond``) refresh branch
  compiled into it (with ``hugetlb=1`` alone, L-DRO's ordinary step was
  ~10% slower than plain training: its refresh branch doubles the temporary
  arena). The process keeps its peak heap; glibc reads tunables at start-up
  only, hence a re-exec of the program.

Neither changes what is computed beyond float round-off of the convolutions.

When they apply (``LDRO_CPU_TUNING`` in the environment): ``0`` never, ``1``
always, unset: unless the program is headed for an accelerator, i.e. unless
``JAX_PLATFORMS`` names a first platform other than ``cpu``, or (with
``JAX_PLATFORMS`` unset) a JAX accelerator plugin or ``libtpu`` is installed
(the settings were measured on XLA:CPU only, and a GPU/TPU host's input
pipeline should keep glibc's per-thread arenas). The YNN flag is added only
where the installed jaxlib knows it (XLA aborts on an unknown ``XLA_FLAGS``
entry; older jaxlibs have no YNNPACK convolutions to turn off), and a
``XLA_FLAGS`` that already names it is left as it is. Library code (``ldro``)
never sets process state; only the programs under ``experiments/`` call
:func:`configure_process`, first thing, before importing JAX.
"""

from __future__ import annotations

import functools
import glob
import importlib.metadata
import importlib.util
import mmap
import os
import sys
from typing import Optional, Sequence

YNN_OPTION = "--xla_cpu_experimental_ynn_fusion_type"
YNN_FLAG = YNN_OPTION + "=-individual_convolution"
#: glibc malloc tunables (name, value); see the module docstring.
MALLOC_TUNABLES = (("glibc.malloc.hugetlb", "1"), ("glibc.malloc.mmap_max", "0"),
                   ("glibc.malloc.arena_max", "1"), ("glibc.malloc.trim_threshold", str(4 << 30)))
OPT_OUT = "LDRO_CPU_TUNING"

__all__ = ["configure_process", "describe", "tuned_env", "applies", "jaxlib_knows_flag",
           "accelerator_plugins", "YNN_FLAG", "MALLOC_TUNABLES"]

#: Python packages through which JAX reaches an accelerator.
ACCELERATOR_MODULES = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                       "jax_rocm7_plugin", "jax_metal")


@functools.lru_cache(maxsize=None)
def accelerator_plugins() -> tuple[str, ...]:
  """Installed JAX accelerator plugins and TPU runtimes (without importing JAX)."""
  found = [name for name in ACCELERATOR_MODULES if importlib.util.find_spec(name) is not None]
  try:
    found += [ep.name for ep in importlib.metadata.entry_points(group="jax_plugins")]
  except Exception:  # pylint: disable=broad-except
    pass
  return tuple(dict.fromkeys(found))


@functools.lru_cache(maxsize=None)
def jaxlib_knows_flag(option: str) -> bool:
  """Whether the installed jaxlib's XLA registers ``option`` (read from its libraries).

  XLA aborts the process on an ``XLA_FLAGS`` entry it does not know, so a
  flag of one jaxlib must not reach another. Reads the shared libraries'
  bytes (memory-mapped, no JAX import).
  """
  spec = importlib.util.find_spec("jaxlib")
  if spec is None or not spec.submodule_search_locations:
    return False
  needle = option.lstrip("-").encode()
  for folder in spec.submodule_search_locations:
    for path in sorted(glob.glob(os.path.join(folder, "**", "*.so*"), recursive=True)):
      try:
        if os.path.getsize(path) < (1 << 20):
          continue
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
          if m.find(needle) >= 0:
            return True
      except (OSError, ValueError):
        continue
  return False


def applies(env: Optional[dict] = None) -> bool:
  """Whether the CPU settings apply to a program started with ``env`` (see module doc)."""
  env = os.environ if env is None else env
  choice = env.get(OPT_OUT, "")
  if choice in ("0", "1"):
    return choice == "1"
  platforms = env.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return platforms.split(",")[0].strip().lower() == "cpu"
  return not accelerator_plugins()


def tuned_env(env: Optional[dict] = None) -> dict:
  """A copy of ``env`` (default ``os.environ``) with both settings added.

  Unchanged where they do not apply (:func:`applies`); an existing YNN option
  in ``XLA_FLAGS`` and the user's own values of the malloc tunables are kept;
  the YNN flag is only added where jaxlib knows it.
  """
  env = dict(os.environ if env is None else env)
  if not applies(env):
    return env
  flags = env.get("XLA_FLAGS", "")
  if YNN_OPTION not in flags and jaxlib_knows_flag(YNN_OPTION):
    env["XLA_FLAGS"] = (flags + " " + YNN_FLAG).strip()
  if sys.platform.startswith("linux"):
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    have = {t.split("=", 1)[0] for t in tunables}
    tunables += [f"{k}={v}" for k, v in MALLOC_TUNABLES if k not in have]
    env["GLIBC_TUNABLES"] = ":".join(tunables)
  return env


def configure_process(module: str, argv: Optional[Sequence[str]] = None) -> None:
  """Applies :func:`tuned_env` to this process, re-executing it if glibc must see it.

  Call it at the top of a program's ``__main__`` block, before JAX is imported
  (XLA reads ``XLA_FLAGS`` when its CPU client starts; glibc reads
  ``GLIBC_TUNABLES`` at process start). The re-exec keeps the PID, so
  supervisors and signal handling see the same process.

  Args:
    module: the program as ``python -m`` names it, e.g. ``"experiments.train"``.
    argv: its arguments (default ``sys.argv[1:]``).
  """
  # TensorFlow (data decoding only) logs a warning line per failed op of the input pipeline:
  # a corrupt image would print them above the one error line the runner ends with
  # (libjpeg's own "Improper call to JPEG library" lines go to stderr unconditionally).
  # Warnings and info only; errors still print. Before the re-exec, so it is inherited.
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env = tuned_env()
  if env == dict(os.environ):
    return
  if "jax" in sys.modules:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    if xla_bridge.backends_are_initialized():
      raise RuntimeError("cpu_runtime.configure_process() must run before JAX starts its "
                         "backends; call it first thing in the program.")
  if env.get("GLIBC_TUNABLES") != os.environ.get("GLIBC_TUNABLES"):
    args = list(sys.argv[1:] if argv is None else argv)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module] + args, env)
  os.environ.update(env)


def describe() -> dict:
  """The settings this process runs under (for result files)."""
  return {"XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
          "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES", ""),
          OPT_OUT: os.environ.get(OPT_OUT, "")}


if __name__ == "__main__":
  # `python -m experiments.runner.cpu_runtime`: applies the settings and prints them
  # (with the PID before and after, which the re-exec keeps) as JSON.
  import json  # pylint: disable=g-import-not-at-top
  if "LDRO_PID_BEFORE" not in os.environ:
    os.environ["LDRO_PID_BEFORE"] = str(os.getpid())
  configure_process("experiments.runner.cpu_runtime")
  print(json.dumps(dict(describe(), pid_before=int(os.environ["LDRO_PID_BEFORE"]),
                        pid=os.getpid())))
