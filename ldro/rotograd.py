"""RotoGrad: per-task rotations of the shared representation (an architecture, not weights).

RotoGrad (Javaloy & Valera, ICLR 2022, "RotoGrad: Gradient Homogenization in
Multitask Learning"; one of the gradient-balancing methods of the
random-weighting paper, section 2) sits between a shared trunk ``z = h(x)``
(``z`` in ``R^d``) and the task heads: task ``k`` sees its own view
``r_k = R_k z`` with an orthogonal ``R_k`` (``d x d``). It changes two things
of the backward pass only (the forward pass is the rotated model):

1. **Magnitudes.** With ``U_k = dL_k/dr_k`` (the rows of task ``k``) and
   ``G_k = U_k R_k`` (rows ``g = R_k^T u``: the gradient w.r.t. ``z``), the
   trunk receives ``C sum_k G_k / ||G_k||`` instead of ``sum_k G_k``, every
   task with the same magnitude

       C = sum_k alpha_k ||G_k||,   alpha_k = (||G_k|| / ||G_k^0||) / sum_i (||G_i|| / ||G_i^0||),

   ``||.||`` the Frobenius norm over the task's rows, ``G_k^0`` the task's
   gradient at the first step, taken again after ``burn_in_period`` steps
   (``alpha``: relative convergence, the slowest task weighs most). This is
   the official code's ``RotoGrad`` class (``rotograd/rotograd.py``,
   ``RotoGrad._rep_grad``), not ``RotoGradNorm`` (GradNorm weights) nor
   ``RotateOnly`` (no rescaling).
2. **Directions.** The rotations follow their own loss: with the target
   ``v = (1/K) sum_k ||m|| gbar_k / ||gbar_k||`` (``gbar_k`` task ``k``'s mean
   row of ``G_k``, ``m = (1/K) sum_k gbar_k``; the mean of the normalised task
   gradients, scaled as the official code scales it),

       L_rot = sum_k mean_b || R_k v - u_{k,b} ||^2   (v and U_k held fixed),

   minimised over ``R_k`` only: up to terms constant on the orthogonal group
   it is ``-2 sum_k <R_k^T ubar_k, v>``, i.e. it turns each task's gradient in
   ``z``-space towards the common direction ``v``. The heads' and the
   rotations' task losses see ``R_k`` as a constant (the official code
   detaches ``R`` in the forward pass).

The heads get their task gradients unchanged (the official
``normalize_losses=False`` default). With the library's equal weights
``c_k = 1/N`` (the mean task loss) every cotangent carries the factor
``1/N``: ``alpha`` and ``v``'s direction do not change, and the trunk's and
heads' updates are the official (summed-loss) ones divided by ``N``.

**Task-grouped batches.** The official code feeds one batch to all tasks and
aligns gradients example by example. Here tasks have their own examples
(``z`` is ``[N, b, d]``, task ``k`` owns row block ``k``), so the common
direction ``v`` is one vector of ``R^d`` built from each task's mean gradient
row ``gbar_k``. Because ``L_rot`` is linear in ``U_k`` (up to constants),
aligning every example of task ``k`` with the shared ``v`` is the same as
aligning ``ubar_k``: nothing is lost by the aggregation (our adaptation,
stated).

**Where it lives.** :func:`rotate_tasks` is one ``jax.custom_vjp`` on the
whole grouped representation (the cross-task ``v`` and ``C`` need every
task's ``G_k`` at once, which a ``vmap`` over tasks would hide): its backward
returns the rescaled trunk cotangent for ``z``, the gradient of ``L_rot`` for
the rotations' generators, and the observed norms ``||G_k||`` for the
reference-norm slot. :class:`TaskRotations` is the Flax layer. The training
step stays the library's ordinary one: one ``jax.vjp`` over the grouped
losses (lean mode) with **equal task weights** (registry method ``'equal'``;
RotoGrad is an architecture, not a coefficient rule, and is not registered
as a method), and :func:`rotograd_optimizer` wraps the model's optimizer so
that the rotations get their own (paper: slower) optimizer and the reference
norms are set, not stepped.

**Parametrisation.** ``R_k = expm(A_k - A_k^T)`` with unconstrained
``A_k`` (``jax.scipy.linalg.expm``), exactly orthogonal (up to float
round-off) whatever the optimizer does, and the identity at ``A_k = 0``
(the official code: geotorch's ``orthogonal(..., triv='expm')`` from
``torch.eye``).

Defaults and their sources: ``burn_in_period = 20`` (the official
``RotoGrad`` class). The rotations' optimizer is the caller's: the paper's
convergence argument (a Stackelberg game, rotations the leader) wants them
to learn more slowly than the network, and the official README recommends a
smaller learning rate for RotoGrad's parameters; its example
(``example/toy.yml``) uses Adam (lr 0.05 on a 2-D toy problem).
"""

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

