"""Tests for experiments.image_experiment and the CIFAR gin configs (offline, small)."""

import glob
import json
import os

import gin
import jax
import numpy as np
import pytest

from experiments.families import image as image_experiment
from experiments.runner import loop
from experiments.runner import paths
from experiments import sweep
from experiments import train as train_lib  # registers train_and_evaluate with gin

REPO = paths.repo_root()
PIL_Image = pytest.importorskip("PIL.Image")


def _q(name):
  return gin.query_parameter(name)


# ------------------------------------------------------------------ configs


def test_every_cifar_gin_file_parses(gin_config):
  files = sorted(glob.glob(os.path.join(REPO, "gin_configs", "cifar100", "*.gin")) +
                 glob.glob(os.path.join(REPO, "gin_configs", "cifar10_mtl", "*.gin")))
  assert len(files) >= 20
  for path in files:
    rel = os.path.relpath(path, REPO)
    d = os.path.dirname(rel)
    name = os.path.basename(rel)
    if name == "base.gin":
      gin_config([rel], ["METHOD = 'equal'"])
    elif name == "large_cnn.gin":  # an add-on: after a method file
      gin_config([f"{d}/static.gin", rel])
      assert _q("%MODEL") == "large"
    else:
      gin_config([rel])
      assert _q("%METHOD") in {"equal", "dro", "ldro", "pcgrad", "avg_max", "rlw", "rgw"}


def test_cifar100_configs_hold_the_paper_settings(gin_config):
  gin_config(["gin_configs/cifar100/static.gin"])
  assert _q("ImageClassificationExperiment.dataset") == "cifar100"
  assert _q("%MODEL") == "small"
  assert _q("ImageClassificationExperiment.batch_size") == 128
  assert _q("optax.sgd.learning_rate") == 0.025
  assert _q("optax.sgd.momentum") == 0.9
  assert _q("optax.sgd.nesterov") is True
  assert _q("%METHOD") == "equal" and _q("%MODE") is None  # the method's preferred mode:
  assert loop.method_mode("equal", None) == "lean"
  gin_config(["gin_configs/cifar100/ldro.gin"])
  assert _q("%UPDATE_EVERY") == 100 and _q("%NORMALIZE") is True
  gin_config(["gin_configs/cifar100/ldro_no_renorm.gin"])
  assert _q("%NORMALIZE") is False and _q("%UPDATE_EVERY") == 100
  for k in (10, 100, 1000):
    gin_config([f"gin_configs/cifar100/ldro_interval_{k}.gin"])
    assert _q("%UPDATE_EVERY") == k
  gin_config(["gin_configs/cifar100/avg_max.gin"])
  assert _q("%AVG_MAX_ALPHA") == 0.5
  for m in ("pcgrad", "rgw"):  # per-task gradients: pinned (pcgrad) or the only mode (rgw)
    gin_config([f"gin_configs/cifar100/{m}.gin"])
    assert loop.method_mode(_q("%METHOD"), _q("%MODE")) == "jacobian"
  gin_config(["gin_configs/cifar10_mtl/static.gin"])
  assert _q("ImageClassificationExperiment.dataset") == "cifar10_pairs"
  assert _q("%DATA_DIR") == "../shared/data/cifar10_images"
  assert _q("optax.sgd.learning_rate") == 0.025 and _q("optax.sgd.nesterov") is True
  # The sweep grids are the paper's (section 5.1).
  assert [float(x) for x in sweep.DRO_WEIGHT_LRS] == [0, 1e-4, 1e-3, 1e-2, 1e-1]
  assert sorted(float(x) for x in sweep.LDRO_WEIGHT_LRS) == [1e-4, 1e-3, 1e-2]
  assert sorted(float(x) for x in sweep.LDRO_LOOKAHEAD_LRS) == [1e-3, 1e-2, 1e-1]
  runs = sweep.sweep_runs("cifar100")
  assert len(runs) == 19
  assert sorted({r.label for r in runs}) == ["avg_max", "dro", "ldro", "pcgrad", "rgw", "rlw",
                                             "static"]


# ------------------------------------------------------------------ cifar100 end to end


def test_cifar100_ldro_end_to_end_with_mock_data(tmp_path, gin_config):
  tfds = pytest.importorskip("tensorflow_datasets")
  workdir = tmp_path / "run"
  with tfds.testing.mock_data(num_examples=400):
    gin_config(["gin_configs/cifar100/ldro.gin"], [
        f"DATA_DIR = '{tmp_path}'", "NUM_STEPS = 3", "EVAL_EVERY = 2",
        "train_and_evaluate.log_every = 3", "train_and_evaluate.checkpoint_every = 3",
        "ImageClassificationExperiment.batch_size = 20",
        "ImageClassificationExperiment.eval_batch_size = 400",
        "WEIGHT_LR = 1.0", "UPDATE_EVERY = 2", "MODEL = 'tiny'"])
    records = loop.train_and_evaluate(str(workdir), quiet=True)
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in lines] == [0, 2, 3] == [r["step"] for r in records]
  for r in lines:
    acc = np.asarray(r["task_accuracy"])
    assert acc.shape == (20,) and np.all((acc >= 0) & (acc <= 1))
    assert len(r["task_test_loss"]) == 20
    assert r["avg_accuracy"] == pytest.approx(acc.mean())
    assert r["worst_accuracy"] == pytest.approx(acc.min())
    w = np.asarray(r["task_weights"])
    assert w.shape == (20,) and w.sum() == pytest.approx(1.0, abs=1e-5)
  assert not np.allclose(lines[-1]["task_weights"], 1 / 20)  # L-DRO moved the weights
  assert "METHOD = 'ldro'" in (workdir / "config.gin").read_text()


