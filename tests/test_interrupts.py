"""Interrupts and damaged run files end in one line, and the run resumes exactly.

Ctrl-C (SIGINT, a real signal to a CLI subprocess) and SIGTERM (in this
process) stop at a step boundary with a checkpoint at the step reached; a
damaged ``metrics.jsonl`` line is skipped with one warning naming the file
and line; a damaged checkpoint is skipped with one warning line and no
tracebacks.
"""

import glob
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import gin
import pytest

from experiments import train as train_lib
from experiments.runner import interrupts
from experiments.runner import loop
from experiments.runner import metrics_io
from experiments.runner import paths

ROOT = paths.repo_root()
CONFIG = "gin_configs/synthetic/ldro.gin"
EVERY = ["train_and_evaluate.eval_every=5", "train_and_evaluate.checkpoint_every=1000"]


def run(workdir, *bindings, **kwargs):
  gin.clear_config()
  train_lib.parse_gin([CONFIG], [*EVERY, *bindings])
  return loop.train_and_evaluate(str(workdir), quiet=True, **kwargs)


def read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(l) for l in f]


def test_sigint_one_line_then_exact_resume(tmp_path):
  """Ctrl-C: exit 130, one line naming the step, a finished checkpoint there, exact resume."""
  wd = tmp_path / "w"
  cmd = [sys.executable, "-m", "experiments.train", f"--workdir={wd}",
         "--gin_bindings=train_and_evaluate.num_steps=100000",
         "--gin_bindings=train_and_evaluate.log_every=1"] + [f"--gin_bindings={b}" for b in EVERY]
  proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  try:
    for line in proc.stdout:
      if line.startswith("step 3/"):
        break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  lines = [l for l in err.splitlines() if l.strip()]
  assert proc.returncode == 130, err[-3000:]
  assert len(lines) == 1, err[-3000:]
  m = re.fullmatch(r"interrupted \(SIGINT\) at step (\d+) of 100000; checkpoint (\d+) saved; "
                   r"re-run the same command to resume from step (\d+)\.", lines[0])
  assert m and m.group(1) == m.group(2) == m.group(3), lines[0]
  stopped = int(m.group(1))
  assert stopped >= 3
  entries = os.listdir(wd / "checkpoints")
  assert str(stopped) in entries and not [e for e in entries if "tmp" in e], entries

  target = stopped + 7
  run(wd, f"train_and_evaluate.num_steps={target}")  # the resume (same config, longer)
  run(tmp_path / "ref", f"train_and_evaluate.num_steps={target}")  # never interrupted
  assert read_jsonl(wd / "metrics.jsonl") == read_jsonl(tmp_path / "ref" / "metrics.jsonl")


def test_sigterm_in_process_stops_at_a_step(tmp_path):
  """SIGTERM is handled like Ctrl-C (here in this process: Interrupted, a KeyboardInterrupt)."""
  metrics = tmp_path / "w" / "metrics.jsonl"
  done = threading.Event()

  def send_when_training():  # the step-0 record is written inside the loop, handlers set
    while not done.is_set():
      if metrics.exists() and metrics.stat().st_size > 0:
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        return
      time.sleep(0.05)

  before = signal.getsignal(signal.SIGTERM)
  sender = threading.Thread(target=send_when_training, daemon=True)
  sender.start()
  try:
    with pytest.raises(interrupts.Interrupted) as info:
      run(tmp_path / "w", "train_and_evaluate.num_steps=100000000")
  finally:
    done.set()
    sender.join()
  e = info.value
  assert isinstance(e, KeyboardInterrupt) and e.exit_status == 143
  assert e.signum == signal.SIGTERM and e.checkpoint == (e.step or None)
  assert f"interrupted (SIGTERM) at step {e.step} of 100000000" in str(e)
  if e.step:  # (0 if the signal came before the first step finished compiling)
    assert str(e.step) in os.listdir(tmp_path / "w" / "checkpoints")
  assert signal.getsignal(signal.SIGTERM) == before  # handlers restored


def test_damaged_metrics_lines_warn_once_naming_file_and_line(tmp_path, capsys):
  path = tmp_path / "metrics.jsonl"
  good = [{"step": 0, "avg_loss": 1.0}, {"step": 5, "avg_loss": 0.5}]
  path.write_bytes(b"\n".join([
      json.dumps(good[0]).encode(),
      b'{"no": "step"}',
      b"\xff\xfe not utf-8",
      b"[1, 2]",
      json.dumps(good[1]).encode(),
      b'{"step": 10, "avg_l',  # torn last line (a run killed mid-write): silent
  ]))
  assert metrics_io.read_metrics(str(path)) == good
  err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
  assert err == [f"warning: {path}: skipped 3 damaged line(s) (line 2: no integer 'step'; "
                 f"2 more)"], err


def test_resume_over_damaged_metrics_line(tmp_path, capfd):
  """The resume drops the damaged line (one warning) and rewrites the records after it."""
  wd = tmp_path / "w"
  run(wd, "train_and_evaluate.num_steps=10", "train_and_evaluate.checkpoint_every=5")
  ref = read_jsonl(wd / "metrics.jsonl")
  lines = (wd / "metrics.jsonl").read_bytes().split(b"\n")
  lines[1] = b"\xff garbage"
  (wd / "metrics.jsonl").write_bytes(b"\n".join(lines))
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(wd / "checkpoints" / "10")
  capfd.readouterr()
  run(wd, "train_and_evaluate.num_steps=10", "train_and_evaluate.checkpoint_every=5")
  err = [l for l in capfd.readouterr().err.splitlines() if l.strip()]
  assert len(err) == 1 and "metrics.jsonl: skipped 1 damaged line(s) (line 2: not UTF-8)" in err[0]
  assert read_jsonl(wd / "metrics.jsonl") == [r for i, r in enumerate(ref) if i != 1]


def test_damaged_checkpoint_one_warning_line(tmp_path):
  """The newest checkpoint damaged: one warning line, no tracebacks, resumed from the previous."""
  wd = tmp_path / "w"
  run(wd, "train_and_evaluate.num_steps=10", "train_and_evaluate.checkpoint_every=5")
  data = [p for p in glob.glob(str(wd / "checkpoints" / "10" / "**" / "d" / "*"), recursive=True)
          if os.path.isfile(p)]
  assert data
  for p in data:  # flip a byte in every data file
    with open(p, "r+b") as f:
      b = bytearray(f.read())
      b[len(b) // 2] ^= 0xFF
      f.seek(0)
      f.write(bytes(b))
  proc = subprocess.run(
      [sys.executable, "-m", "experiments.train", f"--workdir={wd}",
       "--gin_bindings=train_and_evaluate.num_steps=12",
       "--gin_bindings=train_and_evaluate.checkpoint_every=5"] +
      [f"--gin_bindings={b}" for b in EVERY[:1]],
      cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  err = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(err) == 1 and err[0].startswith("warning: checkpoint 10 is unreadable"), \
      proc.stderr[-3000:]
  assert "resuming from checkpoint 5" in err[0]
  assert "resumed from checkpoint at step 5" in proc.stdout
