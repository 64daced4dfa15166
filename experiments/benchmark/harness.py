r"""Speed, memory and solver benchmark of L-DRO against plain training (issue 6).

Measures, in one process, so that every ratio compares runs of the same
process on the same machine:

* **steps/s** of plain training (one ordinary backward pass of the mean loss
  on the flattened batch) and of each method's training step
  (:func:`ldro.train.make_train_step`) for the small and large CNN (N = 20,
  batch 128 -> 6 examples per task) and the tiny decoder (N = 40, one 128-token
  row per language, L-DRO with T = 1000 and a memory-lean Gram strategy);
* the **interaction-step cost** (an L-DRO step that refreshes the Gram
  matrix, divided by a plain step on the same examples) of every Gram
  strategy for N in {2, 5, 10, 20, 50, 100} (small CNN, 128 // N examples per
  task);
* **peak memory** (XLA's compiled memory analysis: temporaries of the
  compiled Gram computation) of the ``chunked`` strategy against the chunk
  size and against N;
* **solver times**: jitted ``maxent_nash`` for N = 100 and
  ``update_weights`` for N = 1000;
* optionally (if ``torch`` imports) PyTorch reference steps of the same small
  CNN and batch: a plain step, PCGrad as LibMTL computes it (N backward
  passes) and, if ``torchjd`` imports, PCGrad through torchjd's Gramian
  engine; the targets then include our L-DRO step against PyTorch's plain
  step and our PCGrad against torchjd's.

How a step rate is measured: every step function is ``jax.jit``-ed with the
state donated (its first call, which compiles, is timed apart as compile time).
A method whose interaction matrix is refreshed every ``T`` steps is timed in
its two phases with the *same* compiled function: a run of ``k``
consecutive ordinary steps (no refresh among them; one host sync at the end)
and single refresh steps (the L-DRO state's counter is set to a multiple of
``T``); its rate is ``T / ((T - 1) t_ordinary + t_refresh)``. Rounds are
interleaved across the methods of one model, and medians are taken. The
compiled-executable count of every step function is recorded (refresh steps
run under ``lax.cond``: one executable, no recompilation). With ``--direct``
(default in the full run) the small CNN's plain and L-DRO T = 100 steps are
also run for whole periods of T consecutive steps, as a check.

Usage::

    python -m experiments.benchmark                # full (~12 min on 2 CPU cores)
    python -m experiments.benchmark --quick        # CI-sized (tiny sizes, ~1 min)

Like the training programs, the command runs under the CPU settings of
:mod:`experiments.runner.cpu_runtime` (Eigen rather than YNNPACK convolutions,
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``; it re-executes itself to apply
them; ``--untuned`` to skip), and, in the full run, measures the small CNN once
more without each of them in child processes, and once more with XLA's own
convolution and max-pool gradients (``--conv_impl=xla``) instead of the CPU
custom VJPs of :mod:`ldro.models.cnn`.

Writes ``<out>/benchmark.json``, ``<out>/benchmark.md`` and
``<out>/scaling.png`` (default ``--out=results/benchmark``).
"""

import sys

# Before JAX starts (see experiments/runner/cpu_runtime.py).
if __name__ == "__main__" and "--untuned" not in sys.argv:
  from experiments.runner import cpu_runtime as _cpu_runtime  # pylint: disable=g-import-not-at-top
  _cpu_runtime.configure_process("experiments.benchmark")

import argparse
import json
import os
import platform
import re
import resource
import shlex
import statistics
import subprocess
import tempfile
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ldro
from ldro import game
from ldro import lookahead
from ldro import train as ldro_train
from ldro.lookahead_dro import LookaheadDROState
from ldro.models import cnn
from ldro.models import decoder as decoder_lib
from experiments.runner import cpu_runtime

PyTree = Any

# ---------------------------------------------------------------------------
# Configuration.
# ---------------------------------------------------------------------------

CNN_MODELS = {
    "small": dict(features=32, num_conv=4, mlp_width=128, mlp_layers=3),   # paper 5.1
    "large": dict(features=160, num_conv=3, mlp_width=320, mlp_layers=2),  # paper App. B.3
    "tiny": dict(features=8, num_conv=2, mlp_width=16, mlp_layers=1),      # tests only
}

def M(label, method, extra=None, mode="lean", strategy="grouped", chunk=None, period=None,
      vmap_losses=False, reuse=None):
  """A method to time. ``period``: refresh period T of the interaction matrix
  (None: no periodic work). ``vmap_losses``: lean mode computes the task
  losses by ``vmap`` of the per-task loss instead of one batched call.
  ``reuse``: ``reuse_refresh_grads`` of the step (None: the workload's, see
  :func:`reuse_ok`)."""
  return dict(label=label, method=method, extra=extra or {}, mode=mode, strategy=strategy,
              chunk=chunk, period=period, vmap_losses=vmap_losses, reuse=reuse)


CNN_METHODS = [
    M("equal (lean)", "equal"),
    M("equal (lean, vmap losses)", "equal", vmap_losses=True),
    M("L-DRO T=100 (lean, grouped)", "ldro", {"update_every": 100}, period=100),
    M("L-DRO T=100 (lean, grouped, second pass)", "ldro", {"update_every": 100}, period=100,
      reuse=False),
    M("L-DRO T=100 (jacobian)", "ldro", {"update_every": 100}, "jacobian", period=100),
    M("L-DRO T=10 (lean, grouped)", "ldro", {"update_every": 10}, period=10),
    M("L-DRO T=1 (jacobian)", "ldro", {"update_every": 1}, "jacobian", period=1),
    M("L-DRO T=1 (lean, grouped)", "ldro", {"update_every": 1}, period=1),
    M("L-DRO exact T=100 (lean, grouped)", "ldro_exact", {"update_every": 100}, period=100),
    M("PCGrad (jacobian)", "pcgrad", {}, "jacobian"),
    M("group DRO (lean)", "dro"),
    M("RLW (lean)", "rlw"),
]
CNN_METHODS_QUICK = ("L-DRO T=100 (lean, grouped)", "PCGrad (jacobian)")

LM_METHODS = [
    M("equal (lean)", "equal"),
    M("L-DRO T=1000 (lean, pairwise)", "ldro", {"update_every": 1000}, strategy="pairwise",
      period=1000),
    M("L-DRO T=1000 (lean, chunked c=8)", "ldro", {"update_every": 1000}, strategy="chunked",
      chunk=8, period=1000),
    M("L-DRO T=1000 (lean, grouped)", "ldro", {"update_every": 1000}, period=1000),
    M("L-DRO T=1000 (jacobian)", "ldro", {"update_every": 1000}, "jacobian", period=1000),
    M("group DRO (lean)", "dro"),
]
LM_METHODS_QUICK = ("L-DRO T=1000 (lean, pairwise)",)

