"""What the benchmark times: the experiments' models and losses, and the methods.

Workloads are the experiments' own models and losses
(:mod:`experiments.families.image`: ``MODELS``, ``task_cross_entropy``,
``grouped_cross_entropy``; :mod:`experiments.families.lm`: ``token_loss``,
``grouped_token_losses``; :mod:`ldro.models.cnn`, :mod:`ldro.models.decoder`)
on random task-grouped batches of the experiments' shapes, so a benchmark row
times exactly the step that a training run takes.

Methods come from the registry (:func:`ldro.method_info`): a
:class:`MethodSpec` names a registered method, overrides of its paper
defaults and how it is run (mode, Gram strategy); its label is the registry's
label followed by that (``'L-DRO T=100 (lean, grouped)'``). Besides the
hand-picked variants (:data:`CNN_VARIANTS`, :data:`LM_VARIANTS`),
:func:`per_method_specs` gives one row per registered method with its
defaults in Jacobian mode (issue 12, "Speed").
"""

import dataclasses
import inspect
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import ldro
from experiments.families import image
from experiments.families import lm
from ldro.models import cnn
from ldro.models import decoder as decoder_lib

PyTree = Any

#: The optimizer after the weighting transformation (the experiments' CIFAR setting).
LEARNING_RATE = 0.025


def optimizer() -> optax.GradientTransformation:
  return optax.sgd(LEARNING_RATE, momentum=0.9, nesterov=True)


# ---------------------------------------------------------------------------
# Workloads.
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Workload:
  """A model, its parameters, one task-grouped batch and its losses.

  Attributes:
    name: e.g. ``'small CNN'``.
    model: the Flax module.
    params: its variables.
    batch: every leaf ``[N, b, ...]``.
    task_loss: ``(params, task_batch, rng) -> (loss, aux)`` (the experiment's).
    grouped_losses: ``(params, batch, rng) -> (losses [N], aux)`` from one
      model application on the flattened batch.
    plain_loss: ``(params, batch, rng) -> (loss, {'task_losses': [N]})``, the
      mean loss of the flattened batch (plain training).
    reuse_refresh_grads: as the experiment sets it
      (``make_train_step(reuse_refresh_grads=)``).
  """
  name: str
  model: Any
  params: PyTree
  batch: PyTree
  task_loss: Callable[..., Any]
  grouped_losses: Callable[..., Any]
  plain_loss: Callable[..., Any]
  reuse_refresh_grads: Optional[bool]

  @property
  def num_tasks(self) -> int:
    return int(jax.tree_util.tree_leaves(self.batch)[0].shape[0])

  @property
  def num_params(self) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(self.params)))


def cnn_model(model: str, num_classes: int = 100, conv_impl: str = "auto") -> cnn.ConvNet:
  """The image experiment's CNN ``model`` (``'small'``, ``'large'``, ``'tiny'``)."""
  if model not in image.MODELS:
    raise ValueError(f"unknown CNN {model!r}; known: {', '.join(image.MODELS)}.")
  return image.MODELS[model](num_classes=num_classes, conv_impl=conv_impl)


def cnn_architecture(model: str, num_classes: int = 100) -> dict:
  """The CNN's fields (for the PyTorch reference, which builds the same network)."""
  net = cnn_model(model, num_classes)
  return dict(features=net.features, num_conv=net.num_conv, mlp_width=net.mlp_width,
              mlp_layers=net.mlp_layers, num_classes=num_classes)


def cnn_workload(model: str, n: int, per_task: int, num_classes: int = 100, seed: int = 0,
                 conv_impl: str = "auto") -> Workload:
  """The image experiment's CNN and losses on a random CIFAR-shaped grouped batch.

  Task ``i`` owns classes ``5i .. 5i+4`` (mod ``num_classes``), as CIFAR-100's
  coarse tasks do; ``per_task`` examples per task.
  """
  net = cnn_model(model, num_classes, conv_impl)
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(n, per_task, 32, 32, 3)).astype(np.float32)
  labels = ((5 * np.arange(n)[:, None] + rng.integers(0, 5, size=(n, per_task)))
            % num_classes).astype(np.int32)
  batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels)}
  params = net.init(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 3)))

  def task_loss(params, task_batch, rng):
    del rng
    return image.task_cross_entropy(net, params, task_batch)

  def grouped_losses(params, batch, rng):
    del rng
    return image.grouped_cross_entropy(net, params, batch)

  def plain_loss(params, batch, rng):
    losses, _ = grouped_losses(params, batch, rng)
    return losses.mean(), {"task_losses": losses}

  # The image experiment's rule (ImageClassificationExperiment.reuse_refresh_grads).
  reuse = True if cnn.fast_backward_under_cond(net.conv_impl) else None
  return Workload(f"{model} CNN", net, params, batch, task_loss, grouped_losses, plain_loss,
                  reuse)


