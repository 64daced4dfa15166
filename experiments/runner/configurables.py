"""Gin wiring: optax transformations, the task-weighting method, the optimizer.

Method hyper-parameters come from ``gin_configs/methods/<name>.gin`` (one file
per registered method, usable with every experiment's ``base.gin``).

T5X style: the optimizer is an ``optax.chain`` composed in gin, e.g.::

    METHOD = 'ldro'
    method.name = %METHOD
    method.hparams = {'lookahead_lr': %LOOKAHEAD_LR, 'weight_lr': %WEIGHT_LR,
                      'update_every': %UPDATE_EVERY}
    optimizer.transforms = [@optax.sgd()]
    optax.sgd.learning_rate = 0.025

The runner builds ``optax.chain(method(num_tasks=N, ...), *optimizer())``.
"""

import inspect
from typing import Any, Optional, Sequence

import gin
import optax

import ldro

for _fn in (optax.sgd, optax.adam, optax.adamw, optax.adafactor, optax.clip_by_global_norm,
            optax.cosine_decay_schedule, optax.warmup_cosine_decay_schedule,
            optax.linear_schedule, optax.constant_schedule, optax.add_decayed_weights,
            optax.chain):
  gin.external_configurable(_fn, module="optax")


@gin.configurable
def method(num_tasks: int, task_sizes: Optional[Sequence[float]] = None,
           baseline_losses: Optional[Sequence[float]] = None, name: str = gin.REQUIRED,
           hparams: Optional[dict] = None, loss_weighting: Optional[str] = None,
           loss_weighting_hparams: Optional[dict] = None) -> optax.GradientTransformationExtraArgs:
  """The task-weighting transformation chosen by registry ``name``.

  The runner supplies what only the data knows (``num_tasks``, ``task_sizes``,
  ``baseline_losses``); each is passed only if the method's factory takes it.
  ``loss_weighting`` combines a loss weighting with the method
  (:func:`ldro.combine`, the RLW paper's Table 4), e.g. in gin::

      include 'gin_configs/methods/cagrad.gin'
      method.loss_weighting = 'rlw'

  Args:
    num_tasks: ``N``.
    task_sizes: ``|D_i|`` (for ``static_mixing``).
    baseline_losses: per-task baselines (for ``baselined_dro``).
    name: registry name (``ldro.method_names()``).
    hparams: the method's hyper-parameters.
    loss_weighting: optional registry name of a loss weighting applied first.
    loss_weighting_hparams: its hyper-parameters.

  Returns:
    The transformation.
  """
  tx = _build(name, "method", hparams, num_tasks, task_sizes, baseline_losses)
  if loss_weighting is None:
    return tx
  lw = _build(loss_weighting, "method.loss_weighting", loss_weighting_hparams, num_tasks,
              task_sizes, baseline_losses)
  return ldro.combine(lw, tx)


def _build(name, binding, hparams, num_tasks, task_sizes, baseline_losses):
  """One registered method from its name, hyper-parameters and the data's arguments."""
  hparams = dict(hparams or {})
  if "num_tasks" in hparams and int(hparams["num_tasks"]) != int(num_tasks):
    raise ValueError(f"method.hparams sets num_tasks={hparams['num_tasks']}, but the experiment "
                     f"has {num_tasks} tasks (leave num_tasks out; the runner supplies it).")
  known = ldro.method_names()
  if name not in known:
    raise ValueError(f"unknown method {name!r} in the config ({binding}.name); known methods: "
                     f"{', '.join(known)}.")
  factory = ldro.method_info(name).factory
  params = inspect.signature(factory).parameters
  var_kw = any(p.kind == p.VAR_KEYWORD for p in params.values())
  supplied = {"num_tasks": num_tasks, "task_sizes": task_sizes, "baseline_losses": baseline_losses}
  for k, v in supplied.items():
    if v is not None and (k in params or (var_kw and k == "num_tasks")):
      hparams.setdefault(k, v)
  for k in ("task_sizes", "baseline_losses"):  # one entry per task of the experiment
    v = hparams.get(k)
    if v is not None and len(v) != int(num_tasks):
      where = (f"method.hparams['{k}']" if supplied[k] is None or v is not supplied[k]
               else "train_and_evaluate.baseline_losses" if k == "baseline_losses"
               else "the experiment's task sizes")
      raise ValueError(f"{where} has {len(v)} entries, but the experiment has {num_tasks} "
                       f"tasks (one entry per task).")
  return ldro.get_method(name, **hparams)


def _known(name: str) -> str:
  known = ldro.method_names()
  if name not in known:
    raise ValueError(f"unknown method {name!r} in the config (method.name); known methods: "
                     f"{', '.join(known)}.")
  return name


def method_name() -> str:
  """The registry name bound to ``method.name`` (macros evaluated), checked to be known."""
  try:
    value = gin.query_parameter("method.name")
  except ValueError:
    raise ValueError("no method in the config: set method.name (METHOD), e.g. "
                     "--gin_file=gin_configs/methods/ldro.gin") from None
  while isinstance(value, gin.config.ConfigurableReference):  # a macro such as %METHOD
    value = value.scoped_configurable_fn()
  return _known(value)


@gin.configurable
def optimizer(transforms: Sequence[optax.GradientTransformation] = gin.REQUIRED) -> list[Any]:
  """The transformations applied after the task weighting (e.g. ``[sgd]``)."""
  return list(transforms)
