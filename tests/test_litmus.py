"""The random-weighting litmus test (issue 13): its grid, an end-to-end sweep of a sample of
it on tiny images, and the report (Delta_p, Table 4, claims, figure)."""

import json
import math
import os

import pytest

from experiments import litmus_report
from experiments import sweep


def test_grid_covers_every_method_of_the_rlw_paper():
  core = sweep.sweep_runs("litmus_core")
  full = sweep.sweep_runs("litmus")
  names = [r.name for r in core]
  # EW, L-DRO, DRO, PCGrad are the regime grid's runs (same names and configs).
  regime = {r.name: r for r in sweep.sweep_runs("cifar10_regime_core")}
  for n in ("static", "ldro-eta1e-3-lam1e-2", "dro-eta1e-2", "pcgrad"):
    assert n in names and next(r for r in core if r.name == n) == regime[n]
  rlw_paper = {"uw", "dwa", "imtl_l", "moml", "mgda", "gradnorm", "pcgrad", "graddrop", "imtl_g",
               "gradvac", "cagrad", "rotograd"}
  assert rlw_paper | {"rlw", "rgw", "famo"} <= {r.label for r in core}
  assert [r.name for r in full[len(core):]] == [f"rlw+{m}" for m in sweep.LITMUS_TABLE4]
  for r in full:
    for f in r.gin_files:
      assert os.path.exists(f), f
  moml = next(r for r in core if r.name == "moml")
  assert any("val_per_task" in b for b in moml.bindings)
  assert litmus_report._label("mgda-norm_none") == "MGDA (norm none)"
  assert "MGDA_NORMALIZATION = 'none'" in next(r for r in core if r.name == "mgda-norm_none").bindings
  combo = next(r for r in full if r.name == "rlw+cagrad")
  assert "method.loss_weighting = 'rlw'" in combo.bindings


def test_delta_p_is_the_mean_relative_improvement():
  assert litmus_report.delta_p([0.6, 0.4], [0.5, 0.5]) == pytest.approx(100 * (0.2 - 0.2) / 2)
  assert litmus_report.delta_p([0.55, 0.5], [0.5, 0.5]) == pytest.approx(5.0)


def test_sweep_of_a_sample_then_the_report(tmp_path, image_folder):
  images = image_folder()
  want = ("static", "rlw", "moml", "rlw+cagrad")
  runs = [r for r in sweep.sweep_runs("litmus") if r.name in want]
  tiny = [f"DATA_DIR = {str(images)!r}", "MODEL = 'tiny'", "NUM_STEPS = 3", "EVAL_EVERY = 1",
          "train_and_evaluate.log_every = 1", "train_and_evaluate.checkpoint_every = 3",
          "ImageClassificationExperiment.model_kwargs = {}",
          "ImageClassificationExperiment.batch_size = 4",
          "ImageClassificationExperiment.train_eval_size = 2",
          "ImageClassificationExperiment.pairs = [['cat', 'dog'], ['bird', 'frog']]"]
  # MOML's 500 held-out examples per task do not fit 16 images per task: 2 here.
  runs = [sweep.Run(r.name, r.gin_files, tuple(
      b.replace(f"= {sweep.LITMUS_VAL_PER_TASK}", "= 2") for b in r.bindings), r.method)
          for r in runs]
  root = tmp_path / "root"
  res = sweep.run_sweep(runs, str(root), seeds=(0, 1), in_process=True, extra_bindings=tiny,
                        say=lambda s: None)
  assert set(res.values()) == {"done"}, res
  for seed in (0, 1):  # a run needs wall_clock.json for the per-step column
    assert os.path.exists(root / "rlw" / f"seed{seed}" / "wall_clock.json")
  report = litmus_report.build_report(str(root), tail=2)
  rows = report["rows"]
  assert set(rows) == set(want)
  # EW against itself: 0 per seed (NaN where a task of EW is at accuracy 0 on these tiny data).
  ew_has_zero = {k: min(v["tail_task_accuracy"]) <= 0 for k, v in
                 litmus_report.build_report(str(root), tail=2)["per_seed"]["static"].items()}
  for k, d in rows["static"]["delta_p"].items():
    assert (math.isnan(d) if ew_has_zero[k] else d == pytest.approx(0.0))
  for r in rows.values():
    assert r["seeds"] == [0, 1] and 0 <= r["avg_mean"] <= 1 and r["worst_mean"] <= r["avg_mean"]
    assert not math.isnan(r["avg_std"]) and set(r["delta_p"]) == {0, 1}
  assert litmus_report.delta_p([0.5, 0.5], [0.5, 0.0]) != litmus_report.delta_p(
      [0.5, 0.5], [0.5, 0.0])  # NaN: undefined when EW has a task at 0
  assert rows["rlw+cagrad"]["label"] == "RLW + CAGrad" and rows["static"]["label"] == "EW"
  cagrad = next(t for t in report["table4"] if t["method"] == "cagrad")
  assert cagrad["ew"] is None and cagrad["rlw"] is rows["rlw+cagrad"]
  verdicts = {c["claim"].split(" ")[0]: c["verdict"] for c in report["claims"]}
  assert verdicts["RLW"] in ("holds", "does not hold")  # RLW >= EW: a verdict from 2 seeds
  best = max(("moml", "rlw+cagrad"), key=lambda n: rows[n]["avg_mean"])  # not EW, RLW, RGW
  assert any(f"best method by average accuracy ({rows[best]['label']})" in c["claim"]
             for c in report["claims"])
  out = tmp_path / "out"
  litmus_report.write_outputs(str(root), str(out))
  md = (out / "report.md").read_text()
  assert "| RLW + CAGrad | 2 |" in md and "Table 4" in md
  assert (out / "litmus.png").stat().st_size > 0
  assert json.loads((out / "report.json").read_text())["rows"]["moml"]["label"] == "MOML"
  # A run that failed (the sweep's FAILED, e.g. a diverged method) is listed, not averaged.
  wd = root / "rlw+cagrad" / "seed1"
  (wd / "DONE").unlink()
  (wd / "FAILED").write_text("exit status 1; error: FloatingPointError: non-finite loss\n")
  rep = litmus_report.build_report(str(root), tail=2)
  assert rep["rows"]["rlw+cagrad"]["seeds"] == [0]
  assert rep["rows"]["rlw+cagrad"]["failed_seeds"] == [1]
  md = litmus_report.markdown(rep)
  assert "| RLW + CAGrad | 1 (+1 failed) |" in md
  assert "- RLW + CAGrad, seed 1 (last evaluation at step 3): exit status 1; error: " \
         "FloatingPointError: non-finite loss" in md
