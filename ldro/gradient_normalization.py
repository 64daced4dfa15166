"""GradNorm (Chen et al., ICML 2018): loss weights that equalise the tasks' gradient norms.

The gradient norms are taken on one parameter subtree ``W`` (the paper's
"last shared layer"), chosen by a path filter (:func:`layer_filter`), and
come from the Gram matrix on ``W`` (``Rule.gram_filter``):
``||grad_W w_i l_i|| = w_i sqrt(G^W_ii)``.
"""

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from ldro import registry
from ldro import weighting

Array = jax.Array


def layer_filter(layer: Optional[str]) -> Optional[Callable[[str], bool]]:
  """GradNorm's ``layer`` as a path predicate (:func:`ldro.weighting.param_filter`)."""
  return weighting.param_filter(layer, "gradnorm: layer")


class GradNormState(NamedTuple):
  """GradNorm's own state.

  Attributes:
    loss_weights: ``[N]`` float32, ``w`` (sums to ``N``; ones at start), the
      weights of the *next* step.
    initial_losses: ``[N]`` float32, ``l_i(0)``, each task's loss at the
      first step where it was present.
    has_initial: ``[N]`` bool, ``initial_losses`` is set.
    gradnorm_loss: ``[]`` float32, the GradNorm loss
      ``sum_i |G_W^(i) - mean(G_W) r_i^alpha|`` at the last step.
  """
  loss_weights: Array
  initial_losses: Array
  has_initial: Array
  gradnorm_loss: Array


def gradnorm_step(w: Array, gram: Array, losses: Array, initial_losses: Array,
                  present: Array, alpha: float | Array, lr: float | Array
                  ) -> tuple[Array, Array]:
  """One GradNorm update of the loss weights ``w`` (sum ``N``) from the Gram matrix on ``W``.

  See :func:`gradnorm` for the maths. Absent tasks (``present`` False) do not
  enter the means and keep their weight before the renormalisation.

  Args:
    w: ``[N]`` loss weights, summing to ``N``.
    gram: ``[N, N]`` Gram matrix of the task gradients on the layer ``W``.
    losses: ``[N]`` this step's task losses.
    initial_losses: ``[N]`` the first step's losses (``L_i(0)``; 0 where unknown).
    present: ``[N]`` bool, the tasks in this batch.
    alpha: the asymmetry ``alpha``.
    lr: the weights' step size.

  Returns:
    ``(w_new [N], gradnorm_loss [])``: the renormalised weights and ``sum_i |G_W^(i) -
    target_i|``.
  """
  n = w.shape[0]
  k = jnp.maximum(jnp.sum(present), 1).astype(jnp.float32)
  norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))  # ||grad_W l_i||
  g_w = w * norms  # G_W^(i) = ||grad_W w_i l_i|| (w >= 0)
  mean_g = jnp.sum(jnp.where(present, g_w, 0.0)) / k
  has = present & (initial_losses > 0)
  ratio = jnp.where(has, jnp.maximum(losses, 0.0) / jnp.where(has, initial_losses, 1.0), 1.0)
  mean_ratio = jnp.sum(jnp.where(present, ratio, 0.0)) / k
  r = jnp.where(mean_ratio > 0, ratio / jnp.where(mean_ratio > 0, mean_ratio, 1.0), 1.0)
  target = mean_g * r ** alpha  # a constant in the paper (no gradient through it)
  diff = jnp.where(present, g_w - target, 0.0)
  grad = jnp.sign(diff) * norms  # d|G_W^(i) - target_i| / dw_i
  w_new = jnp.maximum(w - lr * grad, 0.0)
  total = jnp.sum(w_new)
  w_new = jnp.where(total > 0, w_new * (n / jnp.where(total > 0, total, 1.0)), 1.0)
  return w_new, jnp.sum(jnp.abs(diff))