#: Decoder sizes: (config, tokens per row).
LM_SIZES = {
    # The LM experiment's 'tiny' decoder with the committed 8k vocabulary.
    "tiny": (lambda: decoder_lib.decoder_config("tiny", 8000), 128),
    # For tests only.
    "test": (lambda: decoder_lib.decoder_config("tiny", 64, emb_dim=16, num_heads=2, head_dim=8,
                                                num_layers=1, mlp_dim=32), 8),
}


def lm_workload(size: str, n: int, rows: int = 1, seed: int = 0) -> Workload:
  """The LM experiment's decoder and token loss on random stratified rows ``[N, rows, L]``."""
  make_config, length = LM_SIZES[size]
  config = make_config()
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
    return lm.token_loss(model, params, task_batch)

  def grouped_losses(params, batch, rng):
    del rng
    return lm.grouped_token_losses(model, params, batch)

  def plain_loss(params, batch, rng):
    losses, aux = grouped_losses(params, batch, rng)
    counts = aux["count"]
    return jnp.sum(losses * counts) / jnp.maximum(jnp.sum(counts), 1.0), {"task_losses": losses}

  return Workload(f"decoder {size}", model, params, batch, task_loss, grouped_losses, plain_loss,
                  lm.LanguageModelingExperiment.reuse_refresh_grads)


# ---------------------------------------------------------------------------
# Methods.
# ---------------------------------------------------------------------------


class Unsupported(ValueError):
  """A registered method the benchmark cannot build or run (the reason is the message)."""


#: Values of required factory arguments other than ``num_tasks``, by argument
#: name (not by method): the benchmark's tasks are of different sizes and have
#: a unit baseline loss.
ARGUMENT_VALUES = {
    "task_sizes": lambda n: [float(2 ** (i % 5)) for i in range(n)],
    "baseline_losses": lambda n: [1.0] * n,
}


def factory_kwargs(name: str, n: int, overrides: Optional[dict] = None) -> dict:
  """Arguments of ``ldro.get_method(name, ...)`` for ``N = n`` tasks.

  ``num_tasks`` when the factory takes it, the required arguments of
  :data:`ARGUMENT_VALUES`, then ``overrides``; the registry's defaults fill
  the rest.

  Raises:
    Unsupported: the factory requires an argument the benchmark cannot give.
  """
  info = ldro.method_info(name)
  overrides = dict(overrides or {})
  kwargs = {}
  for p in inspect.signature(info.factory).parameters.values():
    if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.name in overrides:
      continue
    if p.name == "num_tasks":
      kwargs["num_tasks"] = n
    elif p.default is p.empty and p.name not in info.defaults:
      if p.name not in ARGUMENT_VALUES:
        raise Unsupported(f"its factory requires {p.name!r}, which the benchmark does not know")
      kwargs[p.name] = ARGUMENT_VALUES[p.name](n)
  kwargs.update(overrides)
  return kwargs


