"""Multi-host: two processes on 127.0.0.1 train like one process.

``python -m experiments.train`` on the toy MLP experiment, 2 processes with 2
CPU devices each (gloo collectives, JAX's CPU default):

1. explicit ``--coordinator_address/--num_processes/--process_id``, mesh
   ``(2, 2)`` (data across the processes, FSDP inside), 3 steps;
2. ``--multihost`` (cluster auto-detection, here a fake SLURM environment),
   FSDP over all 4 devices ``(1, 4)``: resumes from the orbax checkpoint
   written by the two processes (restored onto another mesh) up to step 5.

Process 0 alone writes ``metrics.jsonl``; its records (task weights, losses,
parameters) must match a single-process, single-device run.
"""

import json
import os
import socket
import subprocess
import sys

import gin
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT = 150
COMMON = ["--gin_file=gin_configs/toy/ldro.gin",
          "--gin_bindings=train_and_evaluate.eval_every = 1",
          "--gin_bindings=train_and_evaluate.log_every = 1",
          "--gin_bindings=ToyMLPExperiment.report_params = True"]


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(port: int, extra=None) -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env.update({
      "XLA_FLAGS": " ".join(flags + ["--xla_force_host_platform_device_count=2"]),
      "JAX_PLATFORMS": "cpu",
      "JAX_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",  # not all interfaces
      "PYTHONPATH": ROOT + os.pathsep + env.get("PYTHONPATH", ""),
  })
  for k in [k for k in env if k.startswith("SLURM_") or k.startswith("OMPI_")]:
    del env[k]
  env.update(extra or {})
  return env


def _launch(workdir, per_process_args, per_process_env):
  procs = [subprocess.Popen([sys.executable, "-m", "experiments.train", *COMMON,
                             f"--workdir={workdir}", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
           for args, env in zip(per_process_args, per_process_env)]
  return procs


def _wait(procs):
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=TIMEOUT)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  for i, (p, out) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {i} failed (rc {p.returncode}):\n{out[-4000:]}"
  return outs


def _single_process_reference(workdir, num_steps):
  from experiments import train as train_lib  # pylint: disable=g-import-not-at-top
  from experiments.runner import loop  # pylint: disable=g-import-not-at-top
  train_lib.parse_gin(
      ["gin_configs/toy/ldro.gin"],
      [b.split("=", 1)[1] for b in COMMON[1:]] +
      [f"train_and_evaluate.num_steps = {num_steps}", "train_and_evaluate.mesh_shape = (1, 1)"])
  return loop.train_and_evaluate(str(workdir), quiet=True)


def test_two_processes_match_one(tmp_path):
  workdir = tmp_path / "mp"
  # 1. Explicit coordinator flags, data x fsdp = (2, 2), 3 steps.
  port = _free_port()
  procs = _launch(
      workdir,
      [[f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
        "--gin_bindings=train_and_evaluate.num_steps = 3",
        "--gin_bindings=train_and_evaluate.mesh_shape = (2, 2)"] for i in range(2)],
      [_env(port)] * 2)
  try:
    reference = _single_process_reference(tmp_path / "one", 5)  # meanwhile, in this process
  finally:
    outs = _wait(procs)
  assert "final (step 3)" in outs[0] and "final (step" not in outs[1]  # process 0 reports
  assert os.path.isdir(workdir / "checkpoints" / "3")

  # 2. --multihost (environment defaults: a fake 2-task SLURM job step), FSDP over all 4
  #    devices of both processes; resumes from step 3.
  port = _free_port()
  slurm = lambda i: {"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "127.0.0.1",
                     "SLURM_NTASKS": "2", "SLURM_PROCID": str(i), "SLURM_LOCALID": str(i),
                     "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}"}
  procs = _launch(workdir,
                  [["--multihost", "--gin_file=gin_configs/mesh/fsdp.gin",
                    "--gin_bindings=train_and_evaluate.num_steps = 5"]] * 2,
                  [_env(port, slurm(i)) for i in range(2)])
  outs = _wait(procs)
  assert "resumed from checkpoint at step 3" in outs[0], outs[0][-3000:]

  with open(workdir / "metrics.jsonl") as f:
    records = [json.loads(l) for l in f]
  assert [r["step"] for r in records] == list(range(6))  # one writer, no duplicates
  assert [r["step"] for r in reference] == list(range(6))
  tol = dict(rtol=2e-5, atol=2e-6)
  for got, want in zip(records, reference):
    for k in ("task_weights", "task_loss", "params"):
      np.testing.assert_allclose(got[k], want[k], err_msg=f"step {got['step']}: {k}", **tol)
    if "train_task_losses" in want:
      np.testing.assert_allclose(got["train_task_losses"], want["train_task_losses"], **tol)
  assert np.abs(np.asarray(records[-1]["task_weights"]) - 0.25).max() > 1e-2


def test_distributed_flag_errors():
  from experiments.runner import sharding  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="needs --num_processes"):
    sharding.initialize_distributed("127.0.0.1:1", None, 0)
  with pytest.raises(ValueError, match="need --coordinator_address"):
    sharding.initialize_distributed(None, 2, 0)
