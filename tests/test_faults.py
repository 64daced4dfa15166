"""Crashes lose nothing: SIGKILL + resume is bitwise identical; broken checkpoints are skipped.

Fast versions of the scenarios of :mod:`experiments.faults` (which see); each
runs ``python -m experiments.train`` (or ``experiments.sweep``) as a subprocess on
the synthetic config.
"""

import json
import os
import subprocess
import sys
import time

import pytest

from experiments import faults
from experiments.runner import metrics_io
from experiments.runner import workdir as workdir_lib


@pytest.fixture(scope="module")
def runner(tmp_path_factory):
  return faults.Runner(str(tmp_path_factory.mktemp("faults")), seed=0)


@pytest.fixture(scope="module")
def cfg():
  return faults.synthetic("synthetic/ldro", num_steps=60)


def test_kill_and_resume_is_bitwise_identical(runner, cfg):
  """SIGKILL while a checkpoint is being written (at a random step), resume, compare.

  (The corrupt-checkpoint test below adds a kill at a random step.)
  """
  res = runner.kill_resume("kill/resume", cfg, ["save"])
  assert res.kills >= 1, res
  assert res.identical == "yes", res.detail
  assert res.passed, res


def test_half_written_and_damaged_checkpoints_are_not_used(runner, cfg):
  """A fake ``*.orbax-checkpoint-tmp-*`` dir and a damaged newest checkpoint are skipped."""
  res = runner.corrupt_checkpoint(cfg)
  assert res.passed, res


def test_interrupted_sweep_resumes_without_redoing_runs(runner):
  """SIGKILL the whole sweep (driver + training run) once, re-run it: finished runs are
  skipped, not redone, and every run ends bitwise equal to an uninterrupted sweep.

  Two of the synthetic sweep's three runs (the full scenario, ``python -m
  experiments.faults``, runs all three)."""
  res = faults.sweep_scenario(runner, kills=1, only="^(avg|ldro)$")
  if res is None:
    pytest.skip("no experiments/sweep.py")
  assert res.kills == 1, res
  assert res.identical == "yes" and res.passed, res.detail


def test_metrics_have_no_wall_clock_fields(runner, cfg):
  with open(os.path.join(runner.reference(cfg), "metrics.jsonl"), encoding="utf-8") as f:
    recs = [json.loads(l) for l in f]
  assert [r["step"] for r in recs] == list(range(0, 61, 5))
  for r in recs:
    assert not [k for k in r if any(w in k.lower() for w in faults.CLOCK_WORDS)], r.keys()


def test_truncate_after_drops_later_and_torn_records(tmp_path):
  w = metrics_io.MetricsWriter(str(tmp_path), enabled=True)
  for s in (0, 5, 10):
    w.write({"step": s, "x": 1.0})
  w.close()
  with open(w.path, "a", encoding="utf-8") as f:
    f.write('{"step": 15, "x"')  # torn by a crash
  w2 = metrics_io.MetricsWriter(str(tmp_path), enabled=True)
  w2.truncate_after(5)
  w2.close()
  with open(w.path, encoding="utf-8") as f:
    assert [json.loads(l)["step"] for l in f] == [0, 5]


def test_workdir_lock_refuses_a_second_run(tmp_path):
  """While one process holds the workdir, another run stops with a clear error."""
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
       "fcntl.flock(f, fcntl.LOCK_EX); f.write('pid 4242 on test\\n'); f.flush(); "
       "print('locked', flush=True); time.sleep(60)", str(tmp_path / ".lock")],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(BlockingIOError, match="in use by a running training process"):
      workdir_lib.lock(str(tmp_path))
  finally:
    holder.kill()
    holder.wait()
  deadline = time.time() + 10
  while True:  # the lock dies with its process (also on SIGKILL)
    try:
      path = workdir_lib.lock(str(tmp_path))
      break
    except BlockingIOError:
      assert time.time() < deadline
      time.sleep(0.05)
  workdir_lib.unlock(path)
