"""The experiment runner end to end on the synthetic experiment."""

import json
import os
import subprocess
import sys
import types

import gin
import pytest

from experiments import train as train_lib
from experiments.runner import loop
from experiments.runner import paths

ROOT = paths.repo_root()


def run(workdir, *bindings, config="ldro.gin"):
  gin.clear_config()
  train_lib.parse_gin(
      [f"gin_configs/synthetic/{config}"],
      ["train_and_evaluate.eval_every = 5", "train_and_evaluate.log_every = 5",
       "train_and_evaluate.checkpoint_every = 5", *bindings])
  return loop.train_and_evaluate(str(workdir), quiet=True)


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(l) for l in f]


def test_end_to_end_writes_workdir(tmp_path):
  records = run(tmp_path, "train_and_evaluate.num_steps = 12")
  assert [r["step"] for r in records] == [0, 5, 10, 12]
  lines = read_jsonl(tmp_path / "metrics.jsonl")
  assert lines == records
  last = lines[-1]
  for key in ("task_loss", "avg_loss", "worst_loss", "task_weights", "train_task_losses"):
    assert key in last
  assert len(last["task_weights"]) == 11 and abs(sum(last["task_weights"]) - 1) < 1e-5
  assert last["worst_loss"] == pytest.approx(max(last["task_loss"]))
  config = (tmp_path / "config.gin").read_text()
  assert "METHOD = 'ldro'" in config and "method.name = %METHOD" in config
  assert os.listdir(tmp_path / "tb")
  assert "12" in os.listdir(tmp_path / "checkpoints")


def test_resume_gives_the_same_run(tmp_path):
  full = run(tmp_path / "full", "train_and_evaluate.num_steps = 20")
  run(tmp_path / "split", "train_and_evaluate.num_steps = 10")
  resumed = run(tmp_path / "split", "train_and_evaluate.num_steps = 20")
  assert [r["step"] for r in resumed] == [15, 20]
  assert read_jsonl(tmp_path / "split" / "metrics.jsonl") == read_jsonl(tmp_path / "full" /
                                                                         "metrics.jsonl")
  assert full[-1] == resumed[-1]  # params-derived metrics and task weights, bitwise


def test_progress_line_says_the_time_left():
  exp = types.SimpleNamespace(main_metric="accuracy")
  record = {"avg_accuracy": 0.5, "worst_accuracy": 0.25}
  assert loop.progress_line(400, 6000, 2.0, exp, record) == (
      "step 400/6000 | 2.0 steps/s | 46m40s left | avg accuracy 0.5000 | worst accuracy 0.2500")
  # the last line has nothing left to estimate; losses instead of a record
  assert loop.progress_line(10, 10, 3.0, exp, [1.0, 3.0]) == (
      "step 10/10 | 3.0 steps/s | avg train loss 2.0000 | worst train loss 3.0000")
  assert [loop.duration(s) for s in (0.4, 59, 61, 3599, 3600, 11220)] == [
      "0s", "59s", "1m01s", "59m59s", "1h00m", "3h07m"]


def test_cli_default_prints_average_and_worst(tmp_path):
  out = subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--workdir={tmp_path}",
       "--gin_bindings=train_and_evaluate.num_steps=10",
       "--gin_bindings=train_and_evaluate.log_every=5"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "step 5/10" in out.stdout and "steps/s" in out.stdout and "left |" in out.stdout
  assert "final (step 10): average loss" in out.stdout and "worst loss" in out.stdout


@pytest.mark.parametrize("args,message", [
    (["--gin_bindings=train_and_evaluate.num_stepz=3"], "doesn't have a parameter named 'num_stepz'"),
    (["--gin_bindings=METHOD='lddro'"], "unknown method 'lddro'"),
    (["--gin_file=gin_configs/nope.gin"], "gin file not found"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
  out = subprocess.run([sys.executable, "-m", "experiments.train", f"--workdir={tmp_path}", *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1
  lines = [l for l in out.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