Array = jax.Array
PyTree = Any

#: Parameter names of :class:`TaskRotations` (what :func:`rotograd_optimizer` looks for).
GENERATORS = "rotograd_generators"
REFERENCE_NORMS = "rotograd_reference_norms"

_TINY = 1e-15  # the official code's clamp of norms and sums


def rotation_matrices(generators: Array) -> Array:
  """Orthogonal ``R = expm(A - A^T)`` of generators ``A`` (``[..., d, d]``).

  ``A - A^T`` is skew-symmetric, so its exponential is a rotation
  (``R^T R = I``, ``det R = 1``); ``A = 0`` gives the identity.

  Args:
    generators: ``[..., d, d]`` unconstrained matrices ``A``.

  Returns:
    ``[..., d, d]`` rotations.
  """
  skew = generators - jnp.swapaxes(generators, -1, -2)
  if skew.ndim == 2:
    return jax.scipy.linalg.expm(skew)
  flat = skew.reshape((-1,) + skew.shape[-2:])
  return jax.vmap(jax.scipy.linalg.expm)(flat).reshape(skew.shape)


def magnitude_weights(norms: Array, reference_norms: Array) -> tuple[Array, Array]:
  """RotoGrad's ``alpha [N]`` and common magnitude ``C`` from the task gradient norms.

  ``alpha_k = (||G_k|| / ||G_k^0||) / sum_i (||G_i|| / ||G_i^0||)`` and
  ``C = sum_k alpha_k ||G_k||``. A reference that is not set yet
  (``reference_norms <= 0``) is the current norm (ratio 1), as on the
  official code's first step.

  Args:
    norms: ``[N]`` Frobenius norms ``||G_k||`` of the task gradients w.r.t. ``z``.
    reference_norms: ``[N]`` ``||G_k^0||`` (``<= 0``: unset).

  Returns:
    ``(alpha [N], C [])``.
  """
  ref = jnp.where(reference_norms > 0, reference_norms, norms)
  ratios = norms / jnp.maximum(ref, _TINY)
  alpha = ratios / jnp.maximum(ratios.sum(), _TINY)
  return alpha, jnp.sum(alpha * norms)


def rescale_task_grads(task_grads: Array, reference_norms: Array) -> Array:
  """The trunk's cotangent ``C sum_k G_k / ||G_k||`` as per-task blocks ``[N, b, d]``.

  Every task's block ``G_k`` is scaled to Frobenius norm ``C``
  (:func:`magnitude_weights`); a task with a zero gradient stays zero. With
  one task it is ``G_1`` exactly.

  Args:
    task_grads: ``[N, b, d]`` ``G_k`` (task ``k``'s rows of ``dL/dz``).
    reference_norms: ``[N]`` ``||G_k^0||`` (``<= 0``: unset).

  Returns:
    ``[N, b, d]`` rescaled blocks.
  """
  norms = jnp.sqrt(jnp.sum(jnp.square(task_grads), axis=(1, 2)))
  _, c = magnitude_weights(norms, reference_norms)
  scale = jnp.where(norms > 0, c / jnp.where(norms > 0, norms, 1.0), 0.0)
  return task_grads * scale[:, None, None]


