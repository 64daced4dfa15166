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

Most cases run in this process, where the message is the point
(``inprocess_error_line``: the line the CLI prints for the exception,
``experiments.train.error_line``); a few go through the CLI to check the one
line itself (exit status, nothing else on stderr). Resumed workdirs, damaged run files and
Ctrl-C are in ``tests/test_interrupts.py`` and below.

Runs that import TensorFlow (the image and language-modelling data) also get
TensorFlow's own log lines from its C++ runtime on stderr (absl logging,
which no environment variable silences, and with a record's continuation
lines), and libjpeg's messages for a bad JPEG; those are not ours and are
left out before counting lines.
"""

import os
import re
import subprocess
import sys

import gin
import jax
import jax.numpy as jnp
import optax
import pytest

import ldro
from ldro import train as ldro_train
from experiments import train as train_lib
from experiments.runner import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR_DIR = os.path.join(REPO, "gin_configs", "cifar10_mtl")


def run_train(workdir, *bindings, gin_file=None, timeout=300, flags=()):
  cmd = [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *flags]
  if gin_file:
    cmd.append(f"--gin_file={gin_file}")
  cmd += [f"--gin_bindings={b}" for b in bindings]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                        check=False)


def run_inprocess(workdir, *bindings, gin_file="gin_configs/synthetic/ldro.gin", **kwargs):
  """The runner in this process (no JAX start-up): what the CLI runs, without its main()."""
  gin.clear_config()
  train_lib.parse_gin([gin_file], list(bindings))
  return loop.train_and_evaluate(str(workdir), quiet=True, **kwargs)


# TensorFlow's C++ log lines (absl), e.g. "I0000 00:00:1795617536.480075   10208 port.cc:153] ..."
NATIVE_LOG = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\) is called"
                        r"|[IWEF]\d{4} [\d:.]+\s+\d+ [\w.\-]+:\d+\] )")
# ... and what native libraries print below them: continuation lines of such a
# log record (TensorFlow's "\t [[{{node ...}}]]") and libjpeg's own messages.
NATIVE_MORE = re.compile(r"^(\s|Improper call to JPEG library|Corrupt JPEG data|"
                         r"Premature end of JPEG file|Not a JPEG file)")


def stderr_lines(proc):
  """Our stderr lines: without the native libraries' (see the module docstring)."""
  return [l for l in proc.stderr.splitlines()
          if l.strip() and not NATIVE_LOG.match(l) and not NATIVE_MORE.match(l)]


def assert_error_line(line, *needles):
  assert line.startswith("error: "), line
  for needle in needles:
    assert needle in line, (needle, line)
  return line


def assert_one_error_line(proc, *needles):
  """The CLI exited with status 1 and printed one stderr line naming the problem."""
  lines = stderr_lines(proc)
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
  assert len(lines) == 1, "expected one stderr line, got:\n" + proc.stderr[-3000:]
  return assert_error_line(lines[0], *needles)


def inprocess_error_line(workdir, *bindings, needles=(), **kwargs):
  """The line the CLI would print (``train.error_line``), from a run in this process."""
  with pytest.raises(train_lib.BAD_INPUT_ERRORS) as info:
    run_inprocess(workdir, *bindings, **kwargs)
  return assert_error_line(train_lib.error_line(info.value), *needles)


# The synthetic config (the default) with 3 steps: these fail before training.
STEPS = "train_and_evaluate.num_steps=3"


# Through the CLI: the one line itself (exit status, nothing else on stderr).
@pytest.mark.parametrize("bindings,needles", [
    (["method.name='nope'"], ["ValueError", "unknown method 'nope'", "known methods", "ldro"]),
    (["train_and_evaluate.num_steps="], ["cannot parse", "train_and_evaluate.num_steps="]),
    # One of the value checks (all of them: test_bad_value_names_its_binding).
    (["optax.sgd.learning_rate='fast'"], ["optax.sgd.learning_rate", "'fast'"]),
], ids=["unknown_method", "gin_syntax", "optimizer_lr_type"])
def test_runner_one_line(tmp_path, bindings, needles):
  proc = run_train(str(tmp_path / "w"), STEPS, *bindings)
  assert_one_error_line(proc, *needles)


