r"""Tables of Spurious-CIFAR runs (issue 14): per run, and per method over seeds with claims.

Per run (final, Val-GP and No-GP test accuracies) and the validity gate::

    python -m experiments.worst_group_image_report results/worst_group/image/A/erm_seed0 \
        results/worst_group/image/A/group_dro_seed0 [--gate ERM_DIR GDRO_DIR]

Per method over seeds, from a ``worst_group_image_methods`` sweep root (``<root>/<run>/seed<k>``,
runs ``pre-<method>`` and ``scratch-<method>``), with the paper's claims read by the paired
rule of :func:`experiments.regime_report.paired_verdict`::

    python -m experiments.worst_group_image_report --methods_root=results/worst_group/image/A/methods \
        --out=results/worst_group/image/A

The one-seed grid (``worst_group_image`` sweep: the ERM lr check and claim 9's sensitivity to
alpha_aux and alpha_reg)::

    python -m experiments.worst_group_image_report --grid_root=results/worst_group/image/A/grid \
        --out=results/worst_group/image/A

Claim 10 across the cue variants (the flip-rate reduction of reg. MTL over ERM, A against B)::

    python -m experiments.worst_group_image_report \
        --claim10=A=results/worst_group/image/A/methods,B=results/worst_group/image/B/methods \
        --out=results/worst_group/image

Each run directory holds ``metrics.jsonl`` (a runner workdir or its copy under ``results/``).
Selection over the evaluations after step 0 (one per epoch): Val-GP = the best validation
worst-group accuracy, No-GP = the best validation pooled average (ties: the earliest). Test
"avg" is the group-balanced average (= pooled on the balanced test set), "worst" the
worst-group accuracy; "flip" the share of test predictions that change when the cue is swapped.
"""

import math
import os
import sys
from typing import Optional, Sequence

import numpy as np

from ldro.data import fileio


def read(run_dir: str) -> list[dict]:
  """A run's evaluation records (:func:`experiments.runner.metrics_io.read_metrics`)."""
  from experiments.runner import metrics_io  # pylint: disable=g-import-not-at-top
  path = os.path.join(run_dir, "metrics.jsonl")
  records = metrics_io.read_metrics(path)
  if not records:
    raise FileNotFoundError(f"no evaluation records in {path}")
  return records


def select(records: list[dict], key: str) -> dict:
  """The record (after step 0) with the largest ``key`` (the earliest on ties)."""
  cands = [r for r in records if r["step"] > 0] or records
  return max(cands, key=lambda r: (r[key], -r["step"]))


def summary(run_dir: str) -> dict:
  """:func:`summarize` of a run directory, named by it (``<run>/seed<k>`` for a sweep's runs)."""
  parts = run_dir.rstrip("/").split("/")
  name = "/".join(parts[-2:]) if len(parts) > 1 and parts[-1].startswith("seed") else parts[-1]
  return summarize(read(run_dir), name)


def summarize(recs: Sequence[dict], name: str = "") -> dict:
  """Final, Val-GP and No-GP test metrics of one run's evaluation records."""
  last = recs[-1]
  out = {"run": name, "steps": last["step"]}
  for name, rec in (("final", last), ("val_gp", select(recs, "val_worst_accuracy")),
                    ("no_gp", select(recs, "val_average_accuracy"))):
    out[name] = {"step": rec["step"], "avg": 100 * rec["avg_accuracy"],
                 "worst": 100 * rec["worst_accuracy"], "worst_group": rec["test_worst_group"],
                 "flip": 100 * rec["flip_rate"], "groups": [100 * x for x in rec["task_accuracy"]]}
  return out


def table(run_dirs) -> str:
  return summary_table([summary(d) for d in run_dirs])


def summary_table(summaries) -> str:
  """The per-run table of :func:`summarize` results."""
  lines = ["| run | steps | final avg / worst | Val-GP (step) avg / worst | No-GP (step) avg / worst "
           "| final per-group (v/r, v/g, a/r, a/g) | final flip % |",
           "|---|---|---|---|---|---|---|"]
  for s in summaries:
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


# ---------------------------------------------------------------- per method, over seeds

