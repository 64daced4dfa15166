"""The random-weighting litmus test's report (issue 13; ``random_weighting.md``).

Reads a sweep root of the ``litmus`` grid (``experiments/sweep.py``; runs
``<run>/seed<k>/``) and writes, per method: average and worst task accuracy
(means over the last evaluations, mean and standard deviation over seeds),
``Delta_p`` against equal weighting (EW), wall-clock per step, the Table-4 grid
(gradient methods alone and with RLW), the claims of the RLW paper with a
verdict by the paired rule of :func:`experiments.regime_report.paired_verdict`,
and a figure (average vs worst accuracy, one marker per method, error bars
over seeds)::

    python -m experiments.litmus_report --root=results/litmus/runs --out=results/litmus

``Delta_p`` is the RLW paper's average per-task relative improvement over EW
(its section 5): ``Delta_p = 100 / T sum_t (M_t - M_t^EW) / M_t^EW`` for a
metric where higher is better (task accuracy here), computed per seed against
EW of the same seed (same data order and initialisation), then averaged.
"""

import math
import os
from typing import Sequence

from absl import app
from absl import flags
import numpy as np

from experiments import regime_report
from experiments import sweep
from experiments.runner import workdir as workdir_lib
import ldro
from ldro.data import fileio

#: The EW run's name in the grid (the regime study's equal-weights run).
EW_RUN = "static"
#: Runs left out of "the best method": in this shared-head setting they are a different model.
NOT_COMPARABLE = {"rotograd": "its per-task rotations give the shared-head model the task "
                              "identity (results/litmus/README.md)"}


def _label(run: str) -> str:
  """Display label from the registry: ``'rlw+cagrad'`` -> ``'RLW + CAGrad'``."""
  names = {"static": "equal", "ldro-eta1e-3-lam1e-2": "ldro", "dro-eta1e-2": "dro"}
  # Not registry methods: architectures run with equal weights (gin_configs/methods/*.gin).
  architectures = {"rotograd": "RotoGrad"}
  parts = run.split("+")
  out = []
  for p in parts:
    name = names.get(p, p)
    if name in architectures:
      out.append(architectures[name])
      continue
    base, _, variant = name.partition("-")  # e.g. 'mgda-norm_none': MGDA, one setting
    try:
      out.append(ldro.method_info(base).label + (f" ({variant.replace('_', ' ')})"
                                                 if variant else ""))
    except ValueError:
      out.append(p)
  label = " + ".join(out)
  if run == "dro-eta1e-2":
    label += " (eta 1e-2)"
  return label


def delta_p(acc: Sequence[float], acc_ew: Sequence[float]) -> float:
  """``100 / T sum_t (acc_t - acc_t^EW) / acc_t^EW`` (higher is better); NaN if EW has a
  task at accuracy 0 (the relative improvement is undefined)."""
  a, e = np.asarray(acc, np.float64), np.asarray(acc_ew, np.float64)
  if np.any(e <= 0):
    return math.nan
  return float(100.0 * np.mean((a - e) / e))


