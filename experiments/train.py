r"""Entry point: trains a multitask model with a gin-selected experiment and method.

    python -m experiments.train --gin_file=gin_configs/synthetic/ldro.gin \
        --workdir=/tmp/ldro_synthetic [--gin_bindings='train_and_evaluate.num_steps=200']
    python -m experiments.train --gin_file=gin_configs/cifar10_mtl/base.gin \
        --gin_file=gin_configs/methods/pcgrad.gin --data_dir=/path/to/cifar10_images

Without ``--gin_file`` the embedded default (the synthetic experiment with
online L-DRO) runs. ``gin_configs/...`` paths resolve from any directory
(gin's search path holds the installed configs); ``--data_dir`` sets the
config's ``DATA_DIR``. Re-running the same command resumes from the last
checkpoint in ``--workdir``.

The workdir gets ``config.gin`` (operative config), ``metrics.jsonl`` (one
JSON object per evaluation), TensorBoard events under ``tb/`` and orbax
checkpoints under ``checkpoints/``. The loop itself is
:func:`experiments.runner.loop.train_and_evaluate`.
"""

if __name__ == "__main__":  # before JAX starts: see experiments/runner/cpu_runtime.py
  from experiments.runner import cpu_runtime as _cpu_runtime  # pylint: disable=g-import-not-at-top
  _cpu_runtime.configure_process("experiments.train")

import os
import signal
import sys
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import gin
import jax

from experiments.runner import interrupts
from experiments.runner import loop
from experiments.runner import paths
from experiments.runner import process
from experiments.runner import sharding

_GIN_FILE = flags.DEFINE_multi_string("gin_file", [], "Gin config files (repeatable).")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings (repeatable).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "Data directory: binds the config's DATA_DIR (after the "
                                "gin files and bindings).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-host: host:port of process 0 (jax.distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False,
    "Resume a workdir that was made with another config (by default refused, naming both; "
    "the old config is kept under <workdir>/config_history/).")
_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "Call jax.distributed.initialize() with the environment's "
                               "defaults (Cloud TPU pod slices, SLURM, ...).")

DEFAULT_CONFIG = "gin_configs/synthetic/ldro.gin"

# What bad input raises (the library, the experiments, the data, gin): one line each.
BAD_INPUT_ERRORS = (ValueError, KeyError, TypeError, OSError, FloatingPointError,
                    NotImplementedError)


def error_line(e: BaseException) -> str:
  """The one stderr line ``main`` prints for a bad-input error: its type and first line."""
  first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
  return f"error: {type(e).__name__}: {first}"


def run_from_flags(argv: Sequence[str]) -> None:
  """Parses gin from the flags and runs :func:`experiments.runner.loop.train_and_evaluate`."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if (_COORDINATOR.value or _MULTIHOST.value or _NUM_PROCESSES.value is not None
      or _PROCESS_ID.value is not None):  # before any other JAX call
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  process.hide_gpus_from_tensorflow()
  gin_files = _GIN_FILE.value or [DEFAULT_CONFIG]
  bindings = list(_GIN_BINDINGS.value)
  if _DATA_DIR.value:
    bindings.append(f"DATA_DIR = {os.path.abspath(os.path.expanduser(_DATA_DIR.value))!r}")
  parse_gin(gin_files, bindings)
  workdir = _WORKDIR.value or os.path.join("workdirs", os.path.splitext(
      os.path.basename(gin_files[-1]))[0])
  records = loop.train_and_evaluate(
      workdir, allow_config_change=_ALLOW_CONFIG_CHANGE.value,
      invocation={"gin_files": list(_GIN_FILE.value) or [DEFAULT_CONFIG],
                  "gin_bindings": list(_GIN_BINDINGS.value)})
  if records and jax.process_index() == 0:
    last = records[-1]
    exp_metric = [k for k in last if k.startswith("avg_")][0][4:]
    print(f"final (step {last['step']}): average {exp_metric} {last['avg_' + exp_metric]:.4f}, "
          f"worst {exp_metric} {last['worst_' + exp_metric]:.4f}; workdir {workdir}", flush=True)


def parse_gin(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
  """Parses gin files (found from any directory, :mod:`experiments.runner.paths`) and bindings.

  Syntax errors become one-line ValueErrors naming the file and line or binding.
  """
  paths.add_gin_search_paths()
  gin_files = [paths.find_gin_file(f) for f in gin_files]
  import tokenize  # pylint: disable=g-import-not-at-top
  from gin import config_parser  # pylint: disable=g-import-not-at-top
  try:
    gin.parse_config_files_and_bindings(gin_files, bindings)
  except (SyntaxError, tokenize.TokenError) as e:
    msg = e.msg if isinstance(e, SyntaxError) else str(e.args[0])
    where = f"{e.filename}, line {e.lineno}" if getattr(e, "filename", None) else None
    if where is None:  # gin does not say which --gin_bindings failed: find it
      for b in bindings:
        try:
          list(config_parser.ConfigParser(b, gin.config.ParserDelegate(skip_unknown=True)))
        except (SyntaxError, tokenize.TokenError):
          where = f"--gin_bindings={b!r}"
          break
    raise ValueError(f"cannot parse the gin config ({where or 'gin files/bindings'}): "
                     f"{msg}") from None


def _raise_keyboard_interrupt(signum, frame):
  del frame
  raise interrupts.SignalBeforeTraining(signum)


def main(argv: Sequence[str]) -> None:
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  # SIGTERM like Ctrl-C: one line, not a silent death (the loop handles both itself).
  signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
  try:
    run_from_flags(argv)
  except interrupts.Interrupted as e:  # in the loop: a checkpoint was saved
    _exit_with_line(str(e), e.exit_status)
  except KeyboardInterrupt as e:  # before the loop (parsing, data, compiling)
    signum = getattr(e, "signum", signal.SIGINT)
    _exit_with_line(f"interrupted ({interrupts.signal_name(signum)}) before training started; "
                    f"nothing was written by this call; re-run the same command to start (or resume).",
                    interrupts.EXIT_STATUS.get(signum, 130))
  except BAD_INPUT_ERRORS as e:
    _exit_with_line(error_line(e), 1)


def _exit_with_line(line: str, status: int) -> None:
  print(line, file=sys.stderr, flush=True)
  sys.stdout.flush()
  # Nothing is pending (the checkpoint manager was closed on the way out); skip the
  # interpreter's shutdown, where a failed orbax/tensorstore restore's leftover
  # callbacks or TensorFlow's threads can print after the one line.
  os._exit(status)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main)
