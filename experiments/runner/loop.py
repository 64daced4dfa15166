"""The training loop: ``train_and_evaluate`` as a short loop over named pieces.

Given an experiment (:class:`experiments.families.base.Experiment`) and the
gin-chosen method and optimizer (:mod:`experiments.runner.configurables`),
:func:`train_and_evaluate` takes the workdir's lock, builds the transform, the
mesh and the jitted step, restores the newest checkpoint, truncates
``metrics.jsonl`` to it, then loops: step, write ``config.gin`` once, check for
non-finite steps and evaluate at log points, checkpoint. Each of those is a
function below; the entry point is :mod:`experiments.train`.
"""

import dataclasses
import os
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

import gin
import jax
import numpy as np
import optax

import ldro
from ldro import metrics as ldro_metrics
from ldro import train as ldro_train
from experiments.families import base as experiment_lib
from experiments.runner import checkpoints
from experiments.runner import configurables
from experiments.runner import host_input
from experiments.runner import interrupts
from experiments.runner import metrics_io
from experiments.runner import sharding
from experiments.runner import validation
from experiments.runner import workdir as workdir_lib

#: Runner modes besides the library's ('jacobian', 'lean'): ordinary training on
#: the experiment's own batches (e.g. static mixing by sampling rates), no method.
PLAIN = "plain"


def method_mode(method_name: str, mode: Optional[str]) -> str:
  """The step mode for ``method_name``: ``mode``, or the method's preferred one if None.

  Raises:
    ValueError: the method does not support ``mode`` (one line naming both).
  """
  if mode == PLAIN:
    return mode
  info = ldro.method_info(method_name)
  if mode is None:
    return info.preferred_mode
  if mode not in info.modes:
    raise ValueError(f"method {method_name!r} does not support mode {mode!r} "
                     f"(train_and_evaluate.mode); its modes: {', '.join(info.modes)}.")
  return mode


@dataclasses.dataclass
class Program:
  """What the loop runs: the jitted step, its state and the mesh."""
  tx: optax.GradientTransformation
  mode: str
  mesh: Any
  state: ldro_train.TrainState
  state_shardings: Any
  step_fn: Callable
  needs_val: bool = False  # the method reads a validation gradient: batches carry 'val'


def needs_validation(weighting, exp: experiment_lib.Experiment) -> bool:
  """Whether the method reads a validation gradient; then the experiment must hold a split.

  Raises:
    ValueError: the method needs one and the experiment has no validation split.
  """
  rule = getattr(weighting, "rule", None)
  if rule is None or not rule.needs_val_grads:
    return False
  if not getattr(exp, "has_validation_split", False):
    raise ValueError(
        f"method {rule.name!r} needs a validation batch (the gradient of held-out training "
        f"data), but {type(exp).__name__} has no validation split (for images: "
        "ImageClassificationExperiment.val_per_task = 500).")
  return True


class Transform(NamedTuple):
  """The gin-chosen method and optimizer, and how to build their step."""
  tx: optax.GradientTransformation
  mode: str
  step_builder: Callable  # param shardings -> step(state, batch)
  needs_val: bool = False  # the step takes {'train', 'val'} batches


