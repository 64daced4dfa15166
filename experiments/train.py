r"""Trains a multitask model with a gin-selected experiment and method.

    python -m experiments.train --gin_file=gin_configs/synthetic/ldro.gin \
        --workdir=/tmp/ldro_synthetic [--gin_bindings='train_and_evaluate.num_steps=200']

Without ``--gin_file`` the embedded default (the synthetic experiment with
online L-DRO) runs. Re-running the same command resumes from the last
checkpoint in ``--workdir``.

The workdir gets ``config.gin`` (operative config), ``metrics.jsonl`` (one
JSON object per evaluation), TensorBoard events under ``tb/`` and orbax
checkpoints under ``checkpoints/``.
"""

if __name__ == "__main__":  # before JAX starts: see experiments/cpu_runtime.py
  from experiments import cpu_runtime as _cpu_runtime  # pylint: disable=g-import-not-at-top
  _cpu_runtime.configure_process("experiments.train")

import json
import os
import sys
import time
from typing import Any, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
import gin
import jax
import numpy as np
import optax

from ldro import metrics as ldro_metrics
from ldro import train as ldro_train
from experiments import configurables
from experiments import metrics_io
from experiments import experiment as experiment_lib
from experiments import sharding

_GIN_FILE = flags.DEFINE_multi_string("gin_file", [], "Gin config files (repeatable).")
_GIN_BINDINGS = flags.DEFINE_multi_string("gin_bindings", [], "Gin bindings (repeatable).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-host: host:port of process 0 (jax.distributed).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: this process's id.")
_MULTIHOST = flags.DEFINE_bool("multihost", False,
                               "Call jax.distributed.initialize() with the environment's "
                               "defaults (Cloud TPU pod slices, SLURM, ...).")

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "gin_configs", "synthetic", "ldro.gin")


class MetricsWriter:
  """Appends evaluation records to ``metrics.jsonl`` (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True, purge_step: Optional[int] = None):
    """``purge_step``: on resume, TensorBoard drops older events at steps >= it."""
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.enabled = enabled
    self._tb = None
    if enabled:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tb"), purge_step=purge_step)
      except ImportError:  # TensorBoard logging is optional
        self._tb = None

  def truncate_after(self, step: int) -> None:
    """Drops records with ``step > step`` (written after the checkpoint we resume from)."""
    if not self.enabled or not os.path.exists(self.path):
      return
    keep = [r for r in metrics_io.read_metrics(self.path) if r["step"] <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:  # the same lines write() made
      f.write("".join(self._line(r) for r in keep))
    os.replace(tmp, self.path)

  @staticmethod
  def _line(record: dict) -> str:
    return json.dumps(record, sort_keys=True) + "\n"

  def write(self, record: dict) -> None:
    if not self.enabled:
      return
    with open(self.path, "a", encoding="utf-8") as f:
      f.write(self._line(record))
      f.flush()
      os.fsync(f.fileno())
    if self._tb is not None:
      step = record["step"]
      for k, v in record.items():
        if isinstance(v, (int, float)) and k != "step":
          self._tb.add_scalar(k, v, step)
      for k in ("task_weights",):
        for i, x in enumerate(record.get(k, [])):
          self._tb.add_scalar(f"{k}/{i}", x, step)
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def _checkpoint_manager(workdir: str, keep: int):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  # cleanup_tmp_directories: remove checkpoints half-written by a killed run
  # (``<step>.orbax-checkpoint-tmp-*``); they are never restored from.
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                         cleanup_tmp_directories=True)
  # The standard handler, named up front, also lets item_metadata() read shapes.
  return ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")),
                               options=options, item_handlers=ocp.StandardCheckpointHandler())


def _restore(mngr, state: ldro_train.TrainState, shardings=None) -> tuple[ldro_train.TrainState, int]:
  """Restores the newest readable checkpoint (``(state, 0)`` if there is none).

  Half-written checkpoints (orbax's tmp directories) are never listed. A
  finalized checkpoint that cannot be read (damaged files) is skipped with a
  warning in favour of the previous one, and moved to
  ``<workdir>/checkpoints_unreadable/`` so the run can save that step again;
  this happens only if an older checkpoint restores, so a config that does not
  match the checkpoints (e.g. another model) is an error and moves nothing.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return state, 0

  def abstract(x, s=None):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s if s is not None else x.sharding)

  if shardings is not None:
    target = jax.tree_util.tree_map(abstract, state, shardings)
  else:
    target = jax.tree_util.tree_map(abstract, state)
  failed = []
  for step in steps:
    mismatch = _shape_mismatch(mngr, step, target)
    if mismatch:  # decided from metadata: a failing orbax restore leaves noisy threads
      failed.append((step, ValueError(mismatch)))
      continue
    try:
      restored = mngr.restore(step, args=ocp.args.StandardRestore(target))
      if int(restored.step) != int(step):
        raise ValueError(f"checkpoint {step} holds a state at step {int(restored.step)}")
    except Exception as e:  # pylint: disable=broad-except
      failed.append((step, e))
      continue
    if failed and jax.process_index() == 0:
      aside = os.path.join(os.path.dirname(str(mngr.directory)), "checkpoints_unreadable")
      os.makedirs(aside, exist_ok=True)
      for bad, e in failed:
        src = os.path.join(str(mngr.directory), str(bad))
        dst = os.path.join(aside, f"{bad}-{time.strftime('%Y%m%d-%H%M%S')}")
        if os.path.isdir(src):
          os.replace(src, dst)
        print(f"warning: checkpoint {bad} is unreadable ({type(e).__name__}: "
              f"{_first_line(e)[:200]}); moved to {dst}; resuming from checkpoint {step}",
              file=sys.stderr, flush=True)
      mngr.reload()
    return restored, int(step)
  step, e = failed[0]
  raise ValueError(
      f"no checkpoint in {mngr.directory} (steps {steps}) can be restored into this run's state; "
      f"was the workdir written with another config? Checkpoint {step}: {type(e).__name__}: "
      f"{_first_line(e)[:300]}")


