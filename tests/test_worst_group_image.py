"""Spurious-CIFAR (ldro.data.spurious) and the worst-group image experiment, on tiny images.

The end-to-end tests run every method's gin file for a few steps on generated 16x16 images
(the loader is replaced by a tiny SpuriousData) with a tiny encoder.
"""

import json

import jax
import numpy as np
import pytest

from experiments import train as train_lib  # pylint: disable=unused-import (registers gin)
from experiments.families import worst_group_image as wgi
from experiments.runner import loop
from ldro.data import spurious

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
           "truck")


def _source(per_class_train=30, per_class_test=12, size=16, seed=0):
  rng = np.random.default_rng(seed)
  tr_cls = np.repeat(np.arange(10), per_class_train)
  te_cls = np.repeat(np.arange(10), per_class_test)
  # Images that carry their class a little (mean brightness) so training can learn something.
  tr = rng.integers(0, 120, (len(tr_cls), size, size, 3)) + 10 * tr_cls[:, None, None, None]
  te = rng.integers(0, 120, (len(te_cls), size, size, 3)) + 10 * te_cls[:, None, None, None]
  return tr.astype(np.uint8), tr_cls, te.astype(np.uint8), te_cls


def _tiny(variant="A", seed=0, majority_fraction=0.75, **kw):
  tr, trc, te, tec = _source()
  kw = {"n_train": 80, "n_val": 40, "test_per_group": 10, **kw}
  return spurious.make_spurious_data(tr, trc, te, tec, CIFAR10, variant=variant, seed=seed,
                                     majority_fraction=majority_fraction, **kw)


def test_splits_groups_balance_and_determinism():
  d = _tiny()
  assert d.counts["train"].tolist() == [30, 10, 10, 30]  # round(0.25 * 40) minority per label
  assert d.counts["val"].tolist() == [15, 5, 5, 15]
  assert d.counts["test"].tolist() == [10, 10, 10, 10]  # cue balanced at test
  for split in (d.train, d.val, d.test):
    np.testing.assert_array_equal(split["group"], 2 * split["label"] + split["cue"])
    vehicle = np.isin(split["class"], [0, 1, 8, 9])
    np.testing.assert_array_equal(split["label"], (~vehicle).astype(int))
    assert (split["label"] == 0).sum() == (split["label"] == 1).sum()  # class-balanced label
  # Each label spread evenly over its classes (train: 40 vehicles over 4 classes, 40 animals / 6).
  assert np.bincount(d.train["class"], minlength=10)[[0, 1, 8, 9]].tolist() == [10] * 4
  assert sorted(np.bincount(d.train["class"], minlength=10)[[2, 3, 4, 5, 6, 7]]) == [6] * 2 + [7] * 4
  # Pool, train and val are disjoint and cover the source.
  used = np.concatenate([d.train["index"], d.val["index"], d.pool_index])
  assert len(np.unique(used)) == len(used) == 300
  # Deterministic per seed; another seed draws other images and cues.
  again, other = _tiny(), _tiny(seed=1)
  for k in ("image", "cue", "index"):
    np.testing.assert_array_equal(d.train[k], again.train[k])
  assert not np.array_equal(d.train["index"], other.train["index"])


def test_cue_pixels_and_flipped_test_images():
  tr, trc, te, tec = _source()
  for variant in ("A", "B"):
    d = _tiny(variant)
    img, cue = d.train["image"].astype(int), d.train["cue"]
    corner = img[:, :4, :4, :] if variant == "A" else img[:, :2, :, :]  # square / top rows
    assert np.all(corner == corner[:, :1, :1, :])  # one colour per image
    red, green = corner[:, 0, 0, 0], corner[:, 0, 0, 1]
    assert np.all((red > green) == (cue == 0))
    assert np.all(np.abs(corner[:, 0, 0, :] - spurious.CUE_COLOURS[cue]) <= spurious.JITTER)
    # Outside the cue the source image is untouched.
    src = tr[d.train["index"]].astype(int)
    if variant == "A":
      np.testing.assert_array_equal(img[:, 4:, :, :], src[:, 4:, :, :])
      np.testing.assert_array_equal(img[:, :4, 4:, :], src[:, :4, 4:, :])
    else:
      np.testing.assert_array_equal(img[:, 2:-2, 2:-2, :], src[:, 2:-2, 2:-2, :])
      assert np.all(img[:, -2:, :, :] == img[:, :1, :1, :])  # the frame's bottom rows
    # The counterfactual test images: same content and jitter, the other cue.
    te_img, flip = d.test["image"].astype(int), d.test["image_flipped"].astype(int)
    np.testing.assert_array_equal(te_img[:, 4:-2, 4:-2], flip[:, 4:-2, 4:-2])
    assert np.all((flip[:, 0, 0, 0] > flip[:, 0, 0, 1]) == (d.test["cue"] == 1))


