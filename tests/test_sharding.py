"""Scale-out: a run on 8 (simulated) devices equals the run on 1 device.

Data parallel ``(8, 1)`` and data x FSDP ``(2, 4)`` (L-DRO), ``(4, 2)`` (L-DRO
in lean mode, group DRO with a batch split over tasks x examples), data
parallel ``(8, 1)`` (group DRO, the baseline), and full
FSDP ``(1, 8)`` from the CLI with ``gin_configs/mesh/fsdp.gin``, on the toy MLP
experiment: task weights, per-task losses, interaction matrix and parameters
agree with the 1-device run to float tolerance. When this process has fewer than 8 devices
the multi-device runs happen in a subprocess with
``--xla_force_host_platform_device_count=8``; the CLI with a
``gin_configs/mesh`` file always runs in a subprocess.
"""

import json
import os
import subprocess
import sys
import time

import gin
import jax
import numpy as np
import pytest
from jax.sharding import AbstractMesh, PartitionSpec as P

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_DEVICES = 8
STEPS = 4

# name -> (gin config in gin_configs/toy, train mode, reference case or None (run on 1 device),
#          [(mesh_shape, min_shard_size)], gin bindings). Lean mode refreshes the interaction
# matrix every step in ldro.gin, so it must give the Jacobian-mode run. With 12 examples per
# task the (4, 2) mesh splits the batch over tasks ('data') and examples ('fsdp'). The CLI
# test adds full FSDP, (1, 8).
CASES = {
    "ldro": ("ldro.gin", "jacobian", None, [((8, 1), 1024), ((2, 4), 1)], []),
    "ldro_lean": ("ldro.gin", "lean", "ldro", [((4, 2), 1024)], []),
    "dro": ("dro.gin", "jacobian", None, [((4, 2), 1)], ["ToyMLPExperiment.batch_per_task = 12"]),
    "dro_dp": ("dro.gin", "jacobian", None, [((8, 1), 1024)], []),
}


