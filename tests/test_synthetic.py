"""The paper's synthetic claims (section 4, Figure 2) on a short run."""

import gin
import pytest

from experiments import synthetic

R2 = 1.25 ** 2


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
  out = tmp_path_factory.mktemp("synthetic")
  names = ["avg", "dro", "dro_max", "ldro_exact", "ldro", "ldro_exact_noisy", "ldro_noisy"]
  histories = synthetic.run_all(str(out), num_steps=400, noise=0.1, seed=0, names=names)
  gin.clear_config()  # module-scoped: runs outside the per-test gin fixture
  return synthetic.summarize(histories)


def test_average_loss_ends_far_from_outlier(summary):
  assert summary["avg"]["outlier_loss"] > 2 * R2
  assert summary["avg"]["mean_cluster_loss"] < 0.1


def test_dro_reaches_the_disc_and_stalls(summary):
  for name in ("dro", "dro_max"):
    assert summary[name]["max_loss"] == pytest.approx(R2, abs=1e-3)
    assert summary[name]["final_outlier_weight"] > 0.99  # all weight on the converged task


def test_ldro_matches_worst_case_and_lowers_the_others(summary):
  for name in ("ldro_exact", "ldro"):
    assert summary[name]["max_loss"] == pytest.approx(R2, abs=1e-3)
    for dro in ("dro", "dro_max"):
      assert summary[name]["mean_cluster_loss"] < summary[dro]["mean_cluster_loss"] - 0.05


def test_online_ldro_is_more_stable_under_noise(summary):
  exact = summary["ldro_exact_noisy"]["weight_change_per_step"]
  online = summary["ldro_noisy"]["weight_change_per_step"]
  assert exact > 10 * online
