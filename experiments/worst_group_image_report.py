r"""Table of Spurious-CIFAR runs (issue 14): final, Val-GP and No-GP test accuracies, the gate.

    python -m experiments.worst_group_image_report results/worst_group/image/A/erm_seed0 \
        results/worst_group/image/A/group_dro_seed0 [--gate ERM_DIR GDRO_DIR]

Each argument is a run directory holding ``metrics.jsonl`` (a runner workdir or its copy
under ``results/``). Selection over the evaluations after step 0 (one per epoch):
Val-GP = the best validation worst-group accuracy, No-GP = the best validation pooled average
(ties: the earliest). Test "avg" is the group-balanced average (= pooled on the balanced test
set), "worst" the worst-group accuracy; "flip" the share of test predictions that change when
the cue is swapped.
"""

import json
import os
import sys
from typing import Optional


def read(run_dir: str) -> list[dict]:
  path = os.path.join(run_dir, "metrics.jsonl")
  with open(path, encoding="utf-8") as f:
    return [json.loads(l) for l in f if l.strip()]


def select(records: list[dict], key: str) -> dict:
  """The record (after step 0) with the largest ``key`` (the earliest on ties)."""
  cands = [r for r in records if r["step"] > 0] or records
  return max(cands, key=lambda r: (r[key], -r["step"]))


def summary(run_dir: str) -> dict:
  recs = read(run_dir)
  last = recs[-1]
  out = {"run": run_dir.rstrip("/").split("/")[-1], "steps": last["step"]}
  for name, rec in (("final", last), ("val_gp", select(recs, "val_worst_accuracy")),
                    ("no_gp", select(recs, "val_average_accuracy"))):
    out[name] = {"step": rec["step"], "avg": 100 * rec["avg_accuracy"],
                 "worst": 100 * rec["worst_accuracy"], "worst_group": rec["test_worst_group"],
                 "flip": 100 * rec["flip_rate"], "groups": [100 * x for x in rec["task_accuracy"]]}
  return out


def table(run_dirs) -> str:
  lines = ["| run | steps | final avg / worst | Val-GP (step) avg / worst | No-GP (step) avg / worst "
           "| final per-group (v/r, v/g, a/r, a/g) | final flip % |",
           "|---|---|---|---|---|---|---|"]
  for d in run_dirs:
    s = summary(d)
    f, v, n = s["final"], s["val_gp"], s["no_gp"]
    lines.append(f"| {s['run']} | {s['steps']} | {f['avg']:.1f} / {f['worst']:.1f} | "
                 f"({v['step']}) {v['avg']:.1f} / {v['worst']:.1f} | "
                 f"({n['step']}) {n['avg']:.1f} / {n['worst']:.1f} | "
                 f"{', '.join(f'{g:.1f}' for g in f['groups'])} | {f['flip']:.1f} |")
  return "\n".join(lines)


def gate(erm_dir: str, gdro_dir: str) -> tuple[bool, str]:
  """The spec's validity gate at the final evaluation and under both selections."""
  e, g = summary(erm_dir), summary(gdro_dir)
  lines, ok = [], True
  for k in ("final", "val_gp", "no_gp"):
    gap = e[k]["avg"] - e[k]["worst"]
    c1, c2 = gap >= 10, g[k]["worst"] > e[k]["worst"]
    ok &= c1 and c2
    lines.append(f"{k}: ERM avg - worst = {gap:.1f} points ({'>=' if c1 else '<'} 10); "
                 f"group DRO worst {g[k]['worst']:.1f} {'>' if c2 else '<='} ERM worst "
                 f"{e[k]['worst']:.1f}")
  return ok, "\n".join(lines + [f"gate: {'PASSED' if ok else 'NOT PASSED'}"])


def main(argv) -> Optional[int]:
  args = argv[1:]
  gate_dirs = None
  if "--gate" in args:
    i = args.index("--gate")
    gate_dirs, args = args[i + 1:i + 3], args[:i] + args[i + 3:]
  print(table(args or gate_dirs))
  if gate_dirs:
    print()
    print(gate(*gate_dirs)[1])
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