METHODS = ("erm", "jtt", "group_dro", "mtl", "l1_only", "aux_only", "ldro", "mtl_ldro")
LABELS = {"erm": "ERM", "jtt": "JTT", "group_dro": "group DRO", "mtl": "reg. MTL (+aux+l1)",
          "l1_only": "+l1 only", "aux_only": "+aux only", "ldro": "L-DRO over groups",
          "mtl_ldro": "reg. MTL + L-DRO"}
REGIMES = ("pre", "scratch")
SELECTIONS = ("val_gp", "no_gp", "final")
#: The claims of the spec's section 5 that these runs test: (text, regime, selection, metric,
#: A, B, rule) with rule '>' (A beats B: paired verdict) or '~' (A and B within noise). A regime
#: or selection 'x|y' compares A under x with B under y.
CLAIMS = tuple(
    [(f"reg. MTL beats ERM in WGA, pre-trained, {sel} (claims 5, 8: by about 2 points)", "pre",
      sel, "worst", "mtl", "erm", ">") for sel in ("val_gp", "no_gp")]
    + [(f"reg. MTL beats JTT in WGA, pre-trained, {sel} (claims 4-5)", "pre", sel, "worst",
        "mtl", "jtt", ">") for sel in ("val_gp", "no_gp")]
    + [("reg. MTL's average >= ERM's, pre-trained, no_gp (claim 5)", "pre", "no_gp", "avg",
        "mtl", "erm", ">=")]
    + [(f"{LABELS[m]} alone beats ERM in WGA, pre-trained, no_gp (claim 6: only +aux+l1 "
        "should)", "pre", "no_gp", "worst", m, "erm", ">") for m in ("l1_only", "aux_only")]
    + [(f"group DRO has the highest WGA under Val-GP: beats {LABELS[m]} (claim 4)", "pre",
        "val_gp", "worst", "group_dro", m, ">") for m in ("mtl", "jtt")]
    + [("from scratch, reg. MTL ~ ERM in WGA, no_gp (claim 7)", "scratch", "no_gp", "worst",
        "mtl", "erm", "~"),
       ("from scratch, JTT beats reg. MTL in WGA, no_gp (claim 7)", "scratch", "no_gp", "worst",
        "jtt", "mtl", ">"),
       ("pre-training helps reg. MTL's WGA, no_gp (pre - scratch; claim 7's flip side)",
        "pre|scratch", "no_gp", "worst", "mtl", "mtl", ">"),
       ("reg. MTL lowers the flip rate vs ERM, pre-trained, final (claim 10, this variant)",
        "pre", "final", "flip", "erm", "mtl", ">"),
       # Claim 8: what the validation group labels are worth (the paper: about 5-15 points).
       *[(f"group labels for model selection lift {LABELS[m]}'s WGA: val_gp - no_gp, "
          "pre-trained (claim 8: by 5-15 points)", "pre", "val_gp|no_gp", "worst", m, m, ">")
         for m in ("erm", "mtl")],
       # Beyond the paper: L-DRO over groups.
       ("L-DRO over groups beats group DRO in WGA, pre-trained, no_gp (beyond the paper)",
        "pre", "no_gp", "worst", "ldro", "group_dro", ">"),
       ("reg. MTL + L-DRO beats reg. MTL in WGA, pre-trained, no_gp (beyond the paper)", "pre",
        "no_gp", "worst", "mtl_ldro", "mtl", ">")])


def _verdict(diffs, rule):
  from experiments import regime_report  # pylint: disable=g-import-not-at-top
  verdict, mean, se = regime_report.paired_verdict(diffs)
  if rule == "~" and verdict in ("holds", "does not hold"):
    verdict = "does not hold"
  elif rule == "~" and verdict == "within noise":
    verdict = "holds"
  elif rule == ">=" and verdict == "within noise":
    verdict = "holds (within noise)"
  return verdict, mean, se