def target_direction(task_grads: Array) -> Array:
  """The common direction ``v [d]`` of the rotation loss.

  ``v = (1/K) sum_k ||m|| gbar_k / ||gbar_k||`` with ``gbar_k`` the mean row
  of task ``k``'s ``G_k`` and ``m = (1/K) sum_k gbar_k`` (the official
  ``RotateOnly._rep_grad``: the normalised task gradients, averaged, at the
  mean gradient's scale). Tasks with a zero gradient count as zero vectors.

  Args:
    task_grads: ``[N, b, d]``.

  Returns:
    ``[d]``.
  """
  gbar = task_grads.mean(axis=1)  # [N, d]
  norms = jnp.linalg.norm(gbar, axis=-1)
  mean_norm = jnp.linalg.norm(gbar.mean(axis=0))
  scale = jnp.where(norms > 0, mean_norm / jnp.where(norms > 0, norms, 1.0), 0.0)
  return jnp.mean(gbar * scale[:, None], axis=0)


def rotation_loss(generators: Array, target: Array, rotated_grads: Array) -> Array:
  """``L_rot = sum_k mean_b ||R_k v - u_{k,b}||^2`` as a function of the generators.

  Args:
    generators: ``[N, d, d]`` ``A_k`` (``R_k = expm(A_k - A_k^T)``).
    target: ``[d]`` the common direction ``v`` (:func:`target_direction`).
    rotated_grads: ``[N, b, d]`` ``U_k = dL_k/dr_k``.

  Returns:
    The scalar loss.
  """
  rotated_target = jnp.einsum("nij,j->ni", rotation_matrices(generators), target)
  diff = rotated_target[:, None, :] - rotated_grads
  return jnp.sum(jnp.mean(jnp.sum(jnp.square(diff), axis=-1), axis=1))


def rotation_loss_grad(generators: Array, rotations: Array, target: Array,
                       rotated_grads: Array) -> Array:
  """``d L_rot / d A`` (:func:`rotation_loss`) without differentiating through ``expm``.

  With ``S = A - A^T`` and ``M = dL_rot/dR = 2 (R v - ubar) v^T`` per task
  (``ubar`` the mean row of ``U_k``), the chain rule through ``R = expm(S)``
  is the adjoint of expm's Frechet derivative, ``L(S, .)^* = L(S^T, .)``,
  read off one block exponential (the block-triangular formula of Frechet
  derivatives, Higham, *Functions of Matrices*, 2008, chapter 3):

      dL/dS = [expm([[S^T, M], [0, S^T]])]_{12},   dL/dA = dL/dS - (dL/dS)^T.

  Equal to ``jax.grad(rotation_loss)`` up to float round-off, with one
  forward ``expm`` of ``[2d, 2d]`` instead of the VJP of ``expm``'s
  scaling-and-squaring (a much smaller program to compile).

  Args:
    generators: ``[N, d, d]`` ``A_k``.
    rotations: ``[N, d, d]`` ``R_k = expm(A_k - A_k^T)``.
    target: ``[d]`` ``v``.
    rotated_grads: ``[N, b, d]`` ``U_k``.

  Returns:
    ``[N, d, d]``.
  """
  d = generators.shape[-1]
  residual = jnp.einsum("nij,j->ni", rotations, target) - rotated_grads.mean(axis=1)
  m = 2.0 * residual[:, :, None] * target[None, None, :]  # dL/dR_k [N, d, d]
  skew_t = jnp.swapaxes(generators, -1, -2) - generators  # S^T
  block = jnp.concatenate([jnp.concatenate([skew_t, m], axis=-1),
                           jnp.concatenate([jnp.zeros_like(m), skew_t], axis=-1)], axis=-2)
  d_skew = jax.vmap(jax.scipy.linalg.expm)(block)[:, :d, d:]
  return d_skew - jnp.swapaxes(d_skew, -1, -2)


