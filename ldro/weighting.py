"""The task-weighting core: one builder for every method's optax transformation.

A task-weighting method maps the ``N`` task gradients ``g_i`` of a step to one
update. Almost every method in the literature does it by choosing coefficients
``c [N]`` and returning ``sum_i c_i g_i``, with ``c`` a function of the task
losses, the task-gradient Gram matrix ``G = J J^T`` (``G_ij = g_i . g_j``) and
a small state. This module owns everything that is not the method's own rule:

* validation of the inputs (shapes, the task mask, the PRNG key, the mode);
* the **Gram source** in every mode (below) and its **refresh schedule**
  (every ``refresh_every`` steps, under ``lax.cond``; the last refreshed Gram
  matrix is kept in the state);
* the **non-finite guard**: a step whose losses, Gram matrix or coefficients
  are not finite keeps the previous coefficients and the method's state;
* the **output**, ``sum_i c_i g_i`` (Jacobian mode) or ``task_vjp(c)`` (lean
  mode, the gradient of the ``c``-weighted loss).

A method supplies a :class:`Rule`: its state (a ``NamedTuple`` of arrays) and
a pure function ``(TaskStats, state) -> (c, state)``; :func:`task_weighting`
turns it into an ``optax.GradientTransformationExtraArgs``. Methods that are
not coefficients on task gradients (a per-coordinate operation such as
GradDrop) supply ``aggregate`` instead and need the per-task gradients
themselves; the core refuses lean mode for them.

Call conventions (per-task inputs are keyword extra args, as optax does for
``value``):

* **Jacobian mode** (default): ``updates`` are the per-task gradients, every
  leaf with a leading task axis ``N`` (e.g. ``vmap(grad)`` over a
  task-grouped batch); the Gram matrix, when a method needs it, comes from
  them (``O(N^2 P)`` flops, no extra backward pass).
* **Lean mode** (big models): pass ``task_vjp=vjp_fn`` where ``task_losses,
  vjp_fn = jax.vjp(losses_fn, params)``; ``updates`` are ignored (``None``).
  A method that needs the Gram matrix also takes one of ``gram_fn`` (zero
  arguments, returns ``[N, N]``; evaluated on refresh steps only, inside
  ``lax.cond``), ``gram`` (precomputed ``[N, N]``, used on refresh steps), or
  ``task_grads_fn`` (zero arguments, returns the ``N`` task gradients): a
  refresh step then takes the Gram matrix *and* its update ``sum_i c_i g_i``
  from those gradients (no second backward pass), an ordinary step uses
  ``task_vjp(c)``. Methods that need no Gram matrix ignore all three.

The state of every method is a :class:`WeightingState` with a
``task_weights`` field (the coefficients of the last update), so
:func:`task_weights` finds them anywhere inside an ``optax.chain``.
"""

import dataclasses
import math
import numbers
import re
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from ldro import lookahead

Array = jax.Array
PyTree = Any

# What a method can need from a step, as the registry names it.
NEEDS = ("losses", "gram", "key", "task_grads", "val_grads")


# ----------------------------------------------------------------------------
# Input validation (shared by the core and the factories).
# ----------------------------------------------------------------------------


def check_task_losses(task_losses: Optional[Array], num_tasks: int, method: str) -> Array:
  """Validates ``task_losses`` (shape ``[N]``) at trace time."""
  if task_losses is None:
    raise ValueError(f"{method}: the 'task_losses' extra argument ([{num_tasks}]) is required.")
  task_losses = jnp.asarray(task_losses)
  if task_losses.shape != (num_tasks,):
    raise ValueError(
        f"{method}: task_losses must have shape ({num_tasks},) (one loss per task), "
        f"got {task_losses.shape}.")
  return task_losses


def check_task_mask(task_mask: Optional[Array], num_tasks: int, method: str) -> Optional[Array]:
  """Validates an optional bool ``task_mask`` of shape ``[N]``."""
  if task_mask is None:
    return None
  task_mask = jnp.asarray(task_mask)
  if task_mask.shape != (num_tasks,):
    raise ValueError(f"{method}: task_mask must have shape ({num_tasks},), got {task_mask.shape}.")
  return task_mask.astype(bool)


def check_task_grads(updates: PyTree, num_tasks: int, method: str,
                     params: Optional[PyTree] = None) -> None:
  """Checks that every leaf of ``updates`` has a leading task axis ``N``.

  With ``params``, gradients shaped like the parameters get a hint: they are one
  gradient, e.g. from a wrapper that accumulates parameter-shaped gradients
  (``optax.MultiSteps``), which cannot carry per-task ones.
  """
  leaves = jax.tree_util.tree_leaves(updates)
  if not leaves:
    raise ValueError(
        f"{method}: no per-task gradients given; pass gradients with a leading task axis "
        f"of size {num_tasks}, or task_vjp=... (lean mode).")
  for path, leaf in jax.tree_util.tree_leaves_with_path(updates):
    if leaf.ndim == 0 or leaf.shape[0] != num_tasks:
      hint = ""
      try:
        like_params = params is not None and jax.tree_util.tree_all(jax.tree_util.tree_map(
            lambda u, p: jnp.shape(u) == jnp.shape(p), updates, params))
      except ValueError:  # not the structure of the parameters
        like_params = False
      if like_params:
        hint = (" These are shaped like the parameters: one gradient, not N per-task ones "
                "(vmap(grad) over the task-grouped batch). optax.MultiSteps accumulates "
                "parameter-shaped gradients and cannot wrap a task-weighting method: use "
                "ldro.train.make_train_step(..., microbatches=k), or sum the per-task "
                "gradients of the micro-batches and call update once.")
      raise ValueError(
          f"{method}: every leaf of the per-task gradients needs a leading task axis of size "
          f"{num_tasks}; leaf {jax.tree_util.keystr(path)} has shape {leaf.shape}.{hint}")


