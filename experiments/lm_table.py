r"""Table 1 of the paper (multilingual LM, section 5.2.2) from finished runs.

    python -m experiments.lm_table --root=workdirs/multilingual --out=results/multilingual

Every sub-directory of ``--root`` with a ``metrics.jsonl`` (except ``mono/``)
is a run. Per run, the evaluation with the best (lowest) average validation
loss is selected (paper section 5.2.1); its per-language perplexity on
``--split`` (``test`` if the runs evaluated it, else ``validation``) is
reported with the average and worst absolute perplexity and the average and
worst relative perplexity (Eq. 3, in %) against the monolingual models of
``<root>/mono/baselines.json`` (:mod:`experiments.monolingual`).

Writes ``table1.md`` (Table 1 with one row per method -- sweeps such as the
DRO weight rates collapsed to the run with the best average validation loss,
as for model selection -- then every run and the per-language perplexities),
``table1.json`` and ``per_language.png`` (per-language absolute and relative
perplexity of every method).

A sweep's root (``<run>/seed<k>/``, ``results/multilingual/run_seeds.sh``)
gives Table 1 over seeds instead: mean ± std per run, the paper's claims as
paired verdicts, each seed's table (``table1_seeds.md``, ``table1_seeds.json``) and the
per-language perplexities with their spread (``per_language_seeds.png``)::

    python -m experiments.lm_table --root=workdirs/multilingual_seeds/runs \
        --mono=workdirs/multilingual_seeds/mono/baselines.json --out=results/multilingual/seeds
"""

import json
import os
import re
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags
import numpy as np

from experiments.runner import metrics_io
from ldro import metrics as ldro_metrics
from ldro.data import fileio

_FLAGS: dict = {}


def define_flags() -> None:
  """Defines the command-line flags (only when run as a program, so modules import cleanly)."""
  _FLAGS['root'] = flags.DEFINE_string("root", "workdirs/multilingual", "Directory of the runs.")
  _FLAGS['out'] = flags.DEFINE_string("out", "results/multilingual", "Output directory.")
  _FLAGS['mono'] = flags.DEFINE_string("mono", None, "Baselines JSON (default <root>/mono/baselines.json).")
  _FLAGS['split'] = flags.DEFINE_enum("split", "test", ["test", "validation"],
                             "Split whose perplexities are reported (selection is always by "
                             "validation loss).")

# Method of a run, from its directory name: (regex, method, label of the run).
_METHODS = [
    (r"^static_alpha(?P<a>[0-9.p]+)$", "static", "Static mixing (α = {a})"),
    (r"^baselined_dro(_lr(?P<lr>.+))?$", "Baselined-DRO", "Baselined-DRO{lr}"),
    (r"^dro(_lr(?P<lr>.+))?$", "DRO", "DRO{lr}"),
    (r"^ldro(?P<rest>.*)$", "L-DRO", "L-DRO{rest}"),
    (r"^equal_stratified$", "Equal weights (stratified)", "Equal weights (stratified)"),
]
_ORDER = ["Static mixing (α = 1)", "Static mixing (α = 0.3)", "Static mixing (α = 0)",
          "Equal weights (stratified)", "DRO", "Baselined-DRO", "L-DRO", "Monolingual"]


def classify(run: str) -> tuple[str, str]:
  """``(method, label)`` of a run directory name (unknown names: the name itself)."""
  for pattern, method, label in _METHODS:
    m = re.match(pattern, run)
    if not m:
      continue
    g = {k: (v or "") for k, v in m.groupdict().items()}
    if method == "static":
      alpha = g["a"].replace("p", ".")
      alpha = f"{float(alpha):g}"
      name = f"Static mixing (α = {alpha})"
      return name, name
    if "lr" in g:
      g["lr"] = f" (η = {g['lr']})" if g["lr"] else ""
    if "rest" in g:
      g["rest"] = f" ({g['rest'].lstrip('_')})" if g["rest"] else ""
    return method, label.format(**g)
  return run, run


def _perplexities(rec: dict, split: str) -> np.ndarray:
  key = "test_task_loss" if split == "test" else "task_loss"
  if key not in rec:
    raise KeyError(f"evaluation at step {rec['step']} has no {key!r} (evaluate the "
                   f"{split!r} split: LanguageModelingExperiment.eval_splits)")
  return ldro_metrics.perplexity(rec[key])