# In this process: the line the CLI would print names the problem.
@pytest.mark.parametrize("bindings,needles", [
    (["method.hparams={'num_tasks': 5, 'lookahead_lr': 0.1, 'weight_lr': 0.1}"],
     ["num_tasks=5", "11 tasks"]),
    (["method.name='baselined_dro'", "method.hparams={'weight_lr': 0.1}",
      "train_and_evaluate.baseline_losses=[1.0, 2.0]"],
     ["train_and_evaluate.baseline_losses has 2 entries", "11 tasks"]),
    (["train_and_evaluate.nmu_steps=3"], ["train_and_evaluate", "nmu_steps"]),
    (["SyntheticExperiment.nonexistent=1"], ["SyntheticExperiment", "nonexistent"]),
    (["no_such_function.x=1"], ["no_such_function"]),
    (["method.hparams={'lookahead_lr': 0.1, 'bogus': 1}"], ["'ldro'", "bogus"]),
    (["train_and_evaluate.nonfinite='ignore'"], ["nonfinite", "'ignore'"]),
], ids=["task_count", "task_count_baselines", "unknown_param", "unknown_param_experiment",
        "unknown_configurable", "unknown_method_hparam", "bad_policy"])
def test_runner_error_line(tmp_path, bindings, needles):
  inprocess_error_line(tmp_path / "w", STEPS, *bindings, needles=needles)


def test_missing_gin_file(tmp_path):
  inprocess_error_line(tmp_path / "w", gin_file=str(tmp_path / "nope.gin"),
                       needles=["FileNotFoundError", "nope.gin"])


def test_workdir_of_another_config(tmp_path):
  """Even with --allow_config_change, checkpoints of another model are refused clearly."""
  wd = str(tmp_path / "w")
  run_inprocess(wd, "train_and_evaluate.num_steps=2")
  with open(os.path.join(wd, "run_config.json")) as f:
    record = f.read()
  inprocess_error_line(wd, "train_and_evaluate.num_steps=4", "SyntheticExperiment.num_cluster=4",
                       allow_config_change=True,
                       needles=["no checkpoint", "another config",
                                "is not compatible with the stored shape"])
  assert os.path.isdir(os.path.join(wd, "checkpoints", "2"))  # nothing moved or deleted
  with open(os.path.join(wd, "run_config.json")) as f:
    assert f.read() == record  # a run that failed changes no record


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
  gin_file = os.path.join(CIFAR_DIR, "ldro.gin")
  if layout == "missing":  # through the CLI; the others in this process
    line = assert_one_error_line(run_train(str(tmp_path / "w"), f"DATA_DIR='{data}'",
                                           gin_file=gin_file), *needles)
  else:
    line = inprocess_error_line(tmp_path / "w", f"DATA_DIR='{data}'", gin_file=gin_file,
                                needles=needles)
  assert str(data) in line


LM_DIR = os.path.join(REPO, "gin_configs", "multilingual")
LM_CASES = {  # layout -> needles; languages en and yo
    "missing": ["FileNotFoundError", "Multilingual data directory not found"],
    "no_text": ["FileNotFoundError", "Missing train file for language 'en'"],
    "empty_language_file": ["ValueError", "Empty train file for language 'yo'", "yo.train.txt"],
}


def _language_data(root, layout):
  """A data folder for languages en and yo with the bad ``layout``."""
  data = root / layout / "data"
  if layout != "missing":
    data.mkdir(parents=True)
  if layout == "empty_language_file":
    (data / "en.train.txt").write_text("hello world\n", encoding="utf-8")
    (data / "en.test.txt").write_text("hello\n", encoding="utf-8")
    (data / "yo.train.txt").write_text("\n  \n", encoding="utf-8")  # blank lines only
    (data / "yo.test.txt").write_text("bawo ni\n", encoding="utf-8")
  return data


@pytest.mark.skipif(not os.path.isdir(LM_DIR), reason="no multilingual configs")
@pytest.mark.parametrize("layout", list(LM_CASES))
def test_language_data_dir(tmp_path, layout):
  """The empty file through the CLI (TensorFlow's log lines are not ours); the others here."""
  pytest.importorskip("seqio")
  data = _language_data(tmp_path, layout)
  bindings = ["LANGUAGES = ['en', 'yo']", f"DATA_DIR = '{data}'", "CACHE_DIR = None",
              "NUM_STEPS = 2"]
  gin_file = os.path.join(LM_DIR, "ldro.gin")
  if layout == "empty_language_file":
    line = assert_one_error_line(run_train(str(tmp_path / "w"), *bindings, gin_file=gin_file),
                                 *LM_CASES[layout])
  else:
    line = inprocess_error_line(tmp_path / "w", *bindings, gin_file=gin_file,
                                needles=LM_CASES[layout])
  assert str(data) in line


