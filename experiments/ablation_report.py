r"""L-DRO's ablations on the CIFAR-10 regime study (issue 15; paper Figures 4, 5b and 8).

    python -m experiments.ablation_report --regime_root=results/cifar10_regime/runs/regime \
        --ablations_root=results/cifar10_regime/runs/ablations --out=results/cifar10_regime/ablations

Reads the runs of the ``cifar10_regime_ablations`` sweep (:mod:`experiments.sweep`;
``<ablations_root>/<run>/seed<k>/``) and the main grid's runs they are compared with
(``<regime_root>/<run>/seed<k>/``: equal weights, L-DRO at T = 100, the narrow CNN's
baselines), and writes to ``--out``:

* ``report.md`` / ``report.json``: three tables of plateau accuracy (mean over the last
  :data:`experiments.regime_report.TAIL` evaluations of a finished run,
  :func:`experiments.regime_report.tail_metrics`), each cell the mean ± standard deviation over
  seeds with the number of seeds, and a paired comparison per row:

  - **interval T** (Figure 4, App. A.1): L-DRO at T = 10 / 100 / 1000 for each (eta, lambda)
    setting of the sweep, compared with T = 100 (the main grid's run);
  - **renormalisation** (Figure 5b, App. A.2): at T = 1000, without vs with renormalisation;
  - **model size** (Figure 8, App. B.3): narrow CNN (the main grid) / the paper's small CNN /
    the large CNN x static mixing, DRO, L-DRO, PCGrad, compared with static mixing of the same
    size; for each method, whether that gap shrinks from the narrow CNN to a larger one
    (:func:`gap_change`; B.3: "the differences vanish"); and L-DRO against DRO at each size
    (:data:`SIZE_PAIR`);

  then every expected run and seed that has not finished (listed, never dropped), each run's
  seeds with its wall-clock (``wall_clock.json``), its interval and renormalisation as its
  ``config.gin`` sets them and whether its ``run.json`` matches the sweep's definition, and the
  commands that made the report.
* ``model_size.png``: each method's gap to static mixing of the same size vs the model size
  (Figure 8 as gaps), mean ± SE over seeds with one marker per seed.
* ``size_curves.png``: per-task training loss and test accuracy over steps of static mixing at
  each model size (seed 0), beside the report's capacity table (training-subset accuracy,
  train - test gap, plateaued tasks per size).
* ``ablations.png``: plateau average and worst-task accuracy vs T (log axis) per setting, and
  renormalisation on / off at T = 1000, mean ± std over seeds with one marker per seed, equal
  weights as a horizontal band (mean ± std).

**Comparisons** use :func:`experiments.regime_report.paired_verdict` on the paired differences
``A - B`` (one per seed present in both): "A is higher than B" **holds** if the mean is above
2 standard errors (shown as *higher*), **does not hold** if below -2 SE (*lower*), else
*within noise*; with one paired seed no verdict is given ("1 seed: no verdict"), only the
difference.
"""

import json
import math
import os
import re
import shlex
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags
import numpy as np

from experiments import regime_report
from experiments import sweep
from experiments.runner import workdir as workdir_lib
from ldro.data import fileio

#: The sweep whose runs this report reads, and the main grid the T = 100 / narrow runs are from.
ABLATION_SWEEP = "cifar10_regime_ablations"
REGIME_SWEEP = "cifar10_regime"
#: Equal weights (the reference band, and the model-size table's comparison).
EW_RUN = "static"
#: L-DRO and DRO of the model-size rows, compared with each other at each size (at the paper's
#: small CNN, its main model, that is section 5.1's claim at one setting of each).
SIZE_PAIR = ("ldro-eta1e-2-lam1e-1", "dro-eta1e-2")
#: The main grid's interaction-matrix interval (gin_configs/methods/ldro.gin, UPDATE_EVERY).
MAIN_T = 100
#: The main grid's model in the model-size table.
NARROW = "narrow"
#: Seeds the study runs every configuration at (a missing one is listed as missing).
SEEDS = (0, 1, 2)

_T_RUN = re.compile(r"ldro_T(\d+)-eta(.+)-lam(.+)")
_NORENORM_RUN = re.compile(r"ldro_norenorm_T(\d+)-eta(.+)-lam(.+)")
_VERDICT_WORDS = {"holds": "higher", "does not hold": "lower", "within noise": "within noise"}