# Interaction-step strategies for the scaling study: (label, mode, strategy, chunk).
SCALING_STRATEGIES = [
    ("jacobian mode (reuse N grads)", "jacobian", "grouped", None),
    ("grouped", "lean", "grouped", None),
    ("chunked c=4", "lean", "chunked", 4),
    ("pairwise", "lean", "pairwise", None),
    ("jacrev", "lean", "jacrev", None),
]

TARGETS = {
    "ldro_t100_small": 1.03,
    "ldro_t1_small": 1.5,
    "pcgrad_small": 1.5,
    "lm_t1000": 1.05,
    "maxent_nash_ms": 10.0,
    "update_weights_ms": 1.0,
    # Absolute goals on the same machine (ratios of step times to PyTorch's).
    "ldro_t100_vs_torch_plain": 1.0,
    "pcgrad_vs_torchjd": 1.0,
}


def _method_kwargs(name: str, n: int, extra: dict) -> dict:
  kw = {"num_tasks": n}
  if name in ("ldro", "ldro_exact"):
    kw.update(lookahead_lr=0.01, weight_lr=0.001)
  elif name == "dro":
    kw.update(weight_lr=0.01)
  kw.update(extra)
  return kw


def make_tx(name: str, n: int, extra: dict) -> optax.GradientTransformationExtraArgs:
  return optax.chain(ldro.get_method(name, **_method_kwargs(name, n, extra)),
                     optax.sgd(0.025, momentum=0.9, nesterov=True))


# ---------------------------------------------------------------------------
# Machine.
# ---------------------------------------------------------------------------


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
      "jaxlib": getattr(jax.lib, "__version__", None) or _version("jaxlib"),
      "flax": flax.__version__,
      "optax": optax.__version__,
      "python": platform.python_version(),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "glibc": " ".join(platform.libc_ver()),
      "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
  }


def _version(pkg: str) -> Optional[str]:
  try:
    from importlib import metadata  # pylint: disable=g-import-not-at-top
    return metadata.version(pkg)
  except Exception:  # pylint: disable=broad-except
    return None


# ---------------------------------------------------------------------------
# Timing helpers.
# ---------------------------------------------------------------------------


def _set_refresh_phase(state: ldro_train.TrainState, count: int) -> ldro_train.TrainState:
  """The state with every L-DRO counter set to ``count`` (host-side, untimed)."""
  def fix(x):
    if isinstance(x, LookaheadDROState):
      return x._replace(count=jnp.asarray(count, jnp.int32))
    return x
  opt_state = jax.tree_util.tree_map(fix, state.opt_state,
                                     is_leaf=lambda x: isinstance(x, LookaheadDROState))
  return state._replace(opt_state=opt_state)


class StepBench:
  """One jitted step function with its (donated) state, timed by phases."""

  def __init__(self, label: str, step: Callable, state: ldro_train.TrainState, batch: PyTree,
               period: Optional[int] = None):
    self.label = label
    self.period = period
    self.batch = batch
    self.jitted = jax.jit(step, donate_argnums=0)
    self.state = state
    t0 = time.perf_counter()
    self._run(1)  # compiles (and runs one step)
    self.compile_s = time.perf_counter() - t0
    self.ordinary: list[float] = []   # seconds per step, one entry per timed run
    self.refresh: list[float] = []
    self.faults: list[float] = []     # minor page faults per ordinary step
    self.warm = False

  def _run(self, k: int) -> float:
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
      self.state = _set_refresh_phase(self.state, 0)
      self._run(1)
      self.state = _set_refresh_phase(self.state, 1)
    self._run(1)
    self.warm = True

  def time_round(self, k: int, k_refresh: int):
    """``k`` ordinary steps in a row (one sync), then ``k_refresh`` single refresh steps."""
    if not self.warm:
      self.warmup()
    if self.period is None or self.period == 1:
      f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      self.ordinary.append(self._run(k) / k)
      self.faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / k)
      return
    self.state = _set_refresh_phase(self.state, 1)  # steps 1..k: no refresh (k < T)
    kk = min(k, self.period - 1)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    self.ordinary.append(self._run(kk) / kk)
    self.faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / kk)
    for _ in range(k_refresh):
      self.state = _set_refresh_phase(self.state, 0)
      self.refresh.append(self._run(1))

  def summary(self) -> dict:
    t_ord = statistics.median(self.ordinary)
    out = {"label": self.label, "period": self.period, "compile_s": self.compile_s,
           "ordinary_ms": 1e3 * t_ord, "ordinary_runs_ms": [1e3 * t for t in self.ordinary],
           "page_faults_per_step": statistics.median(self.faults) if self.faults else None}
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


def _bench_group(benches: list[StepBench], rounds: int, k: int, k_refresh: int, log):
  for b in benches:
    b.warmup()
  for r in range(rounds):
    for b in benches:
      b.time_round(k, k_refresh)
    log(f"    round {r + 1}/{rounds}: " + ", ".join(
        f"{b.label.split(' (')[0]} {1e3 * b.ordinary[-1]:.1f}" for b in benches[:4]) + " ms ...")
  return [b.summary() for b in benches]


def _rates(rows: list[dict]) -> list[dict]:
  plain = next(r for r in rows if r["label"] == "plain")
  for r in rows:
    r["ratio_to_plain"] = r["step_ms"] / plain["step_ms"]
    r["ratio_to_plain_min"] = r["step_ms_min"] / plain["step_ms_min"]
  return rows


# ---------------------------------------------------------------------------
# Workloads.
# ---------------------------------------------------------------------------


def cnn_workload(model: str, n: int, per_task: int, num_classes: int = 100, seed: int = 0,
                 conv_impl: str = "auto"):
  """(params, task-grouped batch, task_loss_fn, plain_loss_fn) for a CNN."""
  net = cnn.ConvNet(num_classes=num_classes, conv_impl=conv_impl, **CNN_MODELS[model])
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, per_task, 32, 32, 3)).astype(np.float32)
  # Task i owns classes 5i..5i+4 (mod num_classes), as in CIFAR-100's coarse tasks.
  labels = ((5 * np.arange(n)[:, None] + rng.integers(0, 5, size=(n, per_task)))
            % num_classes).astype(np.int32)
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  params = net.init(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3)))

  def task_loss(params, task_batch, rng):
    del rng
    logits = net.apply(params, task_batch["image"]).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, task_batch["label"]).mean(), {}

  def grouped_losses(params, batch, rng):
    """All N task losses from one model application on the flattened batch."""
    del rng
    shape = batch["label"].shape
    logits = net.apply(params, batch["image"].reshape((-1,) + batch["image"].shape[2:]))
    per_example = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), batch["label"].reshape(-1)).reshape(shape)
    return per_example.mean(axis=1), {}

  def plain_loss(params, batch, rng):
    losses, _ = grouped_losses(params, batch, rng)
    return losses.mean(), {"task_losses": losses}

  return net, params, batch, task_loss, plain_loss, grouped_losses


