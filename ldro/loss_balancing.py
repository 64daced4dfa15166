"""Loss-balancing methods: UW, DWA, IMTL-L (and the full IMTL), FAMO.

Each method chooses loss weights ``lambda [N]`` from the task losses and a
small state of its own (learned log-variances, loss history, loss scales,
weight logits), kept in the optimizer state (``WeightingState.method_state``),
and the update is ``sum_i lambda_i g_i``: the gradient of the weighted loss.
None needs the Gram matrix, so all run in Jacobian and lean mode (lean mode:
one ordinary backward pass, ``task_vjp(lambda)``) and combine with any
gradient method (:func:`ldro.combine`, the RLW paper's Table 4). The full IMTL
is such a combination: IMTL-L's scales followed by IMTL-G.

Conventions shared by the module:

* **Learned parameters are updated inside the transformation**, by their own
  gradient with their own step size (``lr``; FAMO: ``w_lr``), at the same step
  as the model: the coefficients of step ``t`` use the parameters of step
  ``t`` and the state then holds those of step ``t + 1``, as a joint gradient
  step on the model and the weighting parameters (the papers train them with
  the model's optimizer; the defaults ``0.025`` are the SGD learning rate of
  the library's CIFAR experiments).
* **Update scale**: DWA and FAMO return weights on the simplex (the scale of
  the library's equal weighting, the mean loss). UW and IMTL-L learn the
  *scale* of each loss as well as its share, so their coefficients are not
  renormalised; ``reduction='mean'`` (default) divides them by ``N`` so that
  at initialisation (``s = 0``) the update is the mean-loss gradient, like
  equal weighting and ``pcgrad(reduction='mean')``; ``'sum'`` is the papers'
  objective (the sum over tasks).
* **Absent tasks** (``task_mask`` ``False``; gradient zero, loss 0) get
  coefficient 0 and leave their state unchanged (no log-variance step, no
  entry in DWA's epoch average, no FAMO logit change).
* **Bounds**: the log-scales of UW and IMTL-L are kept in
  ``[-LOG_SCALE_BOUND, LOG_SCALE_BOUND]`` (``e^20 ~ 5e8``): a loss that
  reaches exactly 0 drives the unbounded parameter to infinity (UW's
  ``s* = log l``), and the weight would overflow float32 after a few
  thousand steps. The bound is never active at a fixed point ``|log l| < 20``.
"""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ldro import registry
from ldro import weighting

Array = jax.Array

LOG_SCALE_BOUND = 20.0
REDUCTIONS = ("mean", "sum")


def _scale(reduction: str, n: int) -> float:
  return 1.0 / n if reduction == "mean" else 1.0


def _log_scale_step(stats: weighting.TaskStats, s: Array, sign: float, lr, reduction: str
                    ) -> tuple[Array, Array]:
  """The learned loss scale shared by UW (``sign = -1``) and IMTL-L (``sign = +1``).

  With ``lambda_i = exp(sign s_i)``, both minimise ``lambda_i l_i - sign s_i``
  over ``s`` (UW: ``exp(-s) l + s``; IMTL-L: ``exp(s) l - s``):
  ``d/ds_i = sign (lambda_i l_i - 1)``. Returns the coefficients of this step
  (``lambda``, 0 for absent tasks, divided by ``N`` for ``'mean'``) and ``s``
  after one gradient step of size ``lr`` (absent tasks unchanged; kept in
  ``[-LOG_SCALE_BOUND, LOG_SCALE_BOUND]``).
  """
  n = stats.weights.shape[0]
  present = stats.present
  lam = jnp.exp(sign * s)
  c = jnp.where(present, lam, 0.0) * _scale(reduction, n)
  grad = sign * (lam * stats.losses - 1.0)
  s_new = jnp.clip(s - lr * grad, -LOG_SCALE_BOUND, LOG_SCALE_BOUND)
  return c, jnp.where(present, s_new, s)