def _shape_mismatch(mngr, step: int, target) -> Optional[str]:
  """Why checkpoint ``step`` cannot hold ``target`` (array shapes/dtypes), else None.

  Compares the multisets of (shape, dtype) of the checkpoint's metadata and of
  the target, so tree naming does not matter; unreadable metadata returns None
  (the restore then decides).
  """
  try:
    meta = mngr.item_metadata(step)
    got = sorted((tuple(m.shape), str(m.dtype)) for m in jax.tree_util.tree_leaves(meta))
  except Exception:  # pylint: disable=broad-except
    return None
  want = sorted((tuple(x.shape), str(x.dtype)) for x in jax.tree_util.tree_leaves(target))
  if got == want:
    return None
  only_run = [x for x in want if x not in got][:3]
  only_ckpt = [x for x in got if x not in want][:3]
  return (f"this run's state is not compatible with the stored shapes: arrays (shape, dtype) "
          f"only in this run {only_run}, only in the checkpoint {only_ckpt}")


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else repr(e)


def evaluation_record(exp: experiment_lib.Experiment, state: ldro_train.TrainState,
                      train_metrics: Optional[dict]) -> dict:
  """One ``metrics.jsonl`` record: per-task metrics, avg/worst, task weights."""
  ev = exp.evaluate(sharding.host_local(state.params))
  key = f"task_{exp.main_metric}"
  if key not in ev:
    raise KeyError(f"experiment.evaluate() must return {key!r}.")
  avg, worst = ldro_metrics.average_and_worst(ev[key], exp.higher_is_better)
  record = {"step": int(state.step), f"avg_{exp.main_metric}": avg,
            f"worst_{exp.main_metric}": worst}
  record.update(ev)
  weights = getattr(exp, "sampling_rates", None)  # plain mode: the data mixture's rates
  if weights is None:
    weights = ldro_train._maybe_task_weights(state.opt_state, exp.num_tasks)  # pylint: disable=protected-access
  record["task_weights"] = [float(x) for x in np.asarray(weights)]
  if train_metrics is not None:
    record["train_task_losses"] = [float(x) for x in np.asarray(train_metrics["task_losses"])]
  return record