LM_CONFIGS = {
    # The experiments' 'tiny' decoder with the committed 8k vocabulary.
    "tiny": dict(vocab_size=8000, length=128, **decoder_lib.DECODER_SIZES["tiny"]),
    # For tests only.
    "test": dict(vocab_size=64, length=8, emb_dim=16, num_heads=2, head_dim=8, num_layers=1,
                 mlp_dim=32),
}


def lm_workload(size: str, n: int, rows: int = 1, seed: int = 0):
  cfg = dict(LM_CONFIGS[size])
  length = cfg.pop("length")
  config = decoder_lib.DecoderConfig(**cfg)
  model = decoder_lib.Decoder(config)
  rng = np.random.default_rng(seed)
  targets = rng.integers(1, config.vocab_size, size=(n, rows, length)).astype(np.int32)
  inputs = np.concatenate([np.zeros((n, rows, 1), np.int32), targets[..., :-1]], axis=-1)
  batch = {
      "decoder_target_tokens": jnp.asarray(targets),
      "decoder_input_tokens": jnp.asarray(inputs),
      "decoder_loss_weights": jnp.ones((n, rows, length), jnp.float32),
      "decoder_segment_ids": jnp.ones((n, rows, length), jnp.int32),
      "decoder_positions": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32),
                                            (n, rows, length)),
  }
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, length), jnp.int32))

  def task_loss(params, task_batch, rng):
    del rng
    logits = decoder_lib.apply_decoder(model, params, task_batch)
    total, count = decoder_lib.token_cross_entropy(
        logits, task_batch["decoder_target_tokens"], task_batch["decoder_loss_weights"])
    return total / jnp.maximum(count, 1.0), {"count": count}

  def grouped_losses(params, batch, rng):
    """All N task losses from one decoder application on the flattened batch."""
    del rng
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
    logits = decoder_lib.apply_decoder(model, params, flat)
    lead = batch["decoder_target_tokens"].shape[:2]
    logits = logits.reshape(lead + logits.shape[1:])
    losses, counts = decoder_lib.per_task_token_loss(
        logits, batch["decoder_target_tokens"], batch["decoder_loss_weights"])
    return losses, {"count": counts}

  def plain_loss(params, batch, rng):
    losses, aux = grouped_losses(params, batch, rng)
    counts = aux["count"]
    loss = jnp.sum(losses * counts) / jnp.maximum(jnp.sum(counts), 1.0)
    return loss, {"task_losses": losses}

  return config, params, batch, task_loss, plain_loss, grouped_losses


def _plain_bench(params, batch, plain_loss, n) -> StepBench:
  tx = optax.sgd(0.025, momentum=0.9, nesterov=True)
  state = ldro_train.init_train_state(params, tx, jax.random.PRNGKey(1))
  return StepBench("plain", ldro_train.make_plain_step(plain_loss, tx, n), state, batch)


def reuse_ok(model_or_config) -> Optional[bool]:
  """``reuse_refresh_grads`` for a workload, as the experiments set it: True
  for the CNN with its custom VJPs and for the decoder (no convolutions),
  else None (``make_train_step``'s default)."""
  if isinstance(model_or_config, cnn.ConvNet):
    return True if cnn.fast_backward_under_cond(model_or_config.conv_impl) else None
  return True


def _method_bench(spec, params, batch, task_loss, grouped_losses, n,
                  reuse: Optional[bool] = None) -> StepBench:
  tx = make_tx(spec["method"], n, spec["extra"])
  state = ldro_train.init_train_state(params, tx, jax.random.PRNGKey(1))
  batched = spec["mode"] == "lean" and not spec["vmap_losses"]
  if spec.get("reuse") is not None:
    reuse = spec["reuse"]
  step = ldro_train.make_train_step(task_loss, tx, mode=spec["mode"],
                                    gram_strategy=spec["strategy"], chunk_size=spec["chunk"],
                                    losses_fn=grouped_losses if batched else None,
                                    reuse_refresh_grads=reuse)
  return StepBench(spec["label"], step, state, batch, spec["period"])


def _copy(tree):
  return jax.tree_util.tree_map(jnp.array, tree)


def bench_steps(workload, methods, rounds, k, k_refresh, log) -> dict:
  _, params, batch, task_loss, plain_loss, grouped_losses = workload
  n = batch[next(iter(batch))].shape[0]
  benches = [_plain_bench(_copy(params), batch, plain_loss, n)]
  for spec in methods:
    benches.append(_method_bench(spec, _copy(params), batch, task_loss, grouped_losses, n,
                                 reuse_ok(workload[0])))
    log(f"    compiled {spec['label']} in {benches[-1].compile_s:.1f} s")
  rows = _rates(_bench_group(benches, rounds, k, k_refresh, log))
  return {"rows": rows}


def bench_direct(workload, specs, steps: int, repeats: int, log) -> list[dict]:
  """Whole periods of consecutive steps (no phase forcing), plain first."""
  _, params, batch, task_loss, plain_loss, grouped_losses = workload
  n = batch[next(iter(batch))].shape[0]
  benches = [_plain_bench(_copy(params), batch, plain_loss, n)]
  benches += [_method_bench(s, _copy(params), batch, task_loss, grouped_losses, n,
                            reuse_ok(workload[0]))
              for s in specs]
  times = {b.label: [] for b in benches}
  for b in benches:
    b._run(1)  # pylint: disable=protected-access
  for _ in range(repeats):
    for b in benches:
      b.state = _set_refresh_phase(b.state, 0) if b.period else b.state
      times[b.label].append(b._run(steps) / steps)  # pylint: disable=protected-access
  plain = statistics.median(times["plain"])
  out = []
  for b in benches:
    t = statistics.median(times[b.label])
    out.append({"label": b.label, "steps": steps, "step_ms": 1e3 * t, "steps_per_s": 1 / t,
                "ratio_to_plain": t / plain, "runs_ms": [1e3 * x for x in times[b.label]]})
    log(f"    direct {b.label}: {1e3 * t:.1f} ms/step (x{t / plain:.3f})")
  return out


