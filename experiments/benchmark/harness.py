"""The timing harness: jitted steps with donated state, timed by phases in interleaved rounds.

How a step rate is measured: every step function is ``jax.jit``-ed with the
state donated (its first call, which compiles, is timed apart as compile time).
A method whose Gram matrix is refreshed every ``T`` steps is timed in its two
phases with the *same* compiled function: a run of ``k`` consecutive ordinary
steps (no refresh among them; one host sync at the end) and single refresh
steps (the :class:`ldro.WeightingState` counter set to a multiple of ``T``);
its rate is ``T / ((T - 1) t_ordinary + t_refresh)``. ``T`` is the method's
declared period (:func:`experiments.benchmark.workloads.refresh_period`),
checked on the compiled step (:func:`check_period`: a step at count 1
refreshes only when ``T = 1``, one at count ``T`` always). Rounds are
interleaved across the methods of one workload, medians are taken, and every
ratio is to the plain step timed in the same rounds. The compiled-executable
count of every step function is recorded (refresh steps run under
``lax.cond``: one executable, no recompilation).
"""

import os
import platform
import resource
import statistics
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ldro
from ldro import lookahead
from ldro import train as ldro_train
from experiments.benchmark import workloads

PyTree = Any


# ---------------------------------------------------------------------------
# Machine.
# ---------------------------------------------------------------------------


def version(pkg: str) -> Optional[str]:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return metadata.version(pkg)
  except Exception:  # pylint: disable=broad-except
    return None


def machine_info() -> dict:
  cpu = platform.processor() or "unknown"
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  try:
    usable = len(os.sched_getaffinity(0))
  except AttributeError:
    usable = os.cpu_count()
  dev = jax.devices()[0]
  import flax  # pylint: disable=g-import-not-at-top
  return {
      "cpu_model": cpu,
      "cpu_cores": os.cpu_count(),
      "cpu_cores_usable": usable,
      "platform": dev.platform,
      "device_kind": dev.device_kind,
      "device_count": jax.device_count(),
      "jax": jax.__version__,
      "jaxlib": getattr(jax.lib, "__version__", None) or version("jaxlib"),
      "flax": flax.__version__,
      "optax": optax.__version__,
      "python": platform.python_version(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc": " ".join(platform.libc_ver()),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
  }


# ---------------------------------------------------------------------------
# The weighting state inside a train state.
# ---------------------------------------------------------------------------

_is_weighting = lambda x: isinstance(x, ldro.WeightingState)


def weighting_states(state: ldro_train.TrainState) -> list:
  """The :class:`ldro.WeightingState` s of the optimizer chain (found by type)."""
  return [x for x in jax.tree_util.tree_leaves(state.opt_state, is_leaf=_is_weighting)
          if _is_weighting(x)]


def set_refresh_phase(state: ldro_train.TrainState, count: int) -> ldro_train.TrainState:
  """The state with every weighting counter set to ``count`` (host-side, untimed):
  ``count % T == 0`` makes the next step a refresh step."""
  def fix(x):
    if _is_weighting(x):
      return x._replace(count=jnp.asarray(count, jnp.int32))
    return x
  opt_state = jax.tree_util.tree_map(fix, state.opt_state, is_leaf=_is_weighting)
  return state._replace(opt_state=opt_state)


def _gram(state) -> np.ndarray:
  return np.stack([np.asarray(s.gram) for s in weighting_states(state)])


# ---------------------------------------------------------------------------
# One step function, timed by phases.
# ---------------------------------------------------------------------------


class StepBench:
  """One jitted step function with its (donated) state, timed by phases."""

  def __init__(self, label: str, step: Callable, state: ldro_train.TrainState, batch: PyTree,
               period: Optional[int] = None, spec: Optional[workloads.MethodSpec] = None):
    self.label = label
    self.period = period
    self.spec = spec
    self.batch = batch
    self.period_check: Optional[str] = None
    self.jitted = jax.jit(step, donate_argnums=0)
    # One buffer per leaf: an initial state may hold one array in two fields, which
    # a donated call refuses ("donate the same buffer twice").
    self.state = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), state)
    t0 = time.perf_counter()
    self.run(1)  # compiles (and runs one step)
    self.compile_s = time.perf_counter() - t0
    self.ordinary: list[float] = []   # seconds per step, one entry per timed run
    self.refresh: list[float] = []
    self.faults: list[float] = []     # minor page faults per ordinary step
    self.warm = False

  def run(self, k: int) -> float:
    """``k`` consecutive steps, one host sync at the end; returns seconds."""
    t0 = time.perf_counter()
    state = self.state
    for _ in range(k):
      state, metrics = self.jitted(state, self.batch)
    jax.block_until_ready((state, metrics))
    dt = time.perf_counter() - t0
    self.state = state
    return dt

  def warmup(self):
    if self.period:
      self.state = set_refresh_phase(self.state, 0)
      self.run(1)
      self.state = set_refresh_phase(self.state, 1)
    self.run(1)
    self.warm = True

  def time_round(self, k: int, k_refresh: int):
    """``k`` ordinary steps in a row (one sync), then ``k_refresh`` single refresh steps."""
    if not self.warm:
      self.warmup()
    if self.period is None or self.period == 1:
      f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      self.ordinary.append(self.run(k) / k)
      self.faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / k)
      return
    self.state = set_refresh_phase(self.state, 1)  # steps 1..k: no refresh (k < T)
    kk = min(k, self.period - 1)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    self.ordinary.append(self.run(kk) / kk)
    self.faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / kk)
    for _ in range(k_refresh):
      self.state = set_refresh_phase(self.state, 0)
      self.refresh.append(self.run(1))

  def summary(self) -> dict:
    t_ord = statistics.median(self.ordinary)
    out = {"label": self.label, "period": self.period, "compile_s": self.compile_s,
           "ordinary_ms": 1e3 * t_ord, "ordinary_runs_ms": [1e3 * t for t in self.ordinary],
           "page_faults_per_step": statistics.median(self.faults) if self.faults else None}
    if self.spec is not None:
      s = self.spec
      out.update(method=s.method, args=dict(s.args), mode=s.mode,
                 strategy=s.strategy if s.mode == "lean" else None, chunk=s.chunk,
                 per_method=s.per_method, period_check=self.period_check)
    if self.period and self.period > 1:
      t_ref = statistics.median(self.refresh)
      t_step = ((self.period - 1) * t_ord + t_ref) / self.period
      out.update(refresh_ms=1e3 * t_ref, refresh_runs_ms=[1e3 * t for t in self.refresh])
    else:
      t_step = t_ord
    out["step_ms"] = 1e3 * t_step
    out["steps_per_s"] = 1.0 / t_step
    # The same from the fastest runs (robust to interference by other processes).
    t_min = min(self.ordinary)
    if self.period and self.period > 1:
      t_min = ((self.period - 1) * t_min + min(self.refresh)) / self.period
    out["step_ms_min"] = 1e3 * t_min
    # jit's cache: one entry = one compilation for both phases (no recompilation).
    out["executables"] = int(self.jitted._cache_size())  # pylint: disable=protected-access
    return out


