r"""The worst-group paper's synthetic experiment (section 3): end task, aux task, regularized MTL.

    python -m experiments.worst_group_synthetic \
        --gin_file=gin_configs/worst_group_synthetic/paper.gin --out=results/worst_group/synthetic

Writes ``results.json``, ``table.md`` (worst-group and average accuracy next to the paper's),
``boundaries.png`` (Figures 2/5), ``aux_log_ratio.png`` (Figure 3) and ``accuracy.png``. The
experiment is :mod:`experiments.families.worst_group_synthetic`.

Why an entry point and not ``experiments.train``: the runner's ``Experiment`` contract trains
one model with one optax method on task-grouped batches, step by step. This experiment needs a
constraint (``||a||_1 = tau``, ``||W_aux||_F = 1``) applied to the parameters after every step,
three objectives over the same data, per-epoch validation for checkpoint selection, and a
whole 500-epoch run jitted as one ``lax.scan`` vmapped over seeds (the full study takes
seconds, not one Python step at a time); like ``experiments.synthetic`` (the L-DRO paper's
Figure 2 driver) it is its own driver, still configured with gin.
"""

if __name__ == "__main__":  # before JAX starts: see experiments/runner/cpu_runtime.py
  from experiments.runner import cpu_runtime as _cpu_runtime  # pylint: disable=g-import-not-at-top
  _cpu_runtime.configure_process("experiments.worst_group_synthetic")

import shlex
import sys
from typing import Sequence

from absl import app
from absl import flags

from experiments import train as train_lib
from experiments.families import worst_group_synthetic as family

# --gin_file and --gin_bindings are experiments.train's flags (same meaning). --out is defined
# only when this module is the program (experiments.synthetic, also imported by the tests,
# defines its own --out).
_OUT = None


def define_flags() -> None:
  global _OUT
  _OUT = flags.DEFINE_string("out", None, "Output directory (none: print only).")

DEFAULT_CONFIG = "gin_configs/worst_group_synthetic/paper.gin"


def run(gin_files: Sequence[str], bindings: Sequence[str], out: str | None,
        command: str = "") -> dict:
  """Parses gin and runs :func:`experiments.families.worst_group_synthetic.run_study`."""
  train_lib.parse_gin(list(gin_files) or [DEFAULT_CONFIG], list(bindings))
  return family.run_study(out_dir=out, command=command)


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  command = "python -m experiments.worst_group_synthetic " + " ".join(
      shlex.quote(a) for a in sys.argv[1:])
  results = run(flags.FLAGS.gin_file, flags.FLAGS.gin_bindings, _OUT.value, command)
  for k, c in results["claims"].items():
    print(f"claim {k}: {c['verdict']}", flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