# ----------------------------------------------------------------------------
# UW (Kendall et al., CVPR 2018).
# ----------------------------------------------------------------------------


class UWState(NamedTuple):
  """UW's own state.

  Attributes:
    log_variances: ``[N]`` float32, ``s_i = log sigma_i^2`` (0 at start).
  """
  log_variances: Array


def uw(num_tasks: int, lr: float | Array = 0.025,
       reduction: str = "mean") -> optax.GradientTransformationExtraArgs:
  """Uncertainty weighting, UW (Kendall et al., CVPR 2018), learned log-variances.

  Maths (paper, section 3.2, eq. 7-10, with ``s_i = log sigma_i^2``)::

    L(theta, s) = sum_i exp(-s_i) l_i(theta) + s_i
    update      = sum_i c_i g_i,   c_i = exp(-s_i)         (reduction 'sum')
                                   c_i = exp(-s_i) / N     (reduction 'mean')
    s_i <- s_i - lr * dL/ds_i,     dL/ds_i = 1 - exp(-s_i) l_i

  The fixed point is ``s_i* = log l_i``, where every weighted loss equals 1:
  UW then follows ``sum_i g_i / l_i``, the gradient of ``sum_i log l_i``.

  Conventions (checked against LibMTL ``LibMTL/weighting/UW.py``): the paper's
  regression form ``1/(2 sigma^2) l + log sigma`` is, with
  ``s = log sigma^2``, ``0.5 (exp(-s) l + s)``, which LibMTL uses with
  ``s_0 = -0.5`` (coefficients ``0.5 exp(-s)``, ``0.82`` at start). Here the
  objective is ``exp(-s) l + s`` (same fixed point ``s* = log l``; LibMTL's
  factor 0.5 is a factor of the learning rate and of the update scale) and
  ``s_0 = 0``, so the first step is equal weighting. The paper's
  classification form ``1/sigma^2 l + log sigma`` (fixed point
  ``log(2 l)``) is not used. The coefficients are not renormalised to the
  simplex: the overall scale ``exp(-s)`` is what UW learns (a task with a
  small loss gets a large weight, not only a large share); ``'mean'``
  divides by ``N`` to start on the library's mean-loss scale. The paper
  trains ``s`` with the model's optimizer; here ``s`` takes a plain gradient
  step of its own size ``lr`` inside the transformation (default 0.025, the
  SGD rate of the library's CIFAR runs), from the current ``s`` (the
  coefficients of this step use the ``s`` before the step), and stays in
  ``[-20, 20]`` (module docstring). The explicit step is stable near the
  fixed point for ``lr < 2``; from far away with large losses
  (``lr l >> 1``) it overshoots to the bound and walks back at ``lr`` a
  step, as SGD on the paper's objective does.

  Args:
    num_tasks: ``N``.
    lr: step size of the log-variances.
    reduction: ``'mean'`` (coefficients ``exp(-s) / N``) or ``'sum'``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` taking ``task_losses``
    (Jacobian and lean mode).
  """
  name = "uw"
  weighting.check_hparam(lr, "lr", name, low=0)
  weighting.check_choice(reduction, "reduction", name, REDUCTIONS)

  def init_state(n):
    return UWState(log_variances=jnp.zeros((n,), jnp.float32))

  def coefficients(stats: weighting.TaskStats, state: UWState):
    c, s_new = _log_scale_step(stats, state.log_variances, -1.0, lr, reduction)
    return c, UWState(log_variances=s_new)

  return weighting.task_weighting(
      weighting.Rule(name=name, coefficients=coefficients, init_state=init_state,
                     needs_losses=True), num_tasks)


# ----------------------------------------------------------------------------
# DWA (Liu et al., CVPR 2019).
# ----------------------------------------------------------------------------