def layout() -> dict:
  """The report's rows, from the sweep's definitions (:mod:`experiments.sweep`).

  Returns:
    ``{'settings': [(eta, lambda), ...], 'intervals': [10, 100, 1000], 'norenorm_t': 1000,
    'sizes': ['narrow', 'paper_small', 'large'], 'size_methods': ['static', ...],
    'expected': {('regime' | 'ablations', run name): sweep.Run}}``; run names as strings.
  """
  abl = sweep.sweep_runs(ABLATION_SWEEP)
  main = {r.name: r for r in sweep.sweep_runs(REGIME_SWEEP)}
  settings, intervals, norenorm_t, sizes, size_methods = [], {MAIN_T}, None, [NARROW], []
  expected = {}
  for r in abl:
    expected[("ablations", r.name)] = r
    if m := _T_RUN.fullmatch(r.name):
      intervals.add(int(m.group(1)))
      if (m.group(2), m.group(3)) not in settings:
        settings.append((m.group(2), m.group(3)))
    elif m := _NORENORM_RUN.fullmatch(r.name):
      norenorm_t = int(m.group(1))
    else:
      size, method = r.name.split("-", 1)
      if size not in sizes:
        sizes.append(size)
      if method not in size_methods:
        size_methods.append(method)
  if not set(SIZE_PAIR) <= set(size_methods):
    raise ValueError(f"SIZE_PAIR {SIZE_PAIR} is not among the model-size runs {size_methods}")
  for name in [_t_run(s, MAIN_T)[1] for s in settings] + [EW_RUN] + size_methods:
    if name not in main:
      raise ValueError(f"run {name!r} is not in the {REGIME_SWEEP!r} sweep")
    expected[("regime", name)] = main[name]
  return {"settings": settings, "intervals": sorted(intervals), "norenorm_t": norenorm_t,
          "sizes": sizes, "size_methods": size_methods, "expected": expected}


def _t_run(setting: Sequence[str], t: int) -> tuple[str, str]:
  """(root, run name) of L-DRO at ``setting`` = (eta, lambda) and interval ``t``."""
  eta, lam = setting
  if t == MAIN_T:
    return ("regime", f"ldro-eta{eta}-lam{lam}")
  return ("ablations", f"ldro_T{t}-eta{eta}-lam{lam}")


def _norenorm_run(setting: Sequence[str], t: int) -> tuple[str, str]:
  return ("ablations", f"ldro_norenorm_T{t}-eta{setting[0]}-lam{setting[1]}")


def _size_run(size: str, method: str) -> tuple[str, str]:
  return ("regime", method) if size == NARROW else ("ablations", f"{size}-{method}")


def _load(root: str, flag: str) -> list[dict]:
  """:func:`regime_report.load_runs` of ``root``; ``[]`` if it exists but holds no run yet."""
  if not os.path.isdir(root):
    raise FileNotFoundError(f"--{flag}: directory not found: {root!r}")
  try:
    return regime_report.load_runs(root)
  except FileNotFoundError:  # the folder exists: no run has finished (been synced) yet
    return []


def _config_values(run_dir: str) -> dict:
  """``UPDATE_EVERY``, ``NORMALIZE``, ``MODEL`` and ``MODEL_KWARGS`` as the run's ``config.gin`` sets them."""
  out = {}
  path = os.path.join(run_dir, "config.gin")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        m = re.fullmatch(r"(UPDATE_EVERY|NORMALIZE|MODEL|MODEL_KWARGS) = (.+)", line.strip())
        if m:
          out[m.group(1)] = m.group(2)
  return out


def _matches_sweep(run_dir: str, run: Optional[sweep.Run]) -> Optional[bool]:
  """Whether ``run.json``'s gin files and bindings are the sweep's (None: nothing to check)."""
  path = os.path.join(run_dir, "run.json")
  if run is None or not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    info = json.load(f)
  return (list(info.get("gin_files", [])) == list(run.gin_files) and
          set(run.bindings) <= set(info.get("bindings", [])))


def _seed_summaries(runs: Sequence[dict], root_key: str, expected: dict) -> dict:
  """``{run name: {seed: summary}}``: status, tail metrics, wall-clock, config of each seed."""
  out = {}
  for r in runs:
    tail = regime_report.tail_metrics(r["records"]) if r["done"] else None
    wall = workdir_lib.read_wall_clock(r["dir"])
    out.setdefault(r["run"], {})[r["seed"]] = {
        "done": r["done"], "dir": r["dir"],
        "last_step": r["records"][-1]["step"] if r["records"] else None,
        "tail": tail, "wall_clock": wall, "config": _config_values(r["dir"]),
        "matches_sweep": _matches_sweep(r["dir"], expected.get((root_key, r["run"]))),
        "command": _read(os.path.join(r["dir"], "command.txt")),
        "fit": fit_metrics(r["records"]) if r["done"] else None,
    }
  return out


def fit_metrics(records: Sequence[dict], tail: int = regime_report.TAIL) -> Optional[dict]:
  """How well a run fits its training tasks: means over the last ``tail`` evaluations of the
  per-task accuracy on the fixed training subset (``task_train_accuracy``), and how many
  tasks' training losses have plateaued (:func:`experiments.regime_report.plateau_stats`).

  Returns:
    ``{'train_avg', 'train_worst', 'test_avg', 'tasks', 'plateaued'}``: the tasks' mean and
    lowest training accuracy (lowest of the per-task tail means), the tasks' mean test accuracy,
    the number of tasks and of plateaued tasks (None if the run has too few evaluations for the
    plateau check); or None without ``tail`` evaluations that have ``task_train_accuracy``.
  """
  recs = [r for r in records if "task_train_accuracy" in r][-tail:]
  if len(recs) < tail:
    return None
  train = np.array([r["task_train_accuracy"] for r in recs]).mean(axis=0)
  test = np.array([r["task_accuracy"] for r in recs]).mean(axis=0)
  plateau = regime_report.plateau_stats(records)
  return {"train_avg": float(train.mean()), "train_worst": float(train.min()),
          "test_avg": float(test.mean()), "tasks": int(train.size),
          "plateaued": (sum(t["plateau"] for t in plateau["tasks"]) if plateau else None)}