def build_transform(exp: experiment_lib.Experiment, mode: Optional[str], gram_strategy: str,
                    chunk_size: Optional[int], baseline_losses, microbatches: int = 1) -> Transform:
  """The gin-chosen method and optimizer, and the step for them."""
  n = exp.num_tasks
  refusal = getattr(exp, "no_microbatches", None)
  if microbatches > 1 and refusal:
    raise ValueError(f"train_and_evaluate.microbatches = {microbatches}: "
                     f"{type(exp).__name__}: {refusal} (leave microbatches at 1).")
  if mode == PLAIN and microbatches > 1:
    raise ValueError("train_and_evaluate.microbatches accumulates the task-weighted step's "
                     "per-task gradients; mode 'plain' trains on the experiment's own batches "
                     "(leave microbatches at 1).")
  if mode == PLAIN:
    tx = optax.chain(*configurables.optimizer())
    return Transform(tx, mode, lambda ps: ldro_train.make_plain_step(exp.plain_loss, tx, n,
                                                                     param_shardings=ps))
  mode = method_mode(configurables.method_name(), mode)
  weighting = configurables.method(num_tasks=n, task_sizes=exp.task_sizes,
                                   baseline_losses=baseline_losses)
  tx = optax.chain(weighting, *configurables.optimizer())
  needs_val = needs_validation(weighting, exp)
  reuse = exp.reuse_refresh_grads
  rule = getattr(weighting, "rule", None)
  if mode == "lean" and getattr(rule, "gram_filter", None) and rule.needs_gram:
    # A Gram matrix on selected parameters (shared_params, GradNorm's layer) is taken from a
    # refresh step's per-task gradients: lean mode's grouped strategy with their reuse.
    if gram_strategy != "grouped" or reuse is False:
      raise ValueError(
          "a Gram matrix on selected parameters (method.hparams shared_params or layer) needs "
          "the per-task gradients: use train_and_evaluate.mode = 'jacobian', or lean mode "
          "with gram_strategy 'grouped' (got gram_strategy "
          f"{gram_strategy!r}, reuse_refresh_grads {reuse}).")
    reuse = True

  def builder(ps):
    return ldro_train.make_train_step(
        exp.task_loss, tx, mode=mode, gram_strategy=gram_strategy, chunk_size=chunk_size,
        param_shardings=ps,
        losses_fn=exp.grouped_losses if (mode == "lean" or needs_val) else None,
        reuse_refresh_grads=reuse, val_grads=needs_val, microbatches=microbatches)
  return Transform(tx, mode, builder, needs_val)


def build_program(exp: experiment_lib.Experiment, transform: Transform, seed: int,
                  mesh_shape: Optional[Sequence[int]]) -> Program:
  """Initial state on the mesh and the jitted, donating step."""
  tx = transform.tx
  init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed))
  mesh = sharding.make_mesh(mesh_shape)
  state = ldro_train.init_train_state(exp.init_params(init_rng), tx, train_rng)
  shardings = sharding.state_shardings(state, mesh)
  state = jax.device_put(state, shardings)
  step_fn = jax.jit(transform.step_builder(shardings.params), in_shardings=(shardings, None),
                    out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=0)
  return Program(tx, transform.mode, mesh, state, shardings, step_fn,
                 needs_val=transform.needs_val)


def step_batch(exp: experiment_lib.Experiment, prog: Program, step: int) -> Any:
  """The batch of ``step`` on the mesh (``{'train', 'val'}`` when the method needs validation)."""
  # Multi-host: each process reads only its part of the global batch (host_input).
  batch = host_input.train_batch(exp, step, prog.mesh, task_grouped=prog.mode != PLAIN)
  if not prog.needs_val:
    return batch
  return {"train": batch,
          "val": sharding.shard_batch(exp.val_batch(step), prog.mesh, task_grouped=True)}


def evaluation_record(exp: experiment_lib.Experiment, state: ldro_train.TrainState,
                      train_metrics: Optional[dict]) -> dict:
  """One ``metrics.jsonl`` record: per-task metrics, avg/worst, task weights."""
  ev = host_input.evaluate(exp, sharding.host_local(state.params))  # split across processes
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


def check_finite(state, exp, policy: str, say) -> None:
  """Stops (``'error'``) or warns (``'skip'``) if the jitted step skipped non-finite steps."""
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


def interrupted(signum: int, mngr, state, num_steps: int) -> interrupts.Interrupted:
  """Checkpoints the state reached (finished before returning) and describes the stop."""
  step = int(state.step)
  if step > 0 and step not in mngr.all_steps():
    mngr.save(step, args=checkpoints.save_args(state), force=True)
  mngr.wait_until_finished()  # this save and any in flight are finished, not torn
  saved = [s for s in mngr.all_steps() if s <= step]
  return interrupts.Interrupted(signum, step, num_steps, max(saved) if saved else None)


def duration(seconds: float) -> str:
  """``seconds`` as a short reading: ``'45s'``, ``'12m05s'``, ``'3h07m'``."""
  s = max(int(round(seconds)), 0)
  if s < 60:
    return f"{s}s"
  if s < 3600:
    return f"{s // 60}m{s % 60:02d}s"
  return f"{s // 3600}h{s % 3600 // 60:02d}m"