def build_report(root: str, tail: int = regime_report.TAIL) -> dict:
  """Per-run statistics over seeds, Delta_p against EW, Table 4 and the claims."""
  runs = regime_report.load_runs(root)
  per = {}  # run name -> seed -> tail metrics (+ wall clock)
  failed = {}  # run name -> seed -> (last step evaluated, error line): failures are results
  for r in runs:
    if r["failed"] is not None:
      last = r["records"][-1]["step"] if r["records"] else 0
      failed.setdefault(r["run"], {})[r["seed"]] = {"last_eval_step": last, "error": r["failed"]}
    t = regime_report.tail_metrics(r["records"], tail)
    if t is None or not r["done"]:
      continue
    w = workdir_lib.read_wall_clock(r["dir"])  # None: the per-step column is NaN
    if w is not None and r["records"]:
      t["wall_s_per_step"] = w["wall_s"] / max(r["records"][-1]["step"], 1)
      t["load_at_end"] = w.get("load_average_at_end", [math.nan])[0]
    per.setdefault(r["run"], {})[r["seed"]] = t
  ew = per.get(EW_RUN, {})
  rows = {}
  for name, seeds in per.items():
    avg = [s["tail_avg"] for s in seeds.values()]
    worst = [s["tail_worst"] for s in seeds.values()]
    dps = {k: delta_p(s["tail_task_accuracy"], ew[k]["tail_task_accuracy"])
           for k, s in seeds.items() if k in ew}
    walls = [s["wall_s_per_step"] for s in seeds.values() if "wall_s_per_step" in s]
    loads = [s["load_at_end"] for s in seeds.values() if "load_at_end" in s]
    rows[name] = {
        "label": _label(name), "seeds": sorted(seeds), "failed_seeds": sorted(failed.get(name, {})),
        "avg_mean": float(np.mean(avg)), "avg_std": float(np.std(avg, ddof=1)) if len(avg) > 1 else math.nan,
        "worst_mean": float(np.mean(worst)),
        "worst_std": float(np.std(worst, ddof=1)) if len(worst) > 1 else math.nan,
        "delta_p_mean": float(np.mean(list(dps.values()))) if dps else math.nan,
        "delta_p_std": (float(np.std(list(dps.values()), ddof=1)) if len(dps) > 1
                        else math.nan),
        "delta_p": dps,
        "wall_s_per_step": float(np.median(walls)) if walls else math.nan,
        "load_at_end": float(np.median(loads)) if loads else math.nan,
    }

  def paired(a: str, b: str, key: str) -> tuple[str, float, float, int]:
    if a not in per or b not in per:
      return ("no data", math.nan, math.nan, 0)
    common = sorted(set(per[a]) & set(per[b]))
    diffs = [per[a][k][key] - per[b][k][key] for k in common]
    return regime_report.paired_verdict(diffs) + (len(common),)

  claims = []
  for name in ("rlw", "rgw"):
    v = paired(name, EW_RUN, "tail_avg")
    claims.append({"claim": f"{_label(name)} >= EW in average accuracy (RLW paper, section 6)",
                   "verdict": _at_least(v[0]), "mean": v[1], "se": v[2], "seeds": v[3]})
  best = max((n for n in rows if n not in (EW_RUN, "rlw", "rgw") and n not in NOT_COMPARABLE),
             key=lambda n: rows[n]["avg_mean"], default=None)
  if best is not None:
    v = paired("rlw", best, "tail_avg")
    left_out = ", ".join(_label(n) for n in NOT_COMPARABLE if n in rows)
    claims.append({"claim": f"RLW is comparable with the best method by average accuracy "
                            f"({rows[best]['label']}"
                            f"{f'; {left_out} left out, not comparable here' if left_out else ''}"
                            "): not significantly worse",
                   "verdict": "holds" if v[0] in ("holds", "within noise") else v[0],
                   "mean": v[1], "se": v[2], "seeds": v[3]})
  ldro_run = "ldro-eta1e-3-lam1e-2"
  for other in (EW_RUN, "rlw"):
    v = paired(ldro_run, other, "tail_worst")
    claims.append({"claim": f"L-DRO has a higher worst-task accuracy than {_label(other)}",
                   "verdict": v[0], "mean": v[1], "se": v[2], "seeds": v[3]})
  table4 = []
  for m in sweep.LITMUS_TABLE4:
    alone, with_rlw = rows.get(m), rows.get(f"rlw+{m}")
    v = paired(f"rlw+{m}", m, "tail_avg")
    table4.append({"method": m, "label": _label(m), "ew": alone, "rlw": with_rlw,
                   "rlw_minus_ew": {"verdict": v[0], "mean": v[1], "se": v[2], "seeds": v[3]}})
  return {"root": root, "tail": tail, "rows": rows, "claims": claims, "table4": table4,
          "per_seed": per, "failed": failed}


def _at_least(verdict: str) -> str:
  """'A >= B': holds if A > B significantly or within noise; does not hold if A < B."""
  return "holds" if verdict in ("holds", "within noise") else verdict


def _pm(mean: float, std: float, scale: float = 100.0) -> str:
  return regime_report.pm(mean, std, scale, 2)


