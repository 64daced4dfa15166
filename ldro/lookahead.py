"""Task-gradient Gram ("interaction") matrix and the lookahead matrix.

Paper sections 2.5, 3.2 and Appendices A.2 and C. With per-task gradients
``g_i = grad l_i(theta)``:

* the Gram matrix ``G_ij = g_i . g_j``;
* the interaction matrix ``A_ij = g_i . g_j / ||g_j||`` (renormalised, the
  paper's default) or ``A = G``;
* the lookahead matrix ``L_ij = l_i - lambda * A_ij``, the payoff of the
  one-step lookahead game ``min_w max_v v^T L w``.

Gram strategies (all return the same matrix up to float round-off):

=============  ===============================================  ==============================
strategy        input                                            cost / memory
=============  ===============================================  ==============================
``jacrev``      ``losses_fn(params, batch) -> [N]``, any batch    N backward passes / N grads
``grouped``     ``task_loss_fn(params, task_batch)``, batch       ~1 backward pass / N grads
                ``[N, b, ...]`` (``vmap(grad)`` over tasks)
``chunked``     as ``grouped``, ``chunk_size=c``                  ~(N/c+1)/2 backward / 2c grads
``pairwise``    as ``grouped`` (= ``chunked`` with ``c = 1``)     ~(N+1)/2 backward / 2 grads
=============  ===============================================  ==============================

``pairwise`` is the paper's memory-lean LM strategy (Appendix C: two gradients
in memory, upper triangle only). ``chunked`` generalises it: blocks of ``c``
task gradients, the upper block triangle only, so peak memory grows with ``c``
and not with ``N``.
"""

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp

Array = jax.Array
PyTree = Any

GRAM_STRATEGIES = ("jacrev", "grouped", "chunked", "pairwise")

_HP = jax.lax.Precision.HIGHEST


def _leading_dim(tree: PyTree, what: str) -> int:
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise ValueError(f"{what} is empty.")
  sizes = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
  if len(sizes) != 1 or None in sizes:
    shapes = [leaf.shape for leaf in leaves]
    raise ValueError(
        f"every leaf of {what} needs the same leading task axis; got leaf shapes {shapes}.")
  return sizes.pop()


def task_gram(task_grads: PyTree) -> Array:
  """Gram matrix ``G_ij = g_i . g_j`` of stacked per-task gradients.

  Args:
    task_grads: pytree whose leaves all have a leading task axis ``N``.

  Returns:
    ``[N, N]`` float32 Gram matrix (each leaf's block is computed in the gradients' dtype,
    the sum over leaves in float32).
  """
  n = _leading_dim(task_grads, "task_grads")
  gram = jnp.zeros((n, n), jnp.float32)
  for g in jax.tree_util.tree_leaves(task_grads):
    flat = g.reshape(n, -1)
    gram = gram + jnp.matmul(flat, flat.T, precision=_HP).astype(gram.dtype)
  return gram


def block_gram(grads_a: PyTree, grads_b: PyTree) -> Array:
  """Cross Gram block ``G_ij = a_i . b_j`` ``[Na, Nb]`` (float32) of two stacks of gradients."""
  na = _leading_dim(grads_a, "grads_a")
  nb = _leading_dim(grads_b, "grads_b")
  out = jnp.zeros((na, nb), jnp.float32)
  for a, b in zip(jax.tree_util.tree_leaves(grads_a), jax.tree_util.tree_leaves(grads_b)):
    out = out + jnp.matmul(a.reshape(na, -1), b.reshape(nb, -1).T, precision=_HP).astype(out.dtype)
  return out