def progress_line(step, num_steps, rate, exp, record_or_losses) -> str:
  """One progress line: step, rate, time left at that rate, then metrics or train losses."""
  head = f"step {step}/{num_steps} | {rate:.1f} steps/s"
  if step < num_steps and rate > 0:  # at the last interval's rate, which leaves out evaluations
    head += f" | {duration((num_steps - step) / rate)} left"
  if isinstance(record_or_losses, dict):
    m = exp.main_metric
    return (f"{head} | avg {m} {record_or_losses[f'avg_{m}']:.4f} | "
            f"worst {m} {record_or_losses[f'worst_{m}']:.4f}")
  losses = np.asarray(record_or_losses)
  return f"{head} | avg train loss {losses.mean():.4f} | worst train loss {losses.max():.4f}"


def _validate(num_steps, eval_every, log_every, checkpoint_every, keep_checkpoints, seed, mode,
              gram_strategy, chunk_size, nonfinite, mesh_shape, quiet,
              microbatches=1) -> dict:
  """The runner's own values, checked (one line naming the binding) and converted."""
  name = lambda p: f"train_and_evaluate.{p}"  # pylint: disable=unnecessary-lambda-assignment
  out = {p: validation.whole_number(v, name(p), low=1) for p, v in (
      ("num_steps", num_steps), ("eval_every", eval_every), ("log_every", log_every),
      ("checkpoint_every", checkpoint_every), ("keep_checkpoints", keep_checkpoints),
      ("microbatches", microbatches))}
  out["seed"] = validation.seed(seed, name("seed"))
  if mode is not None:
    validation.choice(mode, name("mode"), ("jacobian", "lean", PLAIN))
  validation.choice(gram_strategy, name("gram_strategy"),
                    ("jacrev", "grouped", "chunked", "pairwise"))
  out["chunk_size"] = validation.optional_whole_number(chunk_size, name("chunk_size"), low=1)
  validation.choice(nonfinite, name("nonfinite"), ("error", "skip"))
  if mesh_shape is not None:
    if not isinstance(mesh_shape, (list, tuple)):
      raise ValueError(f"train_and_evaluate.mesh_shape must be a (data, fsdp) pair, got "
                       f"{mesh_shape!r}.")
    out["mesh_shape"] = tuple(validation.whole_number(v, name("mesh_shape"), low=-1)
                              for v in mesh_shape)
  if not isinstance(quiet, (bool, int)):
    raise ValueError(f"train_and_evaluate.quiet must be True or False, got {quiet!r}.")
  return out