def capacity(found_seeds: dict, key: tuple[str, str], size: str) -> dict:
  """One model size's fit to its training tasks (its static-mixing run ``key``) over seeds.

  Returns:
    ``{'size', 'run', 'seeds', 'train_avg', 'train_worst', 'gap'}`` with mean and std over the
    seeds (``{'mean', 'std'}``; std NaN below 2 seeds, mean NaN with none), ``gap`` = training
    minus test accuracy, averaged over tasks; and ``plateaued`` / ``tasks`` summed over seeds.
  """
  fits = {s: v["fit"] for s, v in sorted(found_seeds.items()) if v.get("fit")}
  out = {"size": size, "run": f"{key[0]}/{key[1]}", "seeds": sorted(fits)}
  for name, f in (("train_avg", lambda x: x["train_avg"]),
                  ("train_worst", lambda x: x["train_worst"]),
                  ("gap", lambda x: x["train_avg"] - x["test_avg"])):
    out[name] = dict(zip(("mean", "std"), _mean_std(f(x) for x in fits.values())))
  checked = [x for x in fits.values() if x["plateaued"] is not None]
  out["plateaued"] = sum(x["plateaued"] for x in checked)
  out["tasks"] = sum(x["tasks"] for x in checked)
  return out


def _read(path: str) -> Optional[str]:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return f.read().strip()


def cell(seeds: dict, key: tuple[str, str], use: Optional[set] = None) -> dict:
  """Mean ± std over the finished seeds of one run (``seeds``: its seed summaries or {}).

  Args:
    seeds: the run's seed summaries.
    key: ``(root, run)``.
    use: only these seeds (those every cell of the row's group has, so the cells side by
      side are means over the same seeds); None: every finished seed.

  Returns:
    ``{'root', 'run', 'status': 'ok' | 'unfinished' | 'missing', 'seeds': [...],
    'unpaired': [...], 'avg': {seed: value}, 'worst': {seed: value}, 'avg_mean',
    'avg_std', 'worst_mean', 'worst_std', 'n'}``; ``unpaired``: finished seeds left out by
    ``use``; std NaN with fewer than 2 seeds, means NaN with none.
  """
  done = {s: v["tail"] for s, v in sorted(seeds.items()) if v["tail"] is not None}
  ok = {s: t for s, t in done.items() if use is None or s in use}
  out = {"root": key[0], "run": key[1], "seeds": sorted(ok), "n": len(ok),
         "unpaired": sorted(set(done) - set(ok)),
         "status": "ok" if ok else ("unfinished" if seeds else "missing"),
         "avg": {s: t["tail_avg"] for s, t in ok.items()},
         "worst": {s: t["tail_worst"] for s, t in ok.items()}}
  for metric in ("avg", "worst"):
    out[f"{metric}_mean"], out[f"{metric}_std"] = _mean_std(out[metric].values())
  return out


def _mean_std(values) -> tuple[float, float]:
  """Mean and standard deviation (ddof 1) over seeds; std NaN below 2 values, mean NaN with
  none."""
  v = np.array(list(values), np.float64)
  return (float(v.mean()) if v.size else math.nan,
          float(v.std(ddof=1)) if v.size > 1 else math.nan)


def compare(a: dict, b: dict, metric: str) -> dict:
  """Paired comparison ``a - b`` of two cells on ``metric`` ('avg' or 'worst') over the seeds
  both have, by :func:`regime_report.paired_verdict`."""
  common = sorted(set(a[metric]) & set(b[metric]))
  diffs = {s: a[metric][s] - b[metric][s] for s in common}
  verdict, mean, se = regime_report.paired_verdict(list(diffs.values()))
  if verdict == "no data":
    text = "no paired seed"
  elif verdict == "one seed":
    text = "1 seed: no verdict"
  else:
    text = _VERDICT_WORDS[verdict]
  return {"a": a["run"], "b": b["run"], "metric": metric, "seeds": common,
          "diffs": diffs, "mean": mean, "se": se, "verdict": verdict, "text": text}


