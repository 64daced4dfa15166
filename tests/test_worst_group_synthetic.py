"""The worst-group paper's synthetic experiment (section 3): data, model, constraints, driver."""

import json
import math
import os
import time

import jax.numpy as jnp
import numpy as np
import pytest

from experiments import worst_group_synthetic as driver
from experiments.families import worst_group_synthetic as F


def test_group_proportions_and_shift():
  spec = F.data_spec()
  assert spec["sizes"] == {"train": (450, 50, 50, 450), "val": (45, 5, 5, 45),
                           "test": (250, 250, 250, 250)}
  d = F.make_data(0, spec)
  for split, agree in (("train", 0.9), ("val", 0.9), ("test", 0.5)):
    y, g = d[split]["y"], d[split]["g"]
    s = np.where(np.isin(g, (1, 3)), 1.0, -1.0)                 # group -> spurious attribute
    np.testing.assert_array_equal(y, np.where(g >= 2, 1.0, -1.0))
    assert np.mean(s == y) == pytest.approx(agree)              # P(s = y): 0.9 train, 0.5 test
    assert np.mean(d[split]["x"][:, 1] * s > 0) > 0.99          # x_spur ~ N(s, 0.1)
  assert d["train"]["x"].shape == (1000, 2) and d["train"]["x_tilde"].shape == (1000, 2)
  np.testing.assert_array_equal(d["test"]["x"], F.make_data(0, spec)["test"]["x"])


def test_eq1_moments_and_the_noise():
  spec = F.data_spec(n_train=40000, n_test=40000, n_val=100)
  d = F.make_data(1, spec)["train"]
  y = d["y"]
  core, spur = d["x"][:, 0] - y, d["x"][:, 1] - np.where(np.isin(d["g"], (1, 3)), 1.0, -1.0)
  assert core.var() == pytest.approx(0.6, rel=0.03) and abs(core.mean()) < 0.02
  assert spur.var() == pytest.approx(0.1, rel=0.03)
  assert (d["x_tilde"] - d["x"]).var(0) == pytest.approx([1.0, 1.0], rel=0.03)
  std = F.data_spec(scale_reading="std")
  assert std["sd_core"] == 0.6 and F.core_only_accuracy(std) == pytest.approx(0.9522, abs=1e-4)
  assert F.core_only_accuracy(spec) == pytest.approx(0.9016, abs=1e-4)   # Phi(1 / sqrt(0.6))


def test_losses_hand_values_and_constraints():
  params = {"a": jnp.array([1.0, 1.0]), "w_end": jnp.array([0.0, 0.0]), "W_aux": jnp.eye(2)}
  x = jnp.array([[1.0, 2.0], [3.0, -1.0]])
  y = jnp.array([1.0, -1.0])
  w = jnp.ones(2)
  assert float(F.end_loss(params, x, y, w, 1.0)) == pytest.approx(math.log(2))
  p2 = dict(params, w_end=jnp.array([1.0, 0.0]))       # logits (1, 3): log(1+e^-1), log(1+e^3)
  want = 0.5 * (math.log1p(math.exp(-1)) + math.log1p(math.exp(3))) + 0.5
  assert float(F.end_loss(p2, x, y, w, 1.0)) == pytest.approx(want, rel=1e-6)
  xt = x + jnp.array([[1.0, 0.0], [0.0, 2.0]])            # errors (1, 0), (0, 2): 0.5 * (1+4)/2
  assert float(F.recon_loss(params, x, xt, w)) == pytest.approx(1.25)
  hp = {"c_end": 1.0, "c_aux": 10.0, "lam": 1.0}
  assert float(F.objective(params, (x, y, xt, w), hp)) == pytest.approx(math.log(2) + 12.5)
  c = F.constrain({"a": jnp.array([3.0, -1.0]), "w_end": jnp.ones(2),
                   "W_aux": jnp.array([[3.0, 0.0], [0.0, 4.0]])}, 0.1)
  np.testing.assert_allclose(c["a"], [0.075, -0.025], rtol=1e-6)
  np.testing.assert_allclose(c["W_aux"], [[0.6, 0.0], [0.0, 0.8]], rtol=1e-6)
  pr = F.constrain({"a": jnp.array([0.5, 0.05]), "w_end": jnp.ones(2), "W_aux": jnp.eye(2)}, 0.1,
                   project=True)
  np.testing.assert_allclose(pr["a"], [0.1, 0.0], atol=1e-7)  # the projection can zero one
  assert F.log_spur_core_ratio(np.array([0.02, 0.08]), (1, 1)) == pytest.approx(math.log(4))