def check_num_tasks(num_tasks: Any, method: str) -> int:
  """``num_tasks`` as a Python int ``>= 1`` (``2.5`` is refused, not truncated)."""
  if isinstance(num_tasks, jax.core.Tracer):
    raise ValueError(
        f"{method}: num_tasks must be a static Python int (with optax.inject_hyperparams, "
        "list it in static_args).")
  arr = np.asarray(num_tasks) if isinstance(num_tasks, (numbers.Number, np.generic,
                                                        np.ndarray, jax.Array)) else None
  if (arr is None or arr.ndim != 0 or arr.dtype == bool
      or not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr)
      or float(arr) != round(float(arr))):
    raise ValueError(f"{method}: num_tasks must be a whole number >= 1, got {num_tasks!r}.")
  n = int(arr)
  if n < 1:
    raise ValueError(f"{method}: num_tasks must be >= 1, got {num_tasks!r}.")
  return n


def is_static(value: Any) -> bool:
  """Whether a hyper-parameter is a concrete value (not traced, e.g. by a schedule)."""
  if isinstance(value, jax.core.Tracer):
    return False
  return isinstance(value, (numbers.Number, np.ndarray, np.generic, jax.Array))


def check_hparam(value: Any, name: str, method: str, *, low: float = -math.inf,
                 high: float = math.inf, low_inclusive: bool = True,
                 high_inclusive: bool = True, integer: bool = False) -> Any:
  """Validates a static scalar hyper-parameter; traced values pass through.

  Values under ``optax.inject_hyperparams`` or a schedule are traced and can
  only be checked by their effect (a non-finite coefficient is caught by the
  core's guard and the step keeps its previous coefficients).

  Args:
    value: the hyper-parameter.
    name: its argument name (shown in the message, as it is bound in gin).
    method: the method's name.
    low, high: the allowed range.
    low_inclusive, high_inclusive: whether the bounds are allowed.
    integer: the value must be a whole number.

  Returns:
    ``value`` unchanged.

  Raises:
    ValueError: naming the method, the parameter and the allowed range.
  """
  if isinstance(value, (str, bytes)):
    raise ValueError(f"{method}: {name} must be a number, got {value!r}.")
  if not is_static(value):
    return value
  if isinstance(value, (bool, np.bool_)):
    raise ValueError(f"{method}: {name} must be a number, got {value!r}.")
  arr = np.asarray(value)
  if arr.ndim != 0 or not (np.issubdtype(arr.dtype, np.number)):
    raise ValueError(f"{method}: {name} must be a scalar number, got {value!r}.")
  x = float(arr)
  lo = "[" if low_inclusive else "("
  hi = "]" if high_inclusive else ")"
  allowed = f"{lo}{low:g}, {high:g}{hi}"
  if not math.isfinite(x):
    raise ValueError(f"{method}: {name} must be finite, got {x!r} (allowed: {allowed}).")
  if integer and x != round(x):
    raise ValueError(f"{method}: {name} must be a whole number, got {value!r}.")
  below = x < low or (x == low and not low_inclusive)
  above = x > high or (x == high and not high_inclusive)
  if below or above:
    raise ValueError(f"{method}: {name} must be in {allowed}, got {x:g}.")
  return value


def check_choice(value: Any, name: str, method: str, choices: tuple[str, ...]) -> str:
  """Validates a string option against its known values."""
  if value not in choices:
    raise ValueError(f"{method}: unknown {name} {value!r}; known: {', '.join(map(repr, choices))}.")
  return value


# ----------------------------------------------------------------------------
# Outputs.
# ----------------------------------------------------------------------------


def weighted_sum(task_grads: PyTree, weights: Array) -> PyTree:
  """``sum_i c_i g_i`` over the leading task axis of every leaf."""
  return jax.tree_util.tree_map(
      lambda g: jnp.tensordot(weights.astype(g.dtype), g, axes=1), task_grads)


def scale_tasks(task_tree: PyTree, w: Array) -> PyTree:
  """Every leaf ``[N, ...]`` times ``w [N]`` along its leading task axis."""
  return jax.tree_util.tree_map(
      lambda x: x * w.astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1)), task_tree)


def pull_back(task_vjp: Callable[[Array], Any], weights: Array) -> PyTree:
  """``task_vjp(c)``: the gradient of ``sum_i c_i l_i`` (lean mode)."""
  out = task_vjp(weights)
  # jax.vjp returns a tuple of cotangents, one per primal input.
  if isinstance(out, tuple) and len(out) == 1:
    out = out[0]
  return out


def task_weights(opt_state: Any) -> Array:
  """The current task weights ``c`` ``[N]``, found anywhere in an optimizer state.

  Works for a bare method state, an ``optax.chain`` state, and states wrapped
  by ``optax.inject_hyperparams``.

  Args:
    opt_state: optimizer state containing exactly one task-weighting method.

  Returns:
    The ``task_weights`` field of that method's state: the coefficients of
    the last update (``update = sum_i c_i g_i``).

  Raises:
    ValueError: the state holds no task-weighting method, or several.
  """
  try:
    found = otu.tree_get(opt_state, "task_weights")
  except KeyError as e:  # raised when several matches are found
    raise ValueError(
        "task_weights: the optimizer state must contain exactly one ldro task-weighting "
        f"method state (a NamedTuple with a 'task_weights' field): {e}") from None
  if found is None:  # optax returns the default when nothing matches
    raise ValueError(
        "task_weights: the optimizer state contains no ldro task-weighting method "
        "(no NamedTuple with a 'task_weights' field); put a method such as "
        "ldro.ldro_weights(...) first in the optax.chain.")
  return found