def bench_scaling(model: str, ns, total_batch: int, strategies, log,
                  max_seconds: float = 60.0) -> list[dict]:
  """Cost of one interaction (refresh) step per Gram strategy, / plain step."""
  rows = []
  for n in ns:
    per_task = max(1, total_batch // n)
    wl = cnn_workload(model, n, per_task)
    _, params, batch, task_loss, plain_loss, grouped_losses = wl
    plain = _plain_bench(_copy(params), batch, plain_loss, n)
    plain.warmup()
    k = 5
    t_plain = statistics.median([plain._run(k) / k for _ in range(3)])  # pylint: disable=protected-access
    for label, mode, strategy, chunk in strategies:
      spec = M(label, "ldro", {"update_every": 1}, mode, strategy, chunk, 1)
      b = _method_bench(spec, _copy(params), batch, task_loss, grouped_losses, n, reuse_ok(wl[0]))
      t1 = b._run(1)  # pylint: disable=protected-access
      ts = [t1]
      if t1 < max_seconds / 4:
        ts.append(b._run(1))  # pylint: disable=protected-access
        ts = ts[1:]
        if t1 < 1.0:
          ts += [b._run(1) for _ in range(2)]  # pylint: disable=protected-access
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
  def gram_fn(strategy, chunk, task_loss, batch_n):
    scalar = lambda p, b: task_loss(p, b, None)[0]
    if strategy == "jacrev":
      losses_fn = lambda p, b: jax.vmap(scalar, in_axes=(None, 0))(p, b)
      return lambda p: lookahead.jacrev_gram(losses_fn, p, batch_n)
    return lambda p: lookahead.compute_gram(strategy, scalar, p, batch_n, chunk)

  config, params, batch, task_loss, _, _ = lm_workload(lm_size, n)
  num_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  by_chunk = []
  for c in chunks:
    m = _memory(gram_fn("chunked", c, task_loss, batch), params)
    m.update(strategy="chunked", chunk=c, n=n)
    by_chunk.append(m)
    log(f"    chunked c={c:3d} N={n}: temp {m.get('temp_bytes', 0) / 2**20:8.1f} MiB")
  for strategy in others:
    m = _memory(gram_fn(strategy, None, task_loss, batch), params)
    m.update(strategy=strategy, chunk=None, n=n)
    by_chunk.append(m)
    log(f"    {strategy} N={n}: temp {m.get('temp_bytes', 0) / 2**20:8.1f} MiB")
  by_n = []
  for nn in ns_fixed_chunk:
    _, p2, b2, tl2, _, _ = lm_workload(lm_size, nn)
    m = _memory(gram_fn("chunked", fixed_chunk, tl2, b2), p2)
    m.update(strategy="chunked", chunk=fixed_chunk, n=nn)
    by_n.append(m)
    log(f"    chunked c={fixed_chunk} N={nn:3d}: temp {m.get('temp_bytes', 0) / 2**20:8.1f} MiB")
  return {"model": f"decoder {lm_size}", "num_params": int(num_params),
          "gradient_mib": 4 * num_params / 2**20, "by_chunk": by_chunk, "by_n": by_n}


def _time_fn(fn, args, min_time: float = 0.5, max_calls: int = 2000) -> dict:
  out = fn(*args)
  jax.block_until_ready(out)
  ts = []
  t_start = time.perf_counter()
  while (time.perf_counter() - t_start < min_time or len(ts) < 5) and len(ts) < max_calls:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts), "calls": len(ts)}


