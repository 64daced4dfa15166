"""The registry of task-weighting methods: what each is, needs and supports.

Configs, the train step, the sweeps, the reports and the benchmark read a
method's label, reference, needs and modes from here instead of keeping their
own tables::

    info = ldro.method_info("cagrad")
    info.label, info.reference      # 'CAGrad', 'Liu et al., NeurIPS 2021: CAGrad, ...'
    info.needs                      # frozenset({'gram'})
    info.modes, info.preferred_mode  # ('jacobian', 'lean'), 'lean'
    tx = ldro.get_method("cagrad", num_tasks=5)   # the paper's defaults (c = 0.5)
"""

import dataclasses
import types
from typing import Any, Callable, Iterable, Mapping, Optional

import optax

from ldro import weighting

MODES = ("jacobian", "lean")
KINDS = ("static", "loss", "dro", "gradient")


@dataclasses.dataclass(frozen=True)
class MethodInfo:
  """What the registry knows about a method.

  Attributes:
    name: registry name (``get_method(name)``, ``METHOD`` in gin).
    factory: builds the transformation from keyword hyper-parameters.
    label: display label for tables and figures.
    reference: the literature reference.
    needs: what the method reads at a step, a subset of
      :data:`ldro.weighting.NEEDS`: ``'losses'`` (``task_losses``),
      ``'gram'`` (the task Gram matrix), ``'key'`` (a PRNG key),
      ``'task_grads'`` (the per-task gradients themselves: Jacobian mode
      only), ``'val_grads'`` (the gradient of a validation batch).
    modes: the train modes it supports (``'jacobian'``, ``'lean'``).
    defaults: hyper-parameters, the original paper's values where it gives them
      and otherwise the library's (each factory's docstring says which; merged
      under the arguments given to :func:`get_method`).
    kind: ``'static'``, ``'loss'`` (weights from the losses), ``'dro'``
      (worst-case weights) or ``'gradient'`` (coefficients from the
      gradients).
    prefer: the mode the runner picks by default, or None (see
      :attr:`preferred_mode`).
  """
  name: str
  factory: Callable[..., optax.GradientTransformationExtraArgs]
  label: str
  reference: str
  needs: frozenset
  modes: tuple
  defaults: Mapping[str, Any]
  kind: str
  prefer: Optional[str] = None

  @property
  def preferred_mode(self) -> str:
    """The registered preference, else ``'lean'`` (one ordinary backward pass a step) when
    supported, else ``'jacobian'``."""
    if self.prefer is not None:
      return self.prefer
    return "lean" if "lean" in self.modes else "jacobian"


_METHODS: dict[str, MethodInfo] = {}


def register_method(
    name: str,
    factory: Callable[..., optax.GradientTransformationExtraArgs],
    reference: str = "",
    *,
    label: Optional[str] = None,
    needs: Iterable[str] = (),
    modes: Iterable[str] = MODES,
    defaults: Optional[Mapping[str, Any]] = None,
    kind: str = "gradient",
    prefer: Optional[str] = None,
) -> MethodInfo:
  """Registers ``factory`` under ``name`` (overwrites an existing entry).

  Args:
    name: registry name.
    factory: keyword hyper-parameters -> transformation.
    reference: literature reference.
    label: display label (default ``name``).
    needs: subset of :data:`ldro.weighting.NEEDS`.
    modes: subset of ``('jacobian', 'lean')``.
    defaults: the paper's default hyper-parameters.
    kind: one of :data:`KINDS`.
    prefer: the default mode when it is not the cheapest by the rule of
      :attr:`MethodInfo.preferred_mode` (one of ``modes``).

  Returns:
    The new :class:`MethodInfo`.
  """
  needs = frozenset(needs)
  unknown = needs - set(weighting.NEEDS)
  if unknown:
    raise ValueError(f"register_method({name!r}): unknown needs {sorted(unknown)}; "
                     f"known: {', '.join(weighting.NEEDS)}.")
  modes = tuple(modes)
  if not modes or set(modes) - set(MODES):
    raise ValueError(f"register_method({name!r}): modes must be a non-empty subset of {MODES}, "
                     f"got {modes}.")
  if "task_grads" in needs and "lean" in modes:
    raise ValueError(f"register_method({name!r}): a method that needs the per-task gradients "
                     "cannot support lean mode.")
  if kind not in KINDS:
    raise ValueError(f"register_method({name!r}): kind must be one of {KINDS}, got {kind!r}.")
  if prefer is not None and prefer not in modes:
    raise ValueError(f"register_method({name!r}): prefer={prefer!r} is not one of its modes "
                     f"{modes}.")
  info = MethodInfo(name=name, factory=factory, label=label or name, reference=reference,
                    needs=needs, modes=modes,
                    defaults=types.MappingProxyType(dict(defaults or {})), kind=kind,
                    prefer=prefer)
  _METHODS[name] = info
  return info


def method_names() -> list[str]:
  """Sorted names of the registered methods."""
  return sorted(_METHODS)


def method_info(name: str) -> MethodInfo:
  """The :class:`MethodInfo` of a registered method.

  Raises:
    ValueError: unknown name; the message lists the known ones.
  """
  if name not in _METHODS:
    raise ValueError(f"unknown method {name!r}; known methods: {', '.join(method_names())}.")
  return _METHODS[name]


def method_reference(name: str) -> str:
  """The literature reference of a registered method."""
  return method_info(name).reference


def get_method(name: str, *, shared_params: Any = None, specific_params: str = "coefficients",
               **kwargs) -> optax.GradientTransformationExtraArgs:
  """Builds the method ``name`` with its defaults overridden by ``kwargs``.

  Args:
    name: a registered name (``method_names()``), e.g. ``'ldro'``.
    shared_params: for methods that use the Gram matrix (``'gram'`` in
      ``needs``): take it on the shared parameters only, e.g. ``'encoder'``
      (:func:`ldro.on_shared_params`; models with task-specific heads); for
      the others only with ``specific_params='equal'`` (the paper's RGW).
      ``None`` (default): on all parameters.
    specific_params: with ``shared_params``, the other (task-specific)
      parameters' update: ``'coefficients'`` (``c_i`` times their task's
      gradient) or ``'equal'`` (unweighted, LibMTL's convention);
      :func:`ldro.on_shared_params`'s ``specific``.
    **kwargs: the factory's arguments, e.g. ``num_tasks=20,
      lookahead_lr=0.01, weight_lr=0.001``.

  Returns:
    The method's gradient transformation.

  Raises:
    ValueError: unknown name (the message lists the known ones), arguments
      the factory does not take, or a bad hyper-parameter value.
  """
  info = method_info(name)
  args = {**info.defaults, **kwargs}
  try:
    tx = info.factory(**args)
  except TypeError as e:
    raise ValueError(f"method {name!r}: bad arguments {sorted(args)}: {e}") from None
  if shared_params is not None:
    tx = weighting.on_shared_params(tx, shared_params, specific_params)
  elif specific_params != "coefficients":
    raise ValueError(f"method {name!r}: specific_params={specific_params!r} needs "
                     "shared_params (which parameters are shared).")
  return tx
