"""Bad input ends with ONE clear line.

``python -m experiments.train`` (run as a subprocess) must exit with status 1
and print exactly one non-empty stderr line, ``error: <Type>: <message>``,
naming the problem: unknown method, task count not matching the data (method
hyper-parameters, per-task baselines, class pairs absent from the images), a
missing data directory or one without images / language files, an empty
language file, a binding of a parameter that does not exist, a gin syntax
error, a workdir written with another config. The library raises
``ValueError`` naming the problem for shape mismatches; the language-data
pipeline names the language of an empty file.

Runs that import TensorFlow (the language-modelling data) also get
TensorFlow's own import-time log lines from its C++ runtime on stderr (absl
logging, which no environment variable silences); those are not ours and are
left out before counting lines.
"""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

import ldro
from ldro import train as ldro_train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_DIR = os.path.join(REPO, "gin_configs", "cifar10_mtl")


def run_train(workdir, *bindings, gin_file=None, timeout=300):
  cmd = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}"]
  if gin_file:
    cmd.append(f"--gin_file={gin_file}")
  cmd += [f"--gin_bindings={b}" for b in bindings]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        check=False)


# TensorFlow's C++ log lines (absl), e.g. "I0000 00:00:1795617536.480075   10208 port.cc:153] ..."
NATIVE_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
                        r"|[IWEF]\d{4} [\d:.]+\s+\d+ [\w.\-]+:\d+\] )")


def assert_one_error_line(proc, *needles):
  lines = [l for l in proc.stderr.splitlines() if l.strip() and not NATIVE_LOG.match(l)]
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
  assert len(lines) == 1, "expected one stderr line, got:\n" + proc.stderr[-3000:]
  line = lines[0]
  assert line.startswith("error: "), line
  for needle in needles:
    assert needle in line, (needle, line)
  return line


# The synthetic config (the default) with 3 steps: these fail before training.
STEPS = "train_and_evaluate.num_steps=3"


@pytest.mark.parametrize("bindings,needles", [
    (["method.name='nope'"], ["ValueError", "unknown method 'nope'", "known methods", "ldro"]),
    (["method.hparams={'num_tasks': 5, 'lookahead_lr': 0.1, 'weight_lr': 0.1}"],
     ["num_tasks=5", "11 tasks"]),
    (["method.name='baselined_dro'", "method.hparams={'weight_lr': 0.1}",
      "train_and_evaluate.baseline_losses=[1.0, 2.0]"],
     ["train_and_evaluate.baseline_losses has 2 entries", "11 tasks"]),
    (["train_and_evaluate.nmu_steps=3"], ["train_and_evaluate", "nmu_steps"]),
    (["SyntheticExperiment.nonexistent=1"], ["SyntheticExperiment", "nonexistent"]),
    (["no_such_function.x=1"], ["no_such_function"]),
    (["method.hparams={'lookahead_lr': 0.1, 'bogus': 1}"], ["'ldro'", "bogus"]),
    (["train_and_evaluate.num_steps="], ["cannot parse", "train_and_evaluate.num_steps="]),
    (["train_and_evaluate.nonfinite='ignore'"], ["nonfinite", "'ignore'"]),
], ids=["unknown_method", "task_count", "task_count_baselines", "unknown_param", "unknown_param_experiment",
        "unknown_configurable", "unknown_method_hparam", "gin_syntax", "bad_policy"])
def test_runner_one_line(tmp_path, bindings, needles):
  proc = run_train(str(tmp_path / "w"), STEPS, *bindings)
  assert_one_error_line(proc, *needles)


def test_missing_gin_file(tmp_path):
  proc = run_train(str(tmp_path / "w"), gin_file=str(tmp_path / "nope.gin"))
  assert_one_error_line(proc, "FileNotFoundError", "nope.gin")


def test_workdir_of_another_config(tmp_path):
  """Resuming a workdir written with another model/task count is refused clearly."""
  wd = str(tmp_path / "w")
  assert run_train(wd, "train_and_evaluate.num_steps=2").returncode == 0
  proc = run_train(wd, "train_and_evaluate.num_steps=4", "SyntheticExperiment.num_cluster=4")
  assert_one_error_line(proc, "no checkpoint", "another config",
                        "is not compatible with the stored shape")
  assert os.path.isdir(os.path.join(wd, "checkpoints", "2"))  # nothing moved or deleted


@pytest.mark.skipif(not os.path.isdir(CIFAR_DIR), reason="no cifar10_mtl configs")
@pytest.mark.parametrize("layout,needles", [
    ("missing", ["FileNotFoundError", "data directory not found", "data_dir"]),
    ("empty", ["train", "missing"]),
    ("no_images", ["No images", "train"]),
    # The config's tasks (class pairs) do not match the data: no 'dog' folder.
    ("other_classes", ["ValueError", "['dog']", "('cat', 'dog')", "not found",
                       "available classes: ['cat']"]),
])
def test_image_data_dir(tmp_path, layout, needles):
  data = tmp_path / "images"
  if layout == "empty":
    data.mkdir()
  elif layout in ("no_images", "other_classes"):
    name = "notes.txt" if layout == "no_images" else "0001.png"  # never decoded
    for split in ("train", "test"):
      (data / split / "cat").mkdir(parents=True)
      (data / split / "cat" / name).write_text("not an image")
  proc = run_train(str(tmp_path / "w"), f"DATA_DIR='{data}'",
                   gin_file=os.path.join(CIFAR_DIR, "ldro.gin"))
  line = assert_one_error_line(proc, *needles)
  assert str(data) in line


