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

Per-host input (``test_per_host_input_*``): the same harness runs this file as
a worker in 2 processes (2 CPU devices each, mesh ``(2, 2)``), on a tiny
generated image folder (multitask CIFAR-10 pairs, tiny CNN) and a tiny text
corpus (3 languages). Each process reads only its part of every batch: the
example ids (images) and input shards (text) of the two processes are
disjoint, their parts make up the 1-process batch, a few training steps give
the 1-process records, split evaluation gives the 1-process metrics, and a run
SIGKILLed after its step-2 checkpoint and resumed by a new 2-process launch
writes exactly the records of the uninterrupted run.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

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


def _wait(procs, timeout=TIMEOUT):
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
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


# ----------------------------------------------------------------------------
# Per-host input: each process reads only its share; evaluation split.
# ----------------------------------------------------------------------------

IMG_PAIRS = [["cat", "dog"], ["bird", "frog"]]
IMG_TRAIN_PER_CLASS = 16  # 32 examples per task = 4 steps of b = 8: one epoch, no repeats
IMG_STEPS = 4
LM_WORDS = {
    "en": "the cat sat on a mat and we read books about rivers".split(),
    "de": "der hund lief schnell durch den park und wir lesen".split(),
    "yo": "mo fe lati lo si oja ni ola pelu awon ore mi".split(),
}
LM_L = 16
MESH = (2, 2)
PER_HOST_TIMEOUT = 600  # a launch's limit (it takes ~1 min of CPU; generous for loaded machines)


def _image_bindings(image_dir, workdir_steps):
  return [f"DATA_DIR = {str(image_dir)!r}", "MODEL = 'tiny'", f"NUM_STEPS = {workdir_steps}",
          "EVAL_EVERY = 2", "train_and_evaluate.log_every = 2",
          "train_and_evaluate.checkpoint_every = 2",
          "ImageClassificationExperiment.batch_size = 16",  # b = 8 per task
          "ImageClassificationExperiment.eval_batch_size = 7",
          f"ImageClassificationExperiment.pairs = {IMG_PAIRS!r}"]


def _image_experiment(image_dir, steps, mesh_shape=MESH):
  from experiments import train as train_lib  # pylint: disable=g-import-not-at-top
  from experiments.families import image  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  train_lib.parse_gin(["gin_configs/cifar10_mtl/ldro.gin"],
                      _image_bindings(image_dir, steps) +
                      [f"train_and_evaluate.mesh_shape = {tuple(mesh_shape)!r}"])
  return image.ImageClassificationExperiment()


def _lm_experiment(corpus, cache_dir, **kw):
  """The tiny LM; its packed rows are cached (shared by the processes and the reference)."""
  from experiments.families import lm  # pylint: disable=g-import-not-at-top
  return lm.LanguageModelingExperiment(languages=list(LM_WORDS), data_dir=str(corpus),
                                       sequence_length=LM_L, eval_rows=5, eval_batch_size=2,
                                       cache_dir=str(cache_dir), **kw)


def _write_image_folder(root):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split, n in (("train", IMG_TRAIN_PER_CLASS), ("test", 5)):
    for name in ("bird", "cat", "dog", "frog"):
      d = root / split / name
      d.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(
            d / f"{i:04d}.jpg", quality=95)


def _write_corpus(root):
  for i, lang in enumerate(LM_WORDS):
    for split, n, seed in (("train", 30, i), ("test", 9, 10 + i)):
      r = np.random.RandomState(seed)
      lines = [" ".join(r.choice(LM_WORDS[lang], r.randint(3, 8))) for _ in range(n)]
      (root / f"{lang}.{split}.txt").write_text("".join(l + "\n" for l in lines), "utf-8")


