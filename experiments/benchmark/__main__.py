"""``python -m experiments.benchmark``: see :mod:`experiments.benchmark`."""

import sys

# Before JAX starts (see experiments/runner/cpu_runtime.py).
if "--untuned" not in sys.argv:
  from experiments.runner import cpu_runtime as _cpu_runtime  # pylint: disable=g-import-not-at-top
  _cpu_runtime.configure_process("experiments.benchmark")

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags  # pylint: disable=g-import-not-at-top

from experiments.benchmark import run as run_lib  # pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  run_lib.define_flags(flags.FLAGS)
  app.run(run_lib.app_main)
