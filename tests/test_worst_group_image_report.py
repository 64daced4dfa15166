"""The Spurious-CIFAR methods report: selection, per-method statistics and paired claims."""

import json
import math

import pytest

from experiments import worst_group_image_report as report_lib


def _record(step, worst, avg, val_worst, val_avg, flip):
  return {"step": step, "avg_accuracy": avg, "worst_accuracy": worst,
          "task_accuracy": [worst, avg, avg, avg], "test_worst_group": "vehicle/green",
          "flip_rate": flip, "val_worst_accuracy": val_worst, "val_average_accuracy": val_avg}


def _write(root, run, seed, records, done=True):
  d = root / run / f"seed{seed}"
  d.mkdir(parents=True)
  (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  (d / "run.json").write_text(json.dumps({"run": run, "method": run.split("-", 1)[1],
                                          "seed": seed}))
  if done:
    (d / "DONE").write_text("cmd\n")


def test_methods_report_selects_and_pairs_seeds(tmp_path):
  # Two evaluations after step 0: Val-GP picks the first (best val worst), No-GP the second.
  for seed, (e, m) in enumerate([(0.50, 0.60), (0.40, 0.56), (0.45, 0.52)]):
    _write(tmp_path, "pre-erm", seed, [_record(0, 0, 0.5, 0, 0.5, 0.5),
                                       _record(75, e + 0.1, 0.8, 0.9, 0.8, 0.4),
                                       _record(150, e, 0.85, 0.5, 0.9, 0.3)])
    _write(tmp_path, "pre-mtl", seed, [_record(0, 0, 0.5, 0, 0.5, 0.5),
                                       _record(75, m + 0.1, 0.8, 0.9, 0.8, 0.2),
                                       _record(150, m, 0.86, 0.5, 0.9, 0.1)])
  _write(tmp_path, "pre-jtt_stage1", 0, [_record(0, 0, 0.5, 0, 0.5, 0.5)])  # not a method row
  _write(tmp_path, "pre-jtt", 0, [_record(0, 0, 0.5, 0, 0.5, 0.5)], done=False)
  # A run copied in from elsewhere (its run.json names another run): counted, and listed.
  _write(tmp_path, "scratch-mtl", 0, [_record(0, 0, 0.5, 0, 0.5, 0.5),
                                      _record(75, 0.5, 0.8, 0.9, 0.8, 0.2)])
  (tmp_path / "scratch-mtl" / "seed0" / "run.json").write_text(json.dumps(
      {"run": "mtl-aux-1-reg-1", "method": "mtl", "seed": 0}))
  rep = report_lib.write_methods(str(tmp_path), str(tmp_path / "out"), figure=False)
  assert rep["made_elsewhere"] == ["scratch-mtl/seed0 (run.json: mtl-aux-1-reg-1/seed0)"]
  assert "made under another run's name" in (tmp_path / "out" / "methods.md").read_text()
  rows = {(r["regime"], r["method"]): r for r in rep["rows"]}
  erm = rows[("pre", "erm")]
  assert erm["seeds"] == [0, 1, 2]
  assert erm["no_gp_worst"][0] == pytest.approx(100 * (0.50 + 0.40 + 0.45) / 3)
  assert erm["val_gp_worst"][0] == pytest.approx(100 * (0.60 + 0.50 + 0.55) / 3)
  assert erm["no_gp_worst"][1] == pytest.approx(5.0)  # std of 50, 40, 45
  assert erm["final_flip"][0] == pytest.approx(30.0)
  claims = {c["claim"]: c for c in rep["claims"]}
  # MTL - ERM worst, No-GP: +10, +16, +7 -> mean 11, se = std / sqrt(3).
  c = claims["reg. MTL beats ERM in WGA, pre-trained, no_gp (claims 5, 8: by about 2 points)"]
  assert c["mean"] == pytest.approx(11.0) and c["verdict"] == "holds" and c["seeds"] == [0, 1, 2]
  # Claim 8 pairs two selections of one run: ERM's Val-GP - No-GP worst is +10 at every seed.
  c = [c for k, c in claims.items() if k.startswith("group labels for model selection lift ERM")][0]
  assert c["mean"] == pytest.approx(10.0) and c["seeds"] == [0, 1, 2]
  c = claims["reg. MTL's average >= ERM's, pre-trained, no_gp (claim 5)"]
  assert c["mean"] == pytest.approx(1.0) and c["verdict"] == "holds"
  c = claims["reg. MTL lowers the flip rate vs ERM, pre-trained, final (claim 10, this variant)"]
  assert c["mean"] == pytest.approx(20.0)
  # Claim 10 across variants: B (a copy with a smaller reduction) against this root as A.
  root_b = tmp_path / "B"
  for seed, cut in enumerate((0.05, 0.08, 0.02)):  # reg. MTL flips 5, 8, 2 points less
    _write(root_b, "pre-erm", seed, [_record(150, 0.5, 0.85, 0.5, 0.9, 0.3)])
    _write(root_b, "pre-mtl", seed, [_record(150, 0.5, 0.85, 0.5, 0.9, 0.3 - cut)])
  c10 = report_lib.claim10_report({"A": str(tmp_path), "B": str(root_b)})
  assert c10["variants"]["A"]["mean"] == pytest.approx(20.0)
  assert c10["variants"]["B"]["mean"] == pytest.approx(5.0) and c10["variants"]["B"]["verdict"] == "holds"
  assert c10["a_minus_b"]["mean"] == pytest.approx(15.0) and c10["a_minus_b"]["seeds"] == [0, 1, 2]
  assert c10["a_minus_b"]["verdict"] == "holds"
  assert "| the reduction is larger for A than for B (A - B) | holds | +15.0 |" in (
      report_lib.claim10_markdown(c10))
  # No JTT finished: no data, and the unfinished run is listed, never silently dropped.
  assert claims["reg. MTL beats JTT in WGA, pre-trained, no_gp (claims 4-5)"]["verdict"] == "no data"
  assert rep["unfinished"] == ["pre-jtt/seed0"]
  md = (tmp_path / "out" / "methods.md").read_text()
  assert "| pre-trained | ERM | 0,1,2 | 80.0 ± 0.0 | 55.0 ± 5.0 | 85.0 ± 0.0 | 45.0 ± 5.0 |" in md
  assert "Unfinished (not counted): pre-jtt/seed0" in md
  assert math.isnan(rows[("scratch", "erm")]["no_gp_worst"][0])
  # A run that failed (the sweep's FAILED, e.g. diverged) is listed with its error, not counted.
  (tmp_path / "pre-jtt" / "seed0" / "FAILED").write_text("exit status 1; error: non-finite\n")
  rep = report_lib.write_methods(str(tmp_path), str(tmp_path / "out"), figure=False)
  assert rep["failed"] == ["pre-jtt/seed0: exit status 1; error: non-finite"]
  assert rep["unfinished"] == []
  assert "- pre-jtt/seed0: exit status 1; error: non-finite" in (
      tmp_path / "out" / "methods.md").read_text()


def test_methods_report_missing_root(tmp_path, capsys):
  assert report_lib.main(["x", f"--methods_root={tmp_path / 'none'}"]) == 1
  assert "--methods_root: directory not found" in capsys.readouterr().err


def test_grid_report_lr_check_and_claim9(tmp_path):
  # MTL grid: WGA (one evaluation, so every selection picks it) = 40 + 10 * reg + aux:
  # the range over alpha_reg is 20 at every alpha_aux, over alpha_aux 2.
  for a in (-1, 0, 1):
    for r in (-1, 0, 1):
      w = (40 + 10 * r + a) / 100
      _write(tmp_path, f"mtl-aux{a}-reg{r}", 0, [_record(0, 0, 0.5, 0, 0.5, 0.5),
                                                  _record(75, w, 0.8, 0.5, 0.7, 0.2)])
  for lr, val_avg in (("0.003", 0.70), ("0.01", 0.75), ("0.03", 0.72)):
    _write(tmp_path, f"erm-lr{lr}", 0, [_record(75, 0.3, 0.8, 0.4, val_avg, 0.3)])
  _write(tmp_path, "group_dro-eta0.01", 0, [_record(0, 0, 0.5, 0, 0.5, 0.5)], done=False)
  rep = report_lib.write_grid(str(tmp_path), str(tmp_path / "out"))
  c9 = rep["claim9"]["no_gp"]
  assert c9["range_over_alpha_reg"] == pytest.approx(20.0)
  assert c9["range_over_alpha_aux"] == pytest.approx(2.0)
  assert rep["lr_check"]["best_by_val_avg"] == "0.01"
  assert rep["unfinished"] == ["group_dro-eta0.01"]
  md = (tmp_path / "out" / "grid.md").read_text()
  assert "more sensitive to alpha_reg" in md and "best: lr 0.01" in md
  assert json.loads((tmp_path / "out" / "grid.json").read_text())["claim9"]["val_gp"]
  assert (tmp_path / "out" / "grid.png").stat().st_size > 0  # the heat maps