def test_bad_input_empty_group_and_options():
  # 10 validation points at 5% minority: round(0.5) = 0 minority points -> named error.
  with pytest.raises(ValueError, match=r"val split: group 1 \(y=-1,s=\+1\), group 2 "
                                       r"\(y=\+1,s=-1\) has no examples"):
    F.data_spec(n_val=10, minority_fraction=0.05)
  with pytest.raises(ValueError, match="test split: .*no examples"):
    F.data_spec(n_test=3)
  with pytest.raises(ValueError, match="val_distribution"):
    F.data_spec(val_distribution="test")
  with pytest.raises(ValueError, match="arm must be one of"):
    F.train_arm("erm", 0.1, [0], F.data_spec(), epochs=1)
  with pytest.raises(ValueError, match="constraint must be one of"):
    F.train_arm("end", 0.1, [0], F.data_spec(), epochs=1, constraint="clip")
  # Perfect correlation: an empty training minority is allowed, an empty validation group not.
  with pytest.raises(ValueError, match=r"val split: group 1 \(y=-1,s=\+1\)"):
    F.data_spec(minority_fraction=0.0)
  spec = F.data_spec(minority_fraction=0.0, val_distribution="balanced")
  assert spec["sizes"]["train"] == (500, 0, 0, 500) and spec["sizes"]["val"] == (25,) * 4


def test_training_keeps_the_constraints_and_is_deterministic():
  spec = F.data_spec(n_train=200, n_test=100, n_val=40)
  run = F.train_arm("mtl", 0.1, [0, 1], spec, epochs=3, lr=1e-2, batch_size=64)
  a, W = run["params"]["a"], run["params"]["W_aux"]            # [seeds, epochs, ...]
  np.testing.assert_allclose(np.abs(a).sum(-1), 0.1, rtol=1e-5)
  np.testing.assert_allclose(np.sqrt((W ** 2).sum((-1, -2))), 1.0, rtol=1e-5)
  again = F.train_arm("mtl", 0.1, [0, 1], spec, epochs=3, lr=1e-2, batch_size=64)
  np.testing.assert_array_equal(a, again["params"]["a"])
  s = F.summarize(run, (1, 1), "last")
  assert np.all((s["worst"] >= 0) & (s["worst"] <= s["average"]) & (s["average"] <= 1))
  np.testing.assert_array_equal(run["metrics"]["test"].max(), run["metrics"]["test"].max())
  assert np.all(run["metrics"]["test"] <= 25)                  # 100 balanced test points


def test_end_to_end_driver(tmp_path):
  t0 = time.process_time()
  results = driver.run(
      ["gin_configs/worst_group_synthetic/paper.gin"],
      ["run_study.epochs = 2", "run_study.seeds = [0, 1]", "run_study.aux_lrs = [1e-3]",
       "run_study.aux_batch_sizes = [64]", "run_study.sensitivity = False"],
      str(tmp_path), command="test")
  cpu = time.process_time() - t0   # CPU seconds: wall time depends on the host's load
  for f in ("results.json", "table.md", "boundaries.png", "aux_log_ratio.png", "accuracy.png"):
    assert os.path.getsize(tmp_path / f) > 0, f
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert [(r["arm"], r["tau"]) for r in saved["main"]] == [
      ("end", 0.1), ("mtl", 0.1), ("end", 10.0), ("mtl", 10.0)]
  assert len(saved["aux"]) == 2 and set(results["claims"]) == {"1", "2", "3"}
  for r in saved["main"]:
    assert all(0.0 <= v <= 1.0 for v in r["no_gp"]["worst"] + r["no_gp"]["average"])
  assert "| End task only | 0.1 |" in (tmp_path / "table.md").read_text()
  assert cpu < 30, cpu             # a few CPU seconds: one XLA compilation, 2 epochs, 3 figures