def refresh_period(name: str, overrides: Optional[dict] = None) -> Optional[int]:
  """The declared Gram refresh period ``T`` of a method (None: it needs no Gram matrix).

  Read from the built transformation's rule (``tx.rule.refresh_every``), with
  the method's defaults merged with ``overrides``. The timing harness checks
  it on the compiled step (:func:`experiments.benchmark.harness.check_period`).
  """
  info = ldro.method_info(name)
  if "gram" not in info.needs:
    return None
  # The period does not depend on the number of tasks; any N builds the rule.
  tx = ldro.get_method(name, num_tasks=2, **dict(overrides or {}))
  return int(tx.rule.refresh_every)


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """A method to time.

  Attributes:
    method: registry name.
    args: overrides of the registry's defaults, as ``((name, value), ...)``.
    mode: ``'jacobian'`` or ``'lean'``.
    strategy: lean mode's Gram strategy.
    chunk: chunk size of the ``chunked`` strategy.
    vmap_losses: lean mode computes the task losses by ``vmap`` of the task
      loss instead of one batched call.
    reuse: ``reuse_refresh_grads`` of the step (None: the workload's).
    per_method: the registry-wide row of this method (its defaults,
      Jacobian mode).
  """
  method: str
  args: tuple = ()
  mode: str = "lean"
  strategy: str = "grouped"
  chunk: Optional[int] = None
  vmap_losses: bool = False
  reuse: Optional[bool] = None
  per_method: bool = False

  @property
  def info(self) -> ldro.MethodInfo:
    return ldro.method_info(self.method)

  @property
  def period(self) -> Optional[int]:
    return refresh_period(self.method, dict(self.args))

  @property
  def label(self) -> str:
    """Registry label, ``T=`` the refresh period (Gram methods, when not every step or
    when set), then how it runs."""
    info = self.info
    parts = [self.mode]
    if self.mode == "lean" and "gram" in info.needs:
      parts.append(self.strategy + (f" c={self.chunk}" if self.chunk else ""))
    if self.reuse is False:
      parts.append("second pass")
    if self.vmap_losses:
      parts.append("vmap losses")
    period = self.period
    explicit = any(k.endswith("every") for k, _ in self.args)
    show = period is not None and (period != 1 or explicit)
    return f"{info.label}{f' T={period}' if show else ''} ({', '.join(parts)})"

  def make_tx(self, n: int) -> optax.GradientTransformationExtraArgs:
    kwargs = factory_kwargs(self.method, n, dict(self.args))
    return optax.chain(ldro.get_method(self.method, **kwargs), optimizer())


def V(method: str, every: Optional[int] = None, mode: str = "lean", **kw) -> MethodSpec:
  """A variant: ``every`` sets the method's refresh period (its ``*every`` argument)."""
  args = ()
  if every is not None:
    names = [k for k in ldro.method_info(method).defaults if k.endswith("every")]
    args = ((names[0] if names else "update_every", every),)
  return MethodSpec(method, args, mode, **kw)


def _variants(build: Callable[[], list]) -> list[MethodSpec]:
  """The variants whose methods are registered (a method may not have landed yet)."""
  names = set(ldro.method_names())
  need = {"equal", "ldro", "ldro_exact", "dro", "rlw"}
  if not need <= names:  # V() reads the registry: build only what exists
    return []
  return [s for s in build() if s.method in names]


def cnn_variants() -> list[MethodSpec]:
  """Hand-picked CNN rows: lean mode, refresh periods, second pass (issue 6)."""
  return _variants(lambda: [
      V("equal"),
      V("equal", vmap_losses=True),
      V("ldro", 100),
      V("ldro", 100, reuse=False),
      V("ldro", 10),
      V("ldro", 1, "jacobian"),
      V("ldro", 1),
      V("ldro_exact", 100),
      V("dro"),
      V("rlw"),
  ])


def lm_variants() -> list[MethodSpec]:
  """Decoder rows: L-DRO T=1000 with each memory-lean Gram strategy."""
  return _variants(lambda: [
      V("equal"),
      V("ldro", 1000, strategy="pairwise"),
      V("ldro", 1000, strategy="chunked", chunk=8),
      V("ldro", 1000),
      V("ldro", 1000, "jacobian"),
      V("dro"),
  ])


#: Quick-run variants (``--quick``): one periodic lean method.
QUICK_CNN_VARIANTS = ("L-DRO T=100 (lean, grouped)",)
QUICK_LM_VARIANTS = ("L-DRO T=1000 (lean, pairwise)",)


def per_method_specs(mode: str = "jacobian") -> tuple[list[MethodSpec], dict[str, str]]:
  """One spec per registered method (its paper defaults) in ``mode``, and the skipped ones.

  Returns:
    ``(specs, skipped)``; ``skipped`` maps a method name to the reason (no
    such mode, an argument the benchmark cannot give).
  """
  specs, skipped = [], {}
  for name in ldro.method_names():
    info = ldro.method_info(name)
    if mode not in info.modes:
      skipped[name] = f"no {mode} mode (modes: {', '.join(info.modes)})"
      continue
    try:
      factory_kwargs(name, 2)
    except Unsupported as e:
      skipped[name] = str(e)
      continue
    specs.append(MethodSpec(name, mode=mode, per_method=True))
  return specs, skipped


def merge_specs(variants: list[MethodSpec], per_method: list[MethodSpec]) -> list[MethodSpec]:
  """Variants then per-method rows; a per-method row that a variant already times
  (same label) marks that variant instead of being timed twice."""
  out = list(variants)
  labels = [s.label for s in out]
  for s in per_method:
    if s.label in labels:
      i = labels.index(s.label)
      out[i] = dataclasses.replace(out[i], per_method=True)
    else:
      out.append(s)
      labels.append(s.label)
  return out