def gap_change(narrow: dict, larger: dict) -> dict:
  """How much a method's gap to static mixing shrinks from the narrow CNN to a larger one.

  The gaps are :func:`compare` results (per-seed paired differences method - static mixing of
  the same size). The two sizes' models are independent, so their gaps are compared unpaired:
  with ``s`` the sign of the narrow gap's mean, the reduction is
  ``r = s * (mean_narrow - mean_larger)``, positive when the larger model's gap is closer to 0
  on the narrow gap's side, with standard error ``sqrt(SE_narrow^2 + SE_larger^2)``. Verdict
  by the 2-SE rule: *smaller* (r > 2 SE), *larger* (r < -2 SE), else *within noise*; fewer
  than 2 seeds at either size: no verdict.

  Returns:
    ``{'narrow', 'larger' (the gaps' means), 'reduction', 'se', 'text'}``.
  """
  out = {"narrow": narrow["mean"], "larger": larger["mean"], "reduction": math.nan,
         "se": math.nan}
  if not (narrow["seeds"] and larger["seeds"]):
    return dict(out, text="no paired seed")
  sign = 1.0 if narrow["mean"] >= 0 else -1.0
  out["reduction"] = sign * (narrow["mean"] - larger["mean"])
  if len(narrow["seeds"]) < 2 or len(larger["seeds"]) < 2:
    return dict(out, text="1 seed: no verdict")
  out["se"] = math.sqrt(narrow["se"] ** 2 + larger["se"] ** 2)
  verdict = regime_report.two_se_verdict(out["reduction"], out["se"])
  return dict(out, text={"holds": "smaller", "does not hold": "larger"}.get(verdict, verdict))


def shrinkage(size_rows: Sequence[dict], sizes: Sequence[str]) -> list[dict]:
  """Appendix B.3 ("the differences between methods vanish with a larger model") per method
  and larger size: :func:`gap_change` of the gap to static mixing, average and worst task."""
  gaps = {(r["size"], r["method"]): r["vs_reference"] for r in size_rows if "vs_reference" in r}
  return [{"size": z, "method": m,
           "change": {k: gap_change(gaps[(NARROW, m)][k], gaps[(z, m)][k])
                      for k in ("avg", "worst")}}
          for z in sizes if z != NARROW for (zz, m) in gaps if zz == z]


def build_report(regime_root: str, ablations_root: str, seeds: Sequence[int] = SEEDS) -> dict:
  """The three tables, the missing runs and the per-seed details (see the module doc)."""
  lay = layout()
  expected = lay["expected"]
  found = {"regime": _seed_summaries(_load(regime_root, "regime_root"), "regime", expected),
           "ablations": _seed_summaries(_load(ablations_root, "ablations_root"), "ablations",
                                        expected)}
  def seeds_of(key) -> dict:
    """The seed summaries of the run ``key`` = (root, run name); {} if it has none."""
    return found[key[0]].get(key[1], {})

  def cell_of(key, use: Optional[set] = None) -> dict:
    """:func:`cell` of the run ``key``."""
    return cell(seeds_of(key), key, use)

  def finished(key) -> set:
    return {s for s, v in seeds_of(key).items() if v["tail"] is not None}

  def group(specs):
    """Rows ``(key, reference key, fields)`` shown side by side (one setting's intervals,
    a renormalisation pair, one model size): each cell is the mean over the seeds all of
    them have finished (cells with none yet do not count), so the table and the figure set
    means over the same seeds side by side; each paired comparison uses every seed its two
    runs share."""
    have = [finished(k) for k, _, _ in specs if finished(k)]
    use = set.intersection(*have) if have else set()
    rows = []
    for key, ref_key, extra in specs:
      out = dict(extra, cell=cell_of(key, use))
      if ref_key is not None:
        every = [cell_of(k) for k in (key, ref_key)]
        out["reference"] = ref_key[1]
        out["vs_reference"] = {m: compare(*every, m) for m in ("avg", "worst")}
      rows.append(out)
    return rows

  ew = cell_of(("regime", EW_RUN))
  interval = []
  for s in lay["settings"]:
    interval += group([(_t_run(s, t), None if t == MAIN_T else _t_run(s, MAIN_T),
                        {"eta": s[0], "lam": s[1], "T": t}) for t in lay["intervals"]])
  renorm = []
  if lay["norenorm_t"] is not None:
    for s in lay["settings"]:
      on, t = _t_run(s, lay["norenorm_t"]), lay["norenorm_t"]
      renorm += group([(on, None, {"eta": s[0], "lam": s[1], "T": t, "renormalise": True}),
                       (_norenorm_run(s, t), on,
                        {"eta": s[0], "lam": s[1], "T": t, "renormalise": False})])
  size = []
  for z in lay["sizes"]:
    size += group([(_size_run(z, m), None if m == EW_RUN else _size_run(z, EW_RUN),
                    {"size": z, "method": m}) for m in lay["size_methods"]])
  size_change = shrinkage(size, lay["sizes"])
  fit = [capacity(seeds_of(k), k, z) for z in lay["sizes"] for k in [_size_run(z, EW_RUN)]]
  size_pair = []
  for z in lay["sizes"]:
    a, b = (cell_of(_size_run(z, m)) for m in SIZE_PAIR)
    size_pair.append({"size": z, "run": a["run"], "reference": b["run"],
                      "vs_reference": {m: compare(a, b, m) for m in ("avg", "worst")}})
  missing = []
  for key in expected:  # the sweeps' order
    done = finished(key)
    absent = [s for s in seeds if s not in done]
    if absent:
      missing.append({"root": key[0], "run": key[1], "seeds": absent,
                      "unfinished": sorted(s for s in seeds_of(key)
                                           if s not in done)})
  details = []
  for root_key in ("ablations", "regime"):
    for name, per in sorted(found[root_key].items()):
      if (root_key, name) not in expected:
        continue
      for s, v in sorted(per.items()):
        details.append({"root": root_key, "run": name, "seed": s} |
                       {k: v[k] for k in ("done", "last_step", "wall_clock", "config",
                                          "matches_sweep", "command")} |
                       {"tail_avg": v["tail"]["tail_avg"] if v["tail"] else None,
                        "tail_worst": v["tail"]["tail_worst"] if v["tail"] else None})
  return {"regime_root": regime_root, "ablations_root": ablations_root,
          "tail": regime_report.TAIL, "seeds_expected": list(seeds),
          "settings": [list(s) for s in lay["settings"]], "intervals": lay["intervals"],
          "equal_weights": ew, "interval": interval, "renormalisation": renorm,
          "model_size": size, "size_change": size_change, "size_pair": size_pair,
          "capacity": fit,
          "missing": missing, "runs": details,
          "rule": "paired difference A - B over seeds: higher (paired_verdict 'holds') if mean "
                  "> 2 SE, lower ('does not hold') if mean < -2 SE, else within noise; 1 seed: "
                  "no verdict"}