class DWAState(NamedTuple):
  """DWA's own state: the running epoch's loss sums and the last two epoch averages.

  Attributes:
    loss_sum: ``[N]`` float32, sum of each task's losses in the running epoch.
    loss_count: ``[N]`` float32, steps of the running epoch where the task
      was present.
    epoch_step: ``[]`` int32, steps taken in the running epoch.
    epochs: ``[]`` int32, epochs completed.
    last: ``[N]`` float32, average loss of the last completed epoch
      ``L(t-1)``.
    before_last: ``[N]`` float32, that of the epoch before ``L(t-2)``.
  """
  loss_sum: Array
  loss_count: Array
  epoch_step: Array
  epochs: Array
  last: Array
  before_last: Array


def dwa_weights(last: Array, before_last: Array, temperature: float | Array = 2.0) -> Array:
  """DWA's weights on the simplex, ``softmax(r / T)``, ``r_i = L_i(t-1) / L_i(t-2)``.

  A ratio with ``L_i(t-2) <= 0`` (no loss recorded) is taken as 1.
  """
  ok = before_last > 0
  r = jnp.where(ok, last / jnp.where(ok, before_last, 1.0), 1.0)
  return jax.nn.softmax(r / temperature)


def dwa(num_tasks: int, temperature: float | Array = 2.0,
        steps_per_epoch: int = 400) -> optax.GradientTransformationExtraArgs:
  """Dynamic Weight Average, DWA (Liu et al., CVPR 2019), from the last two epochs' losses.

  Maths (paper, section 3.3, eq. 6)::

    w_i(t) = N exp(r_i(t-1) / T) / sum_k exp(r_k(t-1) / T),
    r_i(t-1) = L_i(t-1) / L_i(t-2),   T = 2,

  with ``L_i(t)`` the average loss of task ``i`` over epoch ``t``, and
  ``w_i = 1`` for the first two epochs (no ratio yet), as in the paper and
  in LibMTL ``LibMTL/weighting/DWA.py`` (from the authors' ``mtan`` code).

  Coefficients: ``c = w / N = softmax(r / T)``, on the simplex: the scale of
  the library's equal weighting (the mean loss), which the first two epochs
  equal exactly; the paper and LibMTL use ``w`` on the summed loss (``N``
  times larger, as their equal weighting is the sum).

  Epochs: every ``steps_per_epoch`` updates close an epoch: the state keeps
  the running sum of each task's losses and the last two epoch averages
  (O(N) state; the losses are the training batches' losses, as in the
  paper's training-loss averages). A step the core's non-finite guard
  rejects does not count. Absent tasks (``task_mask``) do not enter their
  epoch average; a task absent for a whole epoch keeps its previous
  average. ``steps_per_epoch = 1`` is the per-step variant (ratio of the
  last two steps' losses).

  Args:
    num_tasks: ``N``.
    temperature: ``T`` (the paper's ``2``).
    steps_per_epoch: updates per epoch (default 400: one epoch of the
      library's multitask CIFAR-10 setting; set it to your data's).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` taking ``task_losses``
    (Jacobian and lean mode).
  """
  name = "dwa"
  weighting.check_hparam(temperature, "temperature", name, low=0, low_inclusive=False)
  weighting.check_hparam(steps_per_epoch, "steps_per_epoch", name, low=1, integer=True)

  def init_state(n):
    z = lambda: jnp.zeros((n,), jnp.float32)  # distinct buffers (train steps donate the state)
    return DWAState(loss_sum=z(), loss_count=z(), epoch_step=jnp.zeros([], jnp.int32),
                    epochs=jnp.zeros([], jnp.int32), last=z(), before_last=z())

  def coefficients(stats: weighting.TaskStats, state: DWAState):
    n = stats.weights.shape[0]
    present = stats.present
    w = jnp.where(state.epochs >= 2,
                  dwa_weights(state.last, state.before_last, temperature),
                  jnp.full((n,), 1.0 / n, jnp.float32))
    c = jnp.where(present, w, 0.0)

    loss_sum = state.loss_sum + jnp.where(present, stats.losses, 0.0)
    loss_count = state.loss_count + present.astype(jnp.float32)
    step = state.epoch_step + 1
    done = step >= steps_per_epoch
    seen = loss_count > 0
    average = jnp.where(seen, loss_sum / jnp.where(seen, loss_count, 1.0), state.last)
    new = DWAState(
        loss_sum=jnp.where(done, 0.0, loss_sum),
        loss_count=jnp.where(done, 0.0, loss_count),
        epoch_step=jnp.where(done, 0, step).astype(jnp.int32),
        epochs=state.epochs + done.astype(jnp.int32),
        last=jnp.where(done, average, state.last),
        before_last=jnp.where(done, state.last, state.before_last))
    return c, new

  return weighting.task_weighting(
      weighting.Rule(name=name, coefficients=coefficients, init_state=init_state,
                     needs_losses=True), num_tasks)


