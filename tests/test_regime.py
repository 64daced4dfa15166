"""Tests for the CIFAR regime study: label noise, training-set evaluation, narrow CNN,
the regime sweeps and the report's uncertainty rule (small and fast)."""

import json
import os

import jax
import numpy as np
import pytest

from experiments import regime_report
from experiments import sweep
from experiments.families import image as image_experiment
from ldro.data import images as images_lib


def _data(n_per_task=(40, 30, 20), seed=0):
  rng = np.random.default_rng(seed)
  tasks = np.concatenate([np.full(n, t) for t, n in enumerate(n_per_task)]).astype(np.int32)
  m = len(tasks)
  labels = (2 * tasks + rng.integers(0, 2, m)).astype(np.int32)
  test_tasks = np.arange(3 * len(n_per_task), dtype=np.int32) % len(n_per_task)
  return images_lib.TaskImageData(
      task_names=[f"t{i}" for i in range(len(n_per_task))],
      class_names=[f"c{i}" for i in range(2 * len(n_per_task))],
      train_images=rng.integers(0, 256, (m, 4, 4, 3), np.uint8), train_labels=labels,
      train_tasks=tasks, test_images=rng.integers(0, 256, (len(test_tasks), 4, 4, 3), np.uint8),
      test_labels=(2 * test_tasks).astype(np.int32), test_tasks=test_tasks)


def test_flip_task_labels_flips_exactly_the_fraction_of_one_task_deterministically():
  data = _data()
  noisy = images_lib.flip_task_labels(data, task=1, fraction=0.4, seed=3)
  changed = noisy.train_labels != data.train_labels
  assert changed.sum() == 12  # round(0.4 * 30)
  assert set(data.train_tasks[changed]) == {1}
  # flipped to the other class of the pair, never outside the task's classes
  assert set(noisy.train_labels[changed]) <= {2, 3}
  np.testing.assert_array_equal(noisy.train_labels[changed] + data.train_labels[changed], 5)
  np.testing.assert_array_equal(noisy.test_labels, data.test_labels)
  np.testing.assert_array_equal(data.train_labels, _data().train_labels)  # input untouched
  again = images_lib.flip_task_labels(data, task=1, fraction=0.4, seed=3)
  np.testing.assert_array_equal(again.train_labels, noisy.train_labels)
  other = images_lib.flip_task_labels(data, task=1, fraction=0.4, seed=4)
  assert (other.train_labels != noisy.train_labels).any()
  assert (images_lib.flip_task_labels(data, 0, 0.0, 0).train_labels == data.train_labels).all()
  with pytest.raises(ValueError, match="fraction"):
    images_lib.flip_task_labels(data, 0, 1.5, 0)
  with pytest.raises(ValueError, match="out of range"):
    images_lib.flip_task_labels(data, 3, 0.1, 0)
  # to='any': the same examples, flipped to any other class of the shared softmax (6 here).
  wide = images_lib.flip_task_labels(data, task=1, fraction=0.4, seed=3, to="any")
  moved = wide.train_labels != data.train_labels
  np.testing.assert_array_equal(moved, changed)
  assert set(wide.train_labels[moved]) - {2, 3} and set(wide.train_labels[moved]) <= set(range(6))
  with pytest.raises(ValueError, match="'task' or 'any'"):
    images_lib.flip_task_labels(data, 1, 0.4, 3, to="all")


def test_apply_label_noise_by_name_and_errors():
  data = _data()
  noisy = image_experiment.apply_label_noise(data, {"task": "t2", "fraction": 0.5}, seed=0)
  assert (noisy.train_labels != data.train_labels).sum() == 10
  assert image_experiment.apply_label_noise(data, None, 0) is data
  with pytest.raises(ValueError, match="label_noise"):
    image_experiment.apply_label_noise(data, {"task": "nope", "fraction": 0.1}, 0)
  with pytest.raises(ValueError, match="label_noise"):
    image_experiment.apply_label_noise(data, {"task": 0}, 0)
  wide = image_experiment.apply_label_noise(data, {"task": "t2", "fraction": 0.5, "to": "any"}, 0)
  assert set(wide.train_labels[wide.train_labels != data.train_labels]) - {4, 5}
  with pytest.raises(ValueError, match="'task' or 'any'.*label_noise"):
    image_experiment.apply_label_noise(data, {"task": 0, "fraction": 0.1, "to": "x"}, 0)


