"""Tests for experiments.sweep (skip/resume/--only) and experiments.pareto (table, figure)."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from experiments import pareto
from experiments import sweep
from experiments import sync_runs
from experiments.runner import loop
from experiments.runner import paths
from ldro import metrics as ldro_metrics

REPO = paths.repo_root()
STEPS = ["train_and_evaluate.num_steps = 4", "train_and_evaluate.eval_every = 2",
         "train_and_evaluate.checkpoint_every = 2"]
RUNS = [sweep.Run("avg", ("gin_configs/synthetic/avg.gin",)),
        sweep.Run("ldro-fast", ("gin_configs/synthetic/ldro.gin",), ("WEIGHT_LR = 0.5",))]


def _steps(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(l)["step"] for l in f if l.strip()]


# ------------------------------------------------------------------ sweep


def test_sweep_runs_skips_and_resumes(tmp_path, gin_config):
  root = str(tmp_path / "root")
  lines = []
  res = sweep.run_sweep(RUNS, root, seeds=(0,), in_process=True, extra_bindings=STEPS,
                        say=lines.append)
  assert res == {"avg/seed0": "done", "ldro-fast/seed0": "done"}
  for name in ("avg", "ldro-fast"):
    wd = os.path.join(root, name, "seed0")
    assert _steps(wd) == [0, 2, 4]
    cmd = open(os.path.join(wd, "command.txt")).read().strip()
    assert open(os.path.join(wd, "DONE")).read().strip() == cmd
    assert "-m experiments.train" in cmd and "train_and_evaluate.keep_checkpoints = 1" in cmd
    assert json.load(open(os.path.join(wd, "run.json")))["method"] == name.split("-")[0]
    assert os.listdir(os.path.join(wd, "checkpoints")) == ["4"]  # only the last kept
  assert any("done in" in l for l in lines)
  ldro_cfg = open(os.path.join(root, "ldro-fast", "seed0", "config.gin")).read()
  assert "WEIGHT_LR = 0.5" in ldro_cfg and "METHOD = 'ldro'" in ldro_cfg

  # Finished runs are skipped.
  lines.clear()
  res = sweep.run_sweep(RUNS, root, seeds=(0,), in_process=True, extra_bindings=STEPS,
                        say=lines.append)
  assert set(res.values()) == {"skipped"} and all("skipped (DONE)" in l for l in lines)

  # An interrupted run (checkpoint at step 2, no DONE) resumes instead of restarting.
  wd = os.path.join(root, "avg", "seed1")
  gin_config(["gin_configs/synthetic/avg.gin"],
             ["train_and_evaluate.num_steps = 2", "train_and_evaluate.eval_every = 2",
              "train_and_evaluate.seed = 1"])
  loop.train_and_evaluate(wd, quiet=True)
  lines.clear()
  res = sweep.run_sweep(RUNS, root, seeds=(1,), only="^avg$", in_process=True,
                        extra_bindings=STEPS, say=lines.append)
  assert res == {"avg/seed1": "done"}
  assert "resuming" in lines[0]
  assert _steps(wd) == [0, 2, 4]  # step 0 evaluated once: resumed from step 2


def test_sweep_only_filter_and_dry_run(tmp_path):
  root = str(tmp_path / "root")
  lines = []
  res = sweep.run_sweep(RUNS, root, seeds=(0, 1), only="^ldro", dry_run=True, say=lines.append)
  assert res == {"ldro-fast/seed0": "pending", "ldro-fast/seed1": "pending"}
  assert not os.path.exists(root)  # a dry run writes nothing
  assert "WEIGHT_LR = 0.5" in lines[0] and "SEED = 0" in lines[0]
  with pytest.raises(ValueError, match="matches none"):
    sweep.run_sweep(RUNS, root, only="^nothing$")
  with pytest.raises(ValueError, match="unknown sweep"):
    sweep.sweep_runs("nope")
  names = [r.name for r in sweep.sweep_runs("cifar10_mtl")]
  assert len(names) == 19 and len(set(names)) == 19
  assert sum(n.startswith("ldro-") for n in names) == 9
  assert sum(n.startswith("dro-") for n in names) == 5


def test_sweep_starts_no_run_after_start_before(tmp_path):
  """Past --start_before no run starts (nor resumes): each is deferred, nothing is written."""
  root = str(tmp_path / "root")
  lines = []
  res = sweep.run_sweep(RUNS, root, seeds=(0, 1), only="^avg$", in_process=True,
                        extra_bindings=STEPS, say=lines.append, start_before=time.time() - 1)
  assert res == {"avg/seed0": "deferred", "avg/seed1": "deferred"}
  assert all("past --start_before" in l for l in lines) and not os.path.exists(root)
  assert sweep.parse_utc("2026-12-02T09:00") == 1796202000.0  # UTC unless a zone is named
  assert sweep.parse_utc("2026-12-02T10:00+01:00") == 1796202000.0
  assert sweep.parse_utc(None) is None
  with pytest.raises(ValueError, match="ISO 8601"):
    sweep.parse_utc("9am")


def test_sweep_skips_a_run_another_process_holds(tmp_path):
  """Side-by-side sweep processes: a run whose lock is held is skipped, not trained twice."""
  root = str(tmp_path / "root")
  wd = os.path.join(root, "avg", "seed0")
  os.makedirs(wd)
  held = sweep._claim(wd)  # pylint: disable=protected-access
  assert held is not None and sweep._claim(wd) is None  # pylint: disable=protected-access
  lines = []
  res = sweep.run_sweep(RUNS, root, seeds=(0,), only="^avg$", in_process=True,
                        extra_bindings=STEPS, say=lines.append)
  assert res == {"avg/seed0": "running"} and "another sweep process" in lines[0]
  assert os.listdir(wd) == [".claim"]  # nothing trained or written
  res = sweep.run_sweep(RUNS, root, seeds=(0,), only="^avg$", dry_run=True, say=lines.append)
  assert res == {"avg/seed0": "running"}
  held.close()
  res = sweep.run_sweep(RUNS, root, seeds=(0,), only="^avg$", dry_run=True, say=lines.append)
  assert res == {"avg/seed0": "pending"}  # free again once the holder lets go
  res = sweep.run_sweep(RUNS, root, seeds=(1,), only="^avg$", dry_run=True, say=lines.append)
  assert res == {"avg/seed1": "pending"} and not os.path.exists(os.path.join(root, "avg", "seed1"))
  # A run that needs another one finished first waits for it (e.g. JTT's stage 2).
  second = sweep.Run("second", RUNS[0].gin_files, after=("avg",))
  res = sweep.run_sweep([second], root, seeds=(0,), in_process=True, say=lines.append)
  assert res == {"second/seed0": "waiting"} and "waiting for avg/seed0" in lines[-1]
  assert not os.path.exists(os.path.join(root, "second"))


def test_a_failed_run_is_recorded_and_skipped_until_retried(tmp_path, gin_config):
  """A run that fails leaves FAILED with its error; later sweeps skip it unless retry_failed."""
  del gin_config
  root = str(tmp_path / "root")
  bad = STEPS + ["method.name = 'no_such_method'"]  # fails at once, as a diverged run would
  lines = []
  res = sweep.run_sweep(RUNS, root, seeds=(0,), only="^avg$", in_process=True,
                        extra_bindings=bad, say=lines.append)
  wd = os.path.join(root, "avg", "seed0")
  assert res == {"avg/seed0": "failed"} and "FAILED" in lines[-1]
  error = sweep.failed_error(wd)
  assert "no_such_method" in error and error in lines[-1]
  lines.clear()
  res = sweep.run_sweep(RUNS, root, seeds=(0,), only="^avg$", in_process=True,
                        extra_bindings=bad, say=lines.append)
  assert res == {"avg/seed0": "failed"} and "failed before, skipped" in lines[0]
  assert sweep.run_sweep(RUNS, root, seeds=(0,), only="^avg$", dry_run=True,
                         say=lines.append) == {"avg/seed0": "failed"}
  lines.clear()  # retried: resumed (and here failed again, with nothing trained)
  res = sweep.run_sweep(RUNS, root, seeds=(0,), only="^avg$", in_process=True,
                        extra_bindings=bad, retry_failed=True, say=lines.append)
  assert res == {"avg/seed0": "failed"} and "resuming" in lines[0] and "FAILED" in lines[1]


def test_sync_runs_copies_finished_and_failed_runs_only(tmp_path):
  src, dst = tmp_path / "workdirs", tmp_path / "results"
  for run, marker in (("a/seed0", "DONE"), ("b/seed1", "FAILED"), ("c/seed0", None)):
    d = src / run
    (d / "checkpoints" / "5").mkdir(parents=True)
    (d / "metrics.jsonl").write_text('{"step": 0}\n')
    (d / "train.log").write_text("log\n")
    if marker:
      (d / marker).write_text("cmd\n")
  (dst / "a" / "seed0").mkdir(parents=True)
  (dst / "a" / "seed0" / "FAILED").write_text("old\n")  # failed once, retried since
  assert sync_runs.sync_runs(str(src), str(dst)) == ["a/seed0", "b/seed1"]
  assert sorted(os.listdir(dst / "a" / "seed0")) == ["DONE", "metrics.jsonl"]
  assert sorted(os.listdir(dst / "b" / "seed1")) == ["FAILED", "metrics.jsonl"]
  assert not (dst / "c").exists()  # unfinished: not copied
  with pytest.raises(FileNotFoundError, match="--src: directory not found"):
    sync_runs.sync_runs(str(tmp_path / "nope"), str(dst))


def test_sweep_command_line_runs_a_subprocess(tmp_path):
  root = tmp_path / "root"
  cmd = [sys.executable, "-m", "experiments.sweep", "--sweep=synthetic", f"--root={root}",
         "--only=^avg$"] + [f"--bindings={b}" for b in STEPS]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert "[1/1] avg/seed0: done" in proc.stdout and "1 done" in proc.stdout
  wd = root / "avg" / "seed0"
  assert (wd / "DONE").exists() and (wd / "train.log").exists()
  assert _steps(str(wd)) == [0, 2, 4]


# ------------------------------------------------------------------ pareto


def _write_run(root, name, seed, points, method=None):
  wd = root / name / f"seed{seed}"
  wd.mkdir(parents=True)
  with open(wd / "metrics.jsonl", "w") as f:
    for step, (avg, worst) in enumerate(points):
      f.write(json.dumps({"step": step * 10, "avg_accuracy": avg, "worst_accuracy": worst,
                          "task_accuracy": [worst, 2 * avg - worst]}) + "\n")
    f.write('{"step": 99, "avg_acc')  # a torn last line (killed run) is ignored
  if method:
    (wd / "run.json").write_text(json.dumps({"method": method, "seed": seed}))


def test_pareto_table_and_figure(tmp_path):
  root = tmp_path / "runs"
  _write_run(root, "ldro-eta1-lam1", 0, [(0.5, 0.3), (0.7, 0.6), (0.8, 0.5)])
  _write_run(root, "ldro-eta2-lam1", 0, [(0.6, 0.65)])
  _write_run(root, "ldro-eta1-lam1", 1, [(0.75, 0.55)])
  _write_run(root, "baseline_run", 0, [(0.9, 0.2), (0.7, 0.4)], method="static")
  points = pareto.collect_points(str(root))
  assert len(points) == 7
  assert {p["method"] for p in points} == {"ldro", "static"}
  s = pareto.summarize(points)
  ld, st = s["methods"]["ldro"], s["methods"]["static"]
  assert ld["runs"] == 2 and ld["points"] == 5 and ld["seeds"] == [0, 1]
  assert st["runs"] == 1 and st["points"] == 2
  np.testing.assert_allclose(ld["frontier"], [[0.6, 0.65], [0.7, 0.6], [0.75, 0.55], [0.8, 0.5]])
  # Hypervolume above (0, 0): strips 0.6*0.65 + 0.1*0.6 + 0.05*0.55 + 0.05*0.5.
  assert ld["hypervolume"] == pytest.approx(0.39 + 0.06 + 0.0275 + 0.025)
  assert st["hypervolume"] == pytest.approx(0.7 * 0.4 + 0.2 * 0.2)
  assert ld["best_worst"] == 0.65 and ld["best_average"] == 0.8
  assert st["best_worst"] == 0.4 and st["best_average"] == 0.9
  assert s["matched_average"] == 0.8  # the lowest of the best averages
  assert ld["worst_at_matched_average"] == 0.5 and st["worst_at_matched_average"] == 0.2
  assert ld["hypervolume_per_seed"]["1"] == pytest.approx(0.75 * 0.55)
  # A reference point shifts the hypervolume.
  s2 = pareto.summarize(points, reference=(0.5, 0.5))
  assert s2["methods"]["ldro"]["hypervolume"] == pytest.approx(
      ldro_metrics.hypervolume(np.array(ld["frontier"]), (0.5, 0.5)))

  out = tmp_path / "out"
  pareto.write_outputs(str(root), str(out))
  assert (out / "pareto.png").stat().st_size > 10_000
  table = (out / "pareto.md").read_text()
  assert "| L-DRO | 2 | 5 |" in table and "| Static mixing | 1 | 2 |" in table
  assert "65.00" in table
  saved = json.loads((out / "pareto.json").read_text())
  assert saved["methods"]["ldro"]["best_worst"] == 0.65


def test_pareto_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="not found"):
    pareto.collect_points(str(tmp_path / "absent"))
  with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
    pareto.collect_points(str(tmp_path))


def test_progress_line_needs_avg_and_worst_of_one_metric():
  """The LM logs avg_loss without worst_loss: the line takes perplexity (it crashed the sweep)."""
  rec = {"step": 3, "avg_loss": 1.0, "avg_perplexity": 2.0, "worst_perplexity": 3.0}
  assert sweep._summary(rec) == " | step 3 avg perplexity 2.0000 worst perplexity 3.0000"  # pylint: disable=protected-access
  assert sweep._summary({"step": 3, "avg_loss": 1.0}) == ""  # pylint: disable=protected-access