def test_bad_input_names_group_and_split():
  with pytest.raises(ValueError, match=r"train split: group 1 \(vehicle/green\), group 2 \(animal/red\) has no examples"):
    _tiny(majority_fraction=1.0)  # the cue is the label: the minority groups are empty
  with pytest.raises(ValueError, match=r"unknown cue variant 'C'"):
    _tiny(variant="C")
  with pytest.raises(ValueError, match=r"class id \d+ has \d+ images left"):
    _tiny(n_train=280)  # more vehicles than the source holds
  with pytest.raises(ValueError, match="n_train must be an even integer"):
    _tiny(n_train=81)


def test_model_and_losses_on_a_tiny_batch():
  exp = wgi.WorstGroupImageExperiment(
      data=_tiny(), batch_size=8, alpha_aux=0.5, alpha_reg=0.3, head_weight_decay=0.01,
      model_kwargs={"features": 4, "num_conv": 2, "mlp_width": 8})
  # Jitted (here and below): op-by-op (eager) execution compiles every primitive on its own.
  params = jax.jit(exp.init_params)(jax.random.PRNGKey(0))
  assert params["params"]["aux_head"]["kernel"].shape == (8, 8 * 8 * 3)
  batch = exp.train_batch(0)
  assert batch["image"].shape == (8, 16, 16, 3) and batch["group"].shape == (8,)
  np.testing.assert_array_equal(exp.train_batch(3)["label"], exp.train_batch(3)["label"])
  loss, aux = jax.jit(exp.plain_loss)(params, batch, jax.random.PRNGKey(1))
  # Eq. 9 by hand: CE + a_aux * MSE(recon of the masked image, 2x2-pooled clean image)
  # + a_reg (mean|h_end| + mean|h_aux|) + wd/2 (|W_end|^2 + |W_aux|^2).
  from ldro import worst_group  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  x = batch["image"]

  @jax.jit
  def forward(params, x, labels):
    logits, h = exp.model.apply(params, x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    mask = worst_group.random_patch_mask(jax.random.PRNGKey(1), x.shape, 4, 0.6)
    pred, h_aux = exp.model.apply(params, worst_group.apply_patch_mask(x, mask),
                                  method=wgi.WorstGroupNet.reconstruct)
    return ce, h, pred, h_aux

  ce, h, pred, h_aux = forward(params, x, batch["label"])
  target = x.reshape(8, 8, 2, 8, 2, 3).mean(axis=(2, 4)).reshape(8, -1)
  p = params["params"]
  want = (ce + 0.5 * np.mean((pred - target) ** 2) + 0.3 * (np.abs(h).mean() + np.abs(h_aux).mean())
          + 0.005 * (np.sum(p["end_head"]["kernel"] ** 2) + np.sum(p["aux_head"]["kernel"] ** 2)))
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  assert aux["task_losses"].shape == (4,)
  with pytest.raises(ValueError, match="needs sampling='groups'"):
    exp.task_loss(params, batch, None)


TINY = ["WorstGroupImageExperiment.model_kwargs = {'features': 4, 'num_conv': 2, 'mlp_width': 8}",
        "BATCH_SIZE = 8", "NUM_STEPS = 4", "EVAL_EVERY = 2",
        "train_and_evaluate.checkpoint_every = 4", "WorstGroupImageExperiment.eval_batch_size = 64"]


def _tiny_with_pool(pool_seeds=None, **kw):
  d = _tiny(**kw)
  if pool_seeds is not None:
    tr, trc, te, tec = _source()
    d.pool_index = spurious.shared_pool_index(
        tr, trc, te, tec, CIFAR10, pool_seeds, n_train=80, n_val=40, test_per_group=10,
        majority_fraction=0.75)
    d.pool_images = tr[d.pool_index]
  return d


@pytest.fixture
def tiny_data(monkeypatch):
  monkeypatch.setattr(spurious, "load_spurious_cifar10", lambda data_dir, **kw: _tiny_with_pool(
      **{k: v for k, v in kw.items() if k in ("variant", "seed", "pool_seeds")}))


def _run(gin_config, tmp_path, name, files, bindings=()):
  gin_config([f"gin_configs/worst_group_image/{f}" for f in files],
             [f"DATA_DIR = '{tmp_path}'"] + TINY + list(bindings))
  workdir = tmp_path / name
  loop.train_and_evaluate(str(workdir), quiet=True)
  return [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_ablation_and_method_files_hold_their_settings(gin_config):
  import gin  # pylint: disable=g-import-not-at-top
  want = {"erm.gin": (0.0, 0.0, "iid", "plain"), "mtl.gin": (np.exp(-1), np.exp(-1), "iid", "plain"),
          "l1_only.gin": (0.0, np.exp(-1), "iid", "plain"),
          "aux_only.gin": (np.exp(-1), 0.0, "iid", "plain"),
          "group_dro.gin": (0.0, 0.0, "groups", None), "ldro.gin": (0.0, 0.0, "groups", None),
          "jtt.gin": (0.0, 0.0, "jtt", "plain")}
  for f, (a_aux, a_reg, sampling, mode) in want.items():
    gin_config([f"gin_configs/worst_group_image/{f}"])
    got = [gin.query_parameter(f"%{m}") for m in ("ALPHA_AUX", "ALPHA_REG", "SAMPLING", "MODE")]
    assert got[:2] == pytest.approx([a_aux, a_reg]) and got[2:] == [sampling, mode], f
  gin_config(["gin_configs/worst_group_image/group_dro.gin"])
  assert gin.query_parameter("%METHOD") == "dro" and gin.query_parameter("%WEIGHT_LR") == 0.1


# One training run per kind of step (the ablations use mtl.gin's step with an alpha at 0).
# (L-DRO over groups, ldro.gin, runs the same group-grouped batches through another method.)
@pytest.mark.parametrize("files", [["erm.gin"], ["mtl.gin"], ["group_dro.gin"]])
def test_every_method_end_to_end(tmp_path, gin_config, tiny_data, files):
  del tiny_data
  records = _run(gin_config, tmp_path, "run", files)
  assert [r["step"] for r in records] == [0, 2, 4]
  for r in records:
    assert len(r["task_accuracy"]) == 4 and len(r["val_group_accuracy"]) == 4
    assert r["worst_accuracy"] == pytest.approx(min(r["task_accuracy"]))
    assert r["val_worst_accuracy"] == pytest.approx(min(r["val_group_accuracy"]))
    assert r["test_average_accuracy"] == pytest.approx(r["avg_accuracy"])  # balanced test set
    assert 0 <= r["flip_rate"] <= 1 and r["mean_abs_h"] >= 0
  assert all(np.isfinite(records[-1]["train_task_losses"]))
  if files == ["group_dro.gin"]:
    assert not np.allclose(records[-1]["task_weights"], 0.25)  # group DRO moved the weights


def test_jtt_two_stages_resumable(tmp_path, gin_config, tiny_data):
  del tiny_data
  _run(gin_config, tmp_path, "stage1", ["jtt_stage1.gin"], ["NUM_STEPS = 2"])
  exp_bindings = [f"JTT_STAGE1_WORKDIR = '{tmp_path / 'stage1'}'", "LAMBDA_UP = 3"]
  records = _run(gin_config, tmp_path, "stage2", ["jtt.gin"], exp_bindings)
  assert [r["step"] for r in records] == [0, 2, 4]
  assert (tmp_path / "stage2" / "checkpoints").is_dir()
  with pytest.raises(FileNotFoundError, match="jtt_stage1_workdir"):
    wgi.WorstGroupImageExperiment(data=_tiny(), sampling="jtt",
                                  jtt_stage1_workdir=str(tmp_path / "none"))


def test_shared_pool_leaves_out_every_seeds_train_and_val():
  tr, trc, te, tec = _source()
  kw = {"n_train": 80, "n_val": 40, "test_per_group": 10}
  pool = spurious.shared_pool_index(tr, trc, te, tec, CIFAR10, (0, 1, 2), **kw)
  used = set()
  for seed in (0, 1, 2):
    d = spurious.make_spurious_data(tr, trc, te, tec, CIFAR10, seed=seed, **kw)
    used |= set(d.train["index"]) | set(d.val["index"])
    assert set(pool) <= set(d.pool_index)
  assert len(pool) > 0 and set(pool) == set(range(300)) - used  # everything else is pooled
  with pytest.raises(ValueError, match="non-empty"):
    spurious.shared_pool_index(tr, trc, te, tec, CIFAR10, (), **kw)


def test_pretrain_then_fine_tune_from_it(tmp_path, gin_config, tiny_data):
  del tiny_data
  pool = ["WorstGroupImageExperiment.pool_seeds = (0, 1)", "PRETRAIN_STEPS = 4"]
  records = _run(gin_config, tmp_path, "pretrain", ["pretrain.gin"], pool)
  losses = [r["val_recon_loss"] for r in records]
  assert [r["step"] for r in records] == [0, 2, 4] and losses[-1] < losses[0]
  pre, step = wgi.restore_params(str(tmp_path / "pretrain"))
  assert step == 4
  # Fine-tuning starts from the encoder and the reconstruction head, with a fresh end head.
  gin_config(["gin_configs/worst_group_image/mtl.gin"], TINY)
  kw = dict(data=_tiny(), alpha_aux=1.0, model_kwargs={"features": 4, "num_conv": 2,
                                                       "mlp_width": 8})
  exp = wgi.WorstGroupImageExperiment(pretrained_workdir=str(tmp_path / "pretrain"),
                                      pretrained_steps=4, **kw)
  params = exp.init_params(jax.random.PRNGKey(1))["params"]
  for name in ("conv_0", "conv_1", "dense_0", "dense_1", "aux_head"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, params[name], pre["params"][name])
  assert not np.allclose(params["end_head"]["kernel"], pre["params"]["end_head"]["kernel"])
  assert exp.pretrained_step == 4
  # The gin route, end to end: pretrained.gin on top of a method's file.
  records = _run(gin_config, tmp_path, "mtl", ["mtl.gin", "pretrained.gin"],
                 pool + [f"PRETRAINED_WORKDIR = '{tmp_path / 'pretrain'}'"])
  assert records[0]["pretrained_step"] == 4 and "val_recon_loss" in records[0]
  # Bad input, one line each: an unfinished pre-training, a seed whose images may be in the
  # pool, a run that is not a pre-training.
  for bad, match in (({"pretrained_steps": 8}, "stopped at step 4, not 8"),
                     ({"seed": 2}, "seed 2 is not among the pre-training run's pool_seeds"),
                     ({"pretrained_workdir": str(tmp_path / "mtl")}, "not a pre-training run")):
    args = {"pretrained_workdir": str(tmp_path / "pretrain"), "pretrained_steps": 4, **kw, **bad}
    with pytest.raises(ValueError, match=match):
      wgi.WorstGroupImageExperiment(**args).init_params(jax.random.PRNGKey(1))
  with pytest.raises(ValueError, match="trains the reconstruction alone"):
    wgi.WorstGroupImageExperiment(data=_tiny(), sampling="pretrain", alpha_reg=0.1)


def test_methods_sweep_wires_pretraining_and_jtt_stages():
  from experiments import sweep  # pylint: disable=g-import-not-at-top
  runs = {r.name: r for r in sweep.sweep_runs("worst_group_image_methods")}
  assert len(runs) == 18 and all(f"{p}-{m}" in runs for p in ("pre", "scratch") for m in (
      "erm", "mtl", "l1_only", "aux_only", "group_dro", "jtt_stage1", "jtt", "ldro", "mtl_ldro"))
  names = list(runs)
  assert names.index("pre-jtt_stage1") < names.index("pre-jtt")  # stage 1 runs first
  cmd = sweep.run_command(runs["pre-jtt"], 3, "/r/pre-jtt/seed3")
  assert "--gin_file=gin_configs/worst_group_image/pretrained.gin" in cmd
  assert "--gin_bindings=JTT_STAGE1_WORKDIR = '/r/pre-jtt_stage1/seed3'" in cmd
  assert f"--gin_bindings=PRETRAINED_WORKDIR = '{sweep.WORST_GROUP_PRETRAINED}'" in cmd
  scratch = sweep.run_command(runs["scratch-erm"], 0, "/r/scratch-erm/seed0")
  assert not any("pretrained" in c.lower() for c in scratch)