def test_train_subset_and_narrow_model():
  data = _data()
  sub = images_lib.train_subset(data, per_task=25)
  assert np.bincount(sub["task"]).tolist() == [25, 25, 20]
  np.testing.assert_array_equal(sub["label"], images_lib.train_subset(data, 25)["label"])
  model = image_experiment.build_model("small", 10, "auto", {"features": 8, "mlp_width": 16})
  assert model.features == 8 and model.mlp_width == 16 and model.num_conv == 4
  with pytest.raises(ValueError, match="unknown CNN field"):
    image_experiment.build_model("small", 10, "auto", {"width": 8})


def test_experiment_with_label_noise_reports_training_metrics(tmp_path, monkeypatch):
  pil = pytest.importorskip("PIL.Image")
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  rng = np.random.default_rng(0)
  for split, n in (("train", 10), ("test", 3)):
    for name in ("bird", "cat", "dog", "frog"):
      d = tmp_path / "imgs" / split / name
      d.mkdir(parents=True)
      for i in range(n):
        pil.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.jpg")
  kw = dict(dataset="cifar10_pairs", data_dir=str(tmp_path / "imgs"), model="tiny",
            pairs=[("cat", "dog"), ("bird", "frog")], batch_size=4, eval_batch_size=7)
  clean = image_experiment.ImageClassificationExperiment(**kw)
  exp = image_experiment.ImageClassificationExperiment(
      **kw, label_noise={"task": "cat/dog", "fraction": 0.5}, train_eval_size=8)
  changed = exp.data.train_labels != clean.data.train_labels
  assert changed.sum() == 10 and set(exp.data.train_tasks[changed]) == {0}
  ev = exp.evaluate(exp.init_params(jax.random.PRNGKey(0)))
  assert set(ev) == {"task_accuracy", "task_test_loss", "task_train_accuracy", "task_train_loss"}
  assert len(ev["task_train_loss"]) == 2 and all(np.isfinite(ev["task_train_loss"]))
  assert "task_train_loss" not in clean.evaluate(clean.init_params(jax.random.PRNGKey(0)))


def test_regime_sweeps_are_defined_and_ordered():
  core = sweep.sweep_runs("cifar10_regime_core")
  full = sweep.sweep_runs("cifar10_regime")
  names = [r.name for r in full]
  assert [r.name for r in core] == names[:len(core)]  # the most informative runs first
  assert "static" in names and "pcgrad" in names and "avg_max" in names
  assert sum(n.startswith("dro-") for n in names) == 5
  assert sum(n.startswith("ldro-") for n in names) == 9
  for r in full:
    assert r.gin_files[0] == "gin_configs/cifar10_regime/base.gin"
  hard = sweep.sweep_runs("cifar10_hard_task")
  assert all("gin_configs/cifar10_regime/hard_task.gin" in r.gin_files for r in hard)
  hard_any = sweep.sweep_runs("cifar10_hard_task_any_core")
  assert all("gin_configs/cifar10_regime/hard_task_any.gin" in r.gin_files for r in hard_any)
  assert [r.name for r in hard_any] == [r.name for r in core]
  abl = [r.name for r in sweep.sweep_runs("cifar10_regime_ablations")]
  assert any(n.startswith("ldro_T10-") for n in abl) and any("norenorm_T1000" in n for n in abl)
  assert any(n.startswith("large-") for n in abl)
  assert "ldro-eta1e-2-lam1e-1" in [r.name for r in core]