def markdown(report: dict) -> str:
  """The tables and claims as markdown."""
  rows = sorted(report["rows"].values(), key=lambda r: -r["avg_mean"])
  lines = [f"Means over the last {report['tail']} evaluations of each run, then mean ± standard "
           "deviation over seeds; Delta_p in % against EW of the same seed; wall-clock per "
           "step of the whole run (evaluations included) with the load average at its end.", "",
           "| method | seeds | avg acc % | worst acc % | Delta_p % | s/step (load) |",
           "|---|---|---|---|---|---|"]
  for r in rows:
    wall = "-" if math.isnan(r["wall_s_per_step"]) else (
        f"{r['wall_s_per_step']:.3f} ({r['load_at_end']:.0f})")
    n_failed = len(r.get("failed_seeds", ()))
    seeds = f"{len(r['seeds'])}" + (f" (+{n_failed} failed)" if n_failed else "")
    lines.append(f"| {r['label']} | {seeds} | {_pm(r['avg_mean'], r['avg_std'])} | "
                 f"{_pm(r['worst_mean'], r['worst_std'])} | "
                 f"{_pm(r['delta_p_mean'], r['delta_p_std'], 1.0)} | {wall} |")
  lines += ["", "Table 4 (gradient methods alone = EW column, and with RLW loss weights):", "",
            "| gradient method | EW: avg / worst % | RLW: avg / worst % | RLW - EW avg (verdict) |",
            "|---|---|---|---|"]
  for t in report["table4"]:
    cell = lambda r: "-" if r is None else (  # pylint: disable=unnecessary-lambda-assignment
        f"{_pm(r['avg_mean'], r['avg_std'])} / {_pm(r['worst_mean'], r['worst_std'])}")
    d = t["rlw_minus_ew"]
    diff = "-" if math.isnan(d["mean"]) else f"{100 * d['mean']:+.2f} ({d['verdict']})"
    n_failed = len(report.get("failed", {}).get(f"rlw+{t['method']}", {}))
    rlw = cell(t["rlw"]) + (f" (+{n_failed} failed)" if n_failed else "")
    lines.append(f"| {t['label']} | {cell(t['ew'])} | {rlw} | {diff} |")
  lines += ["", "| claim | verdict | mean diff (pp) | s.e. | seeds |", "|---|---|---|---|---|"]
  for c in report["claims"]:
    mean = "-" if math.isnan(c["mean"]) else f"{100 * c['mean']:+.2f}"
    se = "-" if math.isnan(c["se"]) else f"{100 * c['se']:.2f}"
    lines.append(f"| {c['claim']} | {c['verdict']} | {mean} | {se} | {c['seeds']} |")
  if report.get("failed"):
    lines += ["", "Failed runs (left out of the means and the paired verdicts above; the "
              "sweep's FAILED file holds the error):", ""]
    for name, seeds in sorted(report["failed"].items()):
      for seed, f in sorted(seeds.items()):
        lines.append(f"- {_label(name)}, seed {seed} (last evaluation at step "
                     f"{f['last_eval_step']}): {f['error']}")
  return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
  """Average vs worst task accuracy, one marker per method, error bars over seeds."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(7.5, 5.5))
  markers = "osD^v<>pPX*h"
  for i, (name, r) in enumerate(sorted(report["rows"].items())):
    err = lambda s: 0.0 if math.isnan(s) else 100 * s  # pylint: disable=unnecessary-lambda-assignment
    ax.errorbar(100 * r["avg_mean"], 100 * r["worst_mean"], xerr=err(r["avg_std"]),
                yerr=err(r["worst_std"]), fmt=markers[i % len(markers)], capsize=3,
                label=r["label"], alpha=0.85,
                color="black" if name in (EW_RUN, "rlw", "ldro-eta1e-3-lam1e-2") else None)
  ax.set_xlabel("average task accuracy (%)")
  ax.set_ylabel("worst task accuracy (%)")
  ax.set_title("Litmus test: methods vs random weighting (mean ± std over seeds)")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2, loc="best")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_outputs(root: str, out: str) -> dict:
  """``report.json``, ``report.md`` and ``litmus.png`` under ``out``."""
  report = build_report(root)
  if not report["rows"]:
    raise FileNotFoundError(f"no finished run with enough evaluations under {root!r}")
  os.makedirs(out, exist_ok=True)
  fileio.atomic_write_json(os.path.join(out, "report.json"), report)
  fileio.atomic_write_text(os.path.join(out, "report.md"), markdown(report))
  plot(report, os.path.join(out, "litmus.png"))
  return report


def define_flags() -> None:
  flags.DEFINE_string("root", None, "Sweep root of the litmus grid (<run>/seed<k>/).")
  flags.DEFINE_string("out", None, "Output folder for report.md, report.json, litmus.png.")


def main(argv: Sequence[str]) -> None:
  del argv
  fv = flags.FLAGS
  if not fv.root or not fv.out:
    raise app.UsageError("--root and --out are required.")
  report = write_outputs(fv.root, fv.out)
  print(markdown(report))


if __name__ == "__main__":
  define_flags()
  app.run(main)