def uniform(num_tasks: int) -> Array:
  """Equal weights ``1 / N`` ``[N]`` float32."""
  return jnp.full((num_tasks,), 1.0 / num_tasks, jnp.float32)


# ----------------------------------------------------------------------------
# The core.
# ----------------------------------------------------------------------------


class TaskStats(NamedTuple):
  """What a method's rule sees at one step.

  Attributes:
    losses: ``[N]`` float32 task losses (absent tasks set to 0), or ``None``
      if the method does not need them and none were given.
    mask: ``[N]`` bool, tasks present in the batch; ``None`` when the caller
      gave no mask (every task present).
    gram: ``[N, N]`` float32 Gram matrix ``G_ij = g_i . g_j`` (the last
      refreshed one on steps where no refresh is due); ``None`` if the method
      does not need it.
    refreshed: ``[]`` bool, the Gram matrix was recomputed at this step.
    count: ``[]`` int32, updates taken before this one.
    key: PRNG key, or ``None``.
    weights: ``[N]`` coefficients of the previous update (the method's
      initial weights at the first step).
    val_dots: ``[N]`` float32 ``g_i . g_val``, each task gradient's dot
      product with the gradient of a validation batch; ``None`` unless the
      method needs it (``Rule.needs_val_grads``).
  """
  losses: Optional[Array]
  mask: Optional[Array]
  gram: Optional[Array]
  refreshed: Array
  count: Array
  key: Optional[Array]
  weights: Array
  val_dots: Optional[Array] = None

  @property
  def present(self) -> Array:
    """``[N]`` bool mask of present tasks (all ``True`` without a mask)."""
    n = self.weights.shape[0]
    return jnp.ones((n,), bool) if self.mask is None else self.mask


class EmptyState(NamedTuple):
  """State of a method that keeps nothing beyond its last coefficients."""


class WeightingState(NamedTuple):
  """State of every task-weighting transformation.

  Attributes:
    count: ``[]`` int32, number of updates taken.
    task_weights: ``[N]`` coefficients ``c`` of the last update
      (``update = sum_i c_i g_i``; on the simplex for the weighting methods,
      not for PCGrad, MGDA-UB, CAGrad...).
    gram: ``[N, N]`` Gram matrix of the last refresh (zeros before the first,
      and for methods that use none).
    method_state: the method's own state (a ``NamedTuple`` of arrays).
  """
  count: Array
  task_weights: Array
  gram: Array
  method_state: Any


@dataclasses.dataclass(frozen=True)
class Rule:
  """A method's own part: its state and its rule.

  Attributes:
    name: the method's name in error messages.
    coefficients: ``coefficients(stats, state) -> (c [N], new_state)``; pure
      and jittable. Exactly one of ``coefficients`` and ``aggregate``.
    aggregate: for methods that are not coefficients on task gradients:
      ``aggregate(task_grads, stats, state) -> (update, c [N], new_state)``,
      where ``c`` is what ``task_weights`` reports. Jacobian mode only.
    init_state: ``init_state(N)`` -> the method's state (``EmptyState()``).
    init_weights: ``init_weights(N)`` -> the coefficients reported before the
      first update (default uniform).
    needs_losses: the rule reads ``stats.losses`` (required extra arg).
    needs_gram: the rule reads ``stats.gram``.
    needs_key: the rule reads ``stats.key`` (required extra arg).
    needs_val_grads: the rule reads ``stats.val_dots`` (the ``val_grads``
      extra arg, the gradient of a validation batch, is required; the core
      forms ``g_i . g_val`` from the per-task gradients, or in lean mode
      from ``task_vjp`` by transposition, :func:`task_dots`).
    refresh_every: Gram refresh interval (steps ``0, k, 2k, ...``); may be a
      traced value under ``inject_hyperparams``.
    lean: the method supports lean mode. ``False`` for methods whose update
      is defined on per-task gradients and not on the losses.
    lean_hint: what to use instead when ``lean`` is ``False``.
    gram_filter: optional predicate on a parameter's path
      (``jax.tree_util.keystr``, e.g. ``"['Dense_2']['kernel']"``): the Gram
      matrix is then computed on the selected parameters only (e.g. GradNorm's
      last shared layer). It needs the per-task gradients: Jacobian mode, or
      lean mode with ``task_grads_fn``.
    equal_specific: with ``gram_filter``: the parameters it does not select
      (task-specific ones) get the equal-weights update ``sum_i g_i / N``
      instead of ``sum_i c_i g_i`` (:func:`on_shared_params`, ``specific``).
  """
  name: str
  coefficients: Optional[Callable[[TaskStats, Any], tuple[Array, Any]]] = None
  aggregate: Optional[Callable[[PyTree, TaskStats, Any], tuple[PyTree, Array, Any]]] = None
  init_state: Callable[[int], Any] = lambda n: EmptyState()
  init_weights: Optional[Callable[[int], Array]] = None
  needs_losses: bool = False
  needs_gram: bool = False
  needs_key: bool = False
  needs_val_grads: bool = False
  refresh_every: Any = 1
  lean: bool = True
  lean_hint: str = ""
  gram_filter: Optional[Callable[[str], bool]] = None
  equal_specific: bool = False