def _format_line(step, num_steps, rate, exp, record_or_losses) -> str:
  if isinstance(record_or_losses, dict):
    m = exp.main_metric
    return (f"step {step}/{num_steps} | {rate:.1f} steps/s | avg {m} "
            f"{record_or_losses[f'avg_{m}']:.4f} | worst {m} {record_or_losses[f'worst_{m}']:.4f}")
  losses = np.asarray(record_or_losses)
  return (f"step {step}/{num_steps} | {rate:.1f} steps/s | avg train loss {losses.mean():.4f} | "
          f"worst train loss {losses.max():.4f}")


@gin.configurable(denylist=["workdir"])
def train_and_evaluate(
    workdir: str,
    experiment: experiment_lib.Experiment = gin.REQUIRED,
    num_steps: int = 500,
    eval_every: int = 50,
    log_every: int = 50,
    checkpoint_every: int = 100,
    keep_checkpoints: int = 2,
    seed: int = 0,
    mode: str = "jacobian",
    gram_strategy: str = "grouped",
    chunk_size: Optional[int] = None,
    nonfinite: str = "error",
    baseline_losses: Optional[Sequence[float]] = None,
    mesh_shape: Optional[Sequence[int]] = None,
    quiet: bool = False,
) -> list[dict]:
  """Trains and evaluates; resumes from the latest checkpoint in ``workdir``.

  Args:
    workdir: output directory.
    experiment: the experiment (tasks, data, model, evaluation).
    num_steps: total training steps.
    eval_every: evaluation interval (also at step 0 and at the end).
    log_every: progress-line interval.
    checkpoint_every: checkpoint interval (also at the end).
    keep_checkpoints: checkpoints kept.
    seed: PRNG seed (initialisation and per-step randomness).
    mode: ``'jacobian'`` or ``'lean'`` (see :mod:`ldro.train`), or ``'plain'``:
      ordinary training on ``experiment.plain_loss`` with the experiment's own
      batches (e.g. static mixing by sampling rates); no weighting method.
    gram_strategy: Gram strategy for lean mode.
    chunk_size: chunk size for the ``chunked`` strategy.
    nonfinite: ``'error'`` (stop, naming the step and task) or ``'skip'``
      (skip such steps, keeping params and task weights).
    baseline_losses: per-task baselines for ``baselined_dro``.
    mesh_shape: ``(data, fsdp)`` device mesh (default: all devices on
      ``data``); see :mod:`experiments.sharding`.
    quiet: suppress progress lines.

  Returns:
    The evaluation records written during this call.
  """
  if nonfinite not in ("error", "skip"):
    raise ValueError(f"train_and_evaluate.nonfinite must be 'error' or 'skip', got {nonfinite!r}.")
  for name, v in (("num_steps", num_steps), ("eval_every", eval_every), ("log_every", log_every),
                  ("checkpoint_every", checkpoint_every)):
    if int(v) < 1:
      raise ValueError(f"train_and_evaluate.{name} must be >= 1, got {v}.")
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  lock = _lock_workdir(workdir) if is_main else None  # one run per workdir at a time
  exp = experiment
  n = exp.num_tasks
  if mode == "plain":  # ordinary training on the experiment's own (e.g. mixture) batches
    tx = optax.chain(*configurables.optimizer())
    step_builder = lambda ps: ldro_train.make_plain_step(exp.plain_loss, tx, n, param_shardings=ps)
  else:
    weighting = configurables.method(num_tasks=n, task_sizes=exp.task_sizes,
                                     baseline_losses=baseline_losses)
    tx = optax.chain(weighting, *configurables.optimizer())
    step_builder = lambda ps: ldro_train.make_train_step(
        exp.task_loss, tx, mode=mode, gram_strategy=gram_strategy, chunk_size=chunk_size,
        param_shardings=ps, losses_fn=exp.grouped_losses if mode == "lean" else None,
        reuse_refresh_grads=exp.reuse_refresh_grads)

  rng = jax.random.PRNGKey(seed)
  init_rng, train_rng = jax.random.split(rng)
  mesh = sharding.make_mesh(mesh_shape)
  params = exp.init_params(init_rng)
  state = ldro_train.init_train_state(params, tx, train_rng)
  state_shardings = sharding.state_shardings(state, mesh)
  state = jax.device_put(state, state_shardings)
  step_fn = jax.jit(
      step_builder(state_shardings.params),
      in_shardings=(state_shardings, None),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=0)

  mngr = _checkpoint_manager(workdir, keep_checkpoints)
  writer = None
  try:
    state, start = _restore(mngr, state, state_shardings)
    # Records after the checkpoint are rewritten: drop them (and their TB events).
    writer = MetricsWriter(workdir, enabled=is_main, purge_step=start + 1 if start > 0 else 0)
    writer.truncate_after(start if start > 0 else -1)
    say = (lambda s: print(s, flush=True)) if (is_main and not quiet) else (lambda s: None)
    if start:
      say(f"resumed from checkpoint at step {start} in {workdir}")
    if start >= num_steps:
      say(f"already trained for {start} >= {num_steps} steps")
    records = []
    if start == 0:
      rec = evaluation_record(exp, state, None)
      writer.write(rec)
      records.append(rec)

    config_written = False
    t0, steps_since = time.perf_counter(), 0
    train_metrics = None
    for step in range(start, num_steps):
      # Multi-host: each process keeps its slice (sharding.process_slice) of the global batch.
      batch = sharding.shard_batch(exp.train_batch(step), mesh, task_grouped=mode != "plain")
      state, train_metrics = step_fn(state, batch)
      steps_since += 1
      done = step + 1
      if not config_written and is_main:
        config_path = os.path.join(workdir, "config.gin")
        with open(config_path + ".tmp", "w", encoding="utf-8") as f:  # atomic: a kill never
          f.write(gin.operative_config_str())                        # leaves a torn file
        os.replace(config_path + ".tmp", config_path)
        config_written = True
      last = done == num_steps
      if done % log_every == 0 or done % eval_every == 0 or last:
        _check_finite(state, exp, nonfinite, say)
        jax.block_until_ready(train_metrics)
        rate = steps_since / max(time.perf_counter() - t0, 1e-9)
        if done % eval_every == 0 or last:
          rec = evaluation_record(exp, state, jax.device_get(train_metrics))
          writer.write(rec)
          records.append(rec)
          say(_format_line(done, num_steps, rate, exp, rec))
        else:
          say(_format_line(done, num_steps, rate, exp,
                           jax.device_get(train_metrics["task_losses"])))
        t0, steps_since = time.perf_counter(), 0
      if done % checkpoint_every == 0 or last:
        mngr.save(done, args=_save_args(state))
  finally:
    # Also on errors: finish pending async saves and stop orbax's threads before the
    # error propagates, so the process ends with one error line, not a thread traceback.
    try:
      mngr.wait_until_finished()
      mngr.close()
    finally:
      if writer is not None:
        writer.close()
      _unlock_workdir(lock)
  return records


