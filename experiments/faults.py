r"""Fault injection: killed runs resume bit-exactly; NaN policies behave as documented.

    python -m experiments.faults [--quick] [--seed=0] [--out=results/faults] [--keep]

Every scenario runs ``python -m experiments.train`` as a subprocess:

* **kill/resume** scenarios run the command once uninterrupted (the
  reference), and once more in a fresh workdir where it is killed with
  ``SIGKILL`` several times (seeded random points: at a random training
  progress plus a random delay, or the moment a checkpoint is being written,
  i.e. while orbax's ``*.orbax-checkpoint-tmp-*`` directory exists) and
  re-run with the same command until it finishes. The run is *identical* when
  the final checkpoint (step, params, optimizer state with task weights and
  interaction matrix, PRNG key, non-finite counters) is bitwise equal to the
  reference's, ``metrics.jsonl`` is byte-for-byte equal (it holds no
  wall-clock fields; checked), and so is ``config.gin``.
* **corrupt checkpoint**: after a kill, the newest finalized checkpoint is
  damaged (a flipped byte in its data) and a fake half-written checkpoint
  (``<step>.orbax-checkpoint-tmp-*``) is planted; the resumed run must ignore
  both, resume from the previous checkpoint and still end identical.
* **NaN injection** (:class:`experiments.runner.fault_injection.NanAtStep` around
  the synthetic experiment, :func:`nan_bindings`): with
  ``nonfinite='error'`` the run stops with exit code 1 and one ``error:`` line
  naming the step and the task; with ``'skip'`` it finishes, and the params
  and task weights after the poisoned step equal those before it.
* **sweep** (if ``experiments/sweep.py`` exists): see :func:`sweep_scenario`.

Writes ``<out>/faults.md`` and ``<out>/faults.json`` and prints the table.
Exit code 0 iff every scenario passed.
"""

import argparse
import dataclasses
import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Optional, Sequence

from ldro.data import fileio

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TMP_MARK = ".orbax-checkpoint-tmp"
#: Keys that would make metrics.jsonl depend on wall-clock time.
CLOCK_WORDS = ("time", "wall", "rate", "sec", "elapsed", "date")


def nan_bindings(step: int, task: int) -> list[str]:
  """Gin bindings wrapping the synthetic experiment so that ``task``'s loss is NaN at ``step``."""
  return ["import experiments.runner.fault_injection",
          "train_and_evaluate.experiment = @NanAtStep()",
          "NanAtStep.experiment = @SyntheticExperiment()",
          f"NanAtStep.step = {step}", f"NanAtStep.task = {task}"]


@dataclasses.dataclass
class Config:
  """A ``python -m experiments.train`` command (minus the workdir)."""
  name: str
  gin_files: Sequence[str]
  bindings: Sequence[str]
  num_steps: int

  def command(self, workdir: str) -> list[str]:
    cmd = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}"]
    cmd += [f"--gin_file={f}" for f in self.gin_files]
    cmd += [f"--gin_bindings={b}" for b in self.bindings]
    return cmd


def synthetic(name: str, gin_files=("gin_configs/synthetic/ldro.gin",), bindings=(),
              num_steps: int = 60) -> Config:
  b = [f"train_and_evaluate.num_steps={num_steps}", "train_and_evaluate.checkpoint_every=5",
       "train_and_evaluate.eval_every=5", "train_and_evaluate.log_every=5",
       "train_and_evaluate.keep_checkpoints=2"]
  return Config(name, list(gin_files), b + list(bindings), num_steps)


def cifar10(name: str = "cifar10_mtl/ldro", num_steps: int = 30) -> Config:
  return Config(name, ["gin_configs/cifar10_mtl/ldro.gin"],
                [f"NUM_STEPS={num_steps}", "EVAL_EVERY=15",
                 "train_and_evaluate.checkpoint_every=5", "train_and_evaluate.log_every=5"],
                num_steps)