def _all_finite(tree: PyTree) -> Array:
  leaves = [x for x in jax.tree_util.tree_leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  if not leaves:
    return jnp.array(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _select(ok: Array, new: PyTree, old: PyTree) -> PyTree:
  return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)


def param_filter(spec: Any, method: str = "param_filter") -> Optional[Callable[[str], bool]]:
  r"""A predicate on parameter paths (for ``Rule.gram_filter``), from a regex, a substring or a function.

  Paths are ``jax.tree_util.keystr`` strings, e.g.
  ``"['params']['Dense_2']['kernel']"``. A string ``spec`` is searched in the
  path as a regular expression (``re.search``), so a plain name such as
  ``"Dense_2"`` selects every leaf under it and ``r"Dense_2'\]\['kernel"``
  its kernel only; a ``spec`` in keystr form (starting with ``[``, e.g.
  ``"['Dense_2']"``) or that is not a valid regex is matched literally, as a
  substring (``"['Dense_2']"`` as a regex would be a character class). A
  callable is used as it is (``path -> bool``). ``None``: all parameters.

  Args:
    spec: ``None``, a non-empty string, or a callable on paths.
    method: what is being set, shown in the error message (e.g. ``"gradnorm: layer"``).

  Returns:
    The predicate, or ``None`` for all parameters.

  Raises:
    ValueError: ``spec`` is none of these.
  """
  if spec is None or callable(spec):
    return spec
  if not isinstance(spec, str) or not spec:
    raise ValueError(f"{method} must be None (all parameters), a non-empty substring/regex "
                     f"of the parameter path or a function of the path, got {spec!r}.")
  pattern = None
  if not spec.startswith("["):
    try:
      pattern = re.compile(spec)
    except re.error:
      pass  # not a regex: a plain substring

  def keep(path: str) -> bool:
    return spec in path if pattern is None else pattern.search(path) is not None
  return keep


def filtered_gram(task_grads: PyTree, keep: Optional[Callable[[str], bool]], method: str) -> Array:
  """The Gram matrix of the task gradients, on the leaves whose path ``keep`` selects."""
  if keep is None:
    return lookahead.task_gram(task_grads)
  leaves = [g for path, g in jax.tree_util.tree_leaves_with_path(task_grads)
            if keep(jax.tree_util.keystr(path))]
  if not leaves:
    _no_parameter_selected(task_grads, method)
  return lookahead.task_gram(leaves)


def _no_parameter_selected(tree: PyTree, method: str):
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)]
  raise ValueError(f"{method}: the parameter filter selects no parameter; paths are: "
                   f"{', '.join(paths[:20])}{' ...' if len(paths) > 20 else ''}.")


def task_dots(task_grads: Optional[PyTree], task_vjp: Optional[Callable[[Array], Any]],
              vector: PyTree, num_tasks: int, method: str, dtype=jnp.float32) -> Array:
  """``[N]`` dot products ``g_i . v`` of the task gradients with a params-shaped ``v``.

  Jacobian mode: from the per-task gradients (``O(N P)``). Lean mode: ``J v``
  is the transpose of the linear map ``c -> task_vjp(c) = J^T c``
  (``jax.linear_transpose``; about the cost of one more backward pass, and it
  works for layers with a custom VJP, which forward-mode ``jax.jvp`` refuses).

  Args:
    task_grads: per-task gradients (leading axis ``N``), or None in lean mode.
    task_vjp: lean mode's VJP of the task losses, or None.
    vector: ``v``, a pytree shaped like the parameters.
    num_tasks: ``N``.
    method: the method's name (error messages).
    dtype: dtype of the task losses (the cotangent ``task_vjp`` takes).

  Returns:
    ``[N]`` float32.
  """
  if task_vjp is None:
    g_leaves, g_def = jax.tree_util.tree_flatten(task_grads)
    v_leaves, v_def = jax.tree_util.tree_flatten(vector)
    if g_def != v_def or any(g.shape[1:] != v.shape for g, v in zip(g_leaves, v_leaves)):
      raise ValueError(f"{method}: val_grads must have the structure and shapes of the "
                       f"parameters (one task's gradient); got {v_def} vs {g_def}.")
    return sum(jnp.tensordot(g.reshape(num_tasks, -1).astype(jnp.float32),
                             v.reshape(-1).astype(jnp.float32), axes=1)
               for g, v in zip(g_leaves, v_leaves))
  f = lambda c: pull_back(task_vjp, c)  # pylint: disable=unnecessary-lambda-assignment
  primal = jax.ShapeDtypeStruct((num_tasks,), dtype)
  out = jax.eval_shape(f, primal)
  if jax.tree_util.tree_structure(out) != jax.tree_util.tree_structure(vector):
    raise ValueError(f"{method}: val_grads must have the structure of the parameters; got "
                     f"{jax.tree_util.tree_structure(vector)} vs {jax.tree_util.tree_structure(out)}.")
  vector = jax.tree_util.tree_map(lambda v, o: jnp.asarray(v, o.dtype).reshape(o.shape),
                                  vector, out)
  try:
    (dots,) = jax.linear_transpose(f, primal)(vector)
  except NotImplementedError as e:  # e.g. a custom_vjp layer: its backward has no transpose
    raise ValueError(
        f"{method}: lean mode forms g_i . g_val by transposing task_vjp, which this model does "
        f"not support ({str(e).splitlines()[0]}); use Jacobian mode (mode='jacobian').") from None
  return dots.astype(jnp.float32)


def _is_static_one(k: Any) -> bool:
  return is_static(k) and float(np.asarray(k)) == 1


class TaskWeighting(optax.GradientTransformationExtraArgs):
  """A task-weighting transformation; it also carries its :class:`Rule`.

  An ``optax.GradientTransformationExtraArgs`` (``init``, ``update``) in every
  respect; ``tx.rule`` and ``tx.num_tasks`` let :func:`combine` compose
  methods.
  """
  rule: Rule
  num_tasks: Any