def _summary(ppl: np.ndarray, mono: Optional[np.ndarray]) -> dict:
  avg, worst = ldro_metrics.average_and_worst(ppl, higher_is_better=False)
  out = {"perplexity": ppl.tolist(), "avg_perplexity": avg, "worst_perplexity": worst}
  if mono is not None:
    rel = ldro_metrics.relative_perplexity(ppl, mono) * 100.0
    ravg, rworst = ldro_metrics.average_and_worst(rel, higher_is_better=False)
    out.update(relative_perplexity=rel.tolist(), avg_relative=ravg, worst_relative=rworst)
  return out


def _languages_of(run_dir: str, n: int) -> Optional[list[str]]:
  """Languages of a run from its operative config (``LANGUAGES = [...]``)."""
  path = os.path.join(run_dir, "config.gin")
  if not os.path.exists(path):
    return None
  text = open(path, encoding="utf-8").read()
  m = re.search(r"LanguageModelingExperiment\.languages\s*=\s*(\[[^\]]*\])", text)
  if not m:
    m = re.search(r"^LANGUAGES\s*=\s*(\[[^\]]*\])", text, re.M)
  if not m:
    return None
  langs = re.findall(r"'([^']+)'", m.group(1))
  return langs if len(langs) == n else None


def build_table(root: str, mono_path: Optional[str] = None, split: str = "test") -> dict:
  """Selects each run's best evaluation and computes Table 1's numbers.

  Args:
    root: directory of the runs (``<root>/<run>/metrics.jsonl``).
    mono_path: baselines JSON (default ``<root>/mono/baselines.json``; if it
      does not exist, relative perplexities are left out).
    split: ``'test'`` or ``'validation'`` perplexities.

  Returns:
    ``{'languages', 'split', 'runs': [...], 'methods': [...], 'monolingual'}``.
  """
  entries = [(name, os.path.join(root, name)) for name in sorted(os.listdir(root))
             if name != "mono" and os.path.isfile(os.path.join(root, name, "metrics.jsonl"))]
  return _build(entries, mono_path or os.path.join(root, "mono", "baselines.json"), split, root)


def _build(entries: Sequence[tuple[str, str]], mono_path: str, split: str, where: str) -> dict:
  """:func:`build_table` for the runs ``[(name, run_dir)]`` (``where`` names them in errors)."""
  mono_table = None
  if os.path.exists(mono_path):
    with open(mono_path, encoding="utf-8") as f:
      mono_table = json.load(f)["languages"]
  runs, languages = [], None
  for name, run_dir in entries:
    path = os.path.join(run_dir, "metrics.jsonl")
    best = metrics_io.best_record(metrics_io.read_metrics(path))
    if best is None:
      continue
    n = len(best["task_loss"])
    langs = _languages_of(run_dir, n)
    if languages is None:
      languages = langs
    elif langs is not None and langs != languages:
      raise ValueError(f"run {name} has languages {langs}, others {languages}")
    runs.append((name, best))
  if not runs:
    raise ValueError(f"no runs with metrics.jsonl under {where}")
  n = len(runs[0][1]["task_loss"])
  if languages is None:  # no config.gin: take the monolingual table's order
    languages = list(mono_table)[:n] if mono_table and len(mono_table) >= n else [
        f"task{i}" for i in range(n)]
  mono_ppl = None
  if mono_table is not None:
    key = f"{split}_perplexity"
    missing = [l for l in languages if l not in mono_table or key not in mono_table[l]]
    if missing:
      raise ValueError(f"{mono_path} lacks {key} for {missing}")
    mono_ppl = np.array([mono_table[l][key] for l in languages])
  out_runs = []
  for name, best in runs:
    method, label = classify(name)
    row = {"run": name, "method": method, "label": label, "step": int(best["step"]),
           "avg_validation_loss": float(np.mean(best["task_loss"])),
           "task_weights": best.get("task_weights")}
    row.update(_summary(_perplexities(best, split), mono_ppl))
    out_runs.append(row)
  # One row per method: the run with the best average validation loss.
  methods = {}
  for row in out_runs:
    cur = methods.get(row["method"])
    if cur is None or row["avg_validation_loss"] < cur["avg_validation_loss"]:
      methods[row["method"]] = row
  method_rows = [dict(r, method=m) for m, r in methods.items()]
  mono_row = None
  if mono_ppl is not None:
    mono_row = {"method": "Monolingual", "run": "mono", "label": "Monolingual"}
    mono_row.update(_summary(mono_ppl, mono_ppl))
    method_rows.append(mono_row)
  rank = {m: i for i, m in enumerate(_ORDER)}
  method_rows.sort(key=lambda r: (rank.get(r["method"], len(_ORDER)), r["method"]))
  out_runs.sort(key=lambda r: (rank.get(r["method"], len(_ORDER)), r["run"]))
  return {"languages": list(languages), "split": split, "runs": out_runs,
          "methods": method_rows, "monolingual": mono_row,
          "mono_path": mono_path if mono_table is not None else None}