# ------------------------------------------------------------------ cifar10 pairs (ImageFolder)


def _write_folder(root, classes=("bird", "cat", "dog", "frog"), n_train=6, n_test=3):
  rng = np.random.default_rng(0)
  for split, n in (("train", n_train), ("test", n_test)):
    for name in classes:
      d = root / split / name
      d.mkdir(parents=True, exist_ok=True)
      for i in range(n):
        px = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        PIL_Image.fromarray(px).save(d / f"{i:04d}.jpg", quality=95)
  return root


def test_cifar10_pairs_experiment_on_a_tiny_image_folder(tmp_path, monkeypatch):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  root = _write_folder(tmp_path / "imgs")
  exp = image_experiment.ImageClassificationExperiment(
      dataset="cifar10_pairs", data_dir=str(root), pairs=[("cat", "dog"), ("bird", "frog")],
      batch_size=4, eval_batch_size=5, model="tiny")
  assert exp.task_names == ["cat/dog", "bird/frog"] and exp.num_tasks == 2
  assert exp.task_sizes == [12.0, 12.0]
  assert exp.main_metric == "accuracy" and exp.higher_is_better
  params = exp.init_params(jax.random.PRNGKey(0))
  batch = exp.train_batch(0)
  assert batch["image"].shape == (2, 2, 32, 32, 3) and batch["label"].shape == (2, 2)
  task0 = jax.tree_util.tree_map(lambda x: x[0], batch)
  # Jitted: op-by-op (eager) execution compiles every primitive of the CNN on its own.
  loss, aux = jax.jit(exp.task_loss)(params, task0, jax.random.PRNGKey(1))
  assert np.isfinite(loss) and 0 <= float(aux["accuracy"]) <= 1
  # Lean mode's one-call losses equal vmap of task_loss (values and aux), and so do their
  # gradients of any weighted sum.
  vmapped = jax.vmap(exp.task_loss, in_axes=(None, 0, None))
  losses, aux = jax.jit(exp.grouped_losses)(params, batch, jax.random.PRNGKey(1))
  ref, ref_aux = jax.jit(vmapped)(params, batch, jax.random.PRNGKey(1))
  np.testing.assert_allclose(losses, ref, rtol=1e-5)
  np.testing.assert_allclose(aux["accuracy"], ref_aux["accuracy"])
  w = np.array([0.3, 0.7])
  # The batch is an argument: a numpy array closed over under jit, vmap and the conv's
  # custom VJP trips a JAX assertion (non-canonical constant).
  g = jax.jit(jax.grad(lambda p, b: exp.grouped_losses(p, b, None)[0] @ w))(params, batch)
  g_ref = jax.jit(jax.grad(lambda p, b: vmapped(p, b, None)[0] @ w))(params, batch)
  for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # Evaluation over every test example (12, in batches of 5) matches a direct computation.
  ev = exp.evaluate(params)
  logits = np.asarray(exp.model.apply(params, image_experiment.images_lib.normalize_images(
      exp.data.test_images)))
  correct = logits.argmax(-1) == exp.data.test_labels
  want = [correct[exp.data.test_tasks == t].mean() for t in range(2)]
  np.testing.assert_allclose(ev["task_accuracy"], want, atol=1e-6)
  assert len(ev["task_test_loss"]) == 2 and all(np.isfinite(ev["task_test_loss"]))
  assert os.listdir(tmp_path / "cache" / "ldro" / "imagefolder")  # cache in tmp, not $HOME


def test_missing_data_dir_fails_clearly(tmp_path):
  missing = tmp_path / "no_such_dir"
  for dataset in ("cifar10_pairs", "cifar100"):
    with pytest.raises(FileNotFoundError, match="no_such_dir") as e:
      image_experiment.ImageClassificationExperiment(dataset=dataset, data_dir=str(missing))
    assert "no_such_dir" in str(e.value).splitlines()[0]  # the runner prints the first line
  with pytest.raises(ValueError, match="unknown dataset"):
    image_experiment.ImageClassificationExperiment(dataset="mnist", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="unknown model"):
    image_experiment.ImageClassificationExperiment(dataset="cifar100", model="huge")
  with pytest.raises(ValueError, match="needs ImageClassificationExperiment.data_dir"):
    image_experiment.ImageClassificationExperiment(dataset="cifar10_pairs", data_dir=None)
  with pytest.raises(ValueError, match=r"conv_impl must be one of .*ImageClassificationExperiment"):
    image_experiment.ImageClassificationExperiment(dataset="cifar100", conv_impl="cudnn")