def task_weighting(rule: Rule, num_tasks: int) -> TaskWeighting:
  """Builds a method's ``optax.GradientTransformationExtraArgs`` from its rule.

  Each update:

  1. validate the extra args the rule needs (``task_losses [N]``, ``key``,
     ``task_mask [N]``) and the mode;
  2. when the rule needs the Gram matrix and a refresh is due
     (``count % refresh_every == 0``, under ``lax.cond``), compute ``G`` from
     the per-task gradients (Jacobian mode) or from ``gram_fn``/``gram``/
     ``task_grads_fn`` (lean mode); otherwise use the last refreshed ``G``;
  3. ``c, state = rule.coefficients(stats, state)``; if the losses (when
     needed), ``G`` or ``c`` are not finite, keep the previous coefficients,
     Gram matrix and method state;
  4. output ``sum_i c_i g_i`` (or ``task_vjp(c)`` in lean mode).

  Args:
    rule: the method's :class:`Rule`.
    num_tasks: ``N`` (static).

  Returns:
    The transformation; extra args ``task_losses``, ``task_mask``, ``key``,
    ``task_vjp``, ``gram_fn``, ``gram``, ``task_grads_fn``, ``val_grads``
    (others are ignored, so the method composes in ``optax.chain`` with any
    other).
  """
  name = rule.name
  if (rule.coefficients is None) == (rule.aggregate is None):
    raise ValueError(f"{name}: a rule has exactly one of coefficients and aggregate.")
  if rule.aggregate is not None and rule.lean:
    raise ValueError(f"{name}: an aggregate rule needs the per-task gradients (lean=False).")
  if rule.equal_specific and (rule.gram_filter is None or rule.aggregate is not None):
    raise ValueError(f"{name}: equal_specific needs a gram_filter (the shared parameters) and "
                     "a coefficients rule.")
  check_hparam(rule.refresh_every, "refresh_every", name, low=1, integer=True)
  if not isinstance(num_tasks, jax.core.Tracer):  # traced under inject_hyperparams
    check_num_tasks(num_tasks, name)

  def init_fn(params):
    del params
    n = check_num_tasks(num_tasks, name)
    w0 = uniform(n) if rule.init_weights is None else jnp.asarray(rule.init_weights(n),
                                                                   jnp.float32)
    if w0.shape != (n,):
      raise ValueError(f"{name}: initial weights must have shape ({n},), got {w0.shape}.")
    state = WeightingState(count=jnp.zeros([], jnp.int32), task_weights=w0,
                           gram=jnp.zeros((n, n), jnp.float32),
                           method_state=rule.init_state(n))
    # Every leaf its own buffer: train steps donate the state, and a method may
    # hand out one array twice (a closure constant, a shared zeros array).
    return jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), state)

  def update_fn(updates, state, params=None, *, task_losses=None, task_mask=None, key=None,
                task_vjp: Optional[Callable[[Array], Any]] = None,
                gram_fn: Optional[Callable[[], Array]] = None,
                gram: Optional[Array] = None,
                task_grads_fn: Optional[Callable[[], PyTree]] = None,
                val_grads: Optional[PyTree] = None,
                **extra_args):
    del extra_args
    n = state.task_weights.shape[0]
    lean = task_vjp is not None
    if lean and not rule.lean:
      raise ValueError(f"{name} needs the per-task gradients (Jacobian mode: pass them as "
                       f"updates, without task_vjp); lean mode is not supported."
                       + (f" {rule.lean_hint}" if rule.lean_hint else ""))
    losses = None
    if rule.needs_losses or task_losses is not None:
      losses = check_task_losses(task_losses, n, name).astype(jnp.float32)
    mask = check_task_mask(task_mask, n, name)
    if mask is not None and losses is not None:
      losses = jnp.where(mask, losses, 0.0)
    if rule.needs_key and key is None:
      raise ValueError(f"{name}: a PRNG key is required: pass key=jax.random.key(...) as an "
                       "extra argument to update().")
    if not lean:
      if task_grads_fn is not None:
        raise ValueError(f"{name}: task_grads_fn=... is for lean mode (with task_vjp=...); in "
                         "Jacobian mode pass the per-task gradients as updates.")
      check_task_grads(updates, n, name, params)
    if lean and rule.needs_gram:
      given = [a for a, v in (("gram_fn", gram_fn), ("gram", gram),
                              ("task_grads_fn", task_grads_fn)) if v is not None]
      if not given:
        raise ValueError(
            f"{name}: lean mode (task_vjp given) needs the Gram matrix: pass gram_fn=... (or "
            "gram=..., or task_grads_fn=...).")
      if rule.gram_filter is not None and task_grads_fn is None:
        raise ValueError(f"{name}: a Gram matrix on selected parameters (gram_filter) needs the "
                         "per-task gradients: use Jacobian mode, or lean mode with "
                         "task_grads_fn=... (not gram_fn/gram; ldro.train.make_train_step(..., "
                         "gram_strategy='grouped', reuse_refresh_grads=True) passes it).")
      if len(given) > 1 and "task_grads_fn" in given:
        raise ValueError(f"{name}: task_grads_fn=... replaces gram_fn/gram; pass task_vjp and "
                         f"task_grads_fn only (got {', '.join(given)}).")

    val_dots = None
    if rule.needs_val_grads:
      if val_grads is None:
        raise ValueError(
            f"{name}: the 'val_grads' extra argument (the gradient of a validation batch, "
            "shaped like the parameters) is required; ldro.train.make_train_step(..., "
            "val_grads=True) computes it from a {'train': ..., 'val': ...} batch.")
      dtype = jnp.float32 if task_losses is None else jnp.asarray(task_losses).dtype
      val_dots = task_dots(None if lean else updates, task_vjp if lean else None, val_grads,
                           n, name, dtype)
      if mask is not None:
        val_dots = jnp.where(mask, val_dots, 0.0)

    def checked_gram(g):
      g = jnp.asarray(g)
      if g.shape != (n, n):
        raise ValueError(f"{name}: the Gram matrix must be [{n}, {n}], got {g.shape}.")
      return g.astype(jnp.float32)

    def decide(g, refreshed, task_grads=None):
      """(output or None, c, method state, Gram) at this step, guarded."""
      stats = TaskStats(losses=losses, mask=mask, gram=g if rule.needs_gram else None,
                        refreshed=jnp.asarray(refreshed, bool), count=state.count, key=key,
                        weights=state.task_weights, val_dots=val_dots)
      out = None
      if rule.aggregate is not None:
        out, c, ms = rule.aggregate(task_grads, stats, state.method_state)
      else:
        c, ms = rule.coefficients(stats, state.method_state)
      c = jnp.asarray(c, jnp.float32)
      if c.shape != (n,):
        raise ValueError(f"{name}: the rule returned coefficients of shape {c.shape}, not ({n},).")
      ok = jnp.all(jnp.isfinite(c))
      if rule.needs_losses:
        ok &= jnp.all(jnp.isfinite(losses))
      if rule.needs_gram:
        ok &= jnp.all(jnp.isfinite(g))
      if val_dots is not None:
        ok &= jnp.all(jnp.isfinite(val_dots))
      new = (c, ms, g)
      old = (state.task_weights, state.method_state, state.gram)
      c, ms, g = _select(ok, new, old)
      return out, c, ms, g

    def combine_out(c, grads=None):
      """``sum_i c_i g_i``; with ``equal_specific``, ``sum_i g_i / N`` on the parameters the
      filter leaves out (lean mode: a second pull-back)."""
      out = weighted_sum(grads, c) if grads is not None else pull_back(task_vjp, c)
      if not rule.equal_specific:
        return out
      eq = jnp.full((n,), 1.0 / n, jnp.float32)
      rest = weighted_sum(grads, eq) if grads is not None else pull_back(task_vjp, eq)
      paths = [rule.gram_filter(jax.tree_util.keystr(p_))
               for p_, _ in jax.tree_util.tree_leaves_with_path(out)]
      if not any(paths):  # (a method with a Gram matrix has already said so in filtered_gram)
        _no_parameter_selected(out, name)
      leaves = [a if keep else b for keep, a, b in
                zip(paths, jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(rest))]
      return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out), leaves)

    due = (state.count % rule.refresh_every) == 0
    every_step = _is_static_one(rule.refresh_every)
    cond = (lambda refresh, keep: refresh()) if every_step else (
        lambda refresh, keep: jax.lax.cond(due, refresh, keep))

    if not rule.needs_gram:
      out, c, ms, g = decide(state.gram, False, updates if not lean else None)
      if out is None:
        out = combine_out(c, None if lean else updates)
    elif not lean:
      g = cond(lambda: checked_gram(filtered_gram(updates, rule.gram_filter, name)),
               lambda: state.gram)
      out, c, ms, g = decide(g, due, updates)
      if out is None:
        out = combine_out(c, updates)
    elif task_grads_fn is not None:
      def refresh_step():
        grads = task_grads_fn()
        check_task_grads(grads, n, name)
        _, c, ms, g = decide(checked_gram(filtered_gram(grads, rule.gram_filter, name)), True)
        return combine_out(c, grads), c, ms, g

      def ordinary_step():
        _, c, ms, g = decide(state.gram, False)
        return combine_out(c), c, ms, g

      out, c, ms, g = cond(refresh_step, ordinary_step)
    else:
      compute = gram_fn if gram_fn is not None else (lambda: gram)
      g = cond(lambda: checked_gram(compute()), lambda: state.gram)
      _, c, ms, g = decide(g, due)
      out = combine_out(c)

    new_state = WeightingState(count=optax.safe_increment(state.count), task_weights=c,
                               gram=g, method_state=ms)
    return out, new_state

  tx = TaskWeighting(init_fn, update_fn)
  tx.rule = rule
  tx.num_tasks = num_tasks
  return tx