def solver_games(n: int, seed: int = 0) -> dict:
  """Test games: an L-DRO lookahead matrix and a standard-normal random game."""
  rng = np.random.default_rng(seed)
  losses = rng.uniform(0.5, 3.0, n)
  g = rng.normal(size=(n, max(2, n // 2)))
  lookahead_game = ldro.lookahead_matrix(jnp.asarray(losses, jnp.float32),
                                         jnp.asarray(g @ g.T, jnp.float32), 0.1)
  normal_game = jnp.asarray(rng.normal(size=(n, n)), jnp.float32)
  return {"lookahead": lookahead_game, "normal": normal_game}


def bench_solvers(n_nash: int, n_update: int, log, min_time: float = 0.5) -> dict:
  solve = jax.jit(game.maxent_nash_with_info)  # maxent_nash is this minus the flags
  out = {"maxent_nash": []}
  for kind, L in solver_games(n_nash).items():
    info = solve(L)
    r = _time_fn(solve, (L,), min_time)
    r.update(n=n_nash, game=kind, lp_iterations=int(info.lp_iterations),
             newton_iterations=int(info.newton_iterations), converged=bool(info.converged))
    out["maxent_nash"].append(r)
    log(f"    maxent_nash N={n_nash} ({kind}): {r['median_ms']:.2f} ms "
        f"(LP {r['lp_iterations']} pivots, Newton {r['newton_iterations']} its)")
  rng = np.random.default_rng(1)
  L = jnp.asarray(rng.normal(size=(n_update, n_update)), jnp.float32)
  w = jnp.full((n_update,), 1.0 / n_update, jnp.float32)
  upd = jax.jit(game.update_weights)
  r = _time_fn(upd, (L, w, jnp.float32(0.01)), min_time)
  r.update(n=n_update)
  out["update_weights"] = r
  log(f"    update_weights N={n_update}: {r['median_ms']:.3f} ms")
  return out


#: PyTorch reference steps (see :func:`torch_step`): label -> what it is.
TORCH_STEPS = {
    "plain": "plain step: one backward pass of the mean loss",
    "pcgrad_loop": "PCGrad as LibMTL computes it: N backward passes (one per task loss), "
                   "projections on the flattened gradients",
    "pcgrad_torchjd": "PCGrad with torchjd's Gramian engine (autogram.Engine over the "
                      "per-example losses, batch_dim=0; task Gram = M G M^T; "
                      "PCGradWeighting; one weighted backward pass)",
}


def bench_torch(model: str, n: int, per_task: int, rounds: int, k: int, log) -> Optional[dict]:
  """PyTorch reference steps of the same CNN, in a child process (no JAX threads
  around); None if torch is missing. The torchjd step is skipped (noted) if
  torchjd is missing."""
  code = ("import json, experiments.benchmark as b; "
          f"print('RESULT ' + json.dumps(b.torch_step({model!r}, {n}, {per_task}, {rounds}, {k})))")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode != 0 or not line:
    log(f"    torch step failed or torch missing: {proc.stderr.strip()[-300:]}")
    return None
  out = json.loads(line[0][len("RESULT "):])
  if out:
    for name, r in out["steps"].items():
      log(f"    torch {out['torch']} {name} ({model} CNN, {out['examples']} examples, "
          f"{out['threads']} threads): {r['step_ms']:.1f} ms")
    for name, why in out.get("skipped", {}).items():
      log(f"    torch {name}: not timed ({why})")
  return out


def torch_step(model: str, n: int, per_task: int, rounds: int, k: int) -> Optional[dict]:
  """Times PyTorch steps of the CNN (run by :func:`bench_torch`): :data:`TORCH_STEPS`.

  Same architecture, batch (``n`` tasks x ``per_task`` examples, task ``i``
  owning examples ``[i * per_task, (i + 1) * per_task)``), loss and SGD +
  Nesterov as the JAX steps. Rounds are interleaved across the steps.
  """
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from torch import nn as tnn  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  torch.manual_seed(0)
  cfg = CNN_MODELS[model]

  def build():
    """(per-example losses function, layers, parameters, optimizer): one copy
    per step, since torchjd's engine hooks its modules for good."""
    layers, ch = [], 3
    for _ in range(cfg["num_conv"]):
      layers += [tnn.Conv2d(ch, cfg["features"], 3, padding=1), tnn.ReLU(), tnn.MaxPool2d(2)]
      ch = cfg["features"]
    head, width = [], ch
    for _ in range(cfg["mlp_layers"]):
      head += [tnn.Linear(width, cfg["mlp_width"]), tnn.ReLU()]
      width = cfg["mlp_width"]
    head.append(tnn.Linear(width, 100))
    conv, mlp = tnn.Sequential(*layers), tnn.Sequential(*head)
    params = list(conv.parameters()) + list(mlp.parameters())
    per_example_losses = lambda: tnn.functional.cross_entropy(
        mlp(conv(x).mean(dim=(2, 3))), y, reduction="none")
    return (per_example_losses, list(conv) + list(mlp), params,
            torch.optim.SGD(params, lr=0.025, momentum=0.9, nesterov=True))

  b = n * per_task
  x = torch.randn(b, 3, 32, 32)
  y = torch.randint(0, 100, (b,))
  avg = torch.zeros(n, b)  # M: task losses = M @ per-example losses
  for i in range(n):
    avg[i, i * per_task:(i + 1) * per_task] = 1.0 / per_task

  def make_plain():
    per_example_losses, _, _, opt = build()

    def plain():
      opt.zero_grad(set_to_none=True)
      per_example_losses().mean().backward()
      opt.step()
    return plain

  def make_pcgrad_loop():
    per_example_losses, _, params, opt = build()

    def pcgrad_loop():
      opt.zero_grad(set_to_none=True)
      task_losses = avg @ per_example_losses()
      grads = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
          task_losses[i], params, retain_graph=i < n - 1)]) for i in range(n)])
      projected = grads.clone()
      for i in range(n):
        for j in torch.randperm(n).tolist():
          dot = projected[i] @ grads[j]
          if dot < 0:
            projected[i] -= dot / (grads[j] @ grads[j]) * grads[j]
      flat = projected.sum(dim=0)  # LibMTL and torchjd sum the projected gradients
      offset = 0
      for p in params:
        p.grad = flat[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
      opt.step()
    return pcgrad_loop

  steps, skipped = {"plain": make_plain(), "pcgrad_loop": make_pcgrad_loop()}, {}
  try:
    from torchjd import aggregation as tjd_agg  # pylint: disable=g-import-not-at-top
    from torchjd import autogram as tjd_autogram  # pylint: disable=g-import-not-at-top
    per_example_losses, layers, _, opt = build()
    leaves = [m for m in layers if any(True for _ in m.parameters(recurse=False))]
    engine = tjd_autogram.Engine(*leaves, batch_dim=0)
    weighting = tjd_agg.PCGradWeighting()

    def pcgrad_torchjd():
      opt.zero_grad(set_to_none=True)
      per_example = per_example_losses()
      gram = avg @ engine.compute_gramian(per_example) @ avg.T  # [n, n] task Gram
      (avg @ per_example).backward(weighting(gram))
      opt.step()

    steps["pcgrad_torchjd"] = pcgrad_torchjd
  except ImportError as e:
    skipped["pcgrad_torchjd"] = f"torchjd not importable: {e}"

  for fn in steps.values():
    for _ in range(3):
      fn()
  times = {name: [] for name in steps}
  for _ in range(rounds):
    for name, fn in steps.items():
      t0 = time.perf_counter()
      for _ in range(k):
        fn()
      times[name].append((time.perf_counter() - t0) / k)
  out = {"torch": torch.__version__, "torchjd": _version("torchjd") if "pcgrad_torchjd" in steps else None,
         "threads": torch.get_num_threads(), "model": model, "examples": b, "tasks": n,
         "steps": {name: {"step_ms": 1e3 * statistics.median(ts), "what": TORCH_STEPS[name],
                          "runs_ms": [1e3 * t for t in ts]} for name, ts in times.items()},
         "skipped": skipped}
  return out


# ---------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------


def _find(rows, label):
  for r in rows:
    if r["label"] == label:
      return r
  return None


def evaluate_targets(res: dict) -> list[dict]:
  out = []

  def add(name, what, value, target, unit="x"):
    if value is None:
      return
    out.append({"target": name, "what": what, "value": value, "limit": target, "unit": unit,
                "met": bool(value <= target)})

  small = res.get("cnn", {}).get("small")
  if small:
    rows = small["rows"]
    best_t100 = [r for r in rows if r["label"].startswith("L-DRO T=100")]
    if best_t100:
      r = min(best_t100, key=lambda r: r["ratio_to_plain"])
      add("ldro_t100_small", f"small CNN, {r['label']}", r["ratio_to_plain"],
          TARGETS["ldro_t100_small"])
    t1 = [r for r in rows if r["label"].startswith("L-DRO T=1 ")]
    if t1:
      r = min(t1, key=lambda r: r["ratio_to_plain"])
      add("ldro_t1_small", f"small CNN, {r['label']}", r["ratio_to_plain"],
          TARGETS["ldro_t1_small"])
    pcgrad = _find(rows, "PCGrad (jacobian)")
    if pcgrad:
      add("pcgrad_small", "small CNN, PCGrad (jacobian)", pcgrad["ratio_to_plain"],
          TARGETS["pcgrad_small"])
    # Absolute goals (issue 6): our L-DRO T=100 step no slower than PyTorch's
    # plain step, our PCGrad no slower than torchjd's; ratios of step times.
    torch_res = res.get("torch") or {}
    ref = torch_res.get("steps", {})
    if best_t100 and "plain" in ref and torch_res.get("model") == "small":
      r = min(best_t100, key=lambda r: r["step_ms"])
      add("ldro_t100_vs_torch_plain", f"small CNN, {r['label']} step / PyTorch "
          f"{torch_res['torch']} plain step", r["step_ms"] / ref["plain"]["step_ms"],
          TARGETS["ldro_t100_vs_torch_plain"])
    if pcgrad and "pcgrad_torchjd" in ref and torch_res.get("model") == "small":
      add("pcgrad_vs_torchjd", f"small CNN, PCGrad (jacobian) step / torchjd "
          f"{torch_res.get('torchjd')} PCGrad step",
          pcgrad["step_ms"] / ref["pcgrad_torchjd"]["step_ms"],
          TARGETS["pcgrad_vs_torchjd"])
  lm = res.get("lm")
  if lm:
    lean = [r for r in lm["rows"] if r["label"].startswith("L-DRO T=1000 (lean, pairwise")
            or r["label"].startswith("L-DRO T=1000 (lean, chunked")]
    if lean:
      r = min(lean, key=lambda r: r["ratio_to_plain"])
      add("lm_t1000", f"tiny decoder, {r['label']}", r["ratio_to_plain"], TARGETS["lm_t1000"])
  solvers = res.get("solvers")
  if solvers:
    worst = max(solvers["maxent_nash"], key=lambda r: r["median_ms"])
    add("maxent_nash_ms", f"maxent_nash N={worst['n']} ({worst['game']} game, worst of "
        f"{len(solvers['maxent_nash'])})", worst["median_ms"], TARGETS["maxent_nash_ms"], "ms")
    u = solvers["update_weights"]
    add("update_weights_ms", f"update_weights N={u['n']}", u["median_ms"],
        TARGETS["update_weights_ms"], "ms")
  return out


def _fmt_rows(rows, title) -> list[str]:
  lines = [f"### {title}", "",
           "| method | ordinary step ms | refresh step ms | T | step ms (amortised) | steps/s "
           "| x plain | x plain (fastest runs) | executables | page faults / step |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    ref = f"{r['refresh_ms']:.1f}" if "refresh_ms" in r else ""
    pf = r.get("page_faults_per_step")
    lines.append(f"| {r['label']} | {r['ordinary_ms']:.1f} | {ref} | {r['period'] or ''} | "
                 f"{r['step_ms']:.2f} | {r['steps_per_s']:.2f} | {r['ratio_to_plain']:.3f} | "
                 f"{r['ratio_to_plain_min']:.3f} | {r['executables']} | "
                 f"{'' if pf is None else f'{pf:.0f}'} |")
  return lines + [""]


def to_markdown(res: dict) -> str:
  m = res["machine"]
  lines = ["# L-DRO benchmark" + (" (quick)" if res["quick"] else ""), "",
           f"Command: `{res['command']}`  ", f"Date (UTC): {res['date']}; "
           f"total {res['total_s']:.0f} s.", "",
           f"Machine: {m['cpu_model']}, {m['cpu_cores']} cores ({m['cpu_cores_usable']} usable); "
           f"device {m['platform']} / {m['device_kind']} x{m['device_count']}; jax {m['jax']}, "
           f"jaxlib {m['jaxlib']}, flax {m['flax']}, optax {m['optax']}, "
           f"Python {m['python']}.", ""]
  tg = res.get("targets", [])
  if tg:
    lines += ["## Targets", "", "| target | measured | limit | met |", "|---|---|---|---|"]
    for t in tg:
      v = f"x{t['value']:.3f}" if t["unit"] == "x" else f"{t['value']:.3f} ms"
      lim = f"x{t['limit']}" if t["unit"] == "x" else f"{t['limit']} ms"
      lines.append(f"| {t['what']} | {v} | {lim} | {'yes' if t['met'] else 'NO'} |")
    lines.append("")
  lines += ["## Steps per second", "",
            "Ratios are to the plain step measured in the same process, rounds interleaved "
            "(medians; `fastest runs`: the same from each method's fastest runs). "
            "`executables`: compiled versions of the step after timing both phases "
            "(1 = refresh steps did not recompile).", ""]
  for model, r in res.get("cnn", {}).items():
    lines += _fmt_rows(r["rows"], f"{model} CNN, N={r['n']}, {r['per_task']} examples per task "
                       f"({r['n'] * r['per_task']} per step)")
  if res.get("direct"):
    lines += ["### Direct check: whole periods of consecutive steps (small CNN)", "",
              "| run | steps | step ms | steps/s | x plain |", "|---|---|---|---|---|"]
    for r in res["direct"]:
      lines.append(f"| {r['label']} | {r['steps']} | {r['step_ms']:.2f} | "
                   f"{r['steps_per_s']:.2f} | {r['ratio_to_plain']:.3f} |")
    lines.append("")
  for name in CHILD_CHECKS:
    check = res.get(f"{name}_check")
    if not check:
      continue
    lines += [f"### The same small-CNN steps {check['what']} (child process)", "",
              f"`XLA_FLAGS='{check['xla_flags']}'`, "
              f"`GLIBC_TUNABLES='{check['glibc_tunables']}'`"
              + (f", arguments `{' '.join(check.get('args', []))}`" if check.get("args") else ""),
              "",
              "| method | step ms | x plain | page faults / ordinary step |", "|---|---|---|---|"]
    for r in check["rows"]:
      lines.append(f"| {r['label']} | {r['step_ms']:.2f} | {r['ratio_to_plain']:.3f} | "
                   f"{r['page_faults_per_step']:.0f} |")
    lines.append("")
  if res.get("torch"):
    t = res["torch"]
    jax_rows = res.get("cnn", {}).get(t["model"], {}).get("rows", [])
    lines += [f"### PyTorch {t['torch']} reference steps ({t['threads']} threads, child process), "
              f"same {t['model']} CNN, {t['examples']} examples, {t['tasks']} tasks", "",
              "| step | ms | x PyTorch plain | what |", "|---|---|---|---|"]
    steps = t["steps"]
    for name, r in steps.items():
      lines.append(f"| torch {name} | {r['step_ms']:.1f} | "
                   f"{r['step_ms'] / steps['plain']['step_ms']:.2f} | {r['what']} |")
    for label in ("plain", "L-DRO T=100 (lean, grouped)", "PCGrad (jacobian)"):
      r = _find(jax_rows, label)
      if r:
        lines.append(f"| ours: {label} | {r['step_ms']:.1f} | "
                     f"{r['step_ms'] / steps['plain']['step_ms']:.2f} | JAX, this run |")
    for name, why in t.get("skipped", {}).items():
      lines.append(f"| torch {name} | - | - | not timed: {why} |")
    lines.append("")
  if res.get("lm"):
    r = res["lm"]
    lines += _fmt_rows(r["rows"], f"tiny decoder, N={r['n']}, {r['rows_per_task']} row(s) of "
                       f"{r['length']} tokens per language, {r['num_params']:,} parameters")
  if res.get("scaling"):
    lines += ["## Interaction-step cost per Gram strategy", "",
              f"One L-DRO step that refreshes the Gram matrix, / one plain step on the same "
              f"examples ({res['scaling_model']} CNN, {res['scaling_batch']} // N examples per "
              "task).", ""]
    ns = sorted({r["n"] for r in res["scaling"]})
    strategies = list(dict.fromkeys(r["strategy"] for r in res["scaling"]))
    lines += ["| strategy | " + " | ".join(f"N={n}" for n in ns) + " |",
              "|---|" + "---|" * len(ns)]
    for s in strategies:
      cells = []
      for n in ns:
        r = [x for x in res["scaling"] if x["n"] == n and x["strategy"] == s]
        cells.append(f"x{r[0]['ratio']:.2f}" if r else "")
      lines.append(f"| {s} | " + " | ".join(cells) + " |")
    plain = {r["n"]: r["plain_ms"] for r in res["scaling"]}
    lines.append("| (plain step ms) | " + " | ".join(f"{plain[n]:.1f}" for n in ns) + " |")
    lines.append("")
  if res.get("memory"):
    mem = res["memory"]
    lines += ["## Memory of the Gram computation (compiled memory analysis)", "",
              f"{mem['model']} ({mem['num_params']:,} parameters, one gradient "
              f"{mem['gradient_mib']:.1f} MiB). `temp`: XLA temporaries of the compiled Gram "
              "computation (excluding the parameters and the batch).", "",
              "| strategy | chunk | N | temp MiB | temp / gradient |", "|---|---|---|---|---|"]
    for r in mem["by_chunk"] + mem["by_n"]:
      tmp = r.get("temp_bytes", 0) / 2**20
      lines.append(f"| {r['strategy']} | {r['chunk'] or ''} | {r['n']} | {tmp:.1f} | "
                   f"{tmp / mem['gradient_mib']:.1f} |")
    lines.append("")
  if res.get("solvers"):
    s = res["solvers"]
    lines += ["## Solvers (jitted, median of repeated calls)", "",
              "| solver | N | game | median ms | min ms | LP pivots | Newton its |",
              "|---|---|---|---|---|---|---|"]
    for r in s["maxent_nash"]:
      lines.append(f"| maxent_nash | {r['n']} | {r['game']} | {r['median_ms']:.2f} | "
                   f"{r['min_ms']:.2f} | {r['lp_iterations']} | {r['newton_iterations']} |")
    u = s["update_weights"]
    lines.append(f"| update_weights | {u['n']} | normal | {u['median_ms']:.3f} | "
                 f"{u['min_ms']:.3f} | | |")
    lines.append("")
  return "\n".join(lines)


def plot_scaling(rows: list[dict], path: str, title: str) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.0, 4.2))
  strategies = list(dict.fromkeys(r["strategy"] for r in rows))
  for s in strategies:
    pts = sorted((r["n"], r["ratio"]) for r in rows if r["strategy"] == s)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=s)
  ns = sorted({r["n"] for r in rows})
  ax.plot(ns, ns, color="gray", ls=":", lw=1, label="N (reference)")
  ax.plot(ns, [(n + 1) / 2 for n in ns], color="gray", ls="--", lw=1, label="(N+1)/2 (reference)")
  ax.set_xscale("log")
  ax.set_yscale("log")
  ax.set_xlabel("number of tasks N")
  ax.set_ylabel("interaction step / plain step")
  ax.set_title(title, fontsize=9)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=130)
  plt.close(fig)