@jax.custom_vjp
def rotate_tasks(z: Array, generators: Array, reference_norms: Array) -> Array:
  """``r_k = R_k z_k`` per task block, with RotoGrad's backward pass (Javaloy and Valera, ICLR 2022).

  Forward: ``r[k, i] = R_k z[k, i]``. Backward (cotangent ``U [N, b, d]``):

  * ``z`` gets ``C G_k / ||G_k||`` with ``G_k = R_k^T U_k`` rows
    (:func:`rescale_task_grads`);
  * ``generators`` get ``d L_rot / d A`` (:func:`rotation_loss` with
    ``v = target_direction(G)``, by :func:`rotation_loss_grad`), not the
    task losses' gradient;
  * ``reference_norms`` get the observed norms ``||G_k||``, which
    :func:`rotograd_optimizer` stores as ``||G_k^0||`` when the reference is
    (re)set; it is not a gradient.

  Cotangents that already carry task weights ``c_k`` (lean mode's
  ``task_vjp(c)``) are rescaled as they come: with equal weights
  ``c_k = 1/N`` every quantity carries the same factor, and ``alpha`` and
  ``v``'s direction are unchanged.

  Args:
    z: ``[N, b, d]`` the trunk's task-grouped representation.
    generators: ``[N, d, d]``.
    reference_norms: ``[N]`` (``<= 0``: unset).

  Returns:
    ``[N, b, d]`` the rotated representations.
  """
  return jnp.einsum("nij,nbj->nbi", rotation_matrices(generators).astype(z.dtype), z)


def _rotate_tasks_fwd(z, generators, reference_norms):
  rot = rotation_matrices(generators)
  return jnp.einsum("nij,nbj->nbi", rot.astype(z.dtype), z), (rot, generators, reference_norms)


def _rotate_tasks_bwd(res, rotated_grads):
  rot, generators, reference_norms = res
  u = rotated_grads.astype(jnp.float32)
  g = jnp.einsum("nij,nbi->nbj", rot, u)  # G_k = R_k^T U_k, row by row
  dz = rescale_task_grads(g, reference_norms)
  target = target_direction(g)
  d_generators = rotation_loss_grad(generators, rot, target, u)
  norms = jnp.sqrt(jnp.sum(jnp.square(g), axis=(1, 2)))
  return (dz.astype(rotated_grads.dtype), d_generators.astype(generators.dtype),
          norms.astype(reference_norms.dtype))


rotate_tasks.defvjp(_rotate_tasks_fwd, _rotate_tasks_bwd)


class TaskRotations(nn.Module):
  """RotoGrad's rotation layer: task ``k``'s rows of ``z`` rotated by ``R_k``.

  Put it between a shared trunk and the task heads. Parameters:
  ``rotograd_generators [N, d, d]`` (zeros: every ``R_k`` starts at the
  identity) and ``rotograd_reference_norms [N]`` (zeros: unset). Train with
  :func:`rotograd_optimizer` around the model's optimizer: a plain optimizer
  would step the reference norms by their "gradient" (the observed norms)
  instead of setting them, turning them negative, i.e. unset for good
  (``alpha = 1/N``, ``C`` the mean norm), silently another variant.

  Attributes:
    num_tasks: ``N``.
  """
  num_tasks: int

  @nn.compact
  def __call__(self, z: Array, tasks: Optional[Array] = None) -> Array:
    """Rotates a task-grouped representation (training) or rows with task ids (inference).

    Args:
      z: ``[N, b, d]`` task-grouped (row block ``k`` belongs to task ``k``;
        RotoGrad's backward pass, :func:`rotate_tasks`), or ``[B, d]`` with
        ``tasks``.
      tasks: ``[B]`` int task ids of the rows of a ``[B, d]`` ``z``. This
        form rotates without RotoGrad's backward pass (the rotations are
        constants there): it is for evaluation.

    Returns:
      ``z``'s shape, each row rotated by its task's ``R_k``.

    Raises:
      ValueError: a grouped ``z`` whose task axis is not ``num_tasks``, or a
        ``[B, d]`` ``z`` without ``tasks``.
    """
    d = z.shape[-1]
    generators = self.param(GENERATORS, nn.initializers.zeros_init(),
                            (self.num_tasks, d, d), jnp.float32)
    reference = self.param(REFERENCE_NORMS, nn.initializers.zeros_init(),
                           (self.num_tasks,), jnp.float32)
    if z.ndim == 3 and tasks is None:
      if z.shape[0] != self.num_tasks:
        raise ValueError(f"TaskRotations: the task-grouped representation has {z.shape[0]} "
                         f"tasks on its leading axis, the layer {self.num_tasks}.")
      return rotate_tasks(z, generators, reference)
    if z.ndim != 2 or tasks is None or tasks.shape != z.shape[:1]:
      raise ValueError(
          "TaskRotations needs a task-grouped z [N, b, d], or rows z [B, d] with their task "
          f"ids tasks [B]; got z {z.shape} and tasks "
          f"{None if tasks is None else tasks.shape}.")
    rot = jax.lax.stop_gradient(rotation_matrices(generators)).astype(z.dtype)
    return jnp.einsum("bij,bj->bi", rot[tasks], z)