# ------------------------------------------------------------------ values ---

BAD_VALUES = {  # binding(s) -> what the first line of the error must name
    "num_steps_str": (["train_and_evaluate.num_steps='five'"], ["train_and_evaluate.num_steps"]),
    "num_steps_zero": (["train_and_evaluate.num_steps=0"], ["train_and_evaluate.num_steps", ">= 1"]),
    "eval_every_fraction": (["train_and_evaluate.eval_every=2.5"], ["eval_every", "2.5"]),
    "log_every_negative": (["train_and_evaluate.log_every=-1"], ["log_every", "-1"]),
    "checkpoint_every_zero": (["train_and_evaluate.checkpoint_every=0"], ["checkpoint_every"]),
    "keep_checkpoints_bool": (["train_and_evaluate.keep_checkpoints=True"], ["keep_checkpoints"]),
    "seed_str": (["train_and_evaluate.seed='a'"], ["train_and_evaluate.seed", "'a'"]),
    "seed_negative": (["train_and_evaluate.seed=-1"], ["train_and_evaluate.seed", "-1"]),
    "chunk_size_zero": (["train_and_evaluate.chunk_size=0"], ["chunk_size"]),
    "gram_strategy": (["train_and_evaluate.gram_strategy='nope'"], ["gram_strategy", "'nope'"]),
    "mode": (["train_and_evaluate.mode='fast'"], ["train_and_evaluate.mode", "'fast'"]),
    "mesh_shape": (["train_and_evaluate.mesh_shape=(1.5, 1)"], ["mesh_shape", "1.5"]),
    "lr_str": (["optax.sgd.learning_rate='fast'"], ["optax.sgd.learning_rate", "'fast'"]),
    "lr_negative": (["optax.sgd.learning_rate=-0.1"], ["optax.sgd.learning_rate", "-0.1"]),
    "lr_zero": (["optax.sgd.learning_rate=0.0"], ["optax.sgd.learning_rate", "> 0"]),
    "lr_inf": (["optax.sgd.learning_rate=1e999"], ["optax.sgd.learning_rate", "inf"]),
    "momentum": (["optax.sgd.momentum=1.5"], ["optax.sgd.momentum", "1.5"]),
    "adam_b2": (["optimizer.transforms=[@optax.adam()]", "optax.adam.learning_rate=0.1",
                 "optax.adam.b2=-0.9"], ["optax.adam.b2", "-0.9"]),
    "schedule_value": (["optax.sgd.learning_rate=@optax.cosine_decay_schedule()",
                        "optax.cosine_decay_schedule.init_value=-0.1",
                        "optax.cosine_decay_schedule.decay_steps=10"],
                       ["optax.cosine_decay_schedule.init_value", "-0.1"]),
    "schedule_steps": (["optax.sgd.learning_rate=@optax.cosine_decay_schedule()",
                        "optax.cosine_decay_schedule.init_value=0.1",
                        "optax.cosine_decay_schedule.decay_steps='ten'"],
                       ["optax.cosine_decay_schedule.decay_steps", "'ten'"]),
    "method_rate_negative": (["WEIGHT_LR=-0.5"],
                             ["weight_lr", "method.hparams['weight_lr'] = %WEIGHT_LR"]),
    "method_rate_inf": (["WEIGHT_LR=1e999"], ["weight_lr", "inf", "%WEIGHT_LR"]),
    "method_rate_str": (["WEIGHT_LR='fast'"], ["method.hparams['weight_lr'] = %WEIGHT_LR",
                                               "'fast'", "number"]),
    "method_interval_zero": (["UPDATE_EVERY=0"], ["update_every", "%UPDATE_EVERY"]),
    "method_inline_hparam": (["method.hparams={'lookahead_lr': -1.0}"],
                             ["lookahead_lr", "method.hparams['lookahead_lr']"]),
    "experiment_str": (["SyntheticExperiment.spread='x'"], ["SyntheticExperiment.spread", "'x'"]),
    "experiment_fraction": (["SyntheticExperiment.num_cluster=2.5"],
                            ["SyntheticExperiment.num_cluster", "2.5"]),
    "experiment_negative": (["SyntheticExperiment.radius=-1.0"], ["SyntheticExperiment.radius"]),
}


