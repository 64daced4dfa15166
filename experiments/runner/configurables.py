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

import functools
import inspect
import re
from typing import Any, Optional, Sequence

import gin
import optax

import ldro
from experiments.runner import validation


def _in_unit(value, name):  # a decay rate / momentum: [0, 1)
  return validation.real(value, name, 0.0, 1.0, high_inclusive=False)


def _optional(check):
  return lambda value, name: None if value is None else check(value, name)


def _rate_or_schedule(value, name):  # weight decay: a number >= 0 or a schedule
  return value if callable(value) else validation.nonnegative(value, name)


def _steps(low):
  return lambda value, name: validation.whole_number(value, name, low)


#: Static checks of the optax functions configurable in gin, by parameter. A
#: value that is a schedule (a callable) is checked where the schedule is built.
_OPTAX_CHECKS = {
    "sgd": {"learning_rate": validation.learning_rate, "momentum": _optional(_in_unit)},
    "adam": {"learning_rate": validation.learning_rate, "b1": _in_unit, "b2": _in_unit,
             "eps": validation.nonnegative, "eps_root": validation.nonnegative},
    "adamw": {"learning_rate": validation.learning_rate, "b1": _in_unit, "b2": _in_unit,
              "eps": validation.nonnegative, "eps_root": validation.nonnegative,
              "weight_decay": _rate_or_schedule},
    "adafactor": {"learning_rate": _optional(validation.learning_rate),
                  "eps": validation.nonnegative,
                  "clipping_threshold": _optional(validation.positive),
                  "momentum": _optional(_in_unit)},
    "clip_by_global_norm": {"max_norm": validation.positive},
    "add_decayed_weights": {"weight_decay": _rate_or_schedule},
    "cosine_decay_schedule": {"init_value": validation.nonnegative, "decay_steps": _steps(1),
                              "alpha": validation.nonnegative,
                              "exponent": validation.positive},
    "warmup_cosine_decay_schedule": {
        "init_value": validation.nonnegative, "peak_value": validation.nonnegative,
        "warmup_steps": _steps(0), "decay_steps": _steps(1),
        "end_value": validation.nonnegative, "exponent": validation.positive},
    "linear_schedule": {"init_value": validation.nonnegative,
                        "end_value": validation.nonnegative,
                        "transition_steps": _steps(0), "transition_begin": _steps(0)},
    "constant_schedule": {"value": validation.nonnegative},
}


def _checked(fn, checks):
  """``fn`` with its static arguments checked first (same name and signature for gin)."""
  signature = inspect.signature(fn)

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    try:
      bound = signature.bind(*args, **kwargs)
    except TypeError:
      return fn(*args, **kwargs)  # let optax say what is wrong
    bound.apply_defaults()
    for param, check in checks.items():
      if param in bound.arguments:
        check(bound.arguments[param], f"optax.{fn.__name__}.{param}")
    return fn(*args, **kwargs)

  wrapper.__signature__ = signature  # gin reads the parameters through getfullargspec
  return wrapper


for _fn in (optax.sgd, optax.adam, optax.adamw, optax.adafactor, optax.clip_by_global_norm,
            optax.cosine_decay_schedule, optax.warmup_cosine_decay_schedule,
            optax.linear_schedule, optax.constant_schedule, optax.add_decayed_weights,
            optax.chain):
  gin.external_configurable(_checked(_fn, _OPTAX_CHECKS.get(_fn.__name__, {})),
                            name=_fn.__name__, module="optax")


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
  for k, v in hparams.items():  # a string for a number: name the binding, not a TypeError
    annotation = params[k].annotation if k in params else inspect.Parameter.empty
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    text = text if isinstance(annotation, str) else str(annotation) if not text else text
    if (isinstance(v, str) and annotation is not inspect.Parameter.empty
        and re.search(r"\b(float|int)\b", text) and not re.search(r"\bstr\b", text)):
      raise ValueError(f"{_hparam_binding(k, supplied, hparams)} must be a number, got {v!r} "
                       f"(method {name!r}).")
  try:
    return ldro.get_method(name, **hparams)
  except (ValueError, TypeError) as e:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    key = _named_hparam(msg, hparams)
    if key is None:
      raise
    raise type(e)(f"{msg} (gin: {_hparam_binding(key, supplied, hparams)})") from None


def _named_hparam(msg: str, hparams: dict) -> Optional[str]:
  """The hyper-parameter a factory's error message is about (None if none is named)."""
  text = re.sub(r"\[[^\]]*\]", "", msg)  # not the list of all arguments get_method adds
  keys = sorted(hparams, key=len, reverse=True)
  for pattern in (r"'{}'|\b{}\b\s*(must|=|has|is)", r"\b{}\b"):
    for k in keys:
      if re.search(pattern.format(re.escape(k), re.escape(k)), text):
        return k
  return None


def _hparam_binding(key: str, supplied: dict, hparams: dict) -> str:
  """Where ``method``'s argument ``key`` came from, as the user would bind it."""
  if supplied.get(key) is not None and hparams.get(key) is supplied[key]:
    return {"num_tasks": "num_tasks is the experiment's task count",
            "task_sizes": "task_sizes are the experiment's task sizes",
            "baseline_losses": "train_and_evaluate.baseline_losses"}.get(key, key)
  where = f"method.hparams['{key}']"
  try:
    raw = gin.query_parameter("method.hparams") or {}
    value = raw.get(key) if isinstance(raw, dict) else None
    if isinstance(value, gin.config.ConfigurableReference) and repr(value).startswith("%"):
      where += f" = {value!r}"  # the macro, e.g. %WEIGHT_LR
  except (ValueError, KeyError):
    pass
  return where


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
