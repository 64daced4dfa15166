"""The ablation report (experiments/ablation_report.py) on tiny generated runs: its table
numbers against hand-computed values, paired comparisons, missing / unfinished runs, bad roots.
Pure JSON / numpy (no figure): no training, no JAX compilation."""

import json
import math
import os

import pytest

from experiments import ablation_report
from experiments import sweep

OFFSETS = (-0.01, 0.01, -0.02, 0.02)  # the last 4 evaluations: mean offset 0


def _write_run(root, name, seed, avg, worst, done=True, wall_s=None, run_json=False):
  """A run whose tail (last 4 evaluations) has mean average accuracy ``avg`` and mean
  worst-task accuracy ``worst``, in the runner's metrics.jsonl record format."""
  d = root / name / f"seed{seed}"
  d.mkdir(parents=True)
  records = [{"avg_accuracy": 0.1, "step": 0, "task_accuracy": [0.0, 0.1, 0.1, 0.1, 0.2],
              "task_train_loss": [2.3] * 5, "task_weights": [0.2] * 5, "worst_accuracy": 0.0},
             {"avg_accuracy": 0.3, "step": 400, "task_accuracy": [0.1, 0.3, 0.4, 0.3, 0.4],
              "task_train_loss": [1.9] * 5, "task_weights": [0.2] * 5, "worst_accuracy": 0.1,
              "train_task_losses": [1.8] * 5}]
  for i, off in enumerate(OFFSETS if done else OFFSETS[:2]):
    w, a = worst + off, avg + off
    others = (5 * a - w) / 4
    records.append({"avg_accuracy": a, "step": 800 + 400 * i,
                    "task_accuracy": [w, others, others, others, others],
                    "task_train_loss": [1.0] * 5, "task_weights": [0.2] * 5,
                    "worst_accuracy": w, "train_task_losses": [1.0] * 5})
  with open(d / "metrics.jsonl", "w", encoding="utf-8") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records))
  if done:
    (d / "DONE").write_text("python -m experiments.train ...\n")
  if wall_s is not None:
    (d / "wall_clock.json").write_text(json.dumps(
        {"wall_s": wall_s, "attempts": 1, "finished": done, "load_average_at_end": [3.0, 2, 1]}))
  if run_json:
    run = {r.name: r for r in sweep.sweep_runs(ablation_report.ABLATION_SWEEP)}[name]
    (d / "run.json").write_text(json.dumps(
        {"run": name, "method": run.label, "seed": seed, "gin_files": list(run.gin_files),
         "bindings": sweep.run_bindings(run, seed)}))
    (d / "config.gin").write_text("MODEL = 'small'\nNORMALIZE = True\nUPDATE_EVERY = 10\n")


@pytest.fixture(name="roots")
def _roots(tmp_path):
  regime, abl = tmp_path / "regime", tmp_path / "ablations"
  _write_run(regime, "static", 0, 0.50, 0.30)
  _write_run(regime, "static", 1, 0.52, 0.34)
  _write_run(regime, "ldro-eta1e-3-lam1e-2", 0, 0.55, 0.40)
  _write_run(regime, "ldro-eta1e-3-lam1e-2", 1, 0.56, 0.44)
  _write_run(regime, "dro-eta1e-2", 0, 0.48, 0.42)
  _write_run(regime, "ldro-eta1e-2-lam1e-1", 0, 0.55, 0.40)  # the model-size rows' L-DRO
  _write_run(regime, "ldro-eta1e-2-lam1e-1", 1, 0.56, 0.44)
  _write_run(abl, "ldro_T10-eta1e-3-lam1e-2", 0, 0.53, 0.41, wall_s=100.0, run_json=True)
  _write_run(abl, "ldro_T10-eta1e-3-lam1e-2", 1, 0.55, 0.43, wall_s=200.0)
  _write_run(abl, "ldro_T1000-eta1e-3-lam1e-2", 0, 0.57, 0.45, wall_s=50.0)
  _write_run(abl, "ldro_norenorm_T1000-eta1e-3-lam1e-2", 0, 0.60, 0.50, done=False)
  return str(regime), str(abl)


def _row(rows, **keys):
  (r,) = [r for r in rows if all(r[k] == v for k, v in keys.items())]
  return r