def _env(num_devices):
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={num_devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _run(case, mesh_shape, min_shard_size):
  """STEPS jitted steps as the runner does them (same config, seeds); the trajectory."""
  import optax  # pylint: disable=g-import-not-at-top
  from ldro import train as ldro_train  # pylint: disable=g-import-not-at-top
  from experiments import train as train_lib  # pylint: disable=g-import-not-at-top
  from experiments.families import toy  # pylint: disable=g-import-not-at-top
  from experiments.runner import configurables, sharding  # pylint: disable=g-import-not-at-top

  config, mode, _, _, bindings = CASES[case]
  gin.clear_config()  # also run as a script (the subprocess cases), outside the fixtures
  train_lib.parse_gin([f"gin_configs/toy/{config}"], bindings)
  exp = toy.ToyMLPExperiment()
  tx = optax.chain(configurables.method(num_tasks=exp.num_tasks), *configurables.optimizer())
  gin.clear_config()
  mesh = sharding.make_mesh(mesh_shape)
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(0))  # as the runner (seed 0)
  state = ldro_train.init_train_state(exp.init_params(init_rng), tx, train_rng)
  shardings = sharding.state_shardings(state, mesh, min_shard_size=min_shard_size)
  state = jax.device_put(state, shardings)
  step = jax.jit(ldro_train.make_train_step(exp.task_loss, tx, mode=mode,
                                            param_shardings=shardings.params),
                 in_shardings=(shardings, None),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  weights, losses = [], []
  for t in range(STEPS):
    batch = sharding.shard_batch(exp.train_batch(t), mesh)
    state, metrics = step(state, batch)
    weights.append(np.asarray(metrics["task_weights"]))
    losses.append(np.asarray(metrics["task_losses"]))
  leaves = jax.tree_util.tree_leaves(jax.device_get(state.params))
  specs = jax.tree_util.tree_map(lambda s: str(s.spec), shardings)
  sharded = [k for k, v in jax.tree_util.tree_leaves_with_path(specs) if "fsdp" in v]
  return {
      "weights": np.stack(weights), "losses": np.stack(losses),
      "params": np.concatenate([np.ravel(l) for l in leaves]),
      "weighting_state": np.asarray(state.opt_state[0].gram),
      "weights_spec": np.asarray(str(state.opt_state[0].task_weights.sharding.spec)),
      "num_fsdp_sharded": np.asarray(len(sharded)),
      "kernel_spec": np.asarray(str(state.params["dense_0"]["kernel"].sharding.spec)),
      "batch_spec": np.asarray(str(batch["x"].sharding.spec)),
  }


def compute_all() -> dict:
  """Every case on 1 device and on its meshes (needs >= 8 devices)."""
  assert jax.device_count() >= NUM_DEVICES, jax.device_count()
  out = {}
  for case, (_, _, ref, meshes, _) in CASES.items():
    for key, mesh, min_size in [("ref", (1, 1), 1024)] * (ref is None) + [
        (f"{m[0]}x{m[1]}", m, s) for m, s in meshes]:
      for k, v in _run(case, mesh, min_size).items():
        out[f"{case}/{key}/{k}"] = v
  return out


def _cli_command(workdir):
  return [sys.executable, "-m", "experiments.train",
          "--gin_file=gin_configs/toy/ldro.gin", "--gin_file=gin_configs/mesh/fsdp.gin",
          "--gin_bindings=train_and_evaluate.num_steps = 4",
          "--gin_bindings=train_and_evaluate.eval_every = 2",
          "--gin_bindings=ToyMLPExperiment.report_params = True",
          f"--workdir={workdir}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Starts the CLI run (subprocess) and computes every case (here or in a subprocess)."""
  tmp = tmp_path_factory.mktemp("sharding")
  t0 = time.time()
  cli = subprocess.Popen(_cli_command(tmp / "cli"), cwd=ROOT, env=_env(NUM_DEVICES),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  try:
    if jax.device_count() >= NUM_DEVICES:
      results = compute_all()
    else:
      path = tmp / "results.npz"
      proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(path)], cwd=ROOT,
                            env=_env(NUM_DEVICES), capture_output=True, text=True, timeout=300)
      assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
      with np.load(path) as f:
        results = {k: f[k] for k in f.files}
    cli_out, _ = cli.communicate(timeout=300)
  finally:
    if cli.poll() is None:
      cli.kill()
      cli.communicate()
  print(f"multi-device runs took {time.time() - t0:.1f}s")
  return {"results": results, "cli_rc": cli.returncode, "cli_out": cli_out,
          "cli_workdir": tmp / "cli", "tmp": tmp}


PAIRS = [(case, f"{m[0]}x{m[1]}") for case, (_, _, _, meshes, _) in CASES.items() for m, _ in meshes]



@pytest.mark.parametrize("case,mesh", PAIRS)
def test_same_run_as_one_device(runs, case, mesh):
  r = runs["results"]
  ref, got = f"{CASES[case][2] or case}/ref/", f"{case}/{mesh}/"
  for k in ("weights", "losses", "params", "weighting_state"):
    np.testing.assert_allclose(r[got + k], r[ref + k], rtol=2e-5, atol=2e-6, err_msg=k)
  # The weighting did something (not uniform), so the comparison means something.
  assert np.abs(r[ref + "weights"][-1] - 0.25).max() > 1e-2
  # Task weights replicated; the big kernel FSDP-sharded when there is an fsdp axis.
  assert str(r[got + "weights_spec"]) == str(P())
  if case == "dro":
    assert str(r[got + "batch_spec"]) == str(P("data", "fsdp", None))
  elif case in ("ldro", "dro_dp"):
    assert str(r[got + "batch_spec"]) == str(P(None, ("data", "fsdp"), None))
  fsdp = int(mesh.split("x")[1])
  if fsdp > 1:
    assert "fsdp" in str(r[got + "kernel_spec"])
    assert int(r[got + "num_fsdp_sharded"]) >= 2  # params and momentum
  else:
    assert int(r[got + "num_fsdp_sharded"]) == 0


def test_cli_with_mesh_gin_matches_one_device(runs):
  """``python -m experiments.train ... --gin_file=gin_configs/mesh/fsdp.gin`` on 8 devices."""
  assert runs["cli_rc"] == 0, runs["cli_out"][-3000:]
  with open(runs["cli_workdir"] / "metrics.jsonl") as f:
    records = [json.loads(l) for l in f]
  config = (runs["cli_workdir"] / "config.gin").read_text()
  assert "train_and_evaluate.mesh_shape = (1, -1)" in config
  assert [r["step"] for r in records] == [0, 2, 4]
  ref = {k: v for k, v in runs["results"].items() if k.startswith("ldro/ref/")}
  tol = dict(rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(records[1]["task_weights"], ref["ldro/ref/weights"][1], **tol)
  np.testing.assert_allclose(records[2]["task_weights"], ref["ldro/ref/weights"][3], **tol)
  np.testing.assert_allclose(records[2]["train_task_losses"], ref["ldro/ref/losses"][3], **tol)
  np.testing.assert_allclose(records[2]["params"], ref["ldro/ref/params"], **tol)


# ---------------------------------------------------------------------------
# Specs (no devices needed).
# ---------------------------------------------------------------------------


def test_param_spec():
  from experiments.runner import sharding  # pylint: disable=g-import-not-at-top
  assert sharding.param_spec((64, 128), 4) == P(None, "fsdp")
  assert sharding.param_spec((128, 64), 4) == P("fsdp", None)
  assert sharding.param_spec((130, 64), 4) == P(None, "fsdp")  # largest divisible axis
  assert sharding.param_spec((130, 63), 4) == P()  # none divisible
  assert sharding.param_spec((64,), 4) == P()  # small: replicated
  assert sharding.param_spec((64,), 4, min_shard_size=1) == P("fsdp")
  assert sharding.param_spec((), 4, min_shard_size=1) == P()
  assert sharding.param_spec((64, 128), 1) == P()


def test_batch_spec_fallbacks():
  from experiments.runner import sharding  # pylint: disable=g-import-not-at-top
  mesh = AbstractMesh((4, 2), ("data", "fsdp"))
  both = ("data", "fsdp")
  assert sharding.batch_spec((4, 16, 3), mesh) == P(None, both, None)  # per-task axis b
  assert sharding.batch_spec((8, 6), mesh) == P(both, None)  # b % 8 != 0: task axis
  assert sharding.batch_spec((4, 12, 3), mesh) == P("data", "fsdp", None)  # both axes
  assert sharding.batch_spec((3, 4), mesh) == P(None, "data")  # 4 devices of 8
  assert sharding.batch_spec((3, 6), mesh) == P(None, "fsdp")
  assert sharding.batch_spec((3, 5), mesh) == P()  # nothing divisible: replicated
  assert sharding.batch_spec((), mesh) == P()
  assert sharding.batch_spec((3,), mesh) == P()
  assert sharding.batch_spec((4,), mesh) == P("data")
  assert sharding.batch_spec((16, 3), mesh, task_grouped=False) == P(both, None)
  assert sharding.batch_spec((4, 16), mesh, task_grouped=False) == P("data", None)
  assert sharding.batch_spec((20, 6), AbstractMesh((8, 1), ("data", "fsdp"))) == P()
  assert sharding.batch_spec((4, 16), AbstractMesh((1, 1), ("data", "fsdp"))) == P()


def test_state_shardings_replicate_the_weighting_state():
  import optax  # pylint: disable=g-import-not-at-top
  import ldro  # pylint: disable=g-import-not-at-top
  from ldro import train as ldro_train  # pylint: disable=g-import-not-at-top
  from experiments.families import toy  # pylint: disable=g-import-not-at-top
  from experiments.runner import sharding  # pylint: disable=g-import-not-at-top
  exp = toy.ToyMLPExperiment()  # 4 tasks: the head bias [4] is shaped like the task weights
  tx = optax.chain(ldro.get_method("ldro", num_tasks=4, lookahead_lr=0.1), optax.adam(1e-3))
  state = jax.eval_shape(lambda: ldro_train.init_train_state(
      exp.init_params(jax.random.PRNGKey(0)), tx, jax.random.PRNGKey(1)))
  specs = jax.tree_util.tree_map(
      lambda s: s.spec,
      sharding.state_shardings(state, AbstractMesh((2, 4), ("data", "fsdp")), min_shard_size=1))
  assert specs.params["head"]["bias"] == P("fsdp")
  assert specs.opt_state[1][0].mu["head"]["bias"] == P("fsdp")
  assert specs.opt_state[1][0].nu["dense_0"]["kernel"] == specs.params["dense_0"]["kernel"]
  assert all(s == P() for s in jax.tree_util.tree_leaves(specs.opt_state[0]))
  assert specs.rng == P() and specs.step == P()


def test_local_indices():
  from experiments.runner import sharding  # pylint: disable=g-import-not-at-top
  s = slice
  # Two devices of a process hold b-slices 0:4 and 4:8 of a [4, 16] leaf.
  idx = sharding._local_indices([(s(None), s(0, 4)), (s(None), s(4, 8))], (4, 16))  # pylint: disable=protected-access
  assert idx == (s(0, 4), s(0, 8))
  # Non-contiguous (e.g. a topology-aware device order): sorted index array.
  idx = sharding._local_indices([(s(8, 12),), (s(0, 4),)], (16,))  # pylint: disable=protected-access
  np.testing.assert_array_equal(idx[0], list(range(4)) + list(range(8, 12)))
  # Replicated over the process's devices.
  assert sharding._local_indices([(s(None),), (s(None),)], (5,)) == (s(0, 5),)  # pylint: disable=protected-access


def test_mesh_shape_errors():
  from experiments.runner import sharding  # pylint: disable=g-import-not-at-top
  n = jax.device_count()
  with pytest.raises(ValueError, match="needs"):
    sharding.make_mesh((n + 1, 1))
  with pytest.raises(ValueError, match="2 entries"):
    sharding.make_mesh((n,))
  with pytest.raises(ValueError, match="at most one"):
    sharding.make_mesh((-1, -1))
  mesh = sharding.make_mesh((1, -1))
  assert mesh.shape["fsdp"] == n and mesh.axis_names == ("data", "fsdp")


if __name__ == "__main__":  # worker: python tests/test_sharding.py OUT.npz (>= 8 devices)
  np.savez(sys.argv[1], **compute_all())
