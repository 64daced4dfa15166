r"""Prints the README's method table from the registry (and measured overheads).

    python -m experiments.method_table
    python -m experiments.method_table --benchmark=results/benchmark/methods_2026-12-01/benchmark.json

Every column but the last comes from ``ldro.method_info``; the overhead column
(step time / plain step time, measured in one benchmark run) from the
benchmark's JSON rows that name a registered method.
"""

import json
from typing import Optional

from absl import app
from absl import flags

import ldro

_BENCHMARK = flags.DEFINE_string(
    "benchmark", None, "benchmark JSON(s) with per-method rows (methods: method, "
    "ratio_to_plain, solver_ms); comma-separated, a later file's rows replace an earlier's.")


def overheads(path: Optional[str]) -> dict:
  """``{method name: (ratio to plain, solver ms or None)}`` from benchmark JSON file(s).

  ``path`` may list several files separated by commas; a method's row in a
  later file replaces its row in an earlier one (a focused re-run of a few
  methods over a full run).
  """
  out = {}
  for p in (path or "").split(","):
    if not p.strip():
      continue
    with open(p.strip(), encoding="utf-8") as f:
      res = json.load(f)
    for row in res.get("methods", []):
      old = out.get(row["method"], (None, None))
      out[row["method"]] = (row.get("ratio_to_plain"), row.get("solver_ms") or old[1])
  return out


def _fmt_defaults(defaults) -> str:
  return ", ".join(f"`{k}={v!r}`" for k, v in defaults.items()) or "-"


def table(measured: dict) -> str:
  """The markdown table, one row per registered method."""
  head = ("| name | method | kind | needs | modes | paper defaults | step / plain | "
          "solver N=20 | reference |")
  lines = [head, "|" + "---|" * 9]
  for name in ldro.method_names():
    info = ldro.method_info(name)
    ratio, solver = measured.get(name, (None, None))
    lines.append(
        f"| `{name}` | {info.label} | {info.kind} | {', '.join(sorted(info.needs)) or '-'} | "
        f"{', '.join(info.modes)} | {_fmt_defaults(info.defaults)} | "
        f"{'x%.2f' % ratio if ratio else '-'} | {'%.2f ms' % solver if solver else '-'} | "
        f"{info.reference} |")
  return "\n".join(lines)


def main(argv):
  del argv
  print(table(overheads(_BENCHMARK.value)))


if __name__ == "__main__":
  app.run(main)