@dataclasses.dataclass
class Result:
  scenario: str
  config: str
  steps: int
  kills: int = 0
  kill_points: str = ""
  half_written: int = 0
  resumed: int = 0
  identical: str = "n/a"
  passed: bool = False
  detail: str = ""
  seconds: float = 0.0


# ------------------------------------------------------------------ running ---


def _run(cmd: list[str], log: str, timeout: float = 900) -> int:
  with open(log, "a", encoding="utf-8") as f:
    f.write(f"\n$ {' '.join(cmd)}\n")
    f.flush()
    return subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                          timeout=timeout, check=False).returncode


def _ckpt_entries(workdir: str) -> list[str]:
  try:
    return os.listdir(os.path.join(workdir, "checkpoints"))
  except FileNotFoundError:
    return []


def _progress(workdir: str) -> int:
  """Largest step visible on disk (checkpoints, also half-written, or metrics)."""
  best = -1
  for e in _ckpt_entries(workdir):
    m = re.match(r"^(\d+)", e)
    if m:
      best = max(best, int(m.group(1)))
  try:
    with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
      f.seek(max(0, os.path.getsize(f.name) - 4096))
      for line in f.read().splitlines()[-2:]:
        try:
          best = max(best, int(json.loads(line)["step"]))
        except (ValueError, KeyError):
          pass
  except FileNotFoundError:
    pass
  return best


def _half_written(workdir: str) -> list[str]:
  return [e for e in _ckpt_entries(workdir) if TMP_MARK in e]


def run_with_kills(cfg: Config, workdir: str, log: str, triggers: Sequence[str],
                   rng: random.Random, timeout: float = 900) -> dict:
  """Runs ``cfg`` in ``workdir``, SIGKILLing it once per trigger, then to the end.

  Triggers: ``'random'`` (kill once the visible progress reaches a random
  step, after a further random delay) or ``'save'`` (kill as soon as a
  half-written checkpoint directory appears).

  Returns:
    ``{'kills': int, 'points': [(trigger, progress), ...], 'half_written': int,
    'rc': final exit code}``.
  """
  cmd = cfg.command(workdir)
  kills, points, half = 0, [], 0
  deadline = time.time() + timeout
  k = len(triggers)
  # Stratified targets: kill i lands in the i-th k-th of the run (so later kills
  # do not miss a run that is already finishing).
  bounds = [(1 + i * (cfg.num_steps - 2) // k, (i + 1) * (cfg.num_steps - 2) // k)
            for i in range(k)]
  finished = None
  for trig, (a, b) in zip(triggers, bounds):
    lo = max(_progress(workdir), 0)
    target = rng.randint(max(a, lo + 1), max(b, lo + 1))
    delay = rng.uniform(0.0, 0.05)
    with open(log, "a", encoding="utf-8") as f:
      f.write(f"\n$ {' '.join(cmd)}   # to be killed: {trig}\n")
      f.flush()
      proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
      fired = False
      while proc.poll() is None and time.time() < deadline:
        if trig == "save":
          fired = any(int(re.match(r"^(\d+)", e).group(1)) >= target
                      for e in _half_written(workdir))
        else:
          fired = _progress(workdir) >= target
        if fired:
          if trig == "random":
            time.sleep(delay)
          break
        time.sleep(0.002)
      if proc.poll() is None:
        at = _progress(workdir)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        left = _half_written(workdir)
        half += bool(left)
        points.append(f"{trig}@{at}" + ("*" if left else ""))
        f.write(f"# SIGKILL ({trig}) at progress {at}; half-written: {left}\n")
      else:
        f.write(f"# finished before the {trig} kill fired (rc {proc.returncode})\n")
        finished = proc.returncode
        break
  rc = finished if finished is not None else _run(cmd, log, max(60.0, deadline - time.time()))
  return {"kills": kills, "points": points, "half_written": half, "rc": rc}


def _resumes(log: str) -> list[int]:
  with open(log, encoding="utf-8") as f:
    return [int(m) for m in re.findall(r"resumed from checkpoint at step (\d+)", f.read())]


# --------------------------------------------------------------- comparing ---


def _final_state(workdir: str):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.ERROR)  # read-only / untyped-restore notices
  mngr = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=ocp.CheckpointManagerOptions(read_only=True))
  step = mngr.latest_step()
  tree = mngr.restore(step)
  mngr.close()
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return step, {jax.tree_util.keystr(p): np.asarray(x) for p, x in flat}