def _pm(c: dict, metric: str) -> str:
  """A cell as text: ``'55.31 ± 0.42 (n=3)'`` (%), ``'not run yet'`` or ``'unfinished'``."""
  if c["status"] == "missing":
    return "not run yet"
  if c["status"] == "unfinished":
    return "unfinished"
  unpaired = c.get("unpaired")
  note = (f"; seed{'s' if len(unpaired) > 1 else ''} {', '.join(map(str, unpaired))} not in "
          "every row") if unpaired else ""
  return (regime_report.pm(c[f"{metric}_mean"], c[f"{metric}_std"], 100, 2) +
          f" (n={c['n']}{note})")


def _pct(x: Optional[float]) -> str:
  return "-" if x is None else f"{100 * x:.2f}"


def _gap(x: float) -> str:
  return "-" if math.isnan(x) else f"{100 * x + 0.0:+.2f}"


def _cmp(r: dict, metric: str) -> str:
  if "vs_reference" not in r:
    return "reference"
  c = r["vs_reference"][metric]
  if not c["seeds"]:
    return "no paired seed"
  se = "" if math.isnan(c["se"]) else f" ± {100 * c['se']:.2f}"
  mean = round(100 * c["mean"], 2) + 0.0  # no "-0.00"
  return f"{mean:+.2f}{se} (n={len(c['seeds'])}): {c['text']}"


def _table(rows: Sequence[dict], keys: Sequence[tuple[str, str]], ref: str) -> list[str]:
  head = " | ".join(k[0] for k in keys)
  lines = [f"| {head} | run | avg acc % | worst acc % | Δ avg vs {ref} (pp) | "
           f"Δ worst vs {ref} (pp) |", "|" + "---|" * (len(keys) + 5)]
  for r in rows:
    lead = " | ".join(str(r[k[1]]) for k in keys)
    c = r["cell"]
    lines.append(f"| {lead} | `{c['root']}/{c['run']}` | {_pm(c, 'avg')} | "
                 f"{_pm(c, 'worst')} | {_cmp(r, 'avg')} | {_cmp(r, 'worst')} |")
  return lines


