"""The benchmark's quick path on tiny sizes (experiments/benchmark/, issues 6, 12, 16)."""

import json
import os
import statistics

import pytest

import ldro
from experiments import benchmark
from experiments.benchmark import harness
from experiments.benchmark import references
from experiments.benchmark import workloads


#: The quick run's --methods: one periodic lean variant and the per-method rows of three
#: registered methods, with and without a Gram matrix (L-DRO's own per-method row is
#: 'L-DRO T=100 (jacobian)').
METHODS = ("L-DRO T=100", "PCGrad (jacobian)", "EW (jacobian)")


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench")
  # The quick path, trimmed further to stay fast: one periodic lean method
  # (refresh under lax.cond) and a few per-method rows (N = 4, tiny CNN), two
  # Gram strategies at N = 2.
  res = benchmark.main(["--quick", "--out", str(out), "--rounds", "1", "--scaling_ns", "2",
                        "--sections", "cnn,scaling,memory,solvers",
                        "--methods", ",".join(METHODS),
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
  assert data["registered_methods"] == ldro.method_names()


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
  # The declared refresh period held on the compiled step (refresh at count T, not at 1).
  assert all(r["period_check"] == "ok" for r in periodic)


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


def test_per_method_rows_read_the_registry(quick_result):
  _, res = quick_result
  table = {m["method"]: m for m in res["methods"]}
  want = {s.method for s in workloads.per_method_specs()[0]
          if any(x in s.label for x in METHODS)}
  assert want and set(table) == want
  rows = {r["label"]: r for r in res["cnn"]["tiny"]["rows"]}
  for name, m in table.items():
    info = ldro.method_info(name)
    row = rows[m["label"]]
    assert m["label"].startswith(info.label) and m["needs"] == sorted(info.needs)
    assert row["mode"] == "jacobian" and row["per_method"] and row["args"] == {}
    # The table's figures are the row's, and the ratio is the row's time over the same
    # run's plain step.
    assert m["step_ms"] == row["step_ms"]
    assert m["ratio_to_plain"] == pytest.approx(row["step_ms"] / rows["plain"]["step_ms"],
                                                rel=1e-9)
    # Gram methods carry their solver time from the same run's solver section, and a
    # target each (x1.2 of plain, 2 ms).
    if "gram" in info.needs:
      solver = [r for r in res["solvers"]["gram_methods"] if r["method"] == name]
      assert m["solver_ms"] == solver[0]["median_ms"]
      targets = {t["target"] for t in res["targets"]}
      assert {f"gram_method_small:{name}", f"gram_solver_ms:{name}"} <= targets
    else:
      assert m["solver_ms"] is None


def test_solver_section_times_every_gram_method(quick_result):
  _, res = quick_result
  s = res["solvers"]
  gram = sorted(n for n in ldro.method_names() if "gram" in ldro.method_info(n).needs)
  assert sorted(r["method"] for r in s["gram_methods"]) + sorted(
      s["gram_methods_failed"]) == gram
  assert not s["gram_methods_failed"]
  for r in s["gram_methods"]:
    assert r["n"] == 4 and r["finite"] and r["median_ms"] > 0
    assert r["median_ms"] == pytest.approx(statistics.median(r["runs_ms"]), rel=1e-9)
  assert all(r["converged"] for r in s["maxent_nash"])
  assert s["update_weights"]["median_ms"] > 0
  assert {t["target"] for t in res["targets"]} >= {"maxent_nash_ms", "update_weights_ms"}
  for t in res["targets"]:
    assert t["met"] == (t["value"] <= t["limit"])


def test_quick_benchmark_scaling_memory(quick_result):
  _, res = quick_result
  strategies = {r["strategy"] for r in res["scaling"]}
  assert {"pairwise", "jacrev"} <= strategies
  for r in res["scaling"]:
    assert r["ratio"] == pytest.approx(r["step_ms"] / r["plain_ms"], rel=1e-9)
  mem = res["memory"]
  assert all(r["temp_bytes"] > 0 for r in mem["by_chunk"])
  chunked = {r["chunk"]: r["temp_bytes"] for r in mem["by_chunk"] if r["strategy"] == "chunked"}
  assert chunked[1] <= chunked[max(chunked)]


def test_methods_option_splits_outside_parentheses():
  assert benchmark.split_methods("L-DRO T=100 (lean, grouped),PCGrad, group DRO") == [
      "L-DRO T=100 (lean, grouped)", "PCGrad", "group DRO"]
  labels = [s.label for s in workloads.cnn_variants()]
  keep = benchmark.split_methods("L-DRO T=100 (lean, grouped),T=10 (lean")
  assert [l for l in labels if any(k in l for k in keep)] == [
      "L-DRO T=100 (lean, grouped)", "L-DRO T=10 (lean, grouped)"]


def test_labels_and_arguments_come_from_the_registry():
  specs, skipped = workloads.per_method_specs()
  assert sorted([s.method for s in specs] + list(skipped)) == ldro.method_names()
  for s in specs:
    info = ldro.method_info(s.method)
    assert s.label.startswith(info.label) and s.label.endswith("(jacobian)")
    kwargs = workloads.factory_kwargs(s.method, 5)
    ldro.get_method(s.method, **kwargs)  # builds with the benchmark's arguments
  # The refresh period is the method's '*every' hyper-parameter (None without a Gram matrix).
  assert workloads.V("ldro", 10).period == 10
  assert workloads.MethodSpec("ldro").period == ldro.method_info("ldro").defaults["update_every"]
  assert workloads.MethodSpec("equal").period is None
  # A per-method row that a variant already times is not timed twice.
  merged = workloads.merge_specs(workloads.cnn_variants(), specs)
  assert len({s.label for s in merged}) == len(merged)


def test_set_refresh_phase_finds_the_weighting_state_by_type():
  import jax
  import jax.numpy as jnp
  import optax
  tx = optax.chain(ldro.get_method("ldro", num_tasks=3), optax.sgd(0.1))
  state = ldro.train.init_train_state({"w": jnp.zeros(2)}, tx, jax.random.PRNGKey(0))
  moved = harness.set_refresh_phase(state, 7)
  assert [int(s.count) for s in harness.weighting_states(moved)] == [7]
  assert [int(s.count) for s in harness.weighting_states(state)] == [0]


def test_torch_references_without_torch_say_so():
  # Without torch the reference section is skipped (None), never an error.
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    assert references.torch_step(workloads.cnn_architecture("tiny"), 2, 1, 1, 1) is None
    return
  res = references.torch_step(workloads.cnn_architecture("tiny"), 3, 2, 1, 1,
                              steps=["plain", "mgda_loop", "cagrad_loop"])
  assert set(res["steps"]) | set(res["skipped"]) == {"plain", "mgda_loop", "cagrad_loop"}


def test_method_table_merges_benchmark_files(tmp_path):
  """A focused re-run's rows replace a full run's (keeping the solver time it did not measure)."""
  from experiments import method_table  # pylint: disable=g-import-not-at-top
  full, focused = tmp_path / "full.json", tmp_path / "focused.json"
  full.write_text(json.dumps({"methods": [
      {"method": "cagrad", "ratio_to_plain": 1.3, "solver_ms": 0.4},
      {"method": "equal", "ratio_to_plain": 1.1, "solver_ms": None}]}))
  focused.write_text(json.dumps({"methods": [{"method": "cagrad", "ratio_to_plain": 1.15}]}))
  got = method_table.overheads(f"{full},{focused}")
  assert got == {"cagrad": (1.15, 0.4), "equal": (1.1, None)}
  table = method_table.table(got)
  assert "| `cagrad` | CAGrad |" in table and "x1.15 | 0.40 ms" in table
  assert len(table.splitlines()) == 2 + len(ldro.method_names())