# ----------------------------------------------------------------------------
# IMTL-L and IMTL (Liu et al., ICLR 2021).
# ----------------------------------------------------------------------------


class IMTLLState(NamedTuple):
  """IMTL-L's own state.

  Attributes:
    log_scales: ``[N]`` float32, ``s_i`` (the losses are scaled by
      ``e^{s_i}``; 0 at start).
  """
  log_scales: Array


def imtl_l(num_tasks: int, lr: float | Array = 0.025,
           reduction: str = "mean") -> optax.GradientTransformationExtraArgs:
  """IMTL-L (Liu et al., ICLR 2021), the loss balance of Impartial Multi-task Learning.

  Maths (paper, section 3.1, "loss balance")::

    scaled loss   L_i(s) = e^{s_i} l_i - s_i
    update        = sum_i c_i g_i,   c_i = e^{s_i}        (reduction 'sum')
                                     c_i = e^{s_i} / N    (reduction 'mean')
    s_i <- s_i - lr * dL_i/ds_i,     dL_i/ds_i = e^{s_i} l_i - 1

  At the fixed point ``e^{s_i} l_i = 1`` every scaled loss is 1 (the paper's
  aim: all tasks' losses on the same scale); ``s_i* = -log l_i``. With
  ``s = -log sigma^2`` this is UW's objective ``e^{-s} l + s``
  reparameterised (:func:`uw`): with the same ``lr``, reduction and start the
  two give the same updates (their ``s`` differ in sign), as LibMTL's also
  do up to UW's factor 0.5.

  Conventions (checked against LibMTL ``LibMTL/weighting/IMTL.py``, which
  scales the losses by ``loss_scale.exp()`` and subtracts ``loss_scale``,
  ``s_0 = 0``, and learns ``s`` with the model's optimizer): ``s_0 = 0`` (the
  first step is equal weighting), ``s`` takes a plain gradient step of its
  own size ``lr`` inside the transformation from the current ``s`` (the
  coefficients of this step use the ``s`` before the step), kept in
  ``[-20, 20]``. The coefficients are not renormalised (the scale is learned,
  as in UW); ``'mean'`` divides them by ``N``. The full IMTL (:func:`imtl`)
  uses ``'mean'``, which :func:`ldro.weighting.combine` rescales by ``N`` (mean-one
  loss weights), i.e. the scales of ``'sum'``.

  Args:
    num_tasks: ``N``.
    lr: step size of the loss scales.
    reduction: ``'mean'`` or ``'sum'``.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` taking ``task_losses``
    (Jacobian and lean mode).
  """
  name = "imtl_l"
  weighting.check_hparam(lr, "lr", name, low=0)
  weighting.check_choice(reduction, "reduction", name, REDUCTIONS)

  def init_state(n):
    return IMTLLState(log_scales=jnp.zeros((n,), jnp.float32))

  def coefficients(stats: weighting.TaskStats, state: IMTLLState):
    c, s_new = _log_scale_step(stats, state.log_scales, 1.0, lr, reduction)
    return c, IMTLLState(log_scales=s_new)

  return weighting.task_weighting(
      weighting.Rule(name=name, coefficients=coefficients, init_state=init_state,
                     needs_losses=True), num_tasks)