@pytest.mark.parametrize("case", list(BAD_VALUES))
def test_bad_value_names_its_binding(tmp_path, case):
  """Every static value is checked before training; the first line names the gin binding."""
  bindings, needles = BAD_VALUES[case]
  with pytest.raises(ValueError) as info:
    run_inprocess(tmp_path / "w", STEPS, *bindings)
  first = str(info.value).strip().splitlines()[0]
  for needle in needles:
    assert needle in first, (needle, first)
  assert not os.path.exists(tmp_path / "w" / "checkpoints")  # before any training


def test_good_values_still_run(tmp_path):
  """The checks take what was fine: a float step count that is whole, a schedule, adam."""
  records = run_inprocess(tmp_path / "w", "train_and_evaluate.num_steps=2.0",
                          "optimizer.transforms=[@optax.adam()]",
                          "optax.adam.learning_rate=@optax.warmup_cosine_decay_schedule()",
                          "optax.warmup_cosine_decay_schedule.init_value=0.0",
                          "optax.warmup_cosine_decay_schedule.peak_value=0.01",
                          "optax.warmup_cosine_decay_schedule.warmup_steps=1",
                          "optax.warmup_cosine_decay_schedule.decay_steps=2")
  assert records[-1]["step"] == 2


def test_optax_parameter_names_still_checked_by_gin(tmp_path):
  """The optax functions are wrapped for the checks; gin still knows their parameters."""
  with pytest.raises(ValueError, match="optax.sgd.*learnin_rate"):
    run_inprocess(tmp_path / "w", "optax.sgd.learnin_rate=0.1")


# --------------------------------------------------------- resumed workdirs ---


def test_workdir_remembers_its_config(tmp_path):
  """ldro.gin for 2 steps, then ldro_exact.gin in the same workdir: refused, naming both."""
  wd = tmp_path / "w"
  run_inprocess(wd, "train_and_evaluate.num_steps=2",
                invocation={"gin_files": ["gin_configs/synthetic/ldro.gin"], "gin_bindings": []})
  config = (wd / "config.gin").read_text()
  exact = "gin_configs/synthetic/ldro_exact.gin"
  inprocess_error_line(wd, "train_and_evaluate.num_steps=4", gin_file=exact,
                       invocation={"gin_files": [exact],
                                   "gin_bindings": ["train_and_evaluate.num_steps=4"]},
                       needles=[f"workdir {wd} was made with another config",
                                "--gin_file=gin_configs/synthetic/ldro.gin",
                                "this run: --gin_file=gin_configs/synthetic/ldro_exact.gin",
                                "method.name: 'ldro' -> 'ldro_exact'", "--allow_config_change"])
  assert (wd / "config.gin").read_text() == config  # the record of what ran is kept
  assert sorted(os.listdir(wd / "checkpoints")) == ["2"]

  # The step budget is not part of the config: extending the run resumes it.
  records = run_inprocess(wd, "train_and_evaluate.num_steps=4",
                          "train_and_evaluate.log_every=1", "train_and_evaluate.eval_every=1")
  assert [r["step"] for r in records] == [3, 4]

  # On purpose: the old config goes to config_history/, this one is recorded.
  gin.clear_config()
  train_lib.parse_gin(["gin_configs/synthetic/ldro.gin"],
                      ["train_and_evaluate.num_steps=5", "LOOKAHEAD_LR=0.2"])
  with pytest.raises(ValueError, match=r"'lookahead_lr': 0.1.* -> .*'lookahead_lr': 0.2"):
    loop.train_and_evaluate(str(wd), quiet=True)
  records = loop.train_and_evaluate(str(wd), quiet=True, allow_config_change=True)
  assert records[-1]["step"] == 5
  history = os.listdir(wd / "config_history")
  assert any(f.endswith("config.gin") for f in history), history
  assert "'lookahead_lr': 0.2" in (wd / "run_config.json").read_text()
  assert "LOOKAHEAD_LR = 0.2" in (wd / "config.gin").read_text()


def test_damaged_run_record_is_refused(tmp_path):
  wd = tmp_path / "w"
  run_inprocess(wd, "train_and_evaluate.num_steps=1")
  (wd / "run_config.json").write_text("{not json")
  with pytest.raises(ValueError, match=r"run_config.json is damaged"):
    run_inprocess(wd, "train_and_evaluate.num_steps=2")


# -------------------------------------------------------------- data files ---


