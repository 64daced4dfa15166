r"""Seeded report of a CIFAR regime sweep: frontiers, claims with an uncertainty rule, curves.

    python -m experiments.regime_report --root=results/cifar10_regime/runs/regime \
        --out=results/cifar10_regime/regime --title="..."

Reads ``<root>/<run>/seed<k>/{run.json,metrics.jsonl}`` (written by
:mod:`experiments.sweep`; finished and unfinished runs alike, each unfinished
one flagged in the report) and writes to ``--out``:

* ``pareto.{png,md,json}``: :mod:`experiments.pareto`'s frontiers, pooled and
  per seed (paper Figures 3 and 6);
* ``report.md`` / ``report.json``: per method and seed the frontier
  hypervolume, best worst-task and best average accuracy, and the claims
  below, each with a verdict by :func:`paired_verdict`;
* ``curves.png``: per-task training loss (on the fixed training subset,
  ``task_train_loss``, when logged) and test accuracy over steps of the
  ``--curve_runs`` runs (the plateau check);
* ``weights.png``: task weights ``w`` over steps of the ``--weight_runs`` runs.

**The uncertainty rule** (:func:`paired_verdict`): for a claim "A is better
than B" with one paired difference ``d_s = A_s - B_s`` per seed, with ``n``
seeds, mean ``m`` and standard error ``se = std(d, ddof=1) / sqrt(n)``: the
claim **holds** if ``m > 2 se``, **does not hold** if ``m < -2 se``, and is
**within noise** otherwise; with fewer than 2 seeds no verdict is given
(``one seed``), only the difference. Seeds pair runs that share the data
order and initialisation (the same ``SEED``).
"""

import json
import math
import os
import re
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags
import numpy as np

from experiments import pareto
from experiments import sweep
from experiments.runner import metrics_io
from ldro import metrics as ldro_metrics
from ldro.data import fileio

#: (claim, metric, method A, method B): "A beats B on metric" (paper section 5.1, B.1).
#: Claims in :data:`AT_LEAST` say "A is not below B": within noise they hold.
CLAIMS = (
    ("L-DRO's frontier has a larger hypervolume than static mixing's", "hypervolume", "ldro",
     "static"),
    ("L-DRO's frontier has a larger hypervolume than DRO's", "hypervolume", "ldro", "dro"),
    ("L-DRO's frontier has a larger hypervolume than PCGrad's", "hypervolume", "ldro", "pcgrad"),
    ("L-DRO's frontier has a larger hypervolume than avg/max's", "hypervolume", "ldro",
     "avg_max"),
    ("L-DRO reaches DRO's worst-task accuracy (best worst acc; does not hold only if "
     "L-DRO - DRO < -2 SE)", "best_worst", "ldro", "dro"),
    ("L-DRO has higher average accuracy than DRO (best avg acc)", "best_average", "ldro", "dro"),
    ("Regime: DRO's best worst-task accuracy exceeds static mixing's", "best_worst", "dro",
     "static"),
    ("Regime: static mixing's best average accuracy exceeds DRO's", "best_average", "static",
     "dro"),
    ("L-DRO's worst-task accuracy at matched average beats static mixing's",
     "worst_at_matched", "ldro", "static"),
    ("L-DRO's worst-task accuracy at matched average beats DRO's",
     "worst_at_matched", "ldro", "dro"),
)
#: Non-inferiority claims among :data:`CLAIMS` (:func:`at_least_verdict`).
AT_LEAST = frozenset({CLAIMS[4][0]})