def _worker(cfg):
  """One of the 2 processes (``python tests/test_multiprocess.py worker CONFIG``)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  from experiments.runner import host_input, loop, sharding  # pylint: disable=g-import-not-at-top
  # A long heartbeat timeout: on a loaded machine a process can go quiet for a while.
  jax.distributed.initialize(f"127.0.0.1:{cfg['port']}", 2, cfg["process_id"],
                             heartbeat_timeout_seconds=600)
  # Gloo sets up its CPU collectives at the first one and gives the other process 30 s to
  # arrive; on a loaded machine process starts can drift apart by more. Meet at a barrier of
  # the coordination service (no such limit) and run a first collective together.
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  distributed.global_state.client.wait_at_barrier(f"ldro_{cfg['phase']}_start", 600_000)
  multihost_utils.sync_global_devices(f"ldro_{cfg['phase']}_gloo")
  pid, out = jax.process_index(), cfg["out"]
  mesh = sharding.make_mesh(MESH)
  result = {}

  def image_run(workdir, kill_at=None):
    exp = _image_experiment(cfg["image_dir"], IMG_STEPS)
    reads, part = {}, exp.train_batch_part

    def recording_part(step, block):
      if step == kill_at:  # SIGKILL once the step-2 checkpoint is final (both processes)
        deadline = time.time() + 60
        while not os.path.isdir(os.path.join(workdir, "checkpoints", "2")) and \
            time.time() < deadline:
          time.sleep(0.2)
        multihost_utils.sync_global_devices("kill")
        os.kill(os.getpid(), signal.SIGKILL)
      reads[int(step)] = {"block": [b.tolist() for b in block],
                          "ids": exp.batcher.batch_part_ids(step, *block).tolist()}
      got = part(step, block)
      np.savez(os.path.join(out, f"img_part{pid}_step{step}.npz"), **got)
      return got

    exp.train_batch_part = recording_part
    records = loop.train_and_evaluate(workdir, experiment=exp, quiet=pid != 0)
    return reads, records

  if cfg["phase"] == "main":
    result["image_reads"], _ = image_run(cfg["workdir_a"])
    # LM: stratified [3 languages, 2 rows] (rows split over 'data' = the processes) and a
    # static mixture of 4 rows; input_shards defaults to gcd(2 processes, 2 or 4) = 2.
    gin.clear_config()
    lm = {}
    for name, kw in (("stratified", dict(rows_per_language=2)),
                     ("mixture", dict(rows_per_language=2, alpha=0.3, batch_size=4))):
      exp = _lm_experiment(cfg["corpus"], cfg["lm_cache"], **kw)
      grouped = exp.alpha is None
      prefix = exp.train_batch_prefix()
      block = sharding.process_block(prefix, mesh, grouped)
      entry = {"input_shards": exp.input_shards, "block": [b.tolist() for b in block]}
      for step in range(3):
        part = exp.train_batch_part(step, block)
        np.savez(os.path.join(out, f"lm_{name}_part{pid}_step{step}.npz"), **part)
        glob_batch = host_input.train_batch(exp, step, mesh, grouped)  # assembled on the mesh
        whole = multihost_utils.process_allgather(glob_batch, tiled=True)
        if pid == 0:
          np.savez(os.path.join(out, f"lm_{name}_global_step{step}.npz"), **whole)
      entry["loaded"] = exp.batcher.rows.loaded  # (language, shard) pairs this process read
      if grouped:
        params = exp.init_params(jax.random.PRNGKey(0))
        entry["eval"] = host_input.evaluate(exp, params)
      lm[name] = entry
    result["lm"] = lm
    try:  # a batch that does not divide over the processes: [N=3, b=1] on 4 devices
      sharding.process_blocks((3, 1), mesh, True)
      result["error"] = None
    except ValueError as e:
      result["error"] = str(e)
    with open(os.path.join(out, f"worker{pid}.json"), "w") as f:
      json.dump(result, f)
    image_run(cfg["workdir_b"], kill_at=3)  # never returns: killed at step 3
    raise AssertionError("not killed")
  # phase 'resume': the killed run resumes from its step-2 checkpoint.
  reads, _ = image_run(cfg["workdir_b"])
  with open(os.path.join(out, f"resume{pid}.json"), "w") as f:
    json.dump({"image_reads": reads}, f)


def _launch_workers(cfg, envs):
  procs = []
  for i in range(2):
    path = os.path.join(cfg["out"], f"cfg{i}_{cfg['phase']}.json")
    with open(path, "w") as f:
      json.dump(dict(cfg, process_id=i), f)
    procs.append(subprocess.Popen([sys.executable, os.path.abspath(__file__), "worker", path],
                                  cwd=ROOT, env=envs[i], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True))
  return procs


def _wait_killed(procs):
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=PER_HOST_TIMEOUT)[0])
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.communicate()
  # Process 0 kills itself; process 1 too (or it may see the coordinator go first).
  assert procs[0].returncode == -signal.SIGKILL, f"rc {procs[0].returncode}:\n{outs[0][-4000:]}"
  assert procs[1].returncode != 0, outs[1][-4000:]
  return outs


@pytest.fixture(scope="module")
def per_host_run(tmp_path_factory):
  """Both launches of the 2-process per-host run, and the 1-process references."""
  pytest.importorskip("seqio")
  tmp = tmp_path_factory.mktemp("per_host")
  image_dir, corpus, out = tmp / "images", tmp / "corpus", tmp / "out"
  corpus.mkdir()
  out.mkdir()
  _write_image_folder(image_dir)
  _write_corpus(corpus)
  cache = tmp / "cache"
  from ldro.data import images as images_lib  # pylint: disable=g-import-not-at-top
  images_lib.load_imagefolder_pair_tasks(image_dir, [tuple(p) for p in IMG_PAIRS],
                                         cache_dir=cache / "ldro" / "imagefolder")
  cfg = {"image_dir": str(image_dir), "corpus": str(corpus), "out": str(out),
         "workdir_a": str(tmp / "img_a"), "workdir_b": str(tmp / "img_b"),
         "lm_cache": str(tmp / "lm_cache")}
  port = _free_port()
  # The decoded-images cache, and a compilation cache: the second run and the resumed
  # launch reuse the first run's executables (the runs' programs are identical).
  extra = {"XDG_CACHE_HOME": str(cache), "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  procs = _launch_workers(dict(cfg, phase="main", port=port), [_env(port, extra)] * 2)
  try:
    refs = _per_host_references(cfg, cache, tmp)  # meanwhile, in this process
  finally:
    outs = _wait_killed(procs)
  port = _free_port()
  procs = _launch_workers(dict(cfg, phase="resume", port=port), [_env(port, extra)] * 2)
  outs_resume = _wait(procs, PER_HOST_TIMEOUT)
  import resource  # pylint: disable=g-import-not-at-top
  cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
  print(f"per-host run: {cpu.ru_utime + cpu.ru_stime:.0f} s CPU in this module's subprocesses")
  workers = []
  for i in range(2):
    with open(out / f"worker{i}.json") as f:
      workers.append(json.load(f))
  return dict(cfg=cfg, refs=refs, workers=workers, outs=outs, outs_resume=outs_resume,
              out=out, tmp=tmp)


def _per_host_references(cfg, cache, tmp):
  """1 process, 1 device: the image run, its batches, and the LM batches (input_shards=2)."""
  from experiments.runner import loop  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  old = os.environ.get("XDG_CACHE_HOME")
  os.environ["XDG_CACHE_HOME"] = str(cache)
  try:
    exp = _image_experiment(cfg["image_dir"], IMG_STEPS, mesh_shape=(1, 1))
    records = loop.train_and_evaluate(str(tmp / "img_ref"), experiment=exp, quiet=True,
                                      mesh_shape=(1, 1))
  finally:
    if old is None:
      del os.environ["XDG_CACHE_HOME"]
    else:
      os.environ["XDG_CACHE_HOME"] = old
  n, b = exp.train_batch_prefix()
  image_batches = [exp.train_batch(s) for s in range(IMG_STEPS)]
  image_ids = [exp.batcher.batch_part_ids(s, np.arange(n), np.arange(b)) for s in range(IMG_STEPS)]
  gin.clear_config()
  lm = {}
  for name, kw in (("stratified", dict(rows_per_language=2)),
                   ("mixture", dict(rows_per_language=2, alpha=0.3, batch_size=4))):
    e = _lm_experiment(cfg["corpus"], cfg["lm_cache"], input_shards=2, **kw)
    lm[name] = {"batches": [e.train_batch(s) for s in range(3)]}
    if name == "stratified":
      lm[name]["eval"] = e.evaluate(e.init_params(jax.random.PRNGKey(0)))
  return dict(image_records=records, image_batches=image_batches, image_ids=image_ids, lm=lm)


def test_per_host_input_images_disjoint_and_exact(per_host_run):
  """Each process reads its own examples; together they make the 1-process batch."""
  refs, workers, out = per_host_run["refs"], per_host_run["workers"], per_host_run["out"]
  reads = [w["image_reads"] for w in workers]
  n, b = refs["image_batches"][0]["label"].shape
  for step in range(IMG_STEPS):
    blocks = [r[str(step)]["block"] for r in reads]
    # Both tasks on each process, half of the per-task examples each (b split over processes).
    assert blocks[0] == [list(range(n)), list(range(b // 2))]
    assert blocks[1] == [list(range(n)), list(range(b // 2, b))]
    ids = [np.asarray(r[str(step)]["ids"]) for r in reads]
    assert not set(ids[0].ravel()) & set(ids[1].ravel())  # disjoint example ids
    np.testing.assert_array_equal(np.concatenate(ids, axis=1), refs["image_ids"][step])
    parts = [np.load(out / f"img_part{p}_step{step}.npz") for p in range(2)]
    for k in ("image", "label"):  # the union of the parts is the 1-process batch
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts], axis=1),
                                    refs["image_batches"][step][k])
  # Over the epoch (4 steps), each process read half of every task's examples.
  seen = [np.concatenate([np.asarray(r[str(s)]["ids"]).ravel() for s in range(IMG_STEPS)])
          for r in reads]
  assert len(set(seen[0])) == len(seen[0]) == 2 * IMG_TRAIN_PER_CLASS * len(IMG_PAIRS) // 2
  assert sorted(np.concatenate(seen)) == list(range(2 * 2 * IMG_TRAIN_PER_CLASS))


def test_per_host_input_training_and_evaluation_match_one_process(per_host_run):
  """Training (4 steps) and split evaluation give the 1-process records to round-off."""
  with open(os.path.join(per_host_run["cfg"]["workdir_a"], "metrics.jsonl")) as f:
    got = [json.loads(l) for l in f]
  want = per_host_run["refs"]["image_records"]
  assert [r["step"] for r in got] == [r["step"] for r in want] == [0, 2, 4]
  for g, w in zip(got, want):
    for k in ("task_weights", "task_accuracy", "task_test_loss", "train_task_losses"):
      if k in w:
        np.testing.assert_allclose(g[k], w[k], rtol=2e-5, atol=2e-6, err_msg=f"{g['step']} {k}")
  assert got[-1]["task_weights"] != got[0]["task_weights"]  # the weights moved
  # The LM's split evaluation (3 languages x 5 rows over 2 processes) equals 1 process.
  ev, ref = per_host_run["workers"][0]["lm"]["stratified"]["eval"], \
      per_host_run["refs"]["lm"]["stratified"]["eval"]
  assert per_host_run["workers"][1]["lm"]["stratified"]["eval"] == ev
  for k in ("task_loss", "task_perplexity"):
    np.testing.assert_allclose(ev[k], ref[k], rtol=1e-6)


def test_per_host_input_lm_reads_only_its_shard(per_host_run):
  """seqio ShardInfo: process p materialises shard p of every language, nothing else."""
  workers, refs, out = per_host_run["workers"], per_host_run["refs"], per_host_run["out"]
  for name, axis in (("stratified", 1), ("mixture", 0)):
    entries = [w["lm"][name] for w in workers]
    assert [e["input_shards"] for e in entries] == [2, 2]
    for p, e in enumerate(entries):
      assert e["loaded"] and all(shard == p for _, shard in e["loaded"]), (name, p, e["loaded"])
    if name == "stratified":  # every language present on both processes, its own shard
      assert [len(e["loaded"]) for e in entries] == [3, 3]
    for step in range(3):
      parts = [np.load(out / f"lm_{name}_part{p}_step{step}.npz") for p in range(2)]
      assembled = np.load(out / f"lm_{name}_global_step{step}.npz")
      want = refs["lm"][name]["batches"][step]
      for k, v in want.items():  # parts -> the 1-process batch (input_shards=2), exactly
        np.testing.assert_array_equal(np.concatenate([p[k] for p in parts], axis=axis), v)
        np.testing.assert_array_equal(assembled[k], v)  # make_array_from_process_local_data


def test_per_host_input_kill_resume_is_bitwise(per_host_run):
  """A 2-process run SIGKILLed at step 3 resumes from step 2 and writes identical records."""
  assert "resumed from checkpoint at step 2" in per_host_run["outs_resume"][0], \
      per_host_run["outs_resume"][0][-3000:]
  with open(os.path.join(per_host_run["cfg"]["workdir_a"], "metrics.jsonl")) as f:
    uninterrupted = [json.loads(l) for l in f]
  with open(os.path.join(per_host_run["cfg"]["workdir_b"], "metrics.jsonl")) as f:
    resumed = [json.loads(l) for l in f]
  assert resumed == uninterrupted  # every float of every record, bit for bit


def test_per_host_batch_that_does_not_divide_is_a_clear_error(per_host_run):
  msg = per_host_run["workers"][0]["error"]
  assert msg is not None and "per-host input" in msg and "b=1" in msg and "N=3" in msg, msg
  assert "docs/scale_out.md" in msg


def test_one_input_shard_equals_the_unsharded_batchers():
  """input_shards = 1 (every single-process run by default): the batches of before."""
  text = pytest.importorskip("ldro.data.text")
  from ldro.data import text_batchers  # pylint: disable=g-import-not-at-top
  from ldro.data import text_shards  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  rows = {lang: {k: rng.integers(0, 50, (r, 4)).astype(
      np.float32 if k == "decoder_loss_weights" else np.int32) for k in text.FEATURES}
          for lang, r in (("a", 5), ("b", 9), ("c", 3))}
  one = text_shards.ShardedRows.from_arrays({l: [r] for l, r in rows.items()})
  pairs = [(text_batchers.StratifiedBatcher(rows, 2, seed=3),
            text_shards.ShardedStratifiedBatcher(one, 2, seed=3)),
           (text_batchers.MixtureBatcher(rows, [0.2, 0.5, 0.3], 6, seed=1, block_steps=7),
            text_shards.ShardedMixtureBatcher(one, [0.2, 0.5, 0.3], 6, seed=1, block_steps=7))]
  for old, new in pairs:
    for step in (0, 1, 6, 7, 20):
      a, b = old.batch(step), new.batch(step)
      assert set(a) == set(b)
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=f"{type(old).__name__} {step} {k}")


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "worker":
  with open(sys.argv[2]) as f:
    _worker(json.load(f))