def compare(ref: str, test: str) -> tuple[bool, str]:
  """Bitwise comparison of two finished workdirs: (identical, explanation)."""
  problems = []
  for name in ("metrics.jsonl", "config.gin"):
    with open(os.path.join(ref, name), "rb") as f:
      a = f.read()
    with open(os.path.join(test, name), "rb") as f:
      b = f.read()
    if a != b:
      problems.append(f"{name} differs")
  with open(os.path.join(ref, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(l) for l in f if l.strip()]
  clock = sorted({k for r in records for k in r if any(w in k.lower() for w in CLOCK_WORDS)})
  if clock:
    problems.append(f"metrics.jsonl has wall-clock fields {clock}")
  steps = [r["step"] for r in records]
  if steps != sorted(set(steps)):
    problems.append(f"metrics.jsonl steps not strictly increasing: {steps}")
  sa, ta = _final_state(ref)
  sb, tb = _final_state(test)
  if sa != sb:
    problems.append(f"final checkpoint steps {sa} vs {sb}")
  if set(ta) != set(tb):
    problems.append("checkpoint trees differ")
  else:
    bad = [k for k in ta if ta[k].dtype != tb[k].dtype or ta[k].shape != tb[k].shape
           or ta[k].tobytes() != tb[k].tobytes()]
    if bad:
      problems.append(f"{len(bad)} checkpoint arrays differ (e.g. {bad[0]})")
  n = len(ta)
  if problems:
    return False, "; ".join(problems)
  return True, (f"{len(records)} metric records and {n} state arrays (params, opt state, rng, "
                f"counters) at step {sa} bitwise equal")


# --------------------------------------------------------------- scenarios ---


class Runner:
  """Holds the scratch directory and the cache of reference runs."""

  def __init__(self, root: str, seed: int):
    self.root = root
    self.rng = random.Random(seed)
    self._refs = {}

  def reference(self, cfg: Config) -> str:
    if cfg.name not in self._refs:
      wd = os.path.join(self.root, "ref_" + re.sub(r"\W", "_", cfg.name))
      log = wd + ".log"
      rc = _run(cfg.command(wd), log)
      if rc != 0:
        raise RuntimeError(f"reference run {cfg.name} failed (rc {rc}); see {log}")
      self._refs[cfg.name] = wd
    return self._refs[cfg.name]

  def kill_resume(self, scenario: str, cfg: Config, triggers: Sequence[str]) -> Result:
    t0 = time.time()
    ref = self.reference(cfg)
    wd = os.path.join(self.root, re.sub(r"\W", "_", f"{scenario}_{cfg.name}"))
    log = wd + ".log"
    out = run_with_kills(cfg, wd, log, triggers, self.rng)
    resumes = _resumes(log)
    res = Result(scenario, cfg.name, cfg.num_steps, kills=out["kills"],
                 kill_points=", ".join(out["points"]), half_written=out["half_written"],
                 resumed=len(resumes))
    res.kill_points += f"; resumed from steps {resumes}"
    if out["rc"] != 0:
      res.detail = f"final run exited {out['rc']}; see {log}"
      res.identical = "no"
    else:
      same, why = compare(ref, wd)
      res.identical = "yes" if same else "no"
      res.detail = why
    res.passed = res.identical == "yes" and res.kills > 0
    res.seconds = time.time() - t0
    return res

  def corrupt_checkpoint(self, cfg: Config) -> Result:
    """Kill, damage the newest checkpoint, plant a fake tmp one; resume must not use them."""
    t0 = time.time()
    ref = self.reference(cfg)
    wd = os.path.join(self.root, "corrupt")
    log = wd + ".log"
    cmd = cfg.command(wd)
    # Kill once past the middle (so that two finalized checkpoints exist).
    with open(log, "a", encoding="utf-8") as f:
      proc = subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
      target = cfg.num_steps * 2 // 3
      while proc.poll() is None and _progress(wd) < target:
        time.sleep(0.002)
      if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
      proc.wait()
    res = Result("corrupt newest checkpoint + fake tmp dir", cfg.name, cfg.num_steps, kills=1)
    ck = os.path.join(wd, "checkpoints")
    done = sorted(int(e) for e in _ckpt_entries(wd) if e.isdigit())
    if len(done) < 2:
      res.detail = f"setup failed: finalized checkpoints {done}"
      return res
    newest, previous = done[-1], done[-2]
    data = [p for p in glob.glob(os.path.join(ck, str(newest), "**", "d", "*"), recursive=True)
            if os.path.isfile(p)]
    for p in data:  # flip a byte in every data file of the newest checkpoint
      with open(p, "r+b") as f:
        b = bytearray(f.read())
        b[len(b) // 2] ^= 0xFF
        f.seek(0)
        f.write(bytes(b))
    fake = os.path.join(ck, f"{newest + 5}{TMP_MARK}-{int(time.time())}")
    shutil.copytree(os.path.join(ck, str(previous)), fake)  # looks complete, but is tmp
    rc = _run(cmd, log)
    resumed = _resumes(log)
    res.resumed = len([s for s in resumed if s > 0])
    res.kill_points = (f"damaged {newest} ({len(data)} files), fake tmp {newest + 5}; "
                       f"resumed from {resumed}")
    with open(log, encoding="utf-8") as f:
      text = f.read()
    warned = f"checkpoint {newest} is unreadable" in text
    fake_gone = not os.path.exists(fake)
    if rc != 0:
      res.identical, res.detail = "no", f"resumed run exited {rc}; see {log}"
    else:
      same, why = compare(ref, wd)
      res.identical = "yes" if same else "no"
      res.detail = (why + f"; warned about {newest}: {warned}; fake tmp dir removed: {fake_gone}")
    res.passed = (res.identical == "yes" and resumed == [previous] and warned and fake_gone)
    res.seconds = time.time() - t0
    return res

  def nan(self, policy: str, step: int = 12, task: int = 3) -> Result:
    t0 = time.time()
    wd = os.path.join(self.root, f"nan_{policy}")
    log = wd + ".log"
    cfg = Config(f"synthetic/ldro + nan_at_step={step}, nan_task={task}",
                 ["gin_configs/synthetic/ldro.gin"],
                 ["train_and_evaluate.num_steps=30", "train_and_evaluate.log_every=5",
                  "train_and_evaluate.eval_every=1", *nan_bindings(step, task),
                  f"train_and_evaluate.nonfinite='{policy}'"], 30)
    proc = subprocess.run(cfg.command(wd), cwd=REPO, capture_output=True, text=True,
                          timeout=600, check=False)
    with open(log, "w", encoding="utf-8") as f:
      f.write(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    res = Result(f"NaN in one task, nonfinite='{policy}'", cfg.name, 30)
    if policy == "error":
      errs = [l for l in proc.stderr.splitlines() if l.strip()]
      named = (len(errs) == 1 and errs[0].startswith("error: ") and f"step {step}" in errs[0]
               and f"task {task}" in errs[0])
      res.passed = proc.returncode == 1 and named
      res.detail = f"exit {proc.returncode}; stderr: {errs[0] if errs else '(empty)'}"
      if len(errs) != 1:
        res.detail += f" (+{len(errs) - 1} more lines)"
    else:
      with open(os.path.join(wd, "metrics.jsonl"), encoding="utf-8") as f:
        recs = {r["step"]: r for r in (json.loads(l) for l in f if l.strip())}
      before, after, later = recs[step], recs[step + 1], recs[step + 2]
      kept = (before["theta"] == after["theta"]
              and before["task_weights"] == after["task_weights"])
      moved = later["theta"] != after["theta"]
      import math  # pylint: disable=g-import-not-at-top
      finite = all(math.isfinite(x) for x in recs[30]["theta"] + recs[30]["task_weights"])
      warned = "1 step(s) skipped" in proc.stdout and f"step {step} in task {task}" in proc.stdout
      res.passed = proc.returncode == 0 and kept and moved and finite and warned
      res.detail = (f"exit {proc.returncode}; params/weights after step {step} == before: {kept}; "
                    f"training continued: {moved}; final finite: {finite}; warning printed: "
                    f"{warned}")
    res.identical = "n/a"
    res.seconds = time.time() - t0
    return res


def _sweep_cmd(root: str, steps: int, only: Optional[str]) -> list[str]:
  every = max(1, steps // 8)
  bindings = (f"train_and_evaluate.num_steps = {steps}",
              f"train_and_evaluate.checkpoint_every = {every}",
              f"train_and_evaluate.eval_every = {every}", f"train_and_evaluate.log_every = {every}")
  return ([sys.executable, "-m", "experiments.sweep", "--sweep=synthetic", f"--root={root}"]
          + [f"--bindings={b}" for b in bindings] + ([f"--only={only}"] if only else []))


def _wait_unlocked(workdir: str, timeout: float = 300) -> None:
  """Waits until no process holds ``<workdir>/.lock`` (the runner's workdir lock)."""
  import fcntl  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, ".lock")
  deadline = time.time() + timeout
  while os.path.exists(path) and time.time() < deadline:
    with open(path, "a", encoding="utf-8") as f:
      try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
      except OSError:
        pass
    time.sleep(0.05)


def _lock_holder(workdir: str) -> Optional[int]:
  """The pid written in ``<workdir>/.lock`` by the runner (None if none yet)."""
  deadline = time.time() + 60
  while time.time() < deadline:
    try:
      with open(os.path.join(workdir, ".lock"), encoding="utf-8") as f:
        m = re.match(r"pid (\d+)", f.read())
      if m:
        return int(m.group(1))
    except FileNotFoundError:
      pass
    time.sleep(0.01)
  return None


def sweep_scenario(runner: Runner, kills: int = 2, orphan: bool = False,
                   only: Optional[str] = None) -> Optional[Result]:
  """Interrupted sweep: SIGKILL ``experiments.sweep`` at random points, re-run
  the same command until it finishes, compare every run with an uninterrupted
  sweep, and check that finished runs were not redone.

  Args:
    runner: the scenario runner.
    kills: number of kills.
    orphan: kill only the sweep process (its training subprocess lives on, as
      after ``kill -9 <sweep pid>``) and restart the sweep at once; the
      restarted run must not write the workdir the orphan still uses (the
      runner's workdir lock), and a later restart finishes the sweep.
      Otherwise the whole process group is killed (as a preemption does).
    only: the sweep's ``--only`` (a regular expression over its run names; at
      least two runs keep "finished runs are not redone" testable). ``None``:
      all three runs (the orphan scenario trains ``avg`` alone).

  Returns:
    The result, or None when ``experiments/sweep.py`` does not exist.
  """
  if not os.path.exists(os.path.join(REPO, "experiments", "sweep.py")):
    return None
  t0 = time.time()
  # The orphan scenario trains one longer run, so that the orphan is still
  # running when the sweep restarts.
  steps, only = (200, "^avg$") if orphan else (40, only)
  cmd = lambda root: _sweep_cmd(root, steps, only)
  tag = re.sub(r"\W+", "", only) if only else "all"
  ref = os.path.join(runner.root, f"sweep_ref_{steps}_{tag}")
  test = os.path.join(runner.root, "sweep_orphan" if orphan else f"sweep_test_{tag}")
  log = test + ".log"
  res = Result("interrupted sweep (" + ("kill only the sweep driver; orphaned training lives on"
                                        if orphan else "kill sweep + its training process") + ")",
               "experiments.sweep --sweep=synthetic", steps)
  if not os.path.exists(ref):
    if _run(cmd(ref), ref + ".log") != 0:
      res.detail = f"reference sweep failed; see {ref}.log"
      return res
  runs = sorted(d for d in os.listdir(ref) if os.path.isdir(os.path.join(ref, d)))
  order = ["avg", "dro", "ldro"]  # the sweep's run order
  runs = [r for r in order if r in runs] + [r for r in runs if r not in order]
  wds = [os.path.join(test, r, "seed0") for r in runs]

  def progress():
    total = 0
    for wd in wds:
      if os.path.exists(os.path.join(wd, "DONE")):
        total += steps + 1
      else:
        return total + max(_progress(wd), 0)
    return total

  points = []
  done_before = {}
  for _ in range(kills):
    hi = steps // 4 if orphan else len(wds) * (steps + 1) - 2  # orphan: kill early
    target = runner.rng.randint(min(progress() + 1, hi), hi)
    with open(log, "a", encoding="utf-8") as f:
      f.write(f"\n$ {' '.join(cmd(test))}   # to be killed at progress {target}\n")
      f.flush()
      proc = subprocess.Popen(cmd(test), cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                              start_new_session=True)
      while proc.poll() is None and progress() < target:
        time.sleep(0.002)
      time.sleep(runner.rng.uniform(0.0, 0.1))
      if proc.poll() is not None:
        break
      if orphan:
        # Freeze the training subprocess (it keeps its workdir lock) so that it
        # is certainly still alive when the sweep restarts; thawed afterwards.
        trainer = _lock_holder(wds[0])
        if trainer:
          os.kill(trainer, signal.SIGSTOP)
        os.kill(proc.pid, signal.SIGKILL)
      else:
        os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      res.kills += 1
      run_at = next((r for r, wd in zip(runs, wds)
                     if not os.path.exists(os.path.join(wd, "DONE"))), "-")
      at = _progress(os.path.join(test, run_at, "seed0")) if run_at != "-" else "-"
      points.append(f"{run_at}@{at}")
    if orphan:  # restart at once, while the orphan still trains
      rc_early = _run(cmd(test), log)
      conflicts = 0
      for wd in wds:
        with open(os.path.join(wd, "train.log"), encoding="utf-8", errors="replace") as f:
          conflicts += f.read().count("is in use by a running training process")
      points.append(f"immediate restart: exit {rc_early}, refused by the workdir lock "
                    f"{conflicts}x")
      if trainer:
        os.kill(trainer, signal.SIGCONT)
      for wd in wds:
        _wait_unlocked(wd)
    for r, wd in zip(runs, wds):
      p = os.path.join(wd, "DONE")
      if os.path.exists(p) and r not in done_before:
        done_before[r] = os.path.getmtime(p)
  rc = _run(cmd(test), log)
  res.resumed = res.kills
  problems = []
  if rc != 0:
    problems.append(f"final sweep exited {rc}")
  redone = [r for r, t in done_before.items()
            if os.path.getmtime(os.path.join(test, r, "seed0", "DONE")) != t]
  with open(log, encoding="utf-8") as f:
    text = f.read()
  skipped = re.findall(r"\] (\w+)/seed0: skipped", text)
  details = []
  for r in runs:
    same, why = compare(os.path.join(ref, r, "seed0"), os.path.join(test, r, "seed0"))
    if not same:
      problems.append(f"{r}: {why}")
    details.append(r)
  if redone:
    problems.append(f"finished runs redone: {redone}")
  res.kill_points = ", ".join(points) + f"; finished before the last restart: {sorted(done_before)}"
  res.identical = "no" if problems else "yes"
  res.passed = not problems and res.kills > 0
  res.detail = ("; ".join(problems) if problems else
                f"all {len(runs)} runs bitwise equal to an uninterrupted sweep; runs skipped as "
                f"DONE on restarts: {sorted(set(skipped))}; none redone")
  res.seconds = time.time() - t0
  return res


# ------------------------------------------------------------------- main ---


def _table(results: Sequence[Result]) -> str:
  head = ("| scenario | config | steps | kills injected | kill points (progress; * = "
          "half-written ckpt left) | resumed | identical | pass | detail |")
  lines = [head, "|" + "---|" * 9]
  for r in results:
    lines.append(f"| {r.scenario} | {r.config} | {r.steps} | {r.kills} | {r.kill_points} | "
                 f"{r.resumed} | {r.identical} | {'yes' if r.passed else 'NO'} | {r.detail} |")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true", help="fewer kills, synthetic only")
  p.add_argument("--seed", type=int, default=0, help="seed of the kill points")
  p.add_argument("--out", default=os.path.join(REPO, "results", "faults"))
  p.add_argument("--keep", action="store_true", help="keep the scratch workdirs")
  p.add_argument("--no_cifar", action="store_true", help="skip the CIFAR-10 scenario")
  args = p.parse_args(argv)

  root = tempfile.mkdtemp(prefix="ldro_faults_")
  runner = Runner(root, args.seed)
  t0 = time.time()
  base = synthetic("synthetic/ldro")
  noisy = synthetic("synthetic/ldro+noisy", ["gin_configs/synthetic/ldro.gin",
                                              "gin_configs/synthetic/noisy.gin"])
  results = []

  def add(r):
    if r is None:
      return
    results.append(r)
    print(f"[{r.seconds:6.1f}s] {r.scenario}: kills {r.kills}, resumed {r.resumed}, "
          f"identical {r.identical}, pass {r.passed} -- {r.detail}", flush=True)

  if args.quick:
    add(runner.kill_resume("SIGKILL at random steps", base, ["random", "random"]))
    add(runner.kill_resume("SIGKILL while saving a checkpoint", base, ["save"]))
  else:
    add(runner.kill_resume("SIGKILL at random steps", base, ["random"] * 3))
    add(runner.kill_resume("SIGKILL while saving a checkpoint", base, ["save"] * 3))
    add(runner.kill_resume("SIGKILL at random steps (per-step noise: PRNG state)", noisy,
                           ["random", "save", "random"]))
    exact = synthetic("synthetic/ldro_exact", ["gin_configs/synthetic/ldro_exact.gin"])
    add(runner.kill_resume("SIGKILL at random steps", exact, ["random", "save"]))
  add(runner.corrupt_checkpoint(base))
  cifar_dir = os.path.join(REPO, "gin_configs", "cifar10_mtl")
  if not args.quick and not args.no_cifar and os.path.isdir(cifar_dir):
    add(runner.kill_resume("SIGKILL at random steps / while saving", cifar10(),
                           ["random", "save", "random"]))
  add(runner.nan("error"))
  add(runner.nan("skip"))
  add(sweep_scenario(runner, kills=1 if args.quick else 2))
  if not args.quick:
    add(sweep_scenario(runner, kills=1, orphan=True))

  table = _table(results)
  total = time.time() - t0
  os.makedirs(args.out, exist_ok=True)
  header = (f"# Fault injection ({'quick' if args.quick else 'full'} run, seed {args.seed})\n\n"
            f"`python -m experiments.faults{' --quick' if args.quick else ''} "
            f"--seed={args.seed}`; {total:.0f} s in all. Every kill is a SIGKILL of "
            "`python -m experiments.train`; the killed run is re-run with the same command "
            "until it finishes and then compared with an uninterrupted run of that command "
            "(final checkpoint arrays, metrics.jsonl and config.gin, bitwise).\n\n")
  fileio.atomic_write_text(os.path.join(args.out, "faults.md"), header + table + "\n")
  fileio.atomic_write_json(os.path.join(args.out, "faults.json"),
                           {"quick": args.quick, "seed": args.seed, "seconds": total,
                            "results": [dataclasses.asdict(r) for r in results]})
  print()
  print(table)
  print(f"\nwrote {os.path.join(args.out, 'faults.md')} ({total:.0f} s); scratch {root}")
  if not args.keep:
    shutil.rmtree(root, ignore_errors=True)
  return 0 if results and all(r.passed for r in results) else 1


if __name__ == "__main__":
  sys.exit(main())
