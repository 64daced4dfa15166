"""Find task-weighting methods by name, for configs and command lines."""

from typing import Callable

import optax

from ldro import dro
from ldro import lookahead_dro
from ldro import conflict_projection
from ldro import random_weighting
from ldro import static

_METHODS: dict[str, tuple[Callable[..., optax.GradientTransformationExtraArgs], str]] = {}


def register_method(name: str, factory: Callable[..., optax.GradientTransformationExtraArgs],
                    reference: str = "") -> None:
  """Registers ``factory`` under ``name`` (overwrites an existing entry)."""
  _METHODS[name] = (factory, reference)


def method_names() -> list[str]:
  """Sorted names of the registered methods."""
  return sorted(_METHODS)


def method_reference(name: str) -> str:
  """The literature reference of a registered method."""
  return _lookup(name)[1]


def _lookup(name: str):
  if name not in _METHODS:
    raise ValueError(f"unknown method {name!r}; known methods: {', '.join(method_names())}.")
  return _METHODS[name]


def get_method(name: str, **kwargs) -> optax.GradientTransformationExtraArgs:
  """Builds the method ``name`` with its keyword arguments.

  Args:
    name: a registered name (``method_names()``), e.g. ``'ldro'``.
    **kwargs: the factory's arguments, e.g. ``num_tasks=20,
      lookahead_lr=0.01, weight_lr=0.001``.

  Returns:
    The method's gradient transformation.

  Raises:
    ValueError: unknown name (the message lists the known ones) or arguments
      the factory does not take.
  """
  factory, _ = _lookup(name)
  try:
    return factory(**kwargs)
  except TypeError as e:
    raise ValueError(f"method {name!r}: bad arguments {sorted(kwargs)}: {e}") from None


register_method("equal", static.equal_weighting, "average task loss (paper section 2.1)")
register_method("static_mixing", static.static_mixing,
                "w_i ~ |D_i|^alpha (paper section 2.2; Conneau et al. 2020)")
register_method("dro", dro.group_dro, "online group DRO (Sagawa et al., ICLR 2020)")
register_method("baselined_dro", dro.baselined_dro, "baselined DRO (Oren et al., EMNLP 2019)")
register_method("avg_max", dro.avg_max_interpolation, "avg/max loss interpolation (paper App. B.2)")
register_method("ldro", lookahead_dro.ldro_weights, "online Lookahead-DRO (paper Alg. 2-3)")
register_method("ldro_exact", lambda **kw: lookahead_dro.ldro_weights(exact=True, **kw),
                "exact Lookahead-DRO, max-entropy Nash every step (paper Alg. 1)")
register_method("pcgrad", conflict_projection.pcgrad, "PCGrad (Yu et al., NeurIPS 2020)")
register_method("rlw", random_weighting.random_loss_weighting,
                "random loss weighting (Lin et al., TMLR 2022)")
register_method("rgw", random_weighting.random_gradient_weighting,
                "random gradient weighting (Lin et al., TMLR 2022)")
