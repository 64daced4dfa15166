"""The benchmark's quick path on tiny sizes (experiments/benchmark.py, issue 6)."""

import json
import statistics
import os

import pytest

from experiments import benchmark


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  # The quick path, trimmed further to stay fast: one periodic method (refresh
  # under lax.cond), two Gram strategies at N = 2.
  res = benchmark.main(["--quick", "--out", str(out), "--rounds", "1", "--scaling_ns", "2",
                        "--sections", "cnn,scaling,memory,solvers", "--methods", "L-DRO T=100",
                        "--strategies", "pairwise,jacrev"])
  return out, res


def test_quick_benchmark_writes_json_markdown_and_figure(quick_result):
  out, res = quick_result
  for name in ("benchmark.json", "benchmark.md", "scaling.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  with open(os.path.join(out, "benchmark.json"), encoding="utf-8") as f:
    data = json.load(f)
  machine = data["machine"]
  for key in ("cpu_model", "cpu_cores", "device_kind", "jax"):
    assert machine[key]
  assert data["command"].startswith("python -m experiments.benchmark --quick")
  md = open(os.path.join(out, "benchmark.md"), encoding="utf-8").read()
  assert "x plain" in md and machine["jax"] in md and data["command"] in md


def test_quick_benchmark_rates_and_no_recompilation(quick_result):
  _, res = quick_result
  rows = res["cnn"]["tiny"]["rows"]
  assert rows[0]["label"] == "plain"
  for r in rows:
    assert r["steps_per_s"] > 0 and r["ratio_to_plain"] > 0
    # Refresh and ordinary steps ran through one compiled executable (lax.cond).
    assert r["executables"] == 1, r
  periodic = [r for r in rows if r.get("period") and r["period"] > 1]
  assert periodic and all(r["refresh_ms"] > 0 for r in periodic)


def test_quick_benchmark_scaling_memory_solvers(quick_result):
  _, res = quick_result
  strategies = {r["strategy"] for r in res["scaling"]}
  assert {"pairwise", "jacrev"} <= strategies
  assert all(r["ratio"] > 0 for r in res["scaling"])
  mem = res["memory"]
  assert all(r["temp_bytes"] > 0 for r in mem["by_chunk"])
  chunked = {r["chunk"]: r["temp_bytes"] for r in mem["by_chunk"] if r["strategy"] == "chunked"}
  assert chunked[1] <= chunked[max(chunked)]
  solvers = res["solvers"]
  assert all(r["converged"] for r in solvers["maxent_nash"])
  assert solvers["update_weights"]["median_ms"] > 0
  assert {t["target"] for t in res["targets"]} >= {"maxent_nash_ms", "update_weights_ms"}


def test_methods_option_splits_outside_parentheses():
  assert benchmark.split_methods("L-DRO T=100 (lean, grouped),PCGrad, group DRO") == [
      "L-DRO T=100 (lean, grouped)", "PCGrad", "group DRO"]
  labels = [m["label"] for m in benchmark.CNN_METHODS]
  keep = benchmark.split_methods("L-DRO T=100 (lean, grouped),PCGrad")
  assert [l for l in labels if any(k in l for k in keep)] == [
      "L-DRO T=100 (lean, grouped)", "PCGrad (jacobian)"]


def test_ratios_come_from_the_same_runs_plain_step(quick_result):
  _, res = quick_result
  rows = res["cnn"]["tiny"]["rows"]
  plain = rows[0]
  assert plain["ratio_to_plain"] == 1.0
  for r in rows:
    # A step's time from its own timed rounds: the ordinary median, and on periodic methods
    # one refresh step (median) in every `period` steps.
    ordinary = statistics.median(r["ordinary_runs_ms"])
    if r.get("period") and r["period"] > 1:
      p = r["period"]
      want = ((p - 1) * ordinary + statistics.median(r["refresh_runs_ms"])) / p
    else:
      want = ordinary
    assert r["step_ms"] == pytest.approx(want, rel=1e-9), r["label"]
    assert r["steps_per_s"] == pytest.approx(1e3 / r["step_ms"], rel=1e-9)
    assert r["ratio_to_plain"] == pytest.approx(r["step_ms"] / plain["step_ms"], rel=1e-9)