def test_tables_match_hand_computed_values(roots):
  report = ablation_report.build_report(*roots)
  ew = report["equal_weights"]
  assert ew["n"] == 2 and ew["avg_mean"] == pytest.approx(0.51)
  assert ew["avg_std"] == pytest.approx(math.sqrt(2) * 0.01)  # std (ddof 1) of .50, .52
  assert ew["worst_mean"] == pytest.approx(0.32)
  assert ew["worst_std"] == pytest.approx(math.sqrt(2) * 0.02)

  # The cells of one setting's rows are means over the seeds all of them have (T = 1000 has
  # seed 0 only); each paired comparison uses every seed its two runs share (0 and 1).
  t10 = _row(report["interval"], eta="1e-3", T=10)
  assert t10["cell"]["avg_mean"] == pytest.approx(0.53) and t10["cell"]["unpaired"] == [1]
  assert t10["reference"] == "ldro-eta1e-3-lam1e-2"
  # T=10 - T=100: avg diffs -0.02, -0.01: mean -0.015, SE std([-.02, -.01]) / sqrt(2) = 0.005.
  c = t10["vs_reference"]["avg"]
  assert c["seeds"] == [0, 1]
  assert c["mean"] == pytest.approx(-0.015) and c["se"] == pytest.approx(0.005)
  assert c["text"] == "lower"  # -1.5 < -2 x 0.5
  w = t10["vs_reference"]["worst"]  # diffs +0.01, -0.01: mean 0, SE 0.01
  assert w["mean"] == pytest.approx(0.0, abs=1e-12) and w["text"] == "within noise"
  t100 = _row(report["interval"], eta="1e-3", T=100)
  assert t100["cell"]["root"] == "regime" and "vs_reference" not in t100
  assert t100["cell"]["worst_mean"] == pytest.approx(0.40)  # seed 0 (0.44 at seed 1)
  t1000 = _row(report["interval"], eta="1e-3", T=1000)
  assert t1000["cell"]["n"] == 1 and math.isnan(t1000["cell"]["avg_std"])
  assert t1000["vs_reference"]["avg"]["mean"] == pytest.approx(0.02)  # 0.57 - 0.55, seed 0
  assert t1000["vs_reference"]["avg"]["text"] == "1 seed: no verdict"

  narrow_dro = _row(report["model_size"], size="narrow", method="dro-eta1e-2")
  assert narrow_dro["vs_reference"]["worst"]["mean"] == pytest.approx(0.12)  # .42 - .30
  assert narrow_dro["vs_reference"]["worst"]["text"] == "1 seed: no verdict"
  narrow_ldro = _row(report["model_size"], size="narrow", method="ldro-eta1e-2-lam1e-1")
  assert narrow_ldro["vs_reference"]["avg"]["mean"] == pytest.approx(0.045)  # .05, .04

  md = ablation_report.markdown(report)
  assert "| 1e-3 | 1e-2 | 10 | `ablations/ldro_T10-eta1e-3-lam1e-2` | 53.00 (n=1; seed 1 not " \
         "in every row) | 41.00 (n=1; seed 1 not in every row) | -1.50 ± 0.50 (n=2): lower | " \
         "+0.00 ± 1.00 (n=2): within noise |" in md
  assert "| 57.00 (n=1) | 45.00 (n=1) | +2.00 (n=1): 1 seed: no verdict |" in md
  assert "average 51.00 ± 1.41 (n=2), worst 32.00 ± 2.83 (n=2)" in md