@gin.configurable(denylist=["workdir", "allow_config_change", "invocation"])
def train_and_evaluate(
    workdir: str,
    experiment: experiment_lib.Experiment = gin.REQUIRED,
    num_steps: int = 500,
    eval_every: int = 50,
    log_every: int = 50,
    checkpoint_every: int = 100,
    keep_checkpoints: int = 2,
    seed: int = 0,
    mode: Optional[str] = None,
    gram_strategy: str = "grouped",
    chunk_size: Optional[int] = None,
    microbatches: int = 1,
    nonfinite: str = "error",
    baseline_losses: Optional[Sequence[float]] = None,
    mesh_shape: Optional[Sequence[int]] = None,
    quiet: bool = False,
    allow_config_change: bool = False,
    invocation: Optional[dict] = None,
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
    mode: ``'jacobian'`` or ``'lean'`` (see :mod:`ldro.train`); ``None``: the
      method's preferred mode (``ldro.method_info(name).preferred_mode``); a
      mode the method does not support is an error. Or ``'plain'``: ordinary
      training on ``experiment.plain_loss`` with the experiment's own batches
      (e.g. static mixing by sampling rates); no weighting method.
    gram_strategy: Gram strategy for lean mode.
    chunk_size: chunk size for the ``chunked`` strategy.
    microbatches: gradient accumulation: each step's task-grouped batch in this
      many micro-batches, one after another (``ldro.train.make_train_step``);
      every task's examples per step must divide by it.
    nonfinite: ``'error'`` (stop, naming the step and task) or ``'skip'``
      (skip such steps, keeping params and task weights).
    baseline_losses: per-task baselines for ``baselined_dro``.
    mesh_shape: ``(data, fsdp)`` device mesh (default: all devices on
      ``data``); see :mod:`experiments.runner.sharding`.
    quiet: suppress progress lines.
    allow_config_change: resume a workdir made with another config
      (:func:`experiments.runner.workdir.check_fingerprint`; the entry point's
      ``--allow_config_change``). Not a gin parameter.
    invocation: ``{'gin_files': [...], 'gin_bindings': [...]}`` of the command,
      recorded in the workdir and named when another config is refused.

  Returns:
    The evaluation records written during this call.

  Raises:
    ValueError: a bad value (naming its gin binding), a workdir made with
      another config, ... (one line each; see the README's reliability section).
    experiments.runner.interrupts.Interrupted: SIGINT/SIGTERM; the run saved a
      checkpoint at the step it reached.
  """
  checked = _validate(num_steps, eval_every, log_every, checkpoint_every, keep_checkpoints, seed,
                      mode, gram_strategy, chunk_size, nonfinite, mesh_shape, quiet,
                      microbatches)
  num_steps, eval_every, log_every = checked["num_steps"], checked["eval_every"], checked["log_every"]
  checkpoint_every, keep_checkpoints = checked["checkpoint_every"], checked["keep_checkpoints"]
  seed, chunk_size = checked["seed"], checked["chunk_size"]
  mesh_shape = checked.get("mesh_shape", mesh_shape)
  os.makedirs(workdir, exist_ok=True)
  is_main = jax.process_index() == 0
  lock = workdir_lib.lock(workdir) if is_main else None  # one run per workdir at a time
  try:  # a workdir made with another config is refused before anything is built
    fingerprint = workdir_lib.check_fingerprint(workdir, invocation, allow_config_change)
  except BaseException:
    workdir_lib.unlock(lock)
    raise
  exp = experiment
  transform = build_transform(exp, mode, gram_strategy, chunk_size, baseline_losses,
                              checked["microbatches"])
  prog = build_program(exp, transform, seed, mesh_shape)
  host_input.check(exp, prog.mesh, task_grouped=prog.mode != PLAIN)  # per-host batch must divide
  mngr = checkpoints.manager(workdir, keep_checkpoints)
  writer = None
  stop = interrupts.StopOnSignal()  # Ctrl-C / SIGTERM: stop at the next step boundary
  try:
    state, start = checkpoints.restore(mngr, prog.state, prog.state_shardings)
    if is_main:  # this run's config is the workdir's from now on
      workdir_lib.record_fingerprint(workdir, fingerprint)
    # Records after the checkpoint are rewritten: drop them (and their TB events).
    writer = metrics_io.MetricsWriter(workdir, enabled=is_main,
                                      purge_step=start + 1 if start > 0 else 0)
    writer.truncate_after(start if start > 0 else -1)
    say = (lambda s: print(s, flush=True)) if (is_main and not quiet) else (lambda s: None)
    if start:
      say(f"resumed from checkpoint at step {start} in {workdir}")
    if start >= num_steps:
      say(f"already trained for {start} >= {num_steps} steps")
    records = []
    if start == 0:
      records.append(evaluation_record(exp, state, None))
      writer.write(records[-1])

    t0, steps_since, train_metrics = time.perf_counter(), 0, None
    for step in range(start, num_steps):
      if stop.requested:
        writer.sync()
        raise interrupted(stop.signum, mngr, state, num_steps)
      state, train_metrics = prog.step_fn(state, step_batch(exp, prog, step))
      steps_since += 1
      done, last = step + 1, step + 1 == num_steps
      if step == start and is_main:  # every configurable has been called by now
        workdir_lib.write_config(workdir)
      if done % log_every == 0 or done % eval_every == 0 or last:
        check_finite(state, exp, nonfinite, say)
        jax.block_until_ready(train_metrics)
        rate = steps_since / max(time.perf_counter() - t0, 1e-9)
        if done % eval_every == 0 or last:
          records.append(evaluation_record(exp, state, jax.device_get(train_metrics)))
          writer.write(records[-1])
          say(progress_line(done, num_steps, rate, exp, records[-1]))
        else:
          say(progress_line(done, num_steps, rate, exp,
                            jax.device_get(train_metrics["task_losses"])))
        t0, steps_since = time.perf_counter(), 0
      if done % checkpoint_every == 0 or last:
        writer.sync()  # the records up to this checkpoint, durable before it
        mngr.save(done, args=checkpoints.save_args(state))
  finally:
    stop.close()
    # Also on errors: finish pending async saves and stop orbax's threads before the
    # error propagates, so the process ends with one error line, not a thread traceback.
    try:
      mngr.wait_until_finished()
      mngr.close()
    finally:
      if writer is not None:
        writer.close()
      workdir_lib.unlock(lock)
  return records