def interaction_matrix(gram: Array, normalize: bool = True) -> Array:
  """Interaction matrix ``A`` from the Gram matrix (section 3.2, Appendix A.2).

  ``A_ij = G_ij / sqrt(G_jj) = g_i . g_j / ||g_j||`` when ``normalize``, else
  ``A = G``. A task ``j`` with a zero gradient gets a zero column (its
  normalised gradient is taken to be zero), never NaN.

  Args:
    gram: ``[N, N]`` Gram matrix.
    normalize: renormalise the lookahead gradients to unit norm.

  Returns:
    ``[N, N]`` interaction matrix.
  """
  if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
    raise ValueError(f"gram must be [N, N], got shape {gram.shape}.")
  if not normalize:
    return gram
  diag = jnp.diagonal(gram)
  positive = diag > 0
  inv_norm = jnp.where(positive, jax.lax.rsqrt(jnp.where(positive, diag, 1.0)), 0.0)
  return gram * inv_norm[None, :]


def lookahead_matrix(
    task_losses: Array,
    gram: Array,
    lookahead_lr: float | Array,
    normalize: bool = True,
) -> Array:
  """Lookahead matrix ``L_ij = l_i - lambda * A_ij`` (section 2.5, Eq. 2).

  With ``normalize`` (the paper's default, section 3.2 / A.2)
  ``L_ij = l_i - lambda * G_ij / sqrt(G_jj)``, the first-order loss of task
  ``i`` after a step of size ``lambda`` along task ``j``'s unit gradient.

  Args:
    task_losses: ``[N]`` per-task losses ``l``.
    gram: ``[N, N]`` Gram matrix ``G_ij = g_i . g_j``.
    lookahead_lr: lookahead learning rate ``lambda``.
    normalize: renormalise the lookahead gradients.

  Returns:
    ``[N, N]`` lookahead matrix.
  """
  task_losses = jnp.asarray(task_losses)
  if task_losses.ndim != 1 or gram.shape != (task_losses.shape[0],) * 2:
    raise ValueError(
        f"task_losses must be [N] and gram [N, N]; got {task_losses.shape} and {gram.shape}.")
  return task_losses[:, None] - lookahead_lr * interaction_matrix(gram, normalize)


# ----------------------------------------------------------------------------
# Gram strategies.
# ----------------------------------------------------------------------------


def per_task_grads(task_loss_fn: Callable[..., Array], params: PyTree, batch: PyTree) -> PyTree:
  """All ``N`` task gradients of a task-grouped batch by ``vmap(grad)``.

  Args:
    task_loss_fn: ``task_loss_fn(params, task_batch) -> scalar`` loss of one
      task on its slice of the batch.
    params: model parameters.
    batch: pytree whose leaves have a leading task axis ``N``.

  Returns:
    Gradients with the structure of ``params`` and a leading task axis ``N``.
  """
  return jax.vmap(jax.grad(task_loss_fn), in_axes=(None, 0))(params, batch)


def jacrev_gram(losses_fn: Callable[..., Array], params: PyTree, batch: PyTree) -> Array:
  """Gram matrix from the Jacobian of ``losses_fn(params, batch) -> [N]`` (``N`` backward passes).

  Args:
    losses_fn: ``(params, batch) -> [N]`` task losses.
    params: model parameters.
    batch: any batch ``losses_fn`` takes (not necessarily task-grouped).

  Returns:
    ``[N, N]`` float32 Gram matrix.
  """
  jac = jax.jacrev(losses_fn)(params, batch)
  return task_gram(jac)


def grouped_gram(task_loss_fn: Callable[..., Array], params: PyTree, batch: PyTree) -> Array:
  """Gram matrix of a task-grouped batch via ``vmap(grad)`` over tasks (about one backward pass).

  Args:
    task_loss_fn: ``task_loss_fn(params, task_batch) -> scalar``.
    params: model parameters.
    batch: task-grouped batch, leaves ``[N, ...]``.

  Returns:
    ``[N, N]`` float32 Gram matrix; the ``N`` gradients are in memory at once.
  """
  return task_gram(per_task_grads(task_loss_fn, params, batch))