def test_missing_and_unfinished_runs_are_listed(roots):
  report = ablation_report.build_report(*roots)
  missing = {(m["root"], m["run"]): m for m in report["missing"]}
  # every expected run appears in the tables, finished or not
  expected = ablation_report.layout()["expected"]
  assert ("ablations", "large-pcgrad") in missing and ("regime", "pcgrad") in missing
  assert missing[("ablations", "ldro_T10-eta1e-3-lam1e-2")]["seeds"] == [2]
  assert missing[("regime", "dro-eta1e-2")]["seeds"] == [1, 2]
  assert missing[("ablations", "ldro_norenorm_T1000-eta1e-3-lam1e-2")] == {
      "root": "ablations", "run": "ldro_norenorm_T1000-eta1e-3-lam1e-2", "seeds": [0, 1, 2],
      "unfinished": [0]}
  assert len(report["model_size"]) == 3 * 4
  assert {(r["cell"]["root"], r["cell"]["run"]) for t in ("interval", "renormalisation",
                                                            "model_size") for r in report[t]} \
      == set(expected)
  off = _row(report["renormalisation"], eta="1e-3", renormalise=False)
  assert off["cell"]["status"] == "unfinished" and off["vs_reference"]["avg"]["seeds"] == []
  assert _row(report["model_size"], size="large", method="static")["cell"]["status"] == "missing"
  md = ablation_report.markdown(report)
  assert "| large | pcgrad | `ablations/large-pcgrad` | not run yet | not run yet |" in md
  assert "`ablations/ldro_norenorm_T1000-eta1e-3-lam1e-2`: seed 0, 1, 2; unfinished " \
         "(not counted): seed 0" in md
  # wall-clock per run seed, and run.json checked against the sweep where there is one
  runs = {(d["run"], d["seed"]): d for d in report["runs"]}
  assert runs[("ldro_T10-eta1e-3-lam1e-2", 1)]["wall_clock"]["wall_s"] == 200.0
  assert runs[("ldro_T10-eta1e-3-lam1e-2", 0)]["matches_sweep"] is True
  assert runs[("ldro_T10-eta1e-3-lam1e-2", 0)]["config"]["UPDATE_EVERY"] == "10"
  assert runs[("ldro_T1000-eta1e-3-lam1e-2", 0)]["matches_sweep"] is None
  assert "Ablation runs' wall-clock in all: 350 s over 3 run seeds." in md


def test_outputs_and_bad_roots(roots, tmp_path):
  regime, abl = roots
  out = tmp_path / "out"
  # figure=False: matplotlib's import and drawing alone take seconds on a loaded machine
  ablation_report.write_outputs(regime, abl, str(out), command="python -m x --out=o",
                                figure=False)
  assert sorted(os.listdir(out)) == ["report.json", "report.md"]
  assert "python -m x --out=o" in (out / "report.md").read_text()
  assert json.loads((out / "report.json").read_text())["interval"][0]["T"] == 10
  with pytest.raises(FileNotFoundError, match="^--ablations_root: directory not found"):
    ablation_report.build_report(regime, str(tmp_path / "nope"))
  with pytest.raises(FileNotFoundError, match="^--regime_root: directory not found"):
    ablation_report.build_report(str(tmp_path / "nope"), abl)
  empty = tmp_path / "empty"
  empty.mkdir()  # exists, nothing synced yet: every ablation cell missing, no error
  report = ablation_report.build_report(regime, str(empty))
  assert all(r["cell"]["status"] == "missing" for r in report["renormalisation"])


def _gap(seeds, mean, se):
  return {"seeds": seeds, "mean": mean, "se": se}


def test_gap_change_rule_by_hand():
  # narrow gap +7 ± 1, larger +1 ± 1: 6 closer to 0, SE sqrt(2) = 1.41: smaller (6 > 2.83)
  c = ablation_report.gap_change(_gap([0, 1, 2], 0.07, 0.01), _gap([0, 1, 2], 0.01, 0.01))
  assert c["reduction"] == pytest.approx(0.06) and c["se"] == pytest.approx(0.01 * math.sqrt(2))
  assert c["text"] == "smaller"
  # a negative narrow gap (-3) that grows to -6: closer to 0 by -3, SE 0.5: larger
  c = ablation_report.gap_change(_gap([0, 1], -0.03, 0.003), _gap([0, 1], -0.06, 0.004))
  assert c["reduction"] == pytest.approx(-0.03) and c["text"] == "larger"
  # overshooting past 0 counts as closer on the narrow gap's side: +5 -> -1 is a reduction of 6
  c = ablation_report.gap_change(_gap([0, 1], 0.05, 0.02), _gap([0, 1], -0.01, 0.02))
  assert c["reduction"] == pytest.approx(0.06) and c["text"] == "smaller"  # 6 > 2 x 2.83
  assert ablation_report.gap_change(_gap([0, 1], 0.05, 0.03), _gap([0, 1], 0.01, 0.03))[
      "text"] == "within noise"  # 4 < 2 x 4.24
  assert ablation_report.gap_change(_gap([0, 1], 0.05, 0.01), _gap([0], 0.01, math.nan))[
      "text"] == "1 seed: no verdict"
  assert ablation_report.gap_change(_gap([0, 1], 0.05, 0.01), _gap([], math.nan, math.nan))[
      "text"] == "no paired seed"