def check_period(bench: StepBench) -> None:
  """Checks the declared refresh period on the compiled step (untimed).

  A step at count 1 must refresh the Gram matrix iff ``T = 1``, and a step at
  count ``T`` must refresh it (a refreshed Gram matrix comes from the new
  parameters, so it differs from the previous one). A period that fails is
  recorded (``period_check``) and the row is timed as every step refreshing
  (the conservative rate).
  """
  if not bench.period or not weighting_states(bench.state):
    return
  def refreshes_at(count):
    bench.state = set_refresh_phase(bench.state, count)
    before = _gram(bench.state)
    bench.run(1)
    return not np.array_equal(before, _gram(bench.state))
  bench.state = set_refresh_phase(bench.state, 0)
  bench.run(1)
  at_1 = refreshes_at(1)
  at_t = refreshes_at(bench.period) if bench.period > 1 else at_1
  if (bench.period == 1) == at_1 and at_t:
    bench.period_check = "ok"
  else:
    bench.period_check = (f"declared T={bench.period} not confirmed (refresh at count 1: "
                          f"{at_1}, at count T: {at_t}); timed as refreshing every step")
    bench.period = 1


def bench_group(benches: list[StepBench], rounds: int, k: int, k_refresh: int, log):
  for b in benches:
    b.warmup()
  for r in range(rounds):
    for b in benches:
      b.time_round(k, k_refresh)
    log(f"    round {r + 1}/{rounds}: " + ", ".join(
        f"{b.label.split(' (')[0]} {1e3 * b.ordinary[-1]:.1f}" for b in benches[:4]) + " ms ...")
  return [b.summary() for b in benches]