def _write_run(root, name, method, seed, points):
  d = root / name / f"seed{seed}"
  d.mkdir(parents=True)
  (d / "run.json").write_text(json.dumps({"run": name, "method": method, "seed": seed}))
  with open(d / "metrics.jsonl", "w") as f:
    for step, accs in points:
      f.write(json.dumps({"step": step, "task_accuracy": accs, "avg_accuracy": float(np.mean(accs)),
                          "worst_accuracy": float(np.min(accs))}) + "\n")
  (d / "DONE").write_text("x\n")


def test_paired_verdict_rule():
  # differences 0.02, 0.03, 0.025: mean 0.025, se ~0.0029 -> holds
  assert regime_report.paired_verdict([0.02, 0.03, 0.025])[0] == "holds"
  assert regime_report.paired_verdict([-0.02, -0.03, -0.025])[0] == "does not hold"
  assert regime_report.paired_verdict([0.05, -0.04, 0.01])[0] == "within noise"
  assert regime_report.paired_verdict([0.05])[0] == "one seed"
  assert regime_report.paired_verdict([0.05, float("nan"), 0.04])[0] == "no data"


def test_report_on_fake_runs(tmp_path):
  root = tmp_path / "runs"
  for seed in range(3):
    off = 0.01 * seed
    _write_run(root, "static", "static", seed, [(0, [0.1, 0.1]), (100, [0.9 + off, 0.5])])
    _write_run(root, "dro-eta1e-2", "dro", seed, [(0, [0.1, 0.1]), (100, [0.7, 0.6 + off])])
    _write_run(root, "ldro-eta1e-2-lam1e-2", "ldro", seed,
               [(0, [0.1, 0.1]), (100, [0.85, 0.62 + off])])
  report = regime_report.build_report(str(root))
  assert set(report["methods"]) == {"static", "dro", "ldro"}
  assert len(report["methods"]["ldro"]["hypervolume_per_seed"]) == 3
  claims = {c["claim"]: c for c in report["claims"]}
  assert any(c["verdict"] in ("holds", "does not hold", "within noise") for c in claims.values())
  md = regime_report.markdown(report)
  assert "hypervolume" in md and "holds" in md


def test_frontier_claims_use_the_same_configurations_at_every_seed(tmp_path):
  """A configuration finished at some seeds only stays out of every frontier statistic, so a
  method is compared with the same pool at each seed (and it is listed as left out)."""
  root = tmp_path / "runs"
  for seed in range(3):
    _write_run(root, "static", "static", seed, [(100, [0.8, 0.5 + 0.01 * seed])])
    _write_run(root, "dro-eta1e-2", "dro", seed, [(100, [0.7, 0.6])])
    _write_run(root, "ldro-a", "ldro", seed, [(100, [0.75, 0.55 + 0.01 * seed])])
  _write_run(root, "ldro-b", "ldro", 0, [(100, [0.9, 0.9])])  # seed 0 only: left out
  unfinished = root / "ldro-a" / "seed3"
  _write_run(root, "ldro-a", "ldro", 3, [(100, [0.99, 0.99])])
  (unfinished / "DONE").unlink()  # an unfinished run at a seed no other method has
  report = regime_report.build_report(str(root))
  ldro = report["methods"]["ldro"]
  assert ldro["configs"] == ["ldro-a"]
  assert ldro["left_out"] == ["ldro-a/seed3", "ldro-b/seed0"]
  assert list(ldro["best_worst_per_seed"]) == ["0", "1", "2"]
  np.testing.assert_allclose(list(ldro["best_worst_per_seed"].values()), [0.55, 0.56, 0.57])
  claims = {c["claim"]: c for c in report["claims"]}
  reach = claims[next(iter(regime_report.AT_LEAST))]
  assert reach["configs"] == {"ldro": ["ldro-a"], "dro": ["dro-eta1e-2"]}
  np.testing.assert_allclose(list(reach["diffs"].values()), [-0.05, -0.04, -0.03])
  assert reach["verdict"] == "does not hold"
  hv = claims["L-DRO's frontier has a larger hypervolume than static mixing's"]
  # one point each: (average, worst) = (mean, min) of the task accuracies
  np.testing.assert_allclose(list(hv["diffs"].values()),
                             [(0.65 + k / 200) * 0.05 for k in range(3)])
  assert "ldro-b/seed0" in regime_report.markdown(report)
  assert regime_report.at_least_verdict("within noise") == "holds (within noise)"
  assert regime_report.at_least_verdict("does not hold") == "does not hold"


