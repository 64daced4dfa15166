"""MOML: loss weights learned by the one-step meta-gradient of a validation loss.

Multi-Objective Meta Learning (Ye et al., NeurIPS 2021; one of the four
loss-balancing methods of the random-weighting paper, section 2) chooses the
loss weights ``w`` that make the model's next step best for a validation
loss. With the model's step ``theta' = theta - eta sum_i w_i g_i`` (``eta``
the model's learning rate), the validation loss after the step depends on
``w`` through ``theta'``, and to first order

    d L_val(theta') / d w_i = -eta g_val . g_i,

with ``g_val`` the gradient of a validation batch (a held-out split of the
training data, never the test split). Raising ``w_i`` helps validation when
task ``i``'s gradient points the way validation wants to go.

**The rule here** keeps weight logits ``z`` and takes an exponentiated
(mirror) gradient step on the simplex, ``z <- z + beta eta (g_val . g_i)``,
``w = softmax(z)`` (absent tasks: no logit change, weight 0). Ye et al.
treat the loss weights as the upper-level variables of a bilevel problem and
update them by gradient steps on the validation loss; how the weights are kept
normalised is our choice, stated: the mirror (exponentiated-gradient) step is
the simplex geometry's gradient step and keeps every weight positive, so the
update stays on the scale of the library's equal weighting.

**Relation to L-DRO's lookahead matrix** (``lookahead_dro.md``, section 3):
L-DRO's lookahead entry ``L_ij = l_i - eta G_ij`` is task ``i``'s loss after a
step on task ``j`` (first order), ``G_ij = g_i . g_j``; MOML's signal
``l_val - eta g_val . g_j`` is the same lookahead with the validation loss as
the row: a one-row lookahead matrix whose row is a held-out objective. L-DRO
plays a game over all rows (the worst task after the step); MOML follows the
single validation row (the average after the step, measured out of sample).

Cost: one backward pass on the validation batch (``g_val``, computed by the
train step) and the ``N`` dot products ``g_i . g_val``: free in Jacobian mode
(the runner's default for MOML), one transposed VJP in lean mode
(:func:`ldro.weighting.task_dots`; models whose layers have a custom VJP cannot
be transposed and need Jacobian mode).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ldro import registry
from ldro import weighting

Array = jax.Array


class MOMLState(NamedTuple):
  """MOML's own state.

  Attributes:
    logits: ``[N]`` weight logits ``z``; ``w = softmax(z)`` over present tasks.
  """
  logits: Array  # [N]


def moml_weights(logits: Array, val_dots: Array, present: Array, meta_lr, inner_lr
                 ) -> tuple[Array, Array]:
  """One MOML step: ``(w [N], new logits [N])``.

  ``z_i <- z_i + meta_lr * inner_lr * (g_val . g_i)`` for present tasks, then
  ``w = softmax(z)`` over the present tasks (0 for absent ones).

  Args:
    logits: ``[N]`` current logits.
    val_dots: ``[N]`` ``g_i . g_val``.
    present: ``[N]`` bool.
    meta_lr: ``beta``, the step size on the logits.
    inner_lr: ``eta``, the model's learning rate in the lookahead step.
  """
  step = meta_lr * inner_lr * val_dots
  new = jnp.where(present, logits + step, logits)
  w = jax.nn.softmax(jnp.where(present, new, -jnp.inf))
  return w, new


def moml(num_tasks: int, meta_lr: float = 1.0, inner_lr: float = 0.025
         ) -> optax.GradientTransformationExtraArgs:
  """MOML (Ye et al., NeurIPS 2021) as its one-step meta-gradient.

  With the model's step ``theta' = theta - eta sum_i w_i g_i``, to first order
  ``d L_val(theta') / d w_i = -eta g_val . g_i``; the weights take an
  exponentiated-gradient step on the simplex,

      z <- z + beta eta (g_val . g_i),    w = softmax(z),

  from ``z = 0`` (equal weights); absent tasks keep their logit and get weight 0.
  Ye et al. (section 3, the bilevel problem with the loss weights as its
  upper-level variables) update the weights by gradient steps on the
  validation loss; the module docstring says how this rule relates to theirs.

  Args:
    num_tasks: ``N``.
    meta_lr: ``beta``, step size of the weight logits (our default; the
      signal ``eta g_val . g_i`` is small, ``~ eta |g|^2``).
    inner_lr: ``eta``, the model's learning rate (default ``0.025``, the SGD
      learning rate of the library's CIFAR experiments; bind it to yours).

  Returns:
    A transformation that needs the extra argument ``val_grads`` (the
    gradient of a validation batch, shaped like the parameters; the train
    step's ``val_grads=True`` computes it). Jacobian and lean mode.
  """
  weighting.check_hparam(meta_lr, "meta_lr", "moml", low=0.0, low_inclusive=False)
  weighting.check_hparam(inner_lr, "inner_lr", "moml", low=0.0, low_inclusive=False)

  def coefficients(stats: weighting.TaskStats, state: MOMLState):
    w, logits = moml_weights(state.logits, stats.val_dots, stats.present, meta_lr, inner_lr)
    return w, MOMLState(logits=logits)

  return weighting.task_weighting(
      weighting.Rule(name="moml", coefficients=coefficients,
                     init_state=lambda n: MOMLState(logits=jnp.zeros((n,), jnp.float32)),
                     needs_val_grads=True),
      num_tasks)


registry.register_method(
    "moml", moml,
    "Ye et al., NeurIPS 2021: multi-objective meta learning, loss weights from the one-step "
    "meta-gradient of a validation loss", label="MOML", needs=("val_grads",), kind="loss",
    defaults={"meta_lr": 1.0, "inner_lr": 0.025},
    # Jacobian mode's per-task gradients give g_i . g_val for free; lean mode transposes the
    # VJP, which layers with a custom VJP (ldro.models.cnn on CPU) do not support.
    prefer="jacobian")