def _cells(root: str) -> tuple[dict, list, list, list]:
  """``({(regime, method): {seed: summary}}, unfinished, failed, made elsewhere)`` of a
  methods sweep root; made elsewhere: counted runs whose run.json names another run."""
  from experiments import regime_report  # pylint: disable=g-import-not-at-top
  cells = {}
  unfinished, failed, elsewhere = [], [], []
  for run in regime_report.load_runs(root):
    regime, _, method = run["run"].partition("-")
    if regime not in REGIMES or method not in METHODS:
      continue  # e.g. JTT's stage 1
    if run["made_as"]:
      elsewhere.append(f"{run['run']}/seed{run['seed']} (run.json: {run['made_as']})")
    if run["failed"] is not None:  # a result too (e.g. diverged)
      failed.append(f"{run['run']}/seed{run['seed']}: {run['failed']}")
      continue
    if not run["done"] or not run["records"]:
      unfinished.append(f"{run['run']}/seed{run['seed']}")
      continue
    cells.setdefault((regime, method), {})[run["seed"]] = summarize(run["records"], run["run"])
  return cells, unfinished, failed, elsewhere


def methods_report(root: str) -> dict:
  """Per (regime, method, seed) the selected test metrics; per (regime, method) mean and std
  over seeds; the claims with paired verdicts (seeds pair runs with the same data and cue)."""
  cells, unfinished, failed, elsewhere = _cells(root)
  rows = []
  for regime in REGIMES:
    for method in METHODS:
      per_seed = cells.get((regime, method), {})
      row = {"regime": regime, "method": method, "label": LABELS[method],
             "seeds": sorted(per_seed)}
      for sel in SELECTIONS:
        for metric in ("avg", "worst", "flip"):
          vals = np.array([per_seed[k][sel][metric] for k in sorted(per_seed)], np.float64)
          row[f"{sel}_{metric}"] = [float(vals.mean()) if vals.size else math.nan,
                                    float(vals.std(ddof=1)) if vals.size > 1 else math.nan]
      rows.append(row)
  claims = []
  for text, regime, sel, metric, a, b, rule in CLAIMS:
    ra, rb = regime.split("|") if "|" in regime else (regime, regime)
    sel_a, sel_b = sel.split("|") if "|" in sel else (sel, sel)
    sa, sb = cells.get((ra, a), {}), cells.get((rb, b), {})
    seeds = sorted(set(sa) & set(sb))
    diffs = [sa[k][sel_a][metric] - sb[k][sel_b][metric] for k in seeds]
    verdict, mean, se = _verdict(diffs, rule)
    claims.append({"claim": text, "verdict": verdict, "mean": mean, "se": se,
                   "seeds": seeds})
  return {"root": root, "rows": rows, "claims": claims, "unfinished": unfinished,
          "failed": failed, "made_elsewhere": elsewhere}


def claim10_report(roots: dict) -> dict:
  """Claim 10 across the cue variants: reg. MTL lowers the flip rate for a low-variance cue
  (A), and less so for a high-variance one (B).

  Per variant, the reduction ``r = flip(ERM) - flip(reg. MTL)`` (pre-trained, last epoch,
  paired by seed) with its verdict; then ``r_A - r_B`` over the seeds both variants have
  (the same seed: the same images, splits and initialization; only the cue differs), which
  holds if it exceeds twice its standard error (:func:`experiments.regime_report.paired_verdict`).

  Args:
    roots: ``{'A': methods root, 'B': methods root}``.

  Returns:
    ``{'variants': {v: {'seeds', 'reductions', 'verdict', 'mean', 'se'}}, 'a_minus_b': {...}}``.
  """
  from experiments import regime_report  # pylint: disable=g-import-not-at-top
  out = {"variants": {}}
  for v, root in roots.items():
    cells = _cells(root)[0]
    erm, mtl = cells.get(("pre", "erm"), {}), cells.get(("pre", "mtl"), {})
    seeds = sorted(set(erm) & set(mtl))
    red = {k: erm[k]["final"]["flip"] - mtl[k]["final"]["flip"] for k in seeds}
    verdict, mean, se = regime_report.paired_verdict(list(red.values()))
    out["variants"][v] = {"root": root, "seeds": seeds, "reductions": red,
                          "verdict": verdict, "mean": mean, "se": se}
  if {"A", "B"} <= set(out["variants"]):
    red_a, red_b = (out["variants"][v]["reductions"] for v in ("A", "B"))
    seeds = sorted(set(red_a) & set(red_b))
    verdict, mean, se = regime_report.paired_verdict([red_a[k] - red_b[k] for k in seeds])
    out["a_minus_b"] = {"seeds": seeds, "verdict": verdict, "mean": mean, "se": se}
  return out