def imtl(num_tasks: int, lr: float | Array = 0.025) -> optax.GradientTransformationExtraArgs:
  """IMTL (Liu et al., ICLR 2021): IMTL-L's loss scales followed by IMTL-G.

  ``ldro.combine(imtl_l(N, lr), imtl_g(N))`` (``combine`` rescales IMTL-L's
  ``e^s / N`` to ``lambda = e^s``): the gradients of the scaled losses are
  ``lambda_i g_i``,
  IMTL-G's ``alpha`` (``sum_i alpha_i = 1``) is computed on their Gram matrix
  ``lambda_i lambda_j G_ij``, and the update is
  ``sum_i alpha_i lambda_i g_i`` (coefficients ``c = lambda * alpha``), as in
  LibMTL ``LibMTL/weighting/IMTL.py`` (the IMTL paper's Algorithm 1). The
  first step (``s = 0``) is IMTL-G's own update (``alpha`` sums to 1, the
  scale of the library's weightings). The method
  state is a :class:`ldro.weighting.CombinedState` (``loss_state`` holds
  IMTL-L's ``log_scales``).

  Args:
    num_tasks: ``N``.
    lr: IMTL-L's step size of the loss scales.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` taking ``task_losses``
    (Jacobian mode, and lean mode with a Gram source).
  """
  from ldro import gradient_balancing  # pylint: disable=g-import-not-at-top
  tx = weighting.combine(imtl_l(num_tasks, lr=lr), gradient_balancing.imtl_g(num_tasks))
  return weighting.task_weighting(dataclasses.replace(tx.rule, name="imtl"), num_tasks)


# ----------------------------------------------------------------------------
# FAMO (Liu et al., NeurIPS 2023).
# ----------------------------------------------------------------------------

FAMO_OPTIMIZERS = ("adam", "sgd")
_ADAM_B1, _ADAM_B2, _ADAM_EPS = 0.9, 0.999, 1e-8  # torch.optim.Adam's defaults


class FAMOState(NamedTuple):
  """FAMO's own state.

  Attributes:
    logits: ``[N]`` float32, the weight logits ``xi`` (0 at start).
    mu: ``[N]`` float32, Adam's first moment of the logits' gradient.
    nu: ``[N]`` float32, Adam's second moment.
    logit_steps: ``[]`` int32, logit updates taken (Adam's bias correction).
    prev_losses: ``[N]`` float32, the losses of the previous step.
    prev_present: ``[N]`` bool, tasks present (with a positive loss) at the
      previous step; False before the first step.
    skipped: ``[]`` int32, steps skipped because a present task's loss was
      not positive (see :func:`famo`).
  """
  logits: Array
  mu: Array
  nu: Array
  logit_steps: Array
  prev_losses: Array
  prev_present: Array
  skipped: Array


def famo_logit_gradient(logits: Array, prev_losses: Array, losses: Array,
                        valid: Array | None = None) -> Array:
  """FAMO's logit gradient ``delta = J_z(xi)^T (log l_prev - log l)``, ``z = softmax(xi)``.

  ``J_z^T v = z * (v - z . v)``. Tasks not ``valid`` contribute 0 to the loss change.
  """
  change = jnp.log(prev_losses) - jnp.log(losses)
  if valid is not None:
    change = jnp.where(valid, change, 0.0)
  z = jax.nn.softmax(logits)
  return z * (change - jnp.dot(z, change))


def famo_coefficients(logits: Array, losses: Array, present: Array | None = None) -> Array:
  """FAMO's coefficients ``c_i = (z_i / l_i) / sum_j (z_j / l_j)``, ``z = softmax(xi)``.

  Computed as ``softmax(log z - log l)`` over the present tasks (no overflow
  for tiny losses); absent tasks get 0. Losses must be positive.
  """
  a = jax.nn.log_softmax(logits) - jnp.log(losses)
  if present is None:
    return jax.nn.softmax(a)
  a = jnp.where(present, a, -jnp.inf)
  top = jnp.max(a)
  e = jnp.where(present, jnp.exp(a - jnp.where(jnp.isfinite(top), top, 0.0)), 0.0)
  total = jnp.sum(e)
  return jnp.where(total > 0, e / jnp.where(total > 0, total, 1.0), 0.0)  # none present: 0