# ----------------------------------------------------------------------------
# The optimizer around the model's: the rotations' own, the reference set.
# ----------------------------------------------------------------------------


class ReferenceNormsState(NamedTuple):
  """State of :func:`reference_norms_update`.

  Attributes:
    count: ``[]`` int32 steps seen.
  """
  count: Array  # []


def reference_norms_update(burn_in_period: int = 20) -> optax.GradientTransformation:
  """Sets RotoGrad's reference norms ``||G_k^0||`` instead of stepping them.

  Its input "gradient" is the observed ``||G_k||`` (:func:`rotate_tasks`).
  An unset reference (``<= 0``) takes the observed norm (the first step on
  which the task has a gradient); at step ``burn_in_period - 1`` the
  references are unset again, so step ``burn_in_period`` runs with ratios 1
  and becomes the new reference: the official ``RotoGrad`` class's
  ``counter == burn_in_period`` reset. ``burn_in_period = 0``: no reset.

  Args:
    burn_in_period: steps before the reference is taken again (official
      default 20).

  Returns:
    A transformation whose update moves the reference to its new value.
  """
  if int(burn_in_period) != burn_in_period or burn_in_period < 0:
    raise ValueError(f"burn_in_period must be a whole number >= 0, got {burn_in_period!r}.")
  burn_in_period = int(burn_in_period)

  def init_fn(params):
    del params
    return ReferenceNormsState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("reference_norms_update needs params (the current reference norms).")
    unset = (state.count == burn_in_period - 1) if burn_in_period > 0 else jnp.array(False)

    def one(observed, ref):
      new = jnp.where(unset, 0.0, jnp.where(ref > 0, ref, observed))
      return (new - ref).astype(ref.dtype)

    return (jax.tree_util.tree_map(one, updates, params),
            ReferenceNormsState(count=optax.safe_increment(state.count)))

  return optax.GradientTransformation(init_fn, update_fn)


def rotograd_labels(params: PyTree) -> PyTree:
  """``'rotation'``, ``'reference'`` or ``'model'`` for every leaf of ``params``."""
  def label(path, _):
    last = path[-1] if path else None
    name = getattr(last, "key", getattr(last, "name", None))
    if name == GENERATORS:
      return "rotation"
    if name == REFERENCE_NORMS:
      return "reference"
    return "model"
  return jax.tree_util.tree_map_with_path(label, params)


def rotograd_optimizer(model_tx: optax.GradientTransformation,
                       rotation_tx: Optional[optax.GradientTransformation] = None,
                       burn_in_period: int = 20) -> optax.GradientTransformation:
  """The model's optimizer, with RotoGrad's rotations and reference norms handled apart.

  RotoGrad (Javaloy and Valera, ICLR 2022) learns each task's rotation
  ``R_k = expm(A_k - A_k^T)`` by gradient steps on its rotation loss (the rotated
  task gradients aligned with their common direction) while the model follows the
  task losses; this optimizer routes each part of the parameters to its own rule.

  ``optax.multi_transform`` over :func:`rotograd_labels`: the generators of
  :class:`TaskRotations` follow ``rotation_tx`` (their "gradient" is that of
  RotoGrad's rotation loss; None: ``model_tx``, with its own state), the
  reference norms :func:`reference_norms_update`, everything else
  ``model_tx``. Put it after the task weighting, e.g.
  ``optax.chain(ldro.get_method('equal', num_tasks=N), rotograd_optimizer(optax.sgd(0.025),
  optax.adam(1e-3)))``.

  Args:
    model_tx: the trunk's and heads' optimizer.
    rotation_tx: the rotations' optimizer (the paper: slower than the model's).
    burn_in_period: see :func:`reference_norms_update` (official default 20).

  Returns:
    The transformation.
  """
  return optax.multi_transform(
      {"model": model_tx, "rotation": model_tx if rotation_tx is None else rotation_tx,
       "reference": reference_norms_update(burn_in_period)},
      rotograd_labels)