_WORKDIR_LOCKS: dict[str, Any] = {}


def _lock_workdir(workdir: str) -> str:
  """Takes an exclusive lock on ``<workdir>/.lock`` (released when the process dies).

  Two runs writing one workdir (e.g. a killed sweep's orphaned run and its
  restart) would corrupt its checkpoints and metrics; the second one stops.
  """
  import fcntl  # pylint: disable=g-import-not-at-top
  import socket  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.abspath(workdir), ".lock")
  old = _WORKDIR_LOCKS.pop(path, None)
  if old is not None:  # left by an earlier call of this process that raised
    old.close()
  f = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    holder = f.read().strip() or "another process"
    f.close()
    raise BlockingIOError(f"workdir {workdir} is in use by a running training process "
                          f"({holder}); two runs must not share a workdir.") from None
  f.seek(0)
  f.truncate()
  f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
  f.flush()
  _WORKDIR_LOCKS[path] = f
  return path


def _unlock_workdir(path: Optional[str]) -> None:
  f = _WORKDIR_LOCKS.pop(path, None) if path else None
  if f is not None:
    f.close()


def _save_args(state):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.args.StandardSave(state)


def _check_finite(state, exp, policy, say):
  count = int(state.nonfinite_count)
  if count == 0:
    return
  s, t = int(state.first_nonfinite_step), int(state.first_nonfinite_task)
  where = f"task {t} ({exp.task_names[t]})" if t >= 0 else "the update (gradients)"
  msg = f"non-finite loss or gradient at step {s} in {where}"
  if policy == "error":
    raise FloatingPointError(msg + "; the step was not applied. Set "
                             "train_and_evaluate.nonfinite='skip' to skip such steps.")
  say(f"warning: {count} step(s) skipped; first: {msg}")