def famo(num_tasks: int, w_lr: float | Array = 0.025, gamma: float | Array = 0.001,
         logit_optimizer: str = "adam") -> optax.GradientTransformationExtraArgs:
  """FAMO (Liu et al., NeurIPS 2023): Fast Adaptive Multitask Optimization.

  Maths (paper, section 3, Algorithm 1), with weight logits ``xi`` and
  ``z = softmax(xi)``::

    update = sum_i c_i g_i,  c_i = (z_i / l_i) / sum_j (z_j / l_j)
           (the gradient of sum_i z_i log l_i, rescaled by 1 / sum_j z_j / l_j)
    delta  = J_z(xi)^T [log l_{t} - log l_{t+1}]     (the loss change after the step)
    xi    <- xi - w_lr * (delta + gamma xi)            ('sgd': the paper's Algorithm 1)
           = Adam(lr=w_lr, weight_decay=gamma) step with gradient delta   ('adam')

  so a task whose log loss fell faster than the ``z``-average gets a smaller
  logit. The coefficients are on the simplex (sum to 1) as in the official
  code, so the update is on the scale of the library's equal weighting.

  Conventions (checked against the authors' ``Cranial-XIX/FAMO`` ``famo.py``
  and LibMTL ``LibMTL/weighting/FAMO.py``): the logits start at 0; the
  official code updates them with ``torch.optim.Adam`` (``betas=(0.9,
  0.999)``, ``eps=1e-8``, ``weight_decay=gamma`` added to the gradient),
  which ``logit_optimizer='adam'`` (default) reproduces; the defaults
  ``w_lr = 0.025``, ``gamma = 0.001`` are the paper's and LibMTL's (the
  authors' ``famo.py`` defaults to ``gamma = 0.01``). Their ``min_losses``
  (0 by default) and ``+ 1e-8`` are not used: the losses must be positive.
  Their training loops also clip the shared parameters' gradient to global norm
  1 after the weighted backward pass; that is the optimizer's part here: chain
  ``optax.clip_by_global_norm(1.0)`` after this transformation to match them.

  **One step later, O(1) extra cost.** The official code calls
  ``update(new_losses)`` after the optimizer step with the *same batch*'s
  losses at the new parameters (one extra forward pass). Here the previous
  step's losses are kept in the state and the loss change is
  ``log l_{t-1} - log l_t``, the current step's losses on the next batch,
  so there is no extra forward pass; the change then includes the batch
  noise. Order within step ``t``: the logits are first updated from the
  change between step ``t-1`` and ``t`` (none at the first step), then the
  coefficients use the updated logits and ``l_t``: the same order as the
  official loop (update after step ``t-1``, weights at step ``t``).

  **Non-positive losses.** ``log l`` needs ``l > 0``. A step where a present
  task's loss is ``<= 0`` is skipped by the method: the coefficients of the
  previous step are reused, the logits, Adam moments and stored losses stay
  unchanged, and ``state.skipped`` counts it (under ``jit`` no error can be
  raised; check ``skipped``). Shift such losses (e.g. by a known lower
  bound) before passing them. Absent tasks (``task_mask``) get coefficient
  0 and no loss change.

  Args:
    num_tasks: ``N``.
    w_lr: step size of the logits (the paper's ``beta``).
    gamma: weight decay of the logits.
    logit_optimizer: ``'adam'`` (the official code) or ``'sgd'`` (the
      paper's Algorithm 1).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` taking ``task_losses``
    (Jacobian and lean mode).
  """
  name = "famo"
  weighting.check_hparam(w_lr, "w_lr", name, low=0)
  weighting.check_hparam(gamma, "gamma", name, low=0)
  weighting.check_choice(logit_optimizer, "logit_optimizer", name, FAMO_OPTIMIZERS)

  def init_state(n):
    z = lambda: jnp.zeros((n,), jnp.float32)  # distinct buffers (train steps donate the state)
    return FAMOState(logits=z(), mu=z(), nu=z(), logit_steps=jnp.zeros([], jnp.int32),
                     prev_losses=jnp.ones((n,), jnp.float32),
                     prev_present=jnp.zeros((n,), bool), skipped=jnp.zeros([], jnp.int32))

  def coefficients(stats: weighting.TaskStats, state: FAMOState):
    present = stats.present
    losses = stats.losses
    ok = jnp.all(jnp.where(present, losses > 0, True))
    safe = jnp.where(present & (losses > 0), losses, 1.0)  # no log of <= 0 in either branch
    valid = present & state.prev_present
    update = ok & jnp.any(valid)

    xi = state.logits
    delta = famo_logit_gradient(xi, state.prev_losses, safe, valid)
    grad = delta + gamma * xi
    if logit_optimizer == "adam":
      steps = state.logit_steps + 1
      mu = _ADAM_B1 * state.mu + (1 - _ADAM_B1) * grad
      nu = _ADAM_B2 * state.nu + (1 - _ADAM_B2) * grad * grad
      t = steps.astype(jnp.float32)
      mu_hat = mu / (1 - _ADAM_B1 ** t)
      nu_hat = nu / (1 - _ADAM_B2 ** t)
      new_xi = xi - w_lr * mu_hat / (jnp.sqrt(nu_hat) + _ADAM_EPS)
    else:
      steps, mu, nu = state.logit_steps + 1, state.mu, state.nu
      new_xi = xi - w_lr * grad
    keep = lambda new, old: jnp.where(update, new, old)
    xi, mu, nu = keep(new_xi, xi), keep(mu, state.mu), keep(nu, state.nu)
    steps = keep(steps, state.logit_steps)

    c = famo_coefficients(xi, safe, present)
    c = jnp.where(ok, c, stats.weights)
    new = FAMOState(
        logits=xi, mu=mu, nu=nu, logit_steps=steps,
        prev_losses=jnp.where(ok, jnp.where(present, safe, state.prev_losses), state.prev_losses),
        prev_present=jnp.where(ok, present, state.prev_present),
        skipped=state.skipped + (~ok).astype(jnp.int32))
    return c, new

  return weighting.task_weighting(
      weighting.Rule(name=name, coefficients=coefficients, init_state=init_state,
                     needs_losses=True), num_tasks)