#: (claim, metric, run A, run B): the same comparisons between configurations fixed in
#: advance (no selection over a grid), on the plateau: ``tail_worst`` / ``tail_avg`` are the
#: means over the last TAIL evaluations of a run's worst-task / average accuracy.
RUN_CLAIMS = (
    ("L-DRO (default eta 1e-3, lambda 1e-2) has a higher plateau worst-task accuracy than "
     "static mixing", "tail_worst", "ldro-eta1e-3-lam1e-2", "static"),
    ("L-DRO (default) has a higher plateau average accuracy than DRO (eta 1e-2)", "tail_avg",
     "ldro-eta1e-3-lam1e-2", "dro-eta1e-2"),
    ("L-DRO (default) has a higher plateau worst-task accuracy than DRO (eta 1e-2)",
     "tail_worst", "ldro-eta1e-3-lam1e-2", "dro-eta1e-2"),
    ("DRO (eta 1e-2) has a higher plateau worst-task accuracy than static mixing", "tail_worst",
     "dro-eta1e-2", "static"),
    ("Static mixing has a higher plateau average accuracy than DRO (eta 1e-2)", "tail_avg",
     "static", "dro-eta1e-2"),
    ("L-DRO (default) has a higher plateau worst-task accuracy than PCGrad", "tail_worst",
     "ldro-eta1e-3-lam1e-2", "pcgrad"),
    ("L-DRO (eta 1e-2, lambda 1e-1) has a higher plateau worst-task accuracy than static mixing",
     "tail_worst", "ldro-eta1e-2-lam1e-1", "static"),
    ("L-DRO (eta 1e-2, lambda 1e-1) has a higher plateau average accuracy than DRO (eta 1e-2)",
     "tail_avg", "ldro-eta1e-2-lam1e-1", "dro-eta1e-2"),
    ("L-DRO (eta 1e-2, lambda 1e-1) has a higher plateau worst-task accuracy than DRO (eta 1e-2)",
     "tail_worst", "ldro-eta1e-2-lam1e-1", "dro-eta1e-2"),
    ("L-DRO (eta 1e-2, lambda 1e-2) has a higher plateau worst-task accuracy than static mixing",
     "tail_worst", "ldro-eta1e-2-lam1e-2", "static"),
    ("L-DRO (eta 1e-2, lambda 1e-2) has a higher plateau average accuracy than DRO (eta 1e-2)",
     "tail_avg", "ldro-eta1e-2-lam1e-2", "dro-eta1e-2"),
)
#: Evaluations averaged for the plateau metrics (4 = the last 4 epochs of a 15-epoch run).
TAIL = 4


#: Claims of the hard-task variant (section 2.3): ``tail_others`` is the plateau average
#: accuracy of the tasks other than the hard one, ``tail_hard_weight`` the mean weight on
#: the hard task over the last TAIL evaluations.
HARD_CLAIMS = (
    ("DRO (eta 1e-2) loses accuracy on the other tasks against static mixing (static - DRO > 0)",
     "tail_others", "static", "dro-eta1e-2"),
    ("DRO (eta 1e-1) loses accuracy on the other tasks against static mixing (static - DRO > 0)",
     "tail_others", "static", "dro-eta1e-1"),
    ("L-DRO (default) keeps higher accuracy on the other tasks than DRO (eta 1e-2)",
     "tail_others", "ldro-eta1e-3-lam1e-2", "dro-eta1e-2"),
    ("L-DRO (eta 1e-2, lambda 1e-2) keeps higher accuracy on the other tasks than DRO (eta 1e-1)",
     "tail_others", "ldro-eta1e-2-lam1e-2", "dro-eta1e-1"),
    ("L-DRO (eta 1e-2, lambda 1e-1) keeps higher accuracy on the other tasks than DRO (eta 1e-2)",
     "tail_others", "ldro-eta1e-2-lam1e-1", "dro-eta1e-2"),
    ("DRO (eta 1e-2) puts more weight on the hard task than L-DRO (eta 1e-2, lambda 1e-1)",
     "tail_hard_weight", "dro-eta1e-2", "ldro-eta1e-2-lam1e-1"),
    ("DRO (eta 1e-2) puts more weight on the hard task than L-DRO (default)",
     "tail_hard_weight", "dro-eta1e-2", "ldro-eta1e-3-lam1e-2"),
    ("DRO (eta 1e-1) puts more weight on the hard task than L-DRO (eta 1e-2, lambda 1e-2)",
     "tail_hard_weight", "dro-eta1e-1", "ldro-eta1e-2-lam1e-2"),
)