def _png(path, size=(4, 4), color=0):
  from PIL import Image  # pylint: disable=g-import-not-at-top
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", size, (color, 0, 0)).save(path)


def _image_folder(root, classes=("cat", "dog"), splits=("train", "test")):
  for split in splits:
    for i, c in enumerate(classes):
      for k in range(2):
        _png(root / split / c / f"{k}.png", color=10 * i + k)
  return root


def test_image_class_missing_from_one_split(tmp_path):
  """A copy without test/dog: refused naming the folder (else cat/dog is evaluated on cats)."""
  pytest.importorskip("tensorflow_datasets")
  from ldro.data import images  # pylint: disable=g-import-not-at-top
  root = _image_folder(tmp_path / "img")
  for f in (root / "test" / "dog").iterdir():
    f.unlink()
  with pytest.raises(ValueError, match=r"test/dog' has no images: class 'dog' of task 'cat/dog'"):
    images.load_imagefolder_pair_tasks(root, pairs=[("cat", "dog")], use_cache=False)
  (root / "test" / "dog").rmdir()
  with pytest.raises(ValueError, match=r"test/dog' is missing"):
    images.load_imagefolder_pair_tasks(root, pairs=[("cat", "dog")], use_cache=False)


@pytest.mark.parametrize("damage", ["not_an_image", "truncated_png", "other_size"])
def test_bad_image_named(tmp_path, damage):
  pytest.importorskip("tensorflow_datasets")
  from ldro.data import images  # pylint: disable=g-import-not-at-top
  root = _image_folder(tmp_path / "img")
  bad = root / "test" / "dog" / "1.png"
  if damage == "not_an_image":
    bad.write_text("not an image")
  elif damage == "truncated_png":
    bad.write_bytes(bad.read_bytes()[:40])
  else:
    _png(bad, size=(5, 4))
  with pytest.raises(ValueError) as info:
    images.load_imagefolder_pair_tasks(root, pairs=[("cat", "dog")], use_cache=False)
  assert str(bad) in str(info.value).splitlines()[0]


def test_invalid_utf8_names_file_and_line(tmp_path):
  pytest.importorskip("seqio")
  from ldro.data import text  # pylint: disable=g-import-not-at-top
  (tmp_path / "en.train.txt").write_text("hello world\n", encoding="utf-8")
  (tmp_path / "en.test.txt").write_text("hello\n", encoding="utf-8")
  (tmp_path / "yo.train.txt").write_bytes("bawo ni\n\u1eb9 ku\n".encode() + b"ok \xff\xfe no\n")
  (tmp_path / "yo.test.txt").write_text("bawo ni\n", encoding="utf-8")
  with pytest.raises(ValueError, match=r"Invalid UTF-8 in .*yo\.train\.txt, line 3 \(byte 4"):
    text.register_language_tasks(["en", "yo"], "textfiles", text.default_vocabulary(),
                                 data_dir=str(tmp_path), prefix="test_bad_utf8")


# ------------------------------------------------------------ library level ---


def test_method_for_n_tasks_given_m():
  tx = ldro.ldro_weights(num_tasks=3, lookahead_lr=0.1, weight_lr=0.1)
  params = {"w": jnp.zeros((2,))}
  state = tx.init(params)
  with pytest.raises(ValueError, match=r"task_losses must have shape \(3,\).*\(4,\)"):
    tx.update({"w": jnp.zeros((4, 2))}, state, params, task_losses=jnp.zeros((4,)))
  with pytest.raises(ValueError, match=r"leading task axis of size 3.*\(4, 2\)"):
    tx.update({"w": jnp.zeros((4, 2))}, state, params, task_losses=jnp.zeros((3,)))


def test_parameter_shaped_gradients_name_multisteps():
  """One gradient (parameter-shaped) instead of N per-task ones, e.g. through
  optax.MultiSteps, which accumulates parameter-shaped gradients: the error says so."""
  params = {"w": jnp.ones((4,))}
  tx = optax.MultiSteps(optax.chain(ldro.ldro_weights(3, lookahead_lr=0.1, weight_lr=0.1),
                                    optax.sgd(0.1)), every_k_schedule=2)
  with pytest.raises(ValueError, match=r"shape \(4,\)\. These are shaped like the parameters.*"
                                       r"optax\.MultiSteps"):
    tx.update({"w": jnp.ones((3, 4))}, tx.init(params), params, task_losses=jnp.ones((3,)))


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