def claim10_markdown(rep: dict) -> str:
  fmt = lambda x: "-" if math.isnan(x) else f"{x:+.1f}"  # pylint: disable=unnecessary-lambda-assignment
  lines = ["Claim 10: reg. MTL lowers the flip rate (test predictions that change when the cue "
           "is swapped) for a low-variance cue (A: a 4x4 square), and less so for a "
           "high-variance one (B: a 2-px frame). Reduction = ERM - reg. MTL flip % "
           "(pre-trained, last epoch), paired by seed; holds if mean > 2 s.e.", "",
           "| comparison | verdict | mean (points) | s.e. | seeds |", "|---|---|---|---|---|"]
  rows = [(f"variant {v}: reg. MTL lowers the flip rate", r) for v, r in rep["variants"].items()]
  if "a_minus_b" in rep:
    rows.append(("the reduction is larger for A than for B (A - B)", rep["a_minus_b"]))
  for text, r in rows:
    lines.append(f"| {text} | {r['verdict']} | {fmt(r['mean'])} | {fmt(r['se']).lstrip('+')} | "
                 f"{','.join(map(str, r['seeds'])) or '-'} |")
  return "\n".join(lines) + "\n"


def _pm(mean_std) -> str:
  from experiments import regime_report  # pylint: disable=g-import-not-at-top
  return regime_report.pm(*mean_std, 1.0, 1)


def methods_markdown(report: dict) -> str:
  lines = ["Test accuracy % (group-balanced average / worst group), mean ± std over seeds; "
           "flip % = test predictions that change when the cue is swapped.", "",
           "| regime | method | seeds | Val-GP avg | Val-GP worst | No-GP avg | No-GP worst "
           "| final avg | final worst | final flip % |", "|---|---|---|" + "---|" * 7]
  for r in report["rows"]:
    if not r["seeds"]:
      continue
    lines.append(f"| {'pre-trained' if r['regime'] == 'pre' else 'from scratch'} | "
                 f"{r['label']} | {','.join(map(str, r['seeds']))} | "
                 + " | ".join(_pm(r[f"{sel}_{m}"]) for sel in SELECTIONS
                              for m in ("avg", "worst")) + f" | {_pm(r['final_flip'])} |")
  lines += ["", "Claims (paired over seeds: holds if mean > 2 s.e., does not hold if "
            "< -2 s.e., else within noise; '~' claims hold when within noise):", "",
            "| claim | verdict | mean diff (points) | s.e. | seeds |", "|---|---|---|---|---|"]
  for c in report["claims"]:
    mean = "-" if math.isnan(c["mean"]) else f"{c['mean']:+.1f}"
    se = "-" if math.isnan(c["se"]) else f"{c['se']:.1f}"
    lines.append(f"| {c['claim']} | {c['verdict']} | {mean} | {se} | "
                 f"{','.join(map(str, c['seeds'])) or '-'} |")
  if report["unfinished"]:
    lines += ["", "Unfinished (not counted): " + ", ".join(report["unfinished"])]
  if report.get("made_elsewhere"):
    lines += ["", "Counted, but made under another run's name (its run.json): " +
              ", ".join(report["made_elsewhere"])]
  if report.get("failed"):
    lines += ["", "Failed (not counted; the sweep's FAILED file holds the error):", ""]
    lines += [f"- {f}" for f in report["failed"]]
  return "\n".join(lines) + "\n"