# ---------------------------------------------------------------------------
# Main.
# ---------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--quick", action="store_true", help="CI-sized run (tiny sizes).")
  p.add_argument("--out", default=None,
                 help="output folder (default results/benchmark, or results/benchmark/quick "
                      "with --quick, so a quick run never overwrites the full results).")
  p.add_argument("--sections",
                 default="cnn,direct,allocator,convs,xla_ops,torch,lm,scaling,memory,solvers",
                 help="comma-separated subset of cnn,direct,allocator,convs,xla_ops,torch,lm,scaling,"
                      "memory,solvers.")
  p.add_argument("--cnn_models", default=None, help="e.g. 'small,large'.")
  p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds.")
  p.add_argument("--scaling_ns", default=None, help="e.g. '2,5,10,20,50,100'.")
  p.add_argument("--untuned", action="store_true",
                 help="run in the environment as given: no re-exec under the settings of "
                      "experiments/runner/cpu_runtime.py (see README).")
  p.add_argument("--methods", default=None,
                 help="only the methods whose label contains one of these comma-separated "
                      "strings (commas inside parentheses do not separate; plain is always "
                      "timed).")
  p.add_argument("--conv_impl", default="auto", choices=cnn.CONV_IMPLS,
                 help="the CNNs' convolution/max-pool kernels (ldro.models.cnn.resolve_conv_impl): "
                      "'auto' = the custom VJPs on CPU, XLA's own ops on GPU/TPU.")
  p.add_argument("--strategies", default=None,
                 help="only these comma-separated scaling strategies (e.g. 'grouped,pairwise').")
  return p.parse_args(argv)