def _fmt(x: Optional[float], digits: int = 1) -> str:
  return "—" if x is None else f"{x:.{digits}f}"


def _bold_best(rows: list[dict], key: str) -> dict:
  vals = [r.get(key) for r in rows if r["method"] != "Monolingual" and r.get(key) is not None]
  return min(vals) if vals else None


def to_markdown(table: dict) -> str:
  """Table 1 (methods), all runs, and per-language perplexities as markdown."""
  keys = ["avg_perplexity", "worst_perplexity", "avg_relative", "worst_relative"]
  lines = [f"## Table 1 ({table['split']} split; per method, the run and evaluation with the "
           "best average validation loss)", "",
           "| method | run (step) | avg perplexity | worst perplexity | avg relative (%) | "
           "worst relative (%) |", "|---|---|---:|---:|---:|---:|"]
  best = {k: _bold_best(table["methods"], k) for k in keys}

  def cells(r):
    out = []
    for k in keys:
      s = _fmt(r.get(k))
      if r["method"] != "Monolingual" and r.get(k) is not None and r.get(k) == best[k]:
        s = f"**{s}**"
      out.append(s)
    return out

  for r in table["methods"]:
    where = "—" if r["method"] == "Monolingual" else f"{r['run']} ({r['step']})"
    lines.append(f"| {r['method']} | {where} | " + " | ".join(cells(r)) + " |")
  lines += ["", "## All runs", "",
            "| run | label | step | avg val loss | avg ppl | worst ppl | avg rel (%) | "
            "worst rel (%) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in table["runs"]:
    lines.append(f"| {r['run']} | {r['label']} | {r['step']} | {r['avg_validation_loss']:.4f} | "
                 + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
  langs = table["languages"]
  rows = table["methods"]
  lines += ["", f"## Per-language {table['split']} perplexity (relative perplexity in %)", "",
            "| language | " + " | ".join(r["method"] for r in rows) + " |",
            "|---|" + "---:|" * len(rows)]
  for i, lang in enumerate(langs):
    cells_ = []
    for r in rows:
      s = f"{r['perplexity'][i]:.1f}"
      if "relative_perplexity" in r and r["method"] != "Monolingual":
        s += f" ({r['relative_perplexity'][i]:+.0f}%)"
      cells_.append(s)
    lines.append(f"| {lang} | " + " | ".join(cells_) + " |")
  return "\n".join(lines) + "\n"


def plot(table: dict, path: str) -> None:
  """Grouped bars: per-language perplexity (top) and relative perplexity (bottom); with
  error bars where a row has ``perplexity_std`` / ``relative_perplexity_std`` (over seeds)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

  rows = table["methods"]
  langs = table["languages"]
  has_rel = any("relative_perplexity" in r for r in rows if r["method"] != "Monolingual")
  fig, axes = plt.subplots(2 if has_rel else 1, 1, figsize=(max(10, 1.1 * len(langs) + 3), 9),
                           squeeze=False)
  x = np.arange(len(langs))
  width = 0.8 / len(rows)
  colors = plt.get_cmap("tab10")
  for k, r in enumerate(rows):
    off = (k - (len(rows) - 1) / 2) * width
    axes[0, 0].bar(x + off, r["perplexity"], width, yerr=r.get("perplexity_std"),
                   label=r["method"], color=colors(k % 10), capsize=2)
    if has_rel and r["method"] != "Monolingual" and "relative_perplexity" in r:
      axes[1, 0].bar(x + off, r["relative_perplexity"], width,
                     yerr=r.get("relative_perplexity_std"), label=r["method"],
                     color=colors(k % 10), capsize=2)
  axes[0, 0].set_yscale("log")
  axes[0, 0].set_ylabel(f"{table['split']} perplexity (log scale)")
  axes[0, 0].set_title("Per-language perplexity (lower is better)" + (
      f"; mean and std over each run's seeds (of {', '.join(map(str, table['seeds']))})"
      if table.get("seeds") else ""))
  handles, labels = axes[0, 0].get_legend_handles_labels()
  ncol = min(len(rows), 4)
  fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
  for ax in axes[:, 0]:
    ax.set_xticks(x)
    ax.set_xticklabels(langs, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.set_xlim(-0.6, len(langs) - 0.4)
  if has_rel:
    axes[1, 0].axhline(0, color="k", lw=0.8)
    axes[1, 0].set_ylabel("relative perplexity (%)")
    axes[1, 0].set_title("Relative perplexity vs. the monolingual model (Eq. 3; 0 = monolingual)")
  fig.tight_layout(rect=(0, 0.025 * (-(-len(rows) // ncol)) + 0.01, 1, 1))  # room for the legend
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _write_md_json(table: dict, markdown: str, out: str, name: str) -> None:
  """``<name>.md`` and ``<name>.json`` under ``out``."""
  fileio.atomic_write_text(os.path.join(out, f"{name}.md"), markdown)
  fileio.atomic_write_json(os.path.join(out, f"{name}.json"), table, indent=2)


def write_outputs(table: dict, out: str) -> None:
  """Writes ``table1.md``, ``table1.json`` and ``per_language.png`` to ``out``."""
  _write_md_json(table, to_markdown(table), out, "table1")
  plot(table, os.path.join(out, "per_language.png"))


# ------------------------------------------------------------- several seeds

KEYS = ("avg_perplexity", "worst_perplexity", "avg_relative", "worst_relative")
# The paper's Table 1 claims (section 5.2.2) as (method, aggregate): the method has the
# lowest value of the aggregate, tested against every other run, paired over seeds. L-DRO's
# worst relative perplexity: "outperforms both static mixing and DRO", a "close second" to
# Baselined-DRO's.
CLAIMS = (("L-DRO", "avg_perplexity"), ("L-DRO", "avg_relative"), ("L-DRO", "worst_relative"),
          ("DRO", "worst_perplexity"), ("Baselined-DRO", "worst_relative"))


def _seed_runs(root: str) -> dict[tuple[str, int], bool]:
  """``{(run, seed): finished}`` for a sweep root's ``<run>/seed<k>/metrics.jsonl``;
  finished: the sweep marked it ``DONE`` (a run still training, or failed, is not)."""
  found = {}
  for name in sorted(os.listdir(root)):
    run_dir = os.path.join(root, name)
    if not os.path.isdir(run_dir):
      continue
    for sub in os.listdir(run_dir):
      m = re.fullmatch(r"seed(\d+)", sub)
      if m and os.path.isfile(os.path.join(run_dir, sub, "metrics.jsonl")):
        found[(name, int(m.group(1)))] = os.path.isfile(os.path.join(run_dir, sub, "DONE"))
  return found


def _std(values):
  """Sample standard deviation over seeds (axis 0); NaN with one seed."""
  values = np.asarray(values, np.float64)
  return np.std(values, axis=0, ddof=1) if len(values) > 1 else np.full(values.shape[1:], np.nan)


def seeds_of(root: str) -> list[int]:
  """The seeds of a sweep root's finished runs (``<root>/<run>/seed<k>/``, ``DONE``)."""
  return sorted({k for (_, k), done in _seed_runs(root).items() if done})


def build_seeded_table(root: str, mono_path: str, split: str = "test") -> dict:
  """Table 1 over seeds: each seed's table (:func:`build_table`'s selection), mean and
  standard deviation per run, and the paper's claims (:data:`CLAIMS`) as paired verdicts.

  The verdict rule is the regime study's (:func:`experiments.regime_report.paired_verdict`):
  for each other run X, the differences ``X - method`` over the seeds both have (lower is
  better, so positive favours the method) hold if their mean exceeds twice its standard
  error, do not hold below minus that, else are within noise.

  Args:
    root: a sweep's root (``<root>/<run>/seed<k>/metrics.jsonl``,
      :mod:`experiments.sweep`).
    mono_path: the monolingual baselines JSON (relative perplexity); left out if missing.
    split: ``'test'`` or ``'validation'`` perplexities.

  Returns:
    ``{'languages', 'split', 'seeds', 'per_seed': {seed: table}, 'runs': [...], 'claims'}``;
    a run row has ``'<key>'`` = mean, ``'<key>_std'`` and ``'seeds'``.
  """
  from experiments import regime_report  # pylint: disable=g-import-not-at-top
  found = _seed_runs(root)
  seeds = seeds_of(root)
  if not seeds:
    raise ValueError(f"no finished runs (<run>/seed<k>/ with metrics.jsonl and DONE) under "
                     f"{root}")
  per_seed = {}
  for k in seeds:
    entries = [(name, os.path.join(root, name, f"seed{k}")) for (name, seed), done
               in sorted(found.items()) if seed == k and done]
    per_seed[k] = _build(entries, mono_path, split, f"{root}/*/seed{k}")
  languages = per_seed[seeds[0]]["languages"]
  for k, t in per_seed.items():
    if t["languages"] != languages:
      raise ValueError(f"seed {k}'s runs have languages {t['languages']}, seed {seeds[0]}'s "
                       f"{languages}")
  by_run = {}  # run -> {seed: row}
  for k, t in per_seed.items():
    for row in t["runs"]:
      by_run.setdefault(row["run"], {})[k] = row
  rank = {m: i for i, m in enumerate(_ORDER)}
  runs = []
  for name, rows in by_run.items():
    first = next(iter(rows.values()))
    out = {"run": name, "method": first["method"], "label": first["label"],
           "seeds": sorted(rows)}
    for key in KEYS:
      vals = [r[key] for r in rows.values() if r.get(key) is not None]
      if vals:
        out[key] = float(np.mean(vals))
        out[f"{key}_std"] = float(_std(vals))
    weights = [r["task_weights"] for r in rows.values() if r.get("task_weights") is not None]
    if len(weights) == len(rows):  # at the selected evaluation (mixtures: the sampling rates)
      out["task_weights"] = np.mean(weights, axis=0).tolist()
    for key in ("perplexity", "relative_perplexity"):  # per language: the figure's bars
      vals = np.array([r[key] for r in rows.values() if r.get(key) is not None])
      if len(vals):
        out[key] = vals.mean(0).tolist()
        out[f"{key}_std"] = _std(vals).tolist() if len(vals) > 1 else None
    runs.append(out)
  runs.sort(key=lambda r: (rank.get(r["method"], len(_ORDER)), r["run"]))
  claims = []
  for method, key in CLAIMS:
    for own in [r["run"] for r in runs if r["method"] == method]:
      for other in by_run:
        if other == own:
          continue
        common = sorted(set(by_run[own]) & set(by_run[other]))
        diffs = [by_run[other][k][key] - by_run[own][k][key] for k in common
                 if by_run[own][k].get(key) is not None]
        if not diffs:
          continue
        verdict, mean, se = regime_report.paired_verdict(diffs)
        claims.append({"method": method, "run": own, "key": key, "versus": other,
                       "verdict": verdict, "mean": mean, "se": se, "seeds": common})
  monolingual = next((t["monolingual"] for t in per_seed.values() if t["monolingual"]), None)
  return {"languages": languages, "split": split, "seeds": seeds, "per_seed": per_seed,
          "runs": runs, "claims": claims, "monolingual": monolingual, "mono_path": mono_path
          if os.path.exists(mono_path) else None,
          "unfinished": [f"{name}/seed{k}" for (name, k), done in sorted(found.items())
                         if not done]}


def _mean_std(r: dict, key: str) -> str:
  if r.get(key) is None:
    return "—"
  std = r.get(f"{key}_std")
  return f"{r[key]:.1f}" + ("" if std is None or np.isnan(std) else f" ± {std:.1f}")


def seeded_markdown(table: dict) -> str:
  """Table 1 (mean ± std over seeds), the claims' verdicts, then each seed's Table 1."""
  lines = [f"## Table 1 over seeds {', '.join(map(str, table['seeds']))} ({table['split']} "
           "split; per run and seed, the evaluation with the best average validation loss; "
           "mean ± std over seeds)", "",
           "| run | method | seeds | avg perplexity | worst perplexity | avg relative (%) | "
           "worst relative (%) |", "|---|---|---|---:|---:|---:|---:|"]
  unfinished = table.get("unfinished")
  if unfinished:  # before the table: what it does not include yet
    lines[1:1] = ["", f"Not finished, left out: {', '.join(unfinished)}."]
  for r in table["runs"]:
    lines.append(f"| {r['run']} | {r['label']} | {','.join(map(str, r['seeds']))} | "
                 + " | ".join(_mean_std(r, k) for k in KEYS) + " |")
  lines += ["", "## The paper's claims, paired over seeds", "",
            "Difference = other run - claimed method (lower is better, so > 0 favours the "
            "method); holds if the mean > 2 s.e., does not hold if < -2 s.e., else within "
            "noise.", "", "| claim | versus | verdict | mean difference | s.e. | seeds |",
            "|---|---|---|---:|---:|---|"]
  for c in table["claims"]:
    se = "—" if np.isnan(c["se"]) else f"{c['se']:.1f}"
    lines.append(f"| {c['run']} has the lowest {c['key'].replace('_', ' ')} | {c['versus']} | "
                 f"{c['verdict']} | {c['mean']:+.1f} | {se} | "
                 f"{','.join(map(str, c['seeds']))} |")
  langs = table["languages"]
  lines += ["", "## Task weights at the selected evaluation (mean over seeds; static mixing: "
            "its sampling rates)", "", "| run | " + " | ".join(langs) + " |",
            "|---|" + "---:|" * len(langs)]
  for r in table["runs"]:
    if r.get("task_weights") is not None:
      lines.append(f"| {r['run']} | " + " | ".join(f"{w:.3f}" for w in r["task_weights"]) + " |")
  for k, t in table["per_seed"].items():
    lines += ["", f"# Seed {k}", "", to_markdown(t).split("## All runs")[0].strip()]
  return "\n".join(lines) + "\n"


def write_seeded_outputs(table: dict, out: str) -> None:
  """``table1_seeds.md``, ``table1_seeds.json`` and ``per_language_seeds.png`` (each run's
  per-language perplexities, mean and std over seeds) under ``out``."""
  _write_md_json(table, seeded_markdown(table), out, "table1_seeds")
  rows = [dict(r, method=r["label"]) for r in table["runs"]]
  if table.get("monolingual"):
    rows.append(table["monolingual"])
  plot({"methods": rows, "languages": table["languages"], "split": table["split"],
        "seeds": table["seeds"]}, os.path.join(out, "per_language_seeds.png"))


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  root, out = _FLAGS['root'].value, _FLAGS['out'].value
  command = "python -m experiments.lm_table " + " ".join(sys.argv[1:])
  if seeds_of(root):  # a sweep's root: <run>/seed<k>/
    mono = _FLAGS['mono'].value or os.path.join(root, "mono", "baselines.json")
    table = build_seeded_table(root, mono, _FLAGS['split'].value)
    table["command"] = command
    write_seeded_outputs(table, out)
    print(seeded_markdown(table).split("# Seed")[0])
    print(f"wrote {out}/table1_seeds.md, table1_seeds.json, per_language_seeds.png")
    return
  table = build_table(root, _FLAGS['mono'].value, _FLAGS['split'].value)
  table["command"] = command
  write_outputs(table, out)
  print(to_markdown(table).split("## All runs")[0])
  print(f"wrote {out}/table1.md, table1.json, per_language.png")


if __name__ == "__main__":
  define_flags()
  app.run(main)