def tail_metrics(records: Sequence[dict], tail: int = TAIL,
                 hard_task: Optional[int] = None) -> Optional[dict]:
  """Means over the last ``tail`` evaluations: average, worst-task and per-task accuracy
  (with ``hard_task``: also the other tasks' average accuracy and the hard task's weight)."""
  recs = [r for r in records if "avg_accuracy" in r][-tail:]
  if len(recs) < tail:
    return None
  acc = np.array([r["task_accuracy"] for r in recs])
  out = {"tail_avg": float(np.mean([r["avg_accuracy"] for r in recs])),
         "tail_worst": float(np.mean([r["worst_accuracy"] for r in recs])),
         "tail_task_accuracy": acc.mean(axis=0).tolist(),
         "steps": [recs[0]["step"], recs[-1]["step"]]}
  if hard_task is not None:
    out["tail_others"] = float(np.delete(acc, hard_task, axis=1).mean())
    weights = [r["task_weights"][hard_task] for r in recs if "task_weights" in r]
    out["tail_hard_weight"] = float(np.mean(weights)) if weights else math.nan
  return out


def paired_verdict(diffs: Sequence[float]) -> tuple[str, float, float]:
  """The verdict of the rule above for paired differences ``A - B`` (one per seed).

  Returns:
    ``(verdict, mean, standard error)``; verdict ``'holds'``, ``'does not
    hold'``, ``'within noise'``, ``'one seed'`` (fewer than 2 differences;
    standard error NaN) or ``'no data'`` (none, or one not finite).
  """
  d = np.asarray(list(diffs), np.float64)
  if d.size == 0 or not np.all(np.isfinite(d)):  # e.g. a run that logs no task weights
    return "no data", math.nan, math.nan
  mean = float(d.mean())
  if d.size < 2:
    return "one seed", mean, math.nan
  se = float(d.std(ddof=1) / math.sqrt(d.size))
  return two_se_verdict(mean, se), mean, se


def two_se_verdict(mean: float, se: float) -> str:
  """The rule's threshold: ``'holds'`` if ``mean > 2 se``, ``'does not hold'`` if
  ``mean < -2 se``, else ``'within noise'``."""
  if mean > 2 * se:
    return "holds"
  if mean < -2 * se:
    return "does not hold"
  return "within noise"


def at_least_verdict(verdict: str) -> str:
  """The verdict of "A is not below B" from that of "A beats B": within noise, it holds."""
  return "holds (within noise)" if verdict == "within noise" else verdict