def add_ratios(rows: list[dict]) -> list[dict]:
  """Every row's ratio to the ``plain`` row of the same list (the same run)."""
  plain = next(r for r in rows if r["label"] == "plain")
  for r in rows:
    r["ratio_to_plain"] = r["step_ms"] / plain["step_ms"]
    r["ratio_to_plain_min"] = r["step_ms_min"] / plain["step_ms_min"]
  return rows


# ---------------------------------------------------------------------------
# Step functions of a workload.
# ---------------------------------------------------------------------------


def copy_tree(tree):
  return jax.tree_util.tree_map(jnp.array, tree)


def plain_bench(wl: workloads.Workload) -> StepBench:
  tx = workloads.optimizer()
  state = ldro_train.init_train_state(copy_tree(wl.params), tx, jax.random.PRNGKey(1))
  return StepBench("plain", ldro_train.make_plain_step(wl.plain_loss, tx, wl.num_tasks), state,
                   wl.batch)


def method_bench(spec: workloads.MethodSpec, wl: workloads.Workload) -> StepBench:
  tx = spec.make_tx(wl.num_tasks)
  state = ldro_train.init_train_state(copy_tree(wl.params), tx, jax.random.PRNGKey(1))
  val = "val_grads" in spec.info.needs
  batched = (spec.mode == "lean" or val) and not spec.vmap_losses
  reuse = wl.reuse_refresh_grads if spec.reuse is None else spec.reuse
  step = ldro_train.make_train_step(wl.task_loss, tx, mode=spec.mode,
                                    gram_strategy=spec.strategy, chunk_size=spec.chunk,
                                    losses_fn=wl.grouped_losses if batched else None,
                                    reuse_refresh_grads=reuse, val_grads=val)
  # A validation batch of the training batch's shape (MOML): its cost, not its content, is timed.
  batch = {"train": wl.batch, "val": wl.batch} if val else wl.batch
  return StepBench(spec.label, step, state, batch, spec.period, spec)


def bench_steps(wl: workloads.Workload, specs: list[workloads.MethodSpec], rounds: int, k: int,
                k_refresh: int, log) -> dict:
  """Plain and every spec's step on one workload, rounds interleaved; ratios to plain."""
  benches = [plain_bench(wl)]
  failed = {}
  for spec in specs:
    try:
      b = method_bench(spec, wl)
    except Exception as e:  # pylint: disable=broad-except  (a method that cannot run here)
      failed[spec.label] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}"
      log(f"    {spec.label}: not timed ({failed[spec.label]})")
      continue
    check_period(b)
    benches.append(b)
    log(f"    compiled {spec.label} in {b.compile_s:.1f} s"
        + (f" (period {b.period_check})" if b.period_check else ""))
  rows = add_ratios(bench_group(benches, rounds, k, k_refresh, log))
  return {"rows": rows, "failed": failed}


def bench_direct(wl: workloads.Workload, specs, steps: int, repeats: int, log) -> list[dict]:
  """Whole periods of consecutive steps (no phase forcing), plain first."""
  benches = [plain_bench(wl)] + [method_bench(s, wl) for s in specs]
  times = {b.label: [] for b in benches}
  for b in benches:
    b.run(1)
  for _ in range(repeats):
    for b in benches:
      b.state = set_refresh_phase(b.state, 0) if b.period else b.state
      times[b.label].append(b.run(steps) / steps)
  plain = statistics.median(times["plain"])
  out = []
  for b in benches:
    t = statistics.median(times[b.label])
    out.append({"label": b.label, "steps": steps, "step_ms": 1e3 * t, "steps_per_s": 1 / t,
                "ratio_to_plain": t / plain, "runs_ms": [1e3 * x for x in times[b.label]]})
    log(f"    direct {b.label}: {1e3 * t:.1f} ms/step (x{t / plain:.3f})")
  return out


#: Interaction-step strategies for the scaling study: (label, mode, strategy, chunk).
SCALING_STRATEGIES = [
    ("jacobian mode (reuse N grads)", "jacobian", "grouped", None),
    ("grouped", "lean", "grouped", None),
    ("chunked c=4", "lean", "chunked", 4),
    ("pairwise", "lean", "pairwise", None),
    ("jacrev", "lean", "jacrev", None),
]