def split_methods(spec: str) -> list[str]:
  """``--methods`` items: comma-separated, but not at commas inside parentheses."""
  return [x.strip() for x in re.split(r",(?![^()]*\))", spec) if x.strip()]


#: Child checks of the full run: the small-CNN rows with one setting undone,
#: as (what, environment change, extra arguments).
CHILD_CHECKS = {
    "allocator": ("without the malloc tunables (GLIBC_TUNABLES unset)",
                  lambda env: {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"}, []),
    "convs": ("with XLA:CPU's default (YNNPACK) convolutions",
              lambda env: dict(env, XLA_FLAGS=" ".join(
                  f for f in env.get("XLA_FLAGS", "").split()
                  if not f.startswith(cpu_runtime.YNN_OPTION))), []),
    "xla_ops": ("with XLA's own convolution and max-pool gradients (conv_impl='xla')",
                lambda env: env, ["--conv_impl", "xla"]),
}


def child_check(name: str, methods: str, rounds: int, log) -> Optional[dict]:
  """The small-CNN rows again in a child process with one CPU setting undone."""
  what, undo, extra_args = CHILD_CHECKS[name]
  with tempfile.TemporaryDirectory() as tmp:
    env = undo(cpu_runtime.tuned_env())
    cmd = [sys.executable, "-m", "experiments.benchmark", "--sections", "cnn", "--cnn_models",
           "small", "--methods", methods, "--rounds", str(rounds), "--untuned", "--out", tmp,
           *extra_args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    path = os.path.join(tmp, "benchmark.json")
    if proc.returncode != 0 or not os.path.exists(path):
      log(f"    {name} check failed: {proc.stderr[-500:]}")
      return None
    with open(path, encoding="utf-8") as f:
      rows = json.load(f)["cnn"]["small"]["rows"]
  for r in rows:
    log(f"    {what}: {r['label']:36s} {r['step_ms']:8.2f} ms x{r['ratio_to_plain']:.3f} "
        f"({r['page_faults_per_step']:.0f} page faults/step)")
  return {"what": what, "xla_flags": env.get("XLA_FLAGS", ""),
          "glibc_tunables": env.get("GLIBC_TUNABLES", ""), "args": extra_args, "rows": rows}


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.out is None:
    args.out = "results/benchmark/quick" if args.quick else "results/benchmark"
  quick = args.quick
  sections = set(args.sections.split(","))
  log = lambda s: print(s, flush=True)
  t_start = time.perf_counter()
  command = "python -m experiments.benchmark" + (
      " " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
      if (sys.argv[1:] if argv is None else argv) else "")
  if not args.untuned and argv is None:
    command += "  # (re-runs itself under experiments/runner/cpu_runtime.py's settings)"
  res: dict = {"quick": quick, "command": command.strip(),
               "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
               "machine": machine_info(),
               "conv_impl": cnn.resolve_conv_impl(args.conv_impl)}
  log(f"machine: {json.dumps(res['machine'])}")

  if quick:
    models = (args.cnn_models or "tiny").split(",")
    n_cnn, per_task = 4, 2
    rounds, k, k_ref = args.rounds or 2, 2, 1
    scaling_strategies = [s for s in SCALING_STRATEGIES if s[2] != "chunked"]
    cnn_methods = [m for m in CNN_METHODS if m["label"] in CNN_METHODS_QUICK]
    lm_size, n_lm = "test", 4
    lm_methods = [m for m in LM_METHODS if m["label"] in LM_METHODS_QUICK]
    scaling_ns = [int(x) for x in (args.scaling_ns or "2,3").split(",")]
    scaling_model, scaling_batch = "tiny", 8
    mem = dict(n=4, chunks=[1, 4], ns=[2], fixed=1, others=("grouped",))
    n_nash, n_update = 20, 100
    direct_steps = 0
  else:
    models = (args.cnn_models or "small,large").split(",")
    n_cnn, per_task = 20, 128 // 20
    rounds, k, k_ref = args.rounds or 7, 10, 2
    cnn_methods = CNN_METHODS
    lm_size, n_lm, lm_methods = "tiny", 40, LM_METHODS
    scaling_ns = [int(x) for x in (args.scaling_ns or "2,5,10,20,50,100").split(",")]
    scaling_model, scaling_batch = "small", 128
    mem = dict(n=40, chunks=[1, 2, 4, 8, 20, 40], ns=[10, 20, 40, 80], fixed=4,
               others=("grouped", "jacrev"))
    scaling_strategies = SCALING_STRATEGIES
    n_nash, n_update = 100, 1000
    direct_steps = 100

  if args.methods:
    keep = lambda m: any(x in m["label"] for x in split_methods(args.methods))
    cnn_methods = [m for m in cnn_methods if keep(m)]
    lm_methods = [m for m in lm_methods if keep(m)]
  if args.strategies:
    names = args.strategies.split(",")
    scaling_strategies = [s for s in SCALING_STRATEGIES
                          if s[2] in names or s[0].split(" ")[0] in names]
  if "cnn" in sections:
    res["cnn"] = {}
    for model in models:
      log(f"== {model} CNN: N={n_cnn}, {per_task} examples per task")
      wl = cnn_workload(model, n_cnn, per_task, conv_impl=args.conv_impl)
      if model == "large" and not quick:  # ~1 s steps: fewer, shorter rounds
        out = bench_steps(wl, cnn_methods, max(2, rounds - 2), 2, 1, log)
      elif model == "small" and not quick and not args.rounds:
        # ~30 ms steps: 15 rounds (~1 min in all), medians robust to the bursts of
        # other workers' load on a shared machine.
        out = bench_steps(wl, cnn_methods, 15, k, k_ref, log)
      else:
        out = bench_steps(wl, cnn_methods, rounds, k, k_ref, log)
      out.update(n=n_cnn, per_task=per_task,
                 num_params=int(sum(x.size for x in jax.tree_util.tree_leaves(wl[1]))))
      res["cnn"][model] = out
      for r in out["rows"]:
        log(f"  {r['label']:36s} {r['step_ms']:9.2f} ms/step {r['steps_per_s']:8.2f} steps/s "
            f"x{r['ratio_to_plain']:.3f}")
      if "direct" in sections and direct_steps and model == "small":
        log("== direct check (whole periods), small CNN")
        specs = [m for m in cnn_methods if m["label"] in ("L-DRO T=100 (lean, grouped)",
                                                          "L-DRO T=100 (jacobian)")]
        res["direct"] = bench_direct(wl, specs, direct_steps, 3, log)
  for name in CHILD_CHECKS:
    if name in sections and not quick and not args.untuned:
      log(f"== {name} check: small CNN {CHILD_CHECKS[name][0]}")
      res[f"{name}_check"] = child_check(
          name, "L-DRO T=100 (lean, grouped),PCGrad,group DRO", max(2, rounds // 2), log)
  if "torch" in sections:
    log("== PyTorch plain step (if torch is importable)")
    res["torch"] = bench_torch(models[0], n_cnn, per_task, 3 if quick else 5, 2 if quick else 10,
                               log)
  if "lm" in sections:
    log(f"== decoder ({lm_size}): N={n_lm}")
    wl = lm_workload(lm_size, n_lm)
    if quick:
      out = bench_steps(wl, lm_methods, rounds, k, k_ref, log)
    else:  # ~1 s steps, refreshes of up to ~15 s
      out = bench_steps(wl, lm_methods, max(2, rounds - 2), 5, 1, log)
    cfg = LM_CONFIGS[lm_size]
    out.update(n=n_lm, rows_per_task=1, length=cfg["length"],
               num_params=int(sum(x.size for x in jax.tree_util.tree_leaves(wl[1]))))
    res["lm"] = out
    for r in out["rows"]:
      log(f"  {r['label']:36s} {r['step_ms']:9.2f} ms/step {r['steps_per_s']:8.2f} steps/s "
          f"x{r['ratio_to_plain']:.3f}")
  if "scaling" in sections:
    log(f"== interaction-step cost per Gram strategy ({scaling_model} CNN)")
    res["scaling"] = bench_scaling(scaling_model, scaling_ns, scaling_batch, scaling_strategies,
                                   log)
    res["scaling_model"], res["scaling_batch"] = scaling_model, scaling_batch
  if "memory" in sections:
    log(f"== memory of the chunked Gram strategy (decoder {lm_size})")
    res["memory"] = bench_memory(lm_size, mem["n"], mem["chunks"], mem["ns"], mem["fixed"],
                                 mem["others"], log)
  if "solvers" in sections:
    log("== solvers")
    res["solvers"] = bench_solvers(n_nash, n_update, log, 0.05 if quick else 1.0)

  res["targets"] = evaluate_targets(res)
  res["total_s"] = time.perf_counter() - t_start
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "benchmark.json"), "w", encoding="utf-8") as f:
    json.dump(res, f, indent=1)
  md = to_markdown(res)
  with open(os.path.join(args.out, "benchmark.md"), "w", encoding="utf-8") as f:
    f.write(md + "\n")
  if res.get("scaling"):
    plot_scaling(res["scaling"], os.path.join(args.out, "scaling.png"),
                 f"interaction step / plain step ({scaling_model} CNN, "
                 f"{scaling_batch}//N examples per task)")
  print(md)
  return res


if __name__ == "__main__":
  main()