def on_shared_params(tx: TaskWeighting, shared: Any,
                     specific: str = "coefficients") -> TaskWeighting:
  r"""The method ``tx`` on the shared parameters: its Gram matrix from them only.

  A gradient method compares the task gradients through ``G_ij = g_i . g_j``.
  With task-specific parameters (a head ``theta_i`` per task) the task
  gradient is ``g_i = (g_i^sh, g_i^{theta_i})`` and the heads only add to the
  diagonal,

  .. math::  G_{ij} = g_i^{sh} \cdot g_j^{sh} + \delta_{ij} \|g_i^{\theta_i}\|^2,

  so every pair looks less conflicting and a task with a large head gradient
  looks larger than it is in the shared parameters, where the tasks compete.
  The reference implementations combine the gradients of the shared
  parameters: LibMTL for every gradient method (its ``_compute_grad_dim`` and
  ``_grad2vec`` run over ``get_share_params()``), Nash-MTL's
  ``get_weighted_loss(shared_parameters, ...)``, and the exact MGDA of Sener
  and Koltun's code (their MGDA-UB uses the gradients with respect to the
  shared representation instead). This wrapper gives ``tx`` ``G^sh``, from the
  leaves that ``shared`` selects; the method's rule is unchanged. For models
  whose parameters are all shared (ldro's CNN and decoder) it changes nothing.
  For L-DRO the choice changes the model of the step: its lookahead
  ``l_i - lam G_ij / sqrt(G_jj)`` is the first-order change of ``l_i`` under
  the step, exact on all parameters (a head's step lowers its own task's
  loss too); on the shared ones it counts only the interaction through them.

  The update of the shared parameters is ``sum_i c_i g_i``. The task-specific
  ones get, by ``specific``: ``'coefficients'`` (default) ``c_i`` times their
  own task's gradient, as from the backward pass of ``sum_i c_i l_i`` in the
  Nash-MTL code and Sener and Koltun's MGDA (and LibMTL's Nash-MTL); or
  ``'equal'`` the equal-weights update ``sum_i g_i / N``, their task's
  gradient unweighted on the library's mean-loss scale (the references sum
  the losses, so their heads get ``g_i``: under SGD the heads' step here is
  ``1/N`` of theirs), as LibMTL's MGDA, CAGrad and PCGrad and the CAGrad
  authors' code leave them (in lean mode one more pull-back, i.e. a second
  backward pass, on steps without a refresh, and on every step for a method
  without a Gram matrix).

  It needs the per-task gradients on a refresh step: Jacobian mode, or lean
  mode with ``task_grads_fn`` (``ldro.train.make_train_step(...,
  gram_strategy='grouped', reuse_refresh_grads=True)``); a Gram matrix
  computed on all parameters (``gram_fn``, ``gram``) is refused.

  A method without a Gram matrix takes only ``specific='equal'``: its
  coefficients weight the shared parameters' gradients and the heads get
  their unweighted gradient (``/ N``, as above). This is the random-weighting paper's RGW
  (Algorithm 2: random weights on the shared parameters' task gradients):
  ``on_shared_params(ldro.get_method('rgw', num_tasks=N), 'encoder',
  specific='equal')``.

  Args:
    tx: a task-weighting method (e.g. ``ldro.mgda(N)``,
      ``ldro.get_method('nash_mtl', num_tasks=N)``).
    shared: the shared parameters' paths (:func:`param_filter`: a regex or
      substring of ``jax.tree_util.keystr`` paths, e.g. ``"encoder"``, or a
      function ``path -> bool``).
    specific: the task-specific parameters' update, ``'coefficients'`` or
      ``'equal'`` (above).

  Returns:
    The method with ``Rule.gram_filter`` set (an error names the paths if
    the filter selects none of them at the first update).

  Raises:
    TypeError: ``tx`` is not an ldro task-weighting transformation.
    ValueError: ``tx`` uses no Gram matrix and ``specific`` is
      ``'coefficients'`` (nothing would change); ``tx`` already chooses its own
      parameters (GradNorm's ``layer``); ``specific='equal'`` for a method that
      forms its own update (not coefficients on the task gradients).
  """
  if not isinstance(tx, TaskWeighting):
    raise TypeError("on_shared_params: tx must be an ldro task-weighting transformation (built "
                    f"by ldro.get_method or a method factory), got {type(tx).__name__}.")
  rule = tx.rule
  check_choice(specific, "specific", f"on_shared_params({rule.name})",
               ("coefficients", "equal"))
  if not rule.needs_gram and specific == "coefficients":
    raise ValueError(f"on_shared_params: {rule.name} does not use the task-gradient Gram matrix, "
                     "so with specific='coefficients' nothing changes; specific='equal' gives "
                     "the task-specific parameters their unweighted gradient (RGW's Algorithm "
                     "2 for rgw).")
  keep = param_filter(shared, f"on_shared_params({rule.name}): shared")
  if keep is None:
    return tx
  if rule.gram_filter is not None:
    raise ValueError(f"on_shared_params: {rule.name} already takes its Gram matrix on parameters "
                     "of its own choice (e.g. GradNorm's layer=...); set them there.")
  if specific == "equal" and rule.aggregate is not None:
    raise ValueError(f"on_shared_params: {rule.name} forms its own update (not coefficients on "
                     "the task gradients); specific='equal' does not apply.")
  return task_weighting(dataclasses.replace(rule, gram_filter=keep,
                                            equal_specific=specific == "equal"), tx.num_tasks)