LM_DIR = os.path.join(REPO, "gin_configs", "multilingual")
LM_CASES = {  # layout -> needles; languages en and yo
    "missing": ["FileNotFoundError", "Multilingual data directory not found"],
    "no_text": ["FileNotFoundError", "Missing train file for language 'en'"],
    "empty_language_file": ["ValueError", "Empty train file for language 'yo'", "yo.train.txt"],
}


@pytest.fixture(scope="module")
def lm_runs(tmp_path_factory):
  """The CLI on each bad language-data layout, run in parallel (TensorFlow imports are slow)."""
  pytest.importorskip("seqio")
  tmp = tmp_path_factory.mktemp("lm_bad")
  procs = {}
  for layout in LM_CASES:
    data = tmp / layout / "data"
    if layout != "missing":
      data.mkdir(parents=True)
    if layout == "empty_language_file":
      (data / "en.train.txt").write_text("hello world\n", encoding="utf-8")
      (data / "en.test.txt").write_text("hello\n", encoding="utf-8")
      (data / "yo.train.txt").write_text("\n  \n", encoding="utf-8")  # blank lines only
      (data / "yo.test.txt").write_text("bawo ni\n", encoding="utf-8")
    cmd = [sys.executable, "-m", "experiments.train", f"--workdir={tmp / layout / 'w'}",
           f"--gin_file={os.path.join(LM_DIR, 'ldro.gin')}",
           "--gin_bindings=LANGUAGES = ['en', 'yo']", f"--gin_bindings=DATA_DIR = '{data}'",
           "--gin_bindings=CACHE_DIR = None", "--gin_bindings=NUM_STEPS = 2"]
    procs[layout] = (subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True), data)
  out = {}
  try:
    for layout, (p, data) in procs.items():
      stdout, stderr = p.communicate(timeout=300)
      out[layout] = (subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr), data)
  finally:
    for p, _ in procs.values():
      if p.poll() is None:
        p.kill()
        p.communicate()
  return out


@pytest.mark.skipif(not os.path.isdir(LM_DIR), reason="no multilingual configs")
@pytest.mark.parametrize("layout", list(LM_CASES))
def test_language_data_dir(lm_runs, layout):
  proc, data = lm_runs[layout]
  line = assert_one_error_line(proc, *LM_CASES[layout])
  assert str(data) in line


# ------------------------------------------------------------ library level ---


def test_method_for_n_tasks_given_m():
  tx = ldro.ldro_weights(num_tasks=3, lookahead_lr=0.1, weight_lr=0.1)
  params = {"w": jnp.zeros((2,))}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"task_losses must have shape \(3,\).*\(4,\)"):
    tx.update({"w": jnp.zeros((4, 2))}, state, params, task_losses=jnp.zeros((4,)))
  with pytest.raises(ValueError, match=r"leading task axis of size 3.*\(4, 2\)"):
    tx.update({"w": jnp.zeros((4, 2))}, state, params, task_losses=jnp.zeros((3,)))


def test_train_step_batch_with_other_task_count():
  """A jitted step built for N tasks, fed a batch with M: ValueError naming both."""
  tx = optax.chain(ldro.ldro_weights(num_tasks=3, lookahead_lr=0.1, weight_lr=0.1),
                   optax.sgd(0.1))
  loss = lambda p, b, rng: (jnp.sum((p["w"] - b) ** 2), {})
  params = {"w": jnp.zeros((2,))}
  state = ldro_train.init_train_state(params, tx, jax.random.PRNGKey(0))
  step = jax.jit(ldro_train.make_train_step(loss, tx))
  step(state, jnp.zeros((3, 2)))  # fine
  with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
    step(state, jnp.zeros((4, 2)))


def test_solver_shape_errors():
  with pytest.raises(ValueError, match="square"):
    ldro.maxent_nash(jnp.zeros((2, 3)))
  with pytest.raises(ValueError, match=r"w must have shape \(2,\)"):
    ldro.update_weights(jnp.zeros((2, 2)), jnp.ones((3,)) / 3, 0.1)
  with pytest.raises(ValueError, match=r"task_losses must be \[N\] and gram \[N, N\]"):
    ldro.lookahead_matrix(jnp.zeros((3,)), jnp.zeros((2, 2)), 0.1)
  with pytest.raises(ValueError, match="unknown method 'nope'"):
    ldro.get_method("nope", num_tasks=2)


@pytest.mark.parametrize("content", ["", "\n  \n\n"], ids=["empty", "blank_lines"])
def test_empty_language_file(tmp_path, content):
  pytest.importorskip("seqio")
  from ldro.data import text  # pylint: disable=g-import-not-at-top
  if not hasattr(text, "register_language_tasks"):
    pytest.skip("ldro.data.text has no register_language_tasks")
  (tmp_path / "en.train.txt").write_text("hello world\n", encoding="utf-8")
  (tmp_path / "en.test.txt").write_text("hello\n", encoding="utf-8")
  (tmp_path / "yo.train.txt").write_text(content, encoding="utf-8")
  (tmp_path / "yo.test.txt").write_text("bawo ni\n", encoding="utf-8")
  with pytest.raises(ValueError, match=r"Empty train file for language 'yo'"):
    text.register_language_tasks(["en", "yo"], "textfiles", text.default_vocabulary(),
                                 data_dir=str(tmp_path), prefix="test_bad_input")
  with pytest.raises(FileNotFoundError, match="not found"):
    text.register_language_tasks(["en"], "textfiles", text.default_vocabulary(),
                                 data_dir=str(tmp_path / "missing"), prefix="test_bad_input")