def run_from_flags(argv: Sequence[str]) -> None:
  """Parses gin from the flags and runs :func:`train_and_evaluate`."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if (_COORDINATOR.value or _MULTIHOST.value or _NUM_PROCESSES.value is not None
      or _PROCESS_ID.value is not None):  # before any other JAX call
    sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  gin.add_config_file_search_path(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  gin_files = _GIN_FILE.value or [DEFAULT_CONFIG]
  for path in gin_files:
    if not os.path.exists(path):
      raise FileNotFoundError(f"gin file not found: {path}")
  _parse_gin(gin_files, _GIN_BINDINGS.value)
  workdir = _WORKDIR.value or os.path.join("workdirs", os.path.splitext(
      os.path.basename(gin_files[-1]))[0])
  records = train_and_evaluate(workdir)
  if records and jax.process_index() == 0:
    last = records[-1]
    exp_metric = [k for k in last if k.startswith("avg_")][0][4:]
    print(f"final (step {last['step']}): average {exp_metric} {last['avg_' + exp_metric]:.4f}, "
          f"worst {exp_metric} {last['worst_' + exp_metric]:.4f}; workdir {workdir}", flush=True)


def _parse_gin(gin_files: Sequence[str], bindings: Sequence[str]) -> None:
  """``gin.parse_config_files_and_bindings`` with syntax errors as one-line ValueErrors."""
  import tokenize  # pylint: disable=g-import-not-at-top
  from gin import config_parser  # pylint: disable=g-import-not-at-top
  try:
    gin.parse_config_files_and_bindings(gin_files, bindings)
  except (SyntaxError, tokenize.TokenError) as e:
    msg = e.msg if isinstance(e, SyntaxError) else str(e.args[0])
    where = f"{e.filename}, line {e.lineno}" if getattr(e, "filename", None) else None
    if where is None:  # gin does not say which --gin_bindings failed: find it
      for b in bindings:
        try:
          list(config_parser.ConfigParser(b, gin.config.ParserDelegate(skip_unknown=True)))
        except (SyntaxError, tokenize.TokenError):
          where = f"--gin_bindings={b!r}"
          break
    raise ValueError(f"cannot parse the gin config ({where or 'gin files/bindings'}): "
                     f"{msg}") from None


def main(argv: Sequence[str]) -> None:
  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint step at INFO
  try:
    run_from_flags(argv)
  except (ValueError, KeyError, TypeError, OSError, FloatingPointError,
          NotImplementedError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    print(f"error: {type(e).__name__}: {first}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Nothing is pending (the checkpoint manager was closed on the way out); skip the
    # interpreter's shutdown, where a failed orbax/tensorstore restore's leftover
    # callbacks can print "Event loop is closed" tracebacks after the one error line.
    os._exit(1)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main)