def load_runs(root: str) -> list[dict]:
  """Every ``<root>/<run>/seed<k>`` with its run.json fields, records, DONE flag and, for a
  run that failed and was not finished since (e.g. diverged), its error line (``failed``;
  None otherwise). ``made_as``: the run and seed its ``run.json`` names when they differ
  from its directory (a run copied in from elsewhere; the reports list it), else None."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"sweep root not found: {root!r}")
  runs = []
  for dirpath, _, filenames in sorted(os.walk(root)):
    m = re.fullmatch(r"seed(\d+)", os.path.basename(dirpath))
    if not m or "metrics.jsonl" not in filenames:
      continue
    info = {}
    if "run.json" in filenames:
      with open(os.path.join(dirpath, "run.json"), encoding="utf-8") as f:
        info = json.load(f)
    name = os.path.relpath(os.path.dirname(dirpath), root)
    seed = int(m.group(1))
    made_as = None
    if info.get("run", name) != name or info.get("seed", seed) != seed:
      made_as = f"{info.get('run', name)}/seed{info.get('seed', seed)}"
    records = metrics_io.read_metrics(os.path.join(dirpath, "metrics.jsonl"))
    runs.append({"run": name, "method": info.get("method") or name.split("-", 1)[0],
                 "seed": seed, "done": "DONE" in filenames, "dir": dirpath, "made_as": made_as,
                 "failed": (sweep.failed_error(dirpath)
                            if "FAILED" in filenames and "DONE" not in filenames else None),
                 "records": [r for r in records if "avg_accuracy" in r]})
  if not runs:
    raise FileNotFoundError(f"no <run>/seed<k>/metrics.jsonl under {root!r}")
  return runs


def _points(runs, method, seed=None, configs=None):
  """Every evaluation ``(average, worst)`` of the method's runs (of ``configs`` only, if
  given) at ``seed`` (every seed if None)."""
  return np.array([[r["avg_accuracy"], r["worst_accuracy"]] for run in runs
                   if run["method"] == method and (seed is None or run["seed"] == seed)
                   and (configs is None or run["run"] in configs)
                   for r in run["records"]]).reshape(-1, 2)


def _done_seeds(runs, method) -> set:
  """Seeds at which the method has at least one finished run."""
  return {r["seed"] for r in runs if r["method"] == method and r["done"]}


def complete_configs(runs, method, seeds) -> list[str]:
  """The method's configurations finished at every one of ``seeds``.

  A frontier compared across seeds must be built from the same configurations at each seed:
  a configuration finished at some seeds only (a grid still running, a seed of a partial
  grid) would make the method's pool differ from seed to seed.
  """
  done = {}
  for r in runs:
    if r["method"] == method and r["done"]:
      done.setdefault(r["run"], set()).add(r["seed"])
  return sorted(name for name, have in done.items() if set(seeds) <= have)


def build_report(root: str, reference: Sequence[float] = (0.0, 0.0),
                 hard_task: Optional[int] = None) -> dict:
  """Per-method, per-seed frontier statistics and the claims' verdicts.

  Statistics use every evaluation of the method's runs at that seed (the paper's
  frontier "across epochs and hyper-parameter configurations"), of the
  configurations finished at every seed compared (:func:`complete_configs`):
  the per-method table over the seeds where the method has a finished run, a
  claim over the seeds where both methods have one. Runs left out are listed
  (``left_out``). ``worst_at_matched``: the best worst-task accuracy among a method's points
  with average accuracy at least the lowest of the compared methods' best
  averages at that seed (so both methods have an eligible point).
  """
  runs = load_runs(root)
  methods = pareto._method_order(sorted({r["method"] for r in runs}))  # pylint: disable=protected-access
  seeds = sorted({r["seed"] for r in runs})
  stats = {}
  for m in methods:
    m_seeds = sorted(_done_seeds(runs, m))
    configs = complete_configs(runs, m, m_seeds)
    per = {}
    for s in m_seeds:
      p = _points(runs, m, s, configs)
      if len(p):
        per[s] = {"hypervolume": ldro_metrics.hypervolume(p, reference),
                  "best_worst": float(p[:, 1].max()), "best_average": float(p[:, 0].max())}
    pooled = _points(runs, m, configs=configs)
    stats[m] = {
        "label": pareto.METHOD_LABELS.get(m, m),
        "runs": sorted({r["run"] for r in runs if r["method"] == m}),
        "configs": configs,
        "left_out": sorted(f"{r['run']}/seed{r['seed']}" for r in runs
                           if r["method"] == m and (r["run"] not in configs
                                                    or r["seed"] not in m_seeds)),
        "unfinished": sorted(f"{r['run']}/seed{r['seed']}" for r in runs
                             if r["method"] == m and not r["done"]),
        "hypervolume_per_seed": {str(s): v["hypervolume"] for s, v in per.items()},
        "best_worst_per_seed": {str(s): v["best_worst"] for s, v in per.items()},
        "best_average_per_seed": {str(s): v["best_average"] for s, v in per.items()},
        "hypervolume_pooled": ldro_metrics.hypervolume(pooled, reference),
    }
  claims = []
  for text, metric, a, b in CLAIMS:
    if a not in stats or b not in stats:
      continue
    common = sorted(_done_seeds(runs, a) & _done_seeds(runs, b))
    configs = {m: complete_configs(runs, m, common) for m in (a, b)}
    diffs = {}
    for s in common:
      pa, pb = (_points(runs, m, s, configs[m]) for m in (a, b))
      if not len(pa) or not len(pb):
        continue
      if metric == "worst_at_matched":
        level = min(pa[:, 0].max(), pb[:, 0].max())
        diffs[s] = (ldro_metrics.best_worst_at_average(pa, level) -
                    ldro_metrics.best_worst_at_average(pb, level))
      elif metric == "hypervolume":
        diffs[s] = (ldro_metrics.hypervolume(pa, reference) -
                    ldro_metrics.hypervolume(pb, reference))
      else:
        col = {"best_worst": 1, "best_average": 0}[metric]
        diffs[s] = float(pa[:, col].max() - pb[:, col].max())
    verdict, mean, se = paired_verdict(list(diffs.values()))
    if text in AT_LEAST:
      verdict = at_least_verdict(verdict)
    claims.append({"claim": text, "metric": metric, "a": a, "b": b, "configs": configs,
                   "diffs": {str(k): float(v) for k, v in diffs.items()},
                   "mean": mean, "se": se, "verdict": verdict})
  tails = {}
  for r in runs:
    if r["done"]:
      t = tail_metrics(r["records"], hard_task=hard_task)
      if t:
        tails.setdefault(r["run"], {})[str(r["seed"])] = t
  for text, metric, a, b in RUN_CLAIMS + (HARD_CLAIMS if hard_task is not None else ()):
    if a not in tails or b not in tails:
      continue
    common = sorted(set(tails[a]) & set(tails[b]), key=int)
    if not common:
      continue
    diffs = {s_: tails[a][s_][metric] - tails[b][s_][metric] for s_ in common}
    verdict, mean, se = paired_verdict(list(diffs.values()))
    claims.append({"claim": text, "metric": metric, "a": a, "b": b,
                   "diffs": {k: float(v) for k, v in diffs.items()},
                   "mean": mean, "se": se, "verdict": verdict})
  plateaus = {f"{r['run']}/seed{r['seed']}": plateau_stats(r["records"]) for r in runs
              if r["method"] == "static"}
  final = {f"{r['run']}/seed{r['seed']}": r["records"][-1]["task_accuracy"] for r in runs
           if r["records"]}
  return {"root": root, "seeds": seeds, "methods": stats, "claims": claims, "hard_task": hard_task,
          "made_elsewhere": [f"{r['run']}/seed{r['seed']} (run.json: {r['made_as']})"
                             for r in runs if r["made_as"]],
          "plateau_equal_weights": plateaus, "final_task_accuracy": final, "tail": tails,
          "rule": "paired difference over seeds: holds if mean > 2 SE, does not hold if "
                  "mean < -2 SE, else within noise; one seed: no verdict",
          "runs": [{k: r[k] for k in ("run", "method", "seed", "done")} |
                   {"last_step": r["records"][-1]["step"] if r["records"] else None}
                   for r in runs]}


def plateau_stats(records: Sequence[dict], window: int = 4) -> Optional[dict]:
  """Whether each task's training loss has plateaued at the end of a run.

  Compares the mean ``task_train_loss`` (fixed training subset) over the last
  ``window`` evaluations with the mean over the ``window`` before them: the
  change, its standard error and ``plateau = change > -2 * standard error``:
  no significant decrease (the 2-SE rule of the claims, one-sided, with the
  evaluations as samples; a loss that rises is not still being learnt).

  Returns:
    ``{'steps': [first, last], 'tasks': [{'last': ..., 'change': ..., 'se': ...,
    'plateau': bool}, ...]}``, or None if fewer than ``2 * window`` records
    have ``task_train_loss``.
  """
  recs = [r for r in records if "task_train_loss" in r]
  if len(recs) < 2 * window:
    return None
  a = np.array([r["task_train_loss"] for r in recs[-2 * window:]])
  prev, last = a[:window], a[window:]
  tasks = []
  for t in range(a.shape[1]):
    change = float(last[:, t].mean() - prev[:, t].mean())
    se = float(math.sqrt(last[:, t].var(ddof=1) / window + prev[:, t].var(ddof=1) / window))
    tasks.append({"last": float(last[:, t].mean()), "change": change, "se": se,
                  "plateau": bool(change > -2 * se)})
  return {"steps": [recs[-2 * window]["step"], recs[-1]["step"]], "tasks": tasks}


def pm(mean: float, spread: float, scale: float = 1.0, digits: int = 2) -> str:
  """``'m ± s'`` for the reports' tables: ``'m'`` alone when ``spread`` is NaN (one seed),
  ``'-'`` when ``mean`` is NaN (nothing finished); both multiplied by ``scale``."""
  if math.isnan(mean):
    return "-"
  return f"{scale * mean:.{digits}f}" + ("" if math.isnan(spread) else
                                          f" ± {scale * spread:.{digits}f}")


def _mean_se(values, scale: float = 1.0, digits: int = 2) -> str:
  """Mean ± standard error of ``values`` (the mean alone for one value)."""
  v = np.asarray(list(values), np.float64)
  if v.size == 0:
    return "n/a"
  return pm(v.mean(), v.std(ddof=1) / math.sqrt(v.size) if v.size > 1 else math.nan, scale, digits)


def _fmt(x, scale=100.0, digits=2):
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else \
      f"{scale * x:.{digits}f}"


def markdown(report: dict) -> str:
  """The report as markdown: per-method table (mean ± SE over seeds) and the claims."""
  seeds = report["seeds"]
  lines = [f"Seeds: {', '.join(map(str, seeds))}. Rule: {report['rule']}.", "",
           "Each method's frontier is built from its configurations finished at every seed "
           "(for a claim: at every seed both methods have); `left out` lists the runs this "
           "leaves out of the table (unfinished, or missing at a seed).", "",
           "| method | configurations | hypervolume per seed | hypervolume mean ± SE | best "
           "worst acc mean ± SE (%) | best avg acc mean ± SE (%) | left out |",
           "|---|---|---|---|---|---|---|"]

  def mse(d, scale=1.0, digits=4):
    return _mean_se(d.values(), scale, digits)

  for m, s in report["methods"].items():
    per = " / ".join(f"{s['hypervolume_per_seed'][str(k)]:.4f}" if str(k) in
                     s["hypervolume_per_seed"] else "-" for k in seeds)
    lines.append(f"| {s['label']} | {len(s['configs'])} | {per} | "
                 f"{mse(s['hypervolume_per_seed'])} | {mse(s['best_worst_per_seed'], 100, 2)} | "
                 f"{mse(s['best_average_per_seed'], 100, 2)} | "
                 f"{', '.join(s['left_out']) or '-'} |")
  lines += ["", "| claim | paired differences per seed | mean ± SE | verdict |",
            "|---|---|---|---|"]
  for c in report["claims"]:
    scale = 1.0 if c["metric"] in ("hypervolume", "tail_hard_weight") else 100.0
    digits = {"hypervolume": 4, "tail_hard_weight": 3}.get(c["metric"], 2)
    d = ", ".join(f"s{k}: {scale * v:+.{digits}f}" for k, v in c["diffs"].items())
    se = "" if math.isnan(c["se"]) else f" ± {scale * c['se']:.{digits}f}"
    lines.append(f"| {c['claim']} | {d} | {scale * c['mean']:+.{digits}f}{se} | "
                 f"**{c['verdict']}** |")
  lines.append("")
  lines.append("(hypervolume in accuracy fractions; accuracy differences in points; weights "
               "as fractions.)")
  if report.get("made_elsewhere"):
    lines += ["", "Counted, but made under another run's name (its run.json): " +
              ", ".join(report["made_elsewhere"])]
  plats = {k: v for k, v in report.get("plateau_equal_weights", {}).items() if v}
  if plats:
    lines += ["", "Equal weights, per-task training loss (500 fixed training examples per task): "
              "mean of the last 4 evaluations, change from the 4 before ± its SE, plateau if "
              "change > -2 SE (no significant decrease).", "", "| run | steps | " + " | ".join(
                  f"task {t}" for t in range(len(next(iter(plats.values()))["tasks"]))) + " |",
              "|---|---|" + "---|" * len(next(iter(plats.values()))["tasks"])]
    for k, v in plats.items():
      cells = [f"{t['last']:.3f} ({t['change']:+.3f} ± {t['se']:.3f}{', plateau' if t['plateau'] else ''})"
               for t in v["tasks"]]
      lines.append(f"| {k} | {v['steps'][0]}-{v['steps'][1]} | " + " | ".join(cells) + " |")
  tails = report.get("tail", {})
  if tails:
    n = len(next(iter(next(iter(tails.values())).values()))["tail_task_accuracy"])
    lines += ["", f"Plateau accuracy (%): mean over the last {TAIL} evaluations of each finished "
              "run, mean ± SE over seeds (n = number of seeds).", "",
              "| run | n | " + " | ".join(f"task {t}" for t in range(n)) + " | avg | worst |" +
              (" avg of other tasks | w on hard task |" if report.get("hard_task") is not None
               else ""),
              "|---|---|" + "---|" * (n + 2 + (2 if report.get("hard_task") is not None else 0))]

    def ms(v):
      return _mean_se(v, 100, 1)

    for run, per in tails.items():
      vals = list(per.values())
      cells = [ms([v["tail_task_accuracy"][t] for v in vals]) for t in range(n)]
      extra = ""
      if "tail_others" in vals[0]:
        w = [v["tail_hard_weight"] for v in vals]
        extra = (f" {ms([v['tail_others'] for v in vals])} | "
                 f"{'n/a' if any(math.isnan(x) for x in w) else f'{np.mean(w):.3f}'} |")
      lines.append(f"| {run} | {len(vals)} | " + " | ".join(cells) +
                   f" | {ms([v['tail_avg'] for v in vals])} | "
                   f"{ms([v['tail_worst'] for v in vals])} |" + extra)
  final = report.get("final_task_accuracy", {})
  if final:
    lines += ["", "Final per-task test accuracy (%):", "", "| run | " + " | ".join(
        f"task {t}" for t in range(len(next(iter(final.values()))))) + " | avg | worst |",
              "|---|" + "---|" * (len(next(iter(final.values()))) + 2)]
    for k, v in sorted(final.items()):
      lines.append(f"| {k} | " + " | ".join(f"{100 * x:.1f}" for x in v) +
                   f" | {100 * np.mean(v):.1f} | {100 * np.min(v):.1f} |")
  return "\n".join(lines) + "\n"


#: Task names of the default five CIFAR-10 pairs (legends).
TASK_NAMES = ("cat/dog", "automobile/truck", "airplane/ship", "deer/horse", "bird/frog")


def _task_label(t: int) -> str:
  return f"task {t}" + (f" {TASK_NAMES[t]}" if t < len(TASK_NAMES) else "")


def _pyplot():
  """matplotlib's pyplot on the file-only Agg backend (imported when a figure is drawn)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(plt, fig, path: str, title: Optional[str]) -> None:
  """Titles, lays out, writes and closes a figure."""
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_curves(runs: Sequence[dict], names: Sequence[str], path: str,
                title: Optional[str] = None) -> bool:
  """Per-task training loss (fixed training subset) and test accuracy over steps."""
  plt = _pyplot()
  sel = [r for r in runs if r["run"] in names and r["records"]]
  if not sel:
    return False
  fig, axes = plt.subplots(len(sel), 2, figsize=(12, 3.6 * len(sel)), squeeze=False)
  for row, run in zip(axes, sel):
    recs = run["records"]
    steps = [r["step"] for r in recs]
    key = "task_train_loss" if "task_train_loss" in recs[-1] else "train_task_losses"
    for t in range(len(recs[-1]["task_accuracy"])):
      pts = [(r["step"], r[key][t]) for r in recs if key in r]
      row[0].plot([p[0] for p in pts], [p[1] for p in pts], label=_task_label(t))
      row[1].plot(steps, [r["task_accuracy"][t] for r in recs], label=_task_label(t))
    row[0].set_ylabel(f"{run['run']} seed{run['seed']}\ntraining loss ({key})")
    row[1].set_ylabel("test accuracy")
    for ax in row:
      ax.set_xlabel("step")
      ax.grid(alpha=0.3)
    row[0].set_yscale("log")
    row[1].legend(fontsize=8)
  _save(plt, fig, path, title)
  return True