def plot_methods(report: dict, path: str) -> None:
  """Average vs worst-group accuracy per method, Val-GP and No-GP panels, error bars over
  seeds; filled markers pre-trained, open from scratch."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(11, 5.6), sharey=True)
  colours = dict(zip(METHODS, plt.get_cmap("tab10").colors))
  for ax, sel in zip(axes, ("val_gp", "no_gp")):
    for r in report["rows"]:
      if not r["seeds"]:
        continue
      (xa, xs), (ya, ys) = r[f"{sel}_avg"], r[f"{sel}_worst"]
      pre = r["regime"] == "pre"
      ax.errorbar(xa, ya, xerr=0 if math.isnan(xs) else xs, yerr=0 if math.isnan(ys) else ys,
                  fmt="o" if pre else "s", mfc=colours[r["method"]] if pre else "none",
                  color=colours[r["method"]], capsize=3,
                  label=f"{r['label']} ({'pre' if pre else 'scratch'}, n={len(r['seeds'])})")
    ax.set_title({"val_gp": "Val-GP (best val worst group)",
                  "no_gp": "No-GP (best val average)"}[sel])
    ax.set_xlabel("test average accuracy (%)")
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("test worst-group accuracy (%)")
  handles, labels = axes[1].get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
  fig.tight_layout(rect=(0, 0.14, 1, 1))
  fig.savefig(path, dpi=120)
  plt.close(fig)


def _write_outputs(out: str, name: str, report: dict, markdown: str, plot=None) -> dict:
  """``<name>.json`` and ``<name>.md`` under ``out``, and ``<name>.png`` if ``plot`` is given."""
  fileio.atomic_write_json(os.path.join(out, f"{name}.json"), report)
  fileio.atomic_write_text(os.path.join(out, f"{name}.md"), markdown)
  if plot is not None:
    plot(report, os.path.join(out, f"{name}.png"))
  return report


def write_methods(root: str, out: str, figure: bool = True) -> dict:
  """``methods.md``, ``methods.json`` (and ``methods.png``) under ``out``."""
  report = methods_report(root)
  return _write_outputs(out, "methods", report, methods_markdown(report),
                        plot_methods if figure else None)


# ---------------------------------------------------------------- the one-seed grid

GRID_EXPS = (-1, 0, 1)  # alpha = e^k (experiments.sweep.worst_group_image_grid)


def grid_report(root: str) -> dict:
  """The ``worst_group_image`` sweep (one seed): every finished run's selected test metrics,
  the ERM lr check (the lr with the best validation average, No-GP's rule) and claim 9's
  sensitivities: over the 3 x 3 MTL grid, the range of test WGA over alpha_reg at each
  alpha_aux, averaged over alpha_aux, against the range over alpha_aux at each alpha_reg."""
  from experiments import regime_report  # pylint: disable=g-import-not-at-top
  done, unfinished = {}, []
  for run in regime_report.load_runs(root):
    if run["seed"] != 0:
      continue
    if run["done"] and run["records"]:
      done[run["run"]] = dict(summarize(run["records"], f"{run['run']}/seed0"),
                              val_avg=select(run["records"], "val_average_accuracy")[
                                  "val_average_accuracy"])
    else:
      unfinished.append(run["run"])
  lr = {k[len("erm-lr"):]: v for k, v in done.items() if k.startswith("erm-lr")}
  out = {"root": root, "runs": done, "unfinished": unfinished,
         "lr_check": {"runs": {k: {"val_avg": v["val_avg"], "no_gp": v["no_gp"]}
                               for k, v in lr.items()},
                      "best_by_val_avg": max(lr, key=lambda k: lr[k]["val_avg"]) if lr else None}}
  sens = {}
  for sel in ("val_gp", "no_gp"):
    cells = {(a, r): done.get(f"mtl-aux{a}-reg{r}") for a in GRID_EXPS for r in GRID_EXPS}
    if any(c is None for c in cells.values()):
      continue
    w = {k: c[sel]["worst"] for k, c in cells.items()}
    over_reg = float(np.mean([np.ptp([w[(a, r)] for r in GRID_EXPS]) for a in GRID_EXPS]))
    over_aux = float(np.mean([np.ptp([w[(a, r)] for a in GRID_EXPS]) for r in GRID_EXPS]))
    sens[sel] = {"range_over_alpha_reg": over_reg, "range_over_alpha_aux": over_aux,
                 "wga": {f"aux{a} reg{r}": v for (a, r), v in w.items()}}
  out["claim9"] = sens
  return out


def grid_markdown(rep: dict) -> str:
  lines = ["One seed (seed 0), every run fine-tuning the pre-trained encoder; test % under each "
           "selection.", "", summary_table(rep["runs"].values()), ""]
  lc = rep["lr_check"]
  if lc["runs"]:
    lines.append("ERM lr check (No-GP's rule, the best validation average): " + ", ".join(
        f"lr {k}: val avg {100 * v['val_avg']:.1f}, test {v['no_gp']['avg']:.1f} / "
        f"{v['no_gp']['worst']:.1f}" for k, v in sorted(lc["runs"].items())) +
                 f"; best: lr {lc['best_by_val_avg']}.")
  for sel, c in rep["claim9"].items():
    lines.append(f"Claim 9 ({sel}): test WGA range over alpha_reg (mean over alpha_aux) "
                 f"{c['range_over_alpha_reg']:.1f} points, over alpha_aux (mean over alpha_reg) "
                 f"{c['range_over_alpha_aux']:.1f}: WGA is "
                 f"{'more' if c['range_over_alpha_reg'] > c['range_over_alpha_aux'] else 'less'}"
                 " sensitive to alpha_reg here (one seed: no verdict).")
  if not rep["claim9"]:
    lines.append("Claim 9: the 3 x 3 MTL grid is not finished.")
  if rep["unfinished"]:
    lines.append("Unfinished (not counted): " + ", ".join(rep["unfinished"]))
  return "\n".join(lines) + "\n"


def plot_grid(rep: dict, path: str) -> None:
  """Claim 9 at a glance: test WGA over the 3 x 3 (alpha_aux, alpha_reg) grid, one heat map
  per selection (Val-GP, No-GP), each cell labelled with its value."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  sels = [s for s in ("val_gp", "no_gp") if s in rep["claim9"]]
  fig, axes = plt.subplots(1, len(sels), figsize=(5.0 * len(sels), 4.2), squeeze=False)
  ticks = [f"$e^{{{k}}}$" for k in GRID_EXPS]
  for ax, sel in zip(axes[0], sels):
    c = rep["claim9"][sel]
    w = np.array([[c["wga"][f"aux{a} reg{r}"] for r in GRID_EXPS] for a in GRID_EXPS])
    im = ax.imshow(w, cmap="viridis", vmin=0, vmax=100, origin="lower")
    for i, j in np.ndindex(w.shape):
      ax.text(j, i, f"{w[i, j]:.1f}", ha="center", va="center",
              color="white" if w[i, j] < 60 else "black")
    ax.set_xticks(range(len(GRID_EXPS)), ticks)
    ax.set_yticks(range(len(GRID_EXPS)), ticks)
    ax.set_xlabel("alpha_reg (l1 on the shared activations)")
    ax.set_title(f"{ {'val_gp': 'Val-GP', 'no_gp': 'No-GP'}[sel]}: test worst-group %\n"
                 f"range over alpha_reg {c['range_over_alpha_reg']:.1f}, "
                 f"over alpha_aux {c['range_over_alpha_aux']:.1f}", fontsize=9)
  axes[0][0].set_ylabel("alpha_aux (reconstruction)")
  fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
  fig.savefig(path, dpi=120, bbox_inches="tight")
  plt.close(fig)


def write_grid(root: str, out: str, figure: bool = True) -> dict:
  """``grid.md`` and ``grid.json`` under ``out`` (and ``grid.png`` once the MTL grid is done)."""
  rep = grid_report(root)
  return _write_outputs(out, "grid", rep, grid_markdown(rep),
                        plot_grid if figure and rep["claim9"] else None)


def main(argv) -> Optional[int]:
  args = argv[1:]
  opts = {a.split("=", 1)[0]: a.split("=", 1)[1] for a in args if a.startswith("--") and "=" in a}
  if "--methods_root" in opts:
    root = opts["--methods_root"]
    if not os.path.isdir(root):
      print(f"error: --methods_root: directory not found: {root!r}", file=sys.stderr)
      return 1
    report = write_methods(root, opts.get("--out", root))
    print(methods_markdown(report))
    return 0
  if "--claim10" in opts:  # --claim10=A=<methods root>,B=<methods root>
    roots = dict(p.split("=", 1) for p in opts["--claim10"].split(","))
    missing = [r for r in roots.values() if not os.path.isdir(r)]
    if missing:
      print(f"error: --claim10: directory not found: {missing[0]!r}", file=sys.stderr)
      return 1
    rep = claim10_report(roots)
    text = claim10_markdown(rep)
    if "--out" in opts:
      _write_outputs(opts["--out"], "claim10", rep, text)
    print(text)
    return 0
  if "--grid_root" in opts:
    root = opts["--grid_root"]
    if not os.path.isdir(root):
      print(f"error: --grid_root: directory not found: {root!r}", file=sys.stderr)
      return 1
    print(grid_markdown(write_grid(root, opts.get("--out", root))))
    return 0
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