registry.register_method(
    "uw", uw,
    "Kendall et al., CVPR 2018: uncertainty weighting, learned log-variances s, "
    "weights exp(-s)", label="UW", needs=("losses",), kind="loss",
    defaults={"lr": 0.025, "reduction": "mean"})
registry.register_method(
    "dwa", dwa,
    "Liu et al., CVPR 2019: dynamic weight average, softmax of the last two epochs' loss "
    "ratios (T = 2)", label="DWA", needs=("losses",), kind="loss",
    defaults={"temperature": 2.0, "steps_per_epoch": 400})
registry.register_method(
    "imtl_l", imtl_l,
    "Liu et al., ICLR 2021: IMTL-L, learned loss scales e^s with scaled losses e^s l - s",
    label="IMTL-L", needs=("losses",), kind="loss",
    defaults={"lr": 0.025, "reduction": "mean"})
registry.register_method(
    "imtl", imtl,
    "Liu et al., ICLR 2021: IMTL, IMTL-L's loss scales followed by IMTL-G's equal projections",
    label="IMTL", needs=("losses", "gram"), kind="gradient", defaults={"lr": 0.025})
registry.register_method(
    "famo", famo,
    "Liu et al., NeurIPS 2023: FAMO, weight logits following the change of the log losses, "
    "O(1) per step", label="FAMO", needs=("losses",), kind="loss",
    defaults={"w_lr": 0.025, "gamma": 0.001, "logit_optimizer": "adam"})