def plot_weights(runs: Sequence[dict], names: Sequence[str], path: str,
                 title: Optional[str] = None) -> bool:
  """Task weights ``w`` over steps (one panel per run x seed)."""
  plt = _pyplot()
  sel = [r for r in runs if r["run"] in names and r["records"]]
  if not sel:
    return False
  cols = min(3, len(sel))
  rows = -(-len(sel) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.6 * rows), squeeze=False)
  for ax, run in zip(axes.flat, sel):
    recs = [r for r in run["records"] if "task_weights" in r]
    w = np.array([r["task_weights"] for r in recs])
    for t in range(w.shape[1]):
      ax.plot([r["step"] for r in recs], w[:, t], label=_task_label(t))
    ax.set_title(f"{run['run']} seed{run['seed']}", fontsize=9)
    ax.set_xlabel("step")
    ax.set_ylabel("w")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(sel):]:
    ax.axis("off")
  _save(plt, fig, path, title)
  return True


def write_outputs(root: str, out: str, curve_runs: Sequence[str] = ("static",),
                  weight_runs: Sequence[str] = (), title: Optional[str] = None,
                  hard_task: Optional[int] = None) -> dict:
  """Writes pareto.*, report.{md,json}, curves.png and weights.png to ``out``."""
  os.makedirs(out, exist_ok=True)
  report = build_report(root, hard_task=hard_task)
  # The frontiers drawn are the report's: each method's configurations finished at every
  # seed it has, at those seeds.
  used = {(m, run, seed) for m, st in report["methods"].items() for run in st["configs"]
          for seed in map(int, st["hypervolume_per_seed"])}
  pareto.write_outputs(root, out, title=title,
                       keep=lambda p: (p["method"], p["run"], p["seed"]) in used)
  fileio.atomic_write_json(os.path.join(out, "report.json"), report, indent=2)
  fileio.atomic_write_text(os.path.join(out, "report.md"), markdown(report))
  runs = load_runs(root)
  plot_curves(runs, curve_runs, os.path.join(out, "curves.png"), title)
  if weight_runs:
    plot_weights(runs, weight_runs, os.path.join(out, "weights.png"), title)
  return report


def define_flags() -> None:
  flags.DEFINE_string("root", None, "Sweep root (<run>/seed<k>/metrics.jsonl).")
  flags.DEFINE_string("out", None, "Output directory.")
  flags.DEFINE_list("curve_runs", ["static"], "Runs whose per-task curves to plot.")
  flags.DEFINE_list("weight_runs", [], "Runs whose task weights to plot.")
  flags.DEFINE_string("title", None, "Figure title.")
  flags.DEFINE_integer("hard_task", None, "Index of the task made harder (label noise): adds "
                       "the other tasks' accuracy, the weight on it and section 2.3's claims.")


def main(argv: Sequence[str]) -> None:
  del argv
  f = flags.FLAGS
  try:
    if not f.root or not f.out:
      raise ValueError("--root and --out are required.")
    report = write_outputs(f.root, f.out, f.curve_runs, f.weight_runs, f.title, f.hard_task)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
  print(markdown(report))


if __name__ == "__main__":
  define_flags()
  app.run(main)