def markdown(report: dict, command: Optional[str] = None) -> str:
  """The report as markdown."""
  ew = report["equal_weights"]
  lines = [
      "# L-DRO ablations on the CIFAR-10 regime study (paper Figures 4, 5b, 8)", "",
      f"Plateau accuracy: mean over the last {report['tail']} evaluations of each finished run; "
      "each cell the mean ± standard deviation over seeds (n = seeds). Comparisons: paired "
      f"difference over the seeds both runs have, mean ± SE; rule: {report['rule']}. "
      "Runs: `" + report["ablations_root"] + "` (ablations), `" + report["regime_root"] +
      "` (main grid: T = 100, equal weights, the narrow CNN).", "",
      f"Equal weights (`regime/{EW_RUN}`): average {_pm(ew, 'avg')}, worst {_pm(ew, 'worst')}.",
      "", "## Interaction-matrix interval T (Figure 4, App. A.1)", ""]
  lines += _table(report["interval"], (("eta", "eta"), ("lambda", "lam"), ("T", "T")),
                  f"T = {MAIN_T}")
  lines += ["", "## Renormalisation at T = 1000 (Figure 5b, App. A.2)", ""]
  lines += _table(report["renormalisation"], (("eta", "eta"), ("lambda", "lam"),
                                              ("renormalised", "renormalise")), "renormalised")
  lines += ["", "## Model size (Figure 8, App. B.3)", "",
            f"`{NARROW}`: the main grid's CNN (4 x conv 8, MLP 3 x 32); `paper_small`: the "
            "paper's small CNN (4x wider); `large`: the paper's large CNN.", ""]
  lines += _table(report["model_size"], (("model", "size"), ("method", "method")),
                  "static mixing of the same size")
  lines += ["", "Does the gap to static mixing shrink with the model (App. B.3: the differences "
            "vanish)? The gap (method - static mixing, pp, mean over seeds) on the narrow CNN "
            "and on the larger one; reduction = how much closer to 0 it is on the larger one "
            "(on the narrow gap's side), ± the unpaired SE: *smaller* if above 2 SE, *larger* "
            "if below -2 SE, else within noise.", "",
            "| model | method | avg gap narrow → this | reduction | worst gap narrow → this | "
            "reduction |", "|---|---|---|---|---|---|"]
  for r in report["size_change"]:
    cells = []
    for k in ("avg", "worst"):
      c = r["change"][k]
      se = "" if math.isnan(c["se"]) else f" ± {100 * c['se']:.2f}"
      red = "" if math.isnan(c["reduction"]) else f"{100 * c['reduction'] + 0.0:+.2f}{se}: "
      cells += [f"{_gap(c['narrow'])} → {_gap(c['larger'])}", red + c["text"]]
    lines.append(f"| {r['size']} | {r['method']} | " + " | ".join(cells) + " |")
  lines += ["", f"L-DRO ({SIZE_PAIR[0]}) - DRO ({SIZE_PAIR[1]}) at each size (paired over "
            "seeds; section 5.1: L-DRO reaches DRO's worst task without its cost in average):",
            "", "| model | Δ avg (pp) | Δ worst (pp) |", "|---|---|---|"]
  for r in report["size_pair"]:
    lines.append(f"| {r['size']} | {_cmp(r, 'avg')} | {_cmp(r, 'worst')} |")
  lines += ["", f"Capacity: how well static mixing of each size fits its training tasks (App. "
            "B.3 reads the thinning differences as L-DRO being useful where the model's capacity "
            "limits it). Accuracy on the fixed training subset (500 examples a task; mean over "
            f"the last {report['tail']} evaluations): the tasks' mean and the lowest task, mean ± "
            "std over seeds; train - test: the tasks' mean training minus test accuracy; "
            "plateaued: tasks whose training loss no longer falls (2-SE rule, all seeds). "
            "Curves: `size_curves.png` (seed 0).", "",
            "| model | run | seeds | train avg % | train worst task % | train - test avg (pp) | "
            "tasks plateaued |", "|---|---|---|---|---|---|---|"]
  for r in report["capacity"]:
    cells = [regime_report.pm(r[k]["mean"], r[k]["std"], 100, 2) if r["seeds"] else "-"
             for k in ("train_avg", "train_worst", "gap")]
    cells.append(f"{r['plateaued']}/{r['tasks']}" if r["tasks"] else "-")
    lines.append(f"| {r['size']} | `{r['run']}` | {len(r['seeds'])} | " + " | ".join(cells) + " |")
  lines += ["", "## Missing (expected seeds "
            f"{', '.join(map(str, report['seeds_expected']))} not finished)", ""]
  if report["missing"]:
    for m in report["missing"]:
      extra = (f"; unfinished (not counted): seed {', '.join(map(str, m['unfinished']))}"
               if m["unfinished"] else "")
      lines.append(f"* `{m['root']}/{m['run']}`: seed {', '.join(map(str, m['seeds']))}{extra}")
  else:
    lines.append("None.")
  differs = [f"`{d['root']}/{d['run']}` seed {d['seed']}" for d in report["runs"]
             if d["matches_sweep"] is False]
  if differs:
    lines += ["", f"**Warning**: {len(differs)} run seeds' `run.json` differ from the sweep's "
              "definition of their run (gin files or bindings; see the table below): "
              + ", ".join(differs) + "."]
  lines += ["", "## Runs: wall-clock and configuration", "",
            "Wall-clock from each run's `wall_clock.json` (summed over attempts; load average "
            "at the end); T, renormalisation and model as its `config.gin` sets them; sweep: whether "
            "its `run.json` has the sweep's gin files and bindings. Each run's exact command: "
            "its `command.txt`.", "",
            "| run | seed | finished | last step | avg % | worst % | wall s | attempts | "
            "load at end | UPDATE_EVERY | NORMALIZE | MODEL | sweep |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for d in report["runs"]:
    w = d["wall_clock"] or {}
    load = w.get("load_average_at_end")
    cfg = d["config"]
    cells = [f"`{d['root']}/{d['run']}`", d["seed"], "yes" if d["done"] else "no",
             d["last_step"], _pct(d["tail_avg"]), _pct(d["tail_worst"]),
             f"{w['wall_s']:.0f}" if "wall_s" in w else "-", w.get("attempts", "-"),
             f"{load[0]:.1f}" if load else "-", cfg.get("UPDATE_EVERY", "-"),
             cfg.get("NORMALIZE", "-"),
             " ".join(cfg[k] for k in ("MODEL", "MODEL_KWARGS") if k in cfg) or "-",
             {True: "ok", False: "**differs**", None: "-"}[d["matches_sweep"]]]
    lines.append("| " + " | ".join(map(str, cells)) + " |")
  walls = [d["wall_clock"]["wall_s"] for d in report["runs"]
           if d["root"] == "ablations" and d["wall_clock"] and "wall_s" in d["wall_clock"]]
  lines += ["", f"Ablation runs' wall-clock in all: {sum(walls):.0f} s over {len(walls)} run "
            "seeds."]
  lines += ["", "## Commands", "", "```bash",
            f"python -m experiments.sweep --sweep={ABLATION_SWEEP} "
            "--root=workdirs/cifar10_regime/ablations --seeds=<k>   "
            "# the runs (results/cifar10_regime/run.sh, lane a)",
            "bash results/cifar10_regime/sync.sh   # finished runs into results/.../runs/",
            command or (f"python -m experiments.ablation_report --regime_root="
                        f"{report['regime_root']} --ablations_root={report['ablations_root']} "
                        "--out=<out>"),
            "```"]
  return "\n".join(lines) + "\n"


def plot(report: dict, path: str) -> None:
  """Figure 4 (accuracy vs T per setting) and 5b (renormalisation on / off at T = 1000)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  settings = [tuple(s) for s in report["settings"]]
  fig, axes = plt.subplots(1, len(settings) + 1, figsize=(5.2 * (len(settings) + 1), 4.6),
                           squeeze=False)
  axes = axes[0]
  styles = {"avg": ("tab:blue", "o", "average"), "worst": ("tab:red", "s", "worst task")}
  ew = report["equal_weights"]

  def band(ax):
    for metric, (color, _, label) in styles.items():
      if ew["n"]:
        mean, std = 100 * ew[f"{metric}_mean"], 100 * ew[f"{metric}_std"]
        ax.axhline(mean, color=color, ls=":", lw=1, label=f"equal weights, {label}")
        if not math.isnan(std):
          ax.axhspan(mean - std, mean + std, color=color, alpha=0.1)

  def points(ax, xs, cells, metric, jitter):
    color, marker, label = styles[metric]
    for x, c in zip(xs, cells):
      for s in c["seeds"]:
        ax.plot(x * jitter, 100 * c[metric][s], marker, color=color, alpha=0.45, ms=4)
      if not c["n"] and metric == "avg":
        ax.annotate(c["status"] if c["status"] == "unfinished" else "not run yet",
                    (x, 0.03), xycoords=("data", "axes fraction"), ha="center", fontsize=7,
                    color="gray", rotation=90)
    have = [(x, c) for x, c in zip(xs, cells) if c["n"]]
    if have:
      ax.errorbar([x for x, _ in have], [100 * c[f"{metric}_mean"] for _, c in have],
                  yerr=[0.0 if math.isnan(c[f"{metric}_std"]) else 100 * c[f"{metric}_std"]
                        for _, c in have], color=color, marker=marker, mfc="none", capsize=3,
                  label=f"L-DRO, {label}")

  for ax, s in zip(axes, settings):
    rows = [r for r in report["interval"] if (r["eta"], r["lam"]) == s]
    for metric in styles:
      points(ax, [r["T"] for r in rows], [r["cell"] for r in rows], metric, 1.06)
    band(ax)
    ax.set_xscale("log")
    ax.set_xlim(min(report["intervals"]) / 1.6, max(report["intervals"]) * 1.6)
    ax.set_xticks(report["intervals"], [str(t) for t in report["intervals"]])
    ax.set_xlabel("interaction-matrix interval T (steps)")
    ax.set_title(f"Fig. 4: eta {s[0]}, lambda {s[1]}", fontsize=10)
  ax = axes[-1]
  rows = report["renormalisation"]
  for k in range(0, len(rows), 2):  # one (on, off) pair per setting: lines join a pair only
    for metric in styles:
      points(ax, [k, k + 1][:len(rows) - k], [r["cell"] for r in rows[k:k + 2]], metric, 1.0)
  band(ax)
  ax.set_xticks(range(len(rows)), [f"eta {r['eta']}\n{'on' if r['renormalise'] else 'off'}"
                                   for r in rows])
  ax.set_xlim(-0.5, max(len(rows), 1) - 0.5)
  ax.set_title("Fig. 5b: renormalisation at T = 1000", fontsize=10)
  for a in axes:
    a.set_ylabel("plateau test accuracy (%)")
    a.grid(alpha=0.3)
  handles = {}
  for a in axes:
    for h, label in zip(*a.get_legend_handles_labels()):
      handles.setdefault(label, h)
  fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, fontsize=8)
  fig.suptitle("L-DRO ablations, CIFAR-10 regime (mean ± std over seeds; small markers: seeds; "
               "band: equal weights, mean ± std)", fontsize=10)
  fig.tight_layout(rect=(0, 0.07, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_model_size(report: dict, path: str) -> None:
  """Figure 8 / App. B.3 as gaps: each method minus static mixing of the same size (pp) vs the
  model size, mean ± SE over seeds with one marker per seed; average and worst task."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rows = [r for r in report["model_size"] if "vs_reference" in r]
  sizes = list(dict.fromkeys(r["size"] for r in report["model_size"]))
  methods = list(dict.fromkeys(r["method"] for r in rows))
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.4))
  for ax, (metric, title) in zip(axes, (("avg", "average accuracy"),
                                        ("worst", "worst-task accuracy"))):
    for j, m in enumerate(methods):
      color, dx = f"C{j}", 0.08 * (j - (len(methods) - 1) / 2)
      xs, means, ses = [], [], []
      for i, z in enumerate(sizes):
        c = next(r for r in rows if (r["size"], r["method"]) == (z, m))["vs_reference"][metric]
        for d in c["diffs"].values():
          ax.plot(i + dx, 100 * d, ".", color=color, alpha=0.4, ms=5)
        if c["seeds"]:
          xs.append(i + dx)
          means.append(100 * c["mean"])
          ses.append(0.0 if math.isnan(c["se"]) else 100 * c["se"])
      if xs:
        ax.errorbar(xs, means, yerr=ses, color=color, marker="o", capsize=3, label=m)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(sizes)), sizes)
    ax.set_xlim(-0.5, len(sizes) - 0.5)
    ax.set_xlabel("model")
    ax.set_ylabel(f"{title}: method - static mixing (pp)")
    ax.set_title(f"Fig. 8 / B.3: gap in {title}", fontsize=10)
    ax.grid(alpha=0.3)
  handles, labels = axes[0].get_legend_handles_labels()
  if handles:
    fig.legend(handles, labels, loc="lower center", ncol=len(methods), fontsize=8)
  fig.suptitle("Gap to static mixing of the same model (mean ± SE over seeds; dots: seeds; "
               "a model with no finished seed has no point)", fontsize=10)
  fig.tight_layout(rect=(0, 0.08, 1, 1))
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_size_curves(report: dict, path: str, seed: int = 0) -> bool:
  """Per-task training loss and test accuracy over steps of static mixing at each model size
  (the report's capacity rows; one finished seed); False (no file) if none has finished."""
  runs = []
  for row in report["capacity"]:
    root_key, name = row["run"].split("/", 1)
    folder = os.path.join(report[f"{root_key}_root"], name)
    if os.path.exists(os.path.join(folder, f"seed{seed}", "DONE")):
      runs += [r | {"run": f"{row['size']}: {name}"} for r in regime_report.load_runs(folder)
               if r["seed"] == seed]
  if not runs:
    return False
  return regime_report.plot_curves(runs, [r["run"] for r in runs], path,
                                   "Static mixing at each model size: per-task curves")