def gradnorm(num_tasks: int, alpha: float | Array = 1.5, lr: float | Array = 0.025,
             layer: Optional[str] = None) -> optax.GradientTransformationExtraArgs:
  """GradNorm (Chen et al., ICML 2018): loss weights trained to balance the gradient norms.

  Maths (paper, section 3.2, eq. 1-2, Algorithm 1), with ``W`` the chosen
  parameters and loss weights ``w`` (``sum_i w_i = N``)::

    G_W^(i)   = ||grad_W w_i l_i|| = w_i sqrt(G^W_ii)
    r_i       = (l_i / l_i(0)) / mean_j (l_j / l_j(0))      (relative inverse training rate)
    L_grad(w) = sum_i |G_W^(i) - mean_j(G_W^(j)) r_i^alpha|   (target held constant)
    update    = sum_i c_i g_i,   c = w / N
    w_i      <- w_i - lr * sign(G_W^(i) - target_i) sqrt(G^W_ii),
    w        <- N w / sum(w)

  with ``G^W`` the task-gradient Gram matrix on ``W`` only (the core's
  ``Rule.gram_filter``; the paper's norms of the per-task gradients with
  respect to ``W``). The step uses the current ``w`` and then updates it
  (the paper's order: the network steps with ``w(t)``, then ``w(t+1)``);
  ``l_i(0)`` is the task's loss at its first step (the paper's ``L_i(0)``).

  Conventions (checked against LibMTL ``LibMTL/weighting/GradNorm.py``):
  LibMTL parameterises ``w = N softmax(logits)``, trains the logits with the
  model's optimizer, starts after one epoch of equal weighting and takes
  ``l_i(0)`` as the first epoch's average loss; here ``w`` is the paper's
  direct parameter with a plain L1 gradient step of its own size ``lr``
  (default 0.025, the SGD rate of the library's CIFAR runs), clipped at 0
  and renormalised to sum ``N`` after each step (all-zero: ones). The step
  is in units of the gradient norm ``sqrt(G^W_ii)``, so ``lr`` depends on
  the model's gradient scale. Coefficients ``c = w / N`` are on the simplex
  (the library's equal-weighting scale; the paper's and LibMTL's ``w`` on
  the summed loss), so the first step is equal weighting. Absent tasks
  (``task_mask``) get coefficient 0, do not enter the means and keep their
  weight.

  ``W`` (``layer``): a substring or regex of the parameter path
  (``jax.tree_util.keystr``, e.g. ``"Dense_2"``; :func:`layer_filter`); the
  paper's choice is the last shared layer. ``None`` (default): all
  parameters. With a ``layer`` the Gram matrix needs the per-task gradients:
  Jacobian mode, or lean mode with ``task_grads_fn`` (the core refuses
  ``gram_fn``/``gram``, which cannot be restricted).

  Args:
    num_tasks: ``N``.
    alpha: the restoring force ``alpha`` (the paper's ``1.5`` for NYUv2).
    lr: step size of the weights.
    layer: the parameters ``W`` (path substring or regex), or ``None``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` taking ``task_losses``.
  """
  name = "gradnorm"
  weighting.check_hparam(alpha, "alpha", name, low=0)
  weighting.check_hparam(lr, "lr", name, low=0)
  keep = layer_filter(layer)

  def init_state(n):
    return GradNormState(loss_weights=jnp.ones((n,), jnp.float32),
                         initial_losses=jnp.zeros((n,), jnp.float32),
                         has_initial=jnp.zeros((n,), bool),
                         gradnorm_loss=jnp.zeros([], jnp.float32))

  def coefficients(stats: weighting.TaskStats, state: GradNormState):
    n = stats.weights.shape[0]
    present = stats.present
    first = present & ~state.has_initial
    initial = jnp.where(first, stats.losses, state.initial_losses)
    w = state.loss_weights
    c = jnp.where(present, w, 0.0) / n
    w_new, l_grad = gradnorm_step(w, stats.gram, stats.losses, initial, present, alpha, lr)
    return c, GradNormState(loss_weights=w_new, initial_losses=initial,
                            has_initial=state.has_initial | present, gradnorm_loss=l_grad)

  return weighting.task_weighting(
      weighting.Rule(name=name, coefficients=coefficients, init_state=init_state,
                     needs_losses=True, needs_gram=True, gram_filter=keep), num_tasks)


registry.register_method(
    "gradnorm", gradnorm,
    "Chen et al., ICML 2018: GradNorm, loss weights trained so that the gradient norms on the "
    "last shared layer follow the tasks' training rates", label="GradNorm",
    needs=("gram", "losses"), kind="gradient",
    defaults={"alpha": 1.5, "lr": 0.025, "layer": None})