def bench_scaling(model: str, ns, total_batch: int, strategies, log,
                  max_seconds: float = 60.0, conv_impl: str = "auto") -> list[dict]:
  """Cost of one L-DRO interaction (refresh) step per Gram strategy, / plain step."""
  rows = []
  for n in ns:
    per_task = max(1, total_batch // n)
    wl = workloads.cnn_workload(model, n, per_task, conv_impl=conv_impl)
    plain = plain_bench(wl)
    plain.warmup()
    k = 5
    t_plain = statistics.median([plain.run(k) / k for _ in range(3)])
    for label, mode, strategy, chunk in strategies:
      spec = workloads.V("ldro", 1, mode, strategy=strategy, chunk=chunk)
      b = method_bench(spec, wl)
      t1 = b.run(1)
      ts = [t1]
      if t1 < max_seconds / 4:
        ts.append(b.run(1))
        ts = ts[1:]
        if t1 < 1.0:
          ts += [b.run(1) for _ in range(2)]
      t = statistics.median(ts)
      rows.append({"n": n, "per_task": per_task, "strategy": label, "mode": mode,
                   "plain_ms": 1e3 * t_plain, "step_ms": 1e3 * t, "ratio": t / t_plain,
                   "compile_s": b.compile_s})
      log(f"    N={n:3d} b={per_task:3d} {label:30s} {1e3 * t:9.1f} ms  x{t / t_plain:7.2f} "
          f"(plain {1e3 * t_plain:.1f} ms)")
      del b
  return rows


def _memory(fn, *args) -> dict:
  compiled = jax.jit(fn).lower(*args).compile()
  m = compiled.memory_analysis()
  if m is None:
    return {}
  get = lambda k: int(getattr(m, k, 0) or 0)
  return {"temp_bytes": get("temp_size_in_bytes"), "argument_bytes": get("argument_size_in_bytes"),
          "output_bytes": get("output_size_in_bytes"),
          "peak_bytes": get("peak_memory_in_bytes") or None}


def bench_memory(lm_size: str, n: int, chunks, ns_fixed_chunk, fixed_chunk: int, others,
                 log) -> dict:
  """Compiled memory of the Gram computation: chunked vs chunk size, and vs N."""
  def gram_fn(strategy, chunk, wl):
    scalar = lambda p, b: wl.task_loss(p, b, None)[0]
    if strategy == "jacrev":
      losses_fn = lambda p, b: jax.vmap(scalar, in_axes=(None, 0))(p, b)
      return lambda p: lookahead.jacrev_gram(losses_fn, p, wl.batch)
    return lambda p: lookahead.compute_gram(strategy, scalar, p, wl.batch, chunk)

  wl = workloads.lm_workload(lm_size, n)
  by_chunk = []
  for c in chunks:
    m = _memory(gram_fn("chunked", c, wl), wl.params)
    m.update(strategy="chunked", chunk=c, n=n)
    by_chunk.append(m)
    log(f"    chunked c={c:3d} N={n}: temp {m.get('temp_bytes', 0) / 2**20:8.1f} MiB")
  for strategy in others:
    m = _memory(gram_fn(strategy, None, wl), wl.params)
    m.update(strategy=strategy, chunk=None, n=n)
    by_chunk.append(m)
    log(f"    {strategy} N={n}: temp {m.get('temp_bytes', 0) / 2**20:8.1f} MiB")
  by_n = []
  for nn in ns_fixed_chunk:
    wl2 = workloads.lm_workload(lm_size, nn)
    m = _memory(gram_fn("chunked", fixed_chunk, wl2), wl2.params)
    m.update(strategy="chunked", chunk=fixed_chunk, n=nn)
    by_n.append(m)
    log(f"    chunked c={fixed_chunk} N={nn:3d}: temp {m.get('temp_bytes', 0) / 2**20:8.1f} MiB")
  return {"model": wl.name, "num_params": wl.num_params,
          "gradient_mib": 4 * wl.num_params / 2**20, "by_chunk": by_chunk, "by_n": by_n}


def time_fn(fn, args, min_time: float = 0.5, max_calls: int = 2000) -> dict:
  """Median and min wall time of ``fn(*args)`` (synced), after one untimed call."""
  out = fn(*args)
  jax.block_until_ready(out)
  ts = []
  t_start = time.perf_counter()
  while (time.perf_counter() - t_start < min_time or len(ts) < 5) and len(ts) < max_calls:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "calls": len(ts),
          "runs_ms": [1e3 * t for t in ts]}