def write_outputs(regime_root: str, ablations_root: str, out: str,
                  seeds: Sequence[int] = SEEDS, command: Optional[str] = None,
                  figure: bool = True) -> dict:
  """``report.json``, ``report.md`` and (``figure``) ``ablations.png``, ``model_size.png`` and
  ``size_curves.png`` under ``out``."""
  report = build_report(regime_root, ablations_root, seeds)
  report["command"] = command
  fileio.atomic_write_json(os.path.join(out, "report.json"), report)
  fileio.atomic_write_text(os.path.join(out, "report.md"), markdown(report, command))
  if figure:
    plot(report, os.path.join(out, "ablations.png"))
    plot_model_size(report, os.path.join(out, "model_size.png"))
    plot_size_curves(report, os.path.join(out, "size_curves.png"))
  return report


def define_flags() -> None:
  flags.DEFINE_string("regime_root", None, "Main grid's runs (<run>/seed<k>/): T = 100, equal "
                      "weights, the narrow CNN.")
  flags.DEFINE_string("ablations_root", None, "The cifar10_regime_ablations runs "
                      "(<run>/seed<k>/).")
  flags.DEFINE_string("out", None, "Output folder for report.md, report.json, ablations.png, "
                      "model_size.png, size_curves.png.")
  flags.DEFINE_list("seeds", [str(s) for s in SEEDS], "Seeds every run is expected at (the "
                    "others are listed as missing).")


def main(argv: Sequence[str]) -> None:
  del argv
  fv = flags.FLAGS
  try:
    for name in ("regime_root", "ablations_root", "out"):
      if not getattr(fv, name):
        raise ValueError(f"--{name} is required.")
    command = shlex.join(["python", "-m", "experiments.ablation_report",
                          f"--regime_root={fv.regime_root}",
                          f"--ablations_root={fv.ablations_root}", f"--out={fv.out}"] +
                         ([f"--seeds={','.join(fv.seeds)}"]
                          if [int(s) for s in fv.seeds] != list(SEEDS) else []))
    report = write_outputs(fv.regime_root, fv.ablations_root, fv.out,
                           [int(s) for s in fv.seeds], command)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  print(markdown(report, command))


if __name__ == "__main__":
  define_flags()
  app.run(main)