def chunked_gram(
    task_loss_fn: Callable[..., Array],
    params: PyTree,
    batch: PyTree,
    chunk_size: int,
) -> Array:
  """Gram matrix holding at most ``2 * chunk_size`` task gradients at a time.

  Tasks are split into ``K = ceil(N / c)`` chunks. For each chunk ``a`` its
  ``c`` gradients are computed (``vmap(grad)``) and kept, the diagonal block
  ``G_aa`` formed, then every later chunk ``b > a`` is recomputed and the block
  ``G_ab`` (and its transpose) filled: the upper block triangle only.
  Sequential ``lax.fori_loop``s keep the memory bound.

  Args:
    task_loss_fn: ``task_loss_fn(params, task_batch) -> scalar``.
    params: model parameters.
    batch: task-grouped batch, leaves ``[N, ...]``.
    chunk_size: ``c >= 1`` tasks per chunk.

  Returns:
    ``[N, N]`` Gram matrix.
  """
  n = _leading_dim(batch, "batch")
  c = int(chunk_size)
  if c < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
  c = min(c, n)
  k = -(-n // c)
  pad = k * c - n

  def pad_and_chunk(x):
    if pad:
      x = jnp.concatenate([x, jnp.repeat(x[:1], pad, axis=0)], axis=0)
    return x.reshape((k, c) + x.shape[1:])

  chunks = jax.tree_util.tree_map(pad_and_chunk, batch)

  def chunk_grads(i):
    sub = jax.tree_util.tree_map(lambda x: jax.lax.dynamic_index_in_dim(x, i, keepdims=False), chunks)
    return per_task_grads(task_loss_fn, params, sub)

  def outer(a, gram):
    ga = chunk_grads(a)
    gram = jax.lax.dynamic_update_slice(gram, block_gram(ga, ga), (a * c, a * c))

    def inner(b, gram):
      blk = block_gram(ga, chunk_grads(b))
      gram = jax.lax.dynamic_update_slice(gram, blk, (a * c, b * c))
      return jax.lax.dynamic_update_slice(gram, blk.T, (b * c, a * c))

    return jax.lax.fori_loop(a + 1, k, inner, gram)

  gram = jax.lax.fori_loop(0, k, outer, jnp.zeros((k * c, k * c), jnp.float32))
  return gram[:n, :n]


def pairwise_gram(task_loss_fn: Callable[..., Array], params: PyTree, batch: PyTree) -> Array:
  """Gram matrix with two task gradients in memory (paper, Appendix C).

  ``G_ij`` for ``i <= j`` only, each entry from a freshly computed pair of
  gradients with ``g_i`` kept across the row: ``chunked_gram`` with ``c = 1``.

  Args:
    task_loss_fn: ``task_loss_fn(params, task_batch) -> scalar``.
    params: model parameters.
    batch: task-grouped batch, leaves ``[N, ...]``.

  Returns:
    ``[N, N]`` float32 Gram matrix (``N (N + 1) / 2`` gradient evaluations).
  """
  return chunked_gram(task_loss_fn, params, batch, 1)


def compute_gram(
    strategy: str,
    loss_fn: Callable[..., Array],
    params: PyTree,
    batch: PyTree,
    chunk_size: Optional[int] = None,
) -> Array:
  """Task Gram matrix by the named strategy (see the module docstring).

  Args:
    strategy: one of ``GRAM_STRATEGIES``.
    loss_fn: ``losses_fn(params, batch) -> [N]`` for ``jacrev``; otherwise
      ``task_loss_fn(params, task_batch) -> scalar`` with a task-grouped batch.
    params: model parameters.
    batch: the batch (task-grouped for all but ``jacrev``).
    chunk_size: tasks per chunk for ``chunked``.

  Returns:
    ``[N, N]`` Gram matrix.
  """
  if strategy == "jacrev":
    return jacrev_gram(loss_fn, params, batch)
  if strategy == "grouped":
    return grouped_gram(loss_fn, params, batch)
  if strategy == "chunked":
    if chunk_size is None:
      raise ValueError("the 'chunked' Gram strategy needs chunk_size.")
    return chunked_gram(loss_fn, params, batch, chunk_size)
  if strategy == "pairwise":
    return pairwise_gram(loss_fn, params, batch)
  raise ValueError(f"unknown Gram strategy {strategy!r}; known: {', '.join(GRAM_STRATEGIES)}.")