def loss_weighting(
    name: str,
    num_tasks: int,
    next_weights: Callable[..., Array],
    init_weights: Optional[Callable[[int], Array]] = None,
    needs_losses: bool = True,
    needs_key: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """A loss-weighting method from its rule ``next_weights(w, losses, mask, key, count) -> w_new``.

  Shorthand for :func:`task_weighting` with a rule that reads the previous
  weights, the losses, the mask and the key, and keeps no state of its own
  (the weights are the core's state).

  Args:
    name: the method's name in error messages.
    num_tasks: ``N``.
    next_weights: ``(w [N], losses [N] or None, mask [N] or None, key or None,
      count []) -> [N]`` this step's weights (``count``: the steps before this one).
    init_weights: ``N -> [N]`` the weights before the first step (default uniform).
    needs_losses: the rule reads ``losses`` (the ``task_losses`` extra argument).
    needs_key: the rule reads ``key`` (the ``key`` extra argument).

  Returns:
    A :class:`TaskWeighting` (Jacobian and lean mode).
  """
  def coefficients(stats: TaskStats, state):
    return next_weights(stats.weights, stats.losses, stats.mask, stats.key, stats.count), state
  return task_weighting(Rule(name=name, coefficients=coefficients, init_weights=init_weights,
                             needs_losses=needs_losses, needs_key=needs_key), num_tasks)


class CombinedState(NamedTuple):
  """State of :func:`combine`: each part's state and its last coefficients.

  Attributes:
    loss_weights: ``[N]`` the loss weighting's last weights ``lambda``.
    loss_state: the loss weighting's own state.
    gradient_coefficients: ``[N]`` the gradient method's last coefficients
      ``c'`` on the weighted task gradients ``N lambda_i g_i``.
    gradient_state: the gradient method's own state.
  """
  loss_weights: Array
  loss_state: Any
  gradient_coefficients: Array
  gradient_state: Any


def combine(loss_weighting_tx: TaskWeighting, gradient_tx: TaskWeighting) -> TaskWeighting:
  """A loss weighting followed by a gradient method (RLW paper, Table 4).

  The loss weighting chooses ``lambda`` from the step's statistics (on the
  library's mean-loss scale: equal weights are ``1/N``); the gradient method
  then balances the gradients of the weighted losses rescaled to mean one,
  ``l_i g_i`` with ``l = N lambda``, whose Gram matrix is ``l_i l_j G_ij``:
  with its coefficients ``c'`` the update is ``sum_i c'_i l_i g_i``, so the
  combined coefficients are ``c = N lambda * c'``. The factor ``N`` makes
  ``combine(equal_weighting(N), m)`` the method ``m`` itself, and keeps every
  combination on the gradient method's own update scale (without it, two
  simplex weightings multiply to a step ``N`` times smaller than either
  alone, which under SGD is a learning rate ``N`` times smaller). E.g. RLW +
  CAGrad::

    tx = ldro.combine(ldro.random_loss_weighting(5), ldro.cagrad(5))

  Args:
    loss_weighting_tx: a method that needs no Gram matrix (e.g. RLW, UW,
      DWA, static mixing, DRO).
    gradient_tx: any task-weighting method (e.g. PCGrad, CAGrad, MGDA).

  Returns:
    The combined transformation (Jacobian and lean mode as the gradient
    method supports them).
  """
  for tx in (loss_weighting_tx, gradient_tx):
    if not isinstance(tx, TaskWeighting):
      raise TypeError("combine: both parts must be ldro task-weighting transformations (built "
                      f"by ldro.get_method or a method factory), got {type(tx).__name__}.")
  lw, gm = loss_weighting_tx.rule, gradient_tx.rule
  name = f"{lw.name}+{gm.name}"
  if lw.needs_gram or lw.aggregate is not None:
    raise ValueError(f"combine: the first part must be a loss weighting (no Gram matrix, "
                     f"coefficients only); {lw.name} is not.")
  if lw.gram_filter is not None:
    raise ValueError(f"combine: the loss weighting {lw.name} has shared parameters set "
                     "(on_shared_params); set them on the gradient method, the second part.")
  n_lw, n_gm = loss_weighting_tx.num_tasks, gradient_tx.num_tasks
  if is_static(n_lw) and is_static(n_gm) and int(n_lw) != int(n_gm):
    raise ValueError(f"combine: the parts have different numbers of tasks ({n_lw} and {n_gm}).")

  def init_state(n):
    w_lw = uniform(n) if lw.init_weights is None else jnp.asarray(lw.init_weights(n), jnp.float32)
    w_gm = uniform(n) if gm.init_weights is None else jnp.asarray(gm.init_weights(n), jnp.float32)
    return CombinedState(loss_weights=w_lw, loss_state=lw.init_state(n),
                         gradient_coefficients=w_gm, gradient_state=gm.init_state(n))

  def split(stats: TaskStats, state: CombinedState):
    # Independent randomness for the two parts (e.g. RLW's draw and PCGrad's orders).
    keys = (None, None) if stats.key is None else (jax.random.fold_in(stats.key, 0),
                                                    jax.random.fold_in(stats.key, 1))
    raw, ls = lw.coefficients(stats._replace(weights=state.loss_weights, gram=None, key=keys[0]),
                              state.loss_state)
    raw = jnp.asarray(raw, jnp.float32)
    lam = raw * raw.shape[0]  # mean one: equal loss weights leave the gradient method alone
    inner = stats._replace(
        weights=state.gradient_coefficients, key=keys[1],
        losses=None if stats.losses is None else lam * stats.losses,
        gram=None if stats.gram is None else stats.gram * lam[:, None] * lam[None, :],
        val_dots=None if stats.val_dots is None else lam * stats.val_dots)
    return raw, lam, ls, inner

  def coefficients(stats: TaskStats, state: CombinedState):
    raw, lam, ls, inner = split(stats, state)
    c, gs = gm.coefficients(inner, state.gradient_state)
    return lam * c, CombinedState(raw, ls, jnp.asarray(c, jnp.float32), gs)

  def aggregate(task_grads, stats: TaskStats, state: CombinedState):
    raw, lam, ls, inner = split(stats, state)
    out, c, gs = gm.aggregate(scale_tasks(task_grads, lam), inner, state.gradient_state)
    return out, lam * c, CombinedState(raw, ls, jnp.asarray(c, jnp.float32), gs)

  rule = Rule(
      name=name,
      coefficients=coefficients if gm.aggregate is None else None,
      aggregate=aggregate if gm.aggregate is not None else None,
      init_state=init_state,
      needs_losses=lw.needs_losses or gm.needs_losses,
      needs_gram=gm.needs_gram,
      needs_key=lw.needs_key or gm.needs_key,
      needs_val_grads=lw.needs_val_grads or gm.needs_val_grads,
      refresh_every=gm.refresh_every,
      lean=lw.lean and gm.lean,
      lean_hint=gm.lean_hint or lw.lean_hint,
      gram_filter=gm.gram_filter,
      equal_specific=gm.equal_specific)
  return task_weighting(rule, n_gm)