def test_model_size_shrinkage_rows(roots):
  regime, abl = roots
  import pathlib  # pylint: disable=g-import-not-at-top
  for seed, (s, d) in enumerate(((0.70, 0.72), (0.70, 0.73))):  # worst gaps +2, +3 pp
    _write_run(pathlib.Path(abl), "paper_small-static", seed, 0.75, s)
    _write_run(pathlib.Path(abl), "paper_small-dro-eta1e-2", seed, 0.74, d)
  report = ablation_report.build_report(regime, abl)
  row = _row(report["size_change"], size="paper_small", method="dro-eta1e-2")
  worst = row["change"]["worst"]
  # narrow DRO has seed 0 only (gap +12 pp): no verdict, the reduction 12 - 2.5 all the same
  assert worst["narrow"] == pytest.approx(0.12) and worst["larger"] == pytest.approx(0.025)
  assert worst["reduction"] == pytest.approx(0.095) and worst["text"] == "1 seed: no verdict"
  assert {(r["size"], r["method"]) for r in report["size_change"]} == {
      (z, m) for z in ("paper_small", "large")
      for m in ("dro-eta1e-2", "ldro-eta1e-2-lam1e-1", "pcgrad")}
  md = ablation_report.markdown(report)
  # average gaps: narrow .48 - .50 = -2 pp, paper_small .74 - .75 = -1 pp: 1 pp closer to 0
  assert "| paper_small | dro-eta1e-2 | -2.00 → -1.00 | +1.00: 1 seed: no verdict | " \
         "+12.00 → +2.50 | +9.50: 1 seed: no verdict |" in md
  assert "| large | pcgrad | - → - | no paired seed | - → - | no paired seed |" in md
  # L-DRO - DRO at each size: narrow seed 0 only (.55 - .48 = +7 avg, .40 - .42 = -2 worst)
  narrow = _row(report["size_pair"], size="narrow")
  assert narrow["vs_reference"]["avg"]["mean"] == pytest.approx(0.07)
  assert narrow["vs_reference"]["worst"]["mean"] == pytest.approx(-0.02)
  assert "| narrow | +7.00 (n=1): 1 seed: no verdict | -2.00 (n=1): 1 seed: no verdict |" in md
  assert "| paper_small | no paired seed | no paired seed |" in md


def test_fit_metrics_and_capacity_by_hand():
  # task 0: training accuracy rising, loss still falling (not plateaued); task 1: flat, with
  # its loss moving up and down (plateaued)
  records = [{"step": 400 * i, "task_accuracy": [0.5, 0.6],
              "task_train_accuracy": [0.1 * i + 0.2, 0.8],
              "task_train_loss": [1.0 - 0.1 * i, 0.5 + 0.1 * (i % 2)]} for i in range(8)]
  fit = ablation_report.fit_metrics(records)
  # the last 4 evaluations: task 0 at 0.6, 0.7, 0.8, 0.9 (mean 0.75), task 1 at 0.8
  assert fit["train_avg"] == pytest.approx(0.775) and fit["train_worst"] == pytest.approx(0.75)
  assert fit["test_avg"] == pytest.approx(0.55)
  assert (fit["tasks"], fit["plateaued"]) == (2, 1)
  assert ablation_report.fit_metrics(records[:3]) is None  # fewer than 4 evaluations

  other = {"train_avg": 0.825, "train_worst": 0.8, "test_avg": 0.5, "tasks": 2, "plateaued": 2}
  seeds = {0: {"fit": fit}, 1: {"fit": other}, 2: {"fit": None}}  # seed 2 unfinished
  row = ablation_report.capacity(seeds, ("ablations", "large-static"), "large")
  assert row["run"] == "ablations/large-static" and row["seeds"] == [0, 1]
  assert row["train_avg"]["mean"] == pytest.approx(0.8)
  assert row["train_avg"]["std"] == pytest.approx(math.sqrt(2 * 0.025 ** 2))
  assert row["train_worst"]["mean"] == pytest.approx(0.775)
  assert row["gap"]["mean"] == pytest.approx((0.225 + 0.325) / 2)  # train - test, per seed
  assert (row["plateaued"], row["tasks"]) == (3, 4)
  empty = ablation_report.capacity({}, ("ablations", "large-static"), "large")
  assert empty["seeds"] == [] and math.isnan(empty["gap"]["mean"]) and empty["tasks"] == 0
