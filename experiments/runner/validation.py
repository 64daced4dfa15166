"""Checks of static configuration values, each message naming the gin binding.

The runner's own parameters (``train_and_evaluate.num_steps``, ...), the
experiment families' (batch sizes, seeds, ...) and the optimizer's
(``optax.sgd.learning_rate``, ...) are checked when they are constructed,
before any training, so a typo in a value (``num_steps='five'``) or a wrong
sign (``optax.sgd.learning_rate=-0.1``) ends in one line such as::

    error: ValueError: train_and_evaluate.num_steps must be a whole number >= 1, got 'five'.

Only static values can be checked here. A schedule (a callable learning rate,
or a method's hyper-parameter under ``optax.inject_hyperparams``) is evaluated
inside the jitted step: its static parameters are checked when it is built
(``optax.warmup_cosine_decay_schedule.peak_value`` etc.), the values it
produces are not; a non-finite one makes the update non-finite, which the step
does not apply and the runner reports at its next log point
(``train_and_evaluate.nonfinite``).
"""

import math
import numbers
from typing import Any, Optional, Sequence

import gin
import numpy as np


def binding(name: str) -> str:
  """``name`` (e.g. ``'optax.sgd.learning_rate'``) with gin's current scope, if any."""
  try:
    scope = gin.current_scope_str()
  except Exception:  # pylint: disable=broad-except
    scope = ""
  return f"{scope}/{name}" if scope else name


def _as_real(value: Any) -> Optional[float]:
  """``value`` as a float if it is a real scalar number (not a bool, str, array...)."""
  if isinstance(value, (bool, np.bool_)):
    return None
  if isinstance(value, numbers.Real):
    return float(value)
  if isinstance(value, (np.ndarray, np.generic)) and np.ndim(value) == 0 and np.issubdtype(
      np.asarray(value).dtype, np.number) and not np.iscomplexobj(value):
    return float(value)
  return None


def whole_number(value: Any, name: str, low: Optional[int] = None,
                 high: Optional[int] = None) -> int:
  """``value`` as an int; a float with a fraction, a string, ``True`` ... are refused.

  Raises:
    ValueError: ``<binding> must be a whole number >= low, got <value>.``
  """
  x = _as_real(value)
  want = "a whole number" + (f" >= {low}" if low is not None else "") + (
      f" and <= {high}" if high is not None else "")
  if x is None or not math.isfinite(x) or x != round(x):
    raise ValueError(f"{binding(name)} must be {want}, got {value!r}.")
  n = int(round(x))
  if (low is not None and n < low) or (high is not None and n > high):
    raise ValueError(f"{binding(name)} must be {want}, got {value!r}.")
  return n


def optional_whole_number(value: Any, name: str, low: Optional[int] = None) -> Optional[int]:
  return None if value is None else whole_number(value, name, low)


def real(value: Any, name: str, low: float = -math.inf, high: float = math.inf,
         low_inclusive: bool = True, high_inclusive: bool = True) -> float:
  """``value`` as a finite float in the given range.

  Raises:
    ValueError: ``<binding> must be a finite number in [low, high], got <value>.``
  """
  x = _as_real(value)
  if math.isinf(low) and math.isinf(high):
    allowed = ""
  elif math.isinf(high):
    allowed = f" {'>=' if low_inclusive else '>'} {low:g}"
  elif math.isinf(low):
    allowed = f" {'<=' if high_inclusive else '<'} {high:g}"
  else:
    allowed = f" in {'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high_inclusive else ')'}"
  if (x is None or not math.isfinite(x) or x < low or x > high or (x == low and not low_inclusive)
      or (x == high and not high_inclusive)):
    raise ValueError(f"{binding(name)} must be a finite number{allowed}, got {value!r}.")
  return x


def positive(value: Any, name: str) -> float:
  """A finite number ``> 0``."""
  return real(value, name, low=0.0, low_inclusive=False)


def nonnegative(value: Any, name: str) -> float:
  """A finite number ``>= 0``."""
  return real(value, name, low=0.0)


def seed(value: Any, name: str) -> int:
  """A seed: a whole number in ``[0, 2**32)``."""
  return whole_number(value, name, low=0, high=2**32 - 1)


def choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
  if value not in choices:
    raise ValueError(f"{binding(name)} must be one of {', '.join(map(repr, choices))}, "
                     f"got {value!r}.")
  return value


def learning_rate(value: Any, name: str) -> Any:
  """A learning rate: a finite number ``> 0`` or a schedule (a callable, not checked)."""
  if callable(value):
    return value
  x = _as_real(value)
  if x is None:
    raise ValueError(f"{binding(name)} must be a finite number > 0 or a schedule, "
                     f"got {value!r}.")
  positive(value, name)
  return value