def test_every_regime_run_parses_with_the_regime_settings(gin_config):
  import gin  # pylint: disable=g-import-not-at-top
  noises = {"cifar10_hard_task": {"task": "cat/dog", "fraction": 0.4},
            "cifar10_hard_task_any_core": {"task": "cat/dog", "fraction": 0.5, "to": "any"}}
  for name in ("cifar10_regime", "cifar10_regime_ablations", *noises):
    for run in sweep.sweep_runs(name):
      gin_config(run.gin_files, sweep.run_bindings(run, seed=1))
      q = gin.query_parameter
      assert q("ImageClassificationExperiment.dataset") == "cifar10_pairs"
      assert q("optax.sgd.learning_rate") == 0.025 and q("%SEED") == 1
      assert q("ImageClassificationExperiment.train_eval_size") > 0
      try:
        noise = q("ImageClassificationExperiment.label_noise")
      except ValueError:  # not bound: the default, no noise
        noise = None
      assert noise == noises.get(name)
      if run.name.startswith(("large-", "paper_small-")):
        assert q("%MODEL_KWARGS") == {}
      else:
        assert q("%MODEL") == "small" and q("%MODEL_KWARGS") == {"features": 8, "mlp_width": 32}
  gin.clear_config()


def test_plateau_stats():
  flat = [{"step": 100 * i, "task_train_loss": [1.0 + 0.01 * (-1) ** i, 2.0 - 0.1 * i]}
          for i in range(8)]
  p = regime_report.plateau_stats(flat)
  assert p["steps"] == [0, 700]
  assert p["tasks"][0]["plateau"] and not p["tasks"][1]["plateau"]
  assert regime_report.plateau_stats(flat[:5]) is None


def test_report_hard_task_claims(tmp_path):
  root = tmp_path / "runs"
  for seed in range(2):
    for name, method, accs in (("static", "static", [0.3, 0.7, 0.7]),
                               ("dro-eta1e-2", "dro", [0.35, 0.5, 0.5 + 0.01 * seed]),
                               ("ldro-eta1e-3-lam1e-2", "ldro", [0.32, 0.65, 0.66])):
      _write_run(root, name, method, seed, [(100 * i, accs) for i in range(5)])
  report = regime_report.build_report(str(root), hard_task=0)
  tail = report["tail"]["dro-eta1e-2"]["0"]
  assert abs(tail["tail_others"] - 0.5) < 1e-9 and np.isnan(tail["tail_hard_weight"])
  claims = {c["claim"]: c for c in report["claims"]}
  c = claims["DRO (eta 1e-2) loses accuracy on the other tasks against static mixing "
             "(static - DRO > 0)"]
  assert c["verdict"] == "holds" and set(c["diffs"]) == {"0", "1"}
  assert "avg of other tasks" in regime_report.markdown(report)


def test_multilingual_seed_grid_parses(gin_config):
  """The 3-seed LM grid (issue 15 part 3): Table 1's main rows, each config parses, with the
  fixed batch composition (2 rows per language) and the longer schedule."""
  import gin  # pylint: disable=g-import-not-at-top
  runs = sweep.sweep_runs("multilingual_seeds")
  assert [r.name for r in runs] == ["static_alpha0", "static_alpha0.3", "dro_lr1e-4",
                                    "baselined_dro_lr1e-3", "ldro_lam0.1", "equal_stratified"]
  for r in runs:
    gin_config(list(r.gin_files), list(r.bindings) + ["BASELINES = '/tmp/b.json'"])
    assert gin.query_parameter("%ROWS_PER_LANGUAGE") == 2
    assert gin.query_parameter("%NUM_STEPS") == 1800
  # the control: equal weights on the stratified batches (no mixture rate)
  assert gin.query_parameter("%METHOD") == "equal" and gin.query_parameter("%ALPHA") is None
