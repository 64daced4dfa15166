"""Device meshes and shardings for multitask training (JAX SPMD).

A 2-D mesh ``('data', 'fsdp')``: batches are split over ``data`` (and
``fsdp``), parameters and optimizer state (including the task weights and
the interaction matrix, which are small and replicated) are split over
``fsdp`` along their largest divisible axis. ``jit`` with these shardings
computes per-task losses, gradients and the Gram matrix over the *global*
batch: every device sees the same task weights.

Multi-host: :func:`initialize_distributed` calls ``jax.distributed.initialize``;
each process then feeds its own slice of the global batch
(``jax.make_array_from_process_local_data``).
"""

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any

MESH_AXES = ("data", "fsdp")


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """``jax.distributed.initialize`` (explicit arguments, or the environment's)."""
  kwargs = {}
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id.")
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  jax.distributed.initialize(**kwargs)


def make_mesh(mesh_shape: Optional[Sequence[int]] = None) -> Mesh:
  """A ``('data', 'fsdp')`` mesh over all devices (default ``(n_devices, 1)``).

  One entry may be -1 (inferred).
  """
  n = jax.device_count()
  shape = list(mesh_shape) if mesh_shape is not None else [n, 1]
  if len(shape) != 2:
    raise ValueError(f"mesh_shape must have 2 entries (data, fsdp), got {mesh_shape}.")
  if shape.count(-1) > 1:
    raise ValueError(f"at most one mesh_shape entry may be -1, got {mesh_shape}.")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    shape[shape.index(-1)] = n // known
  if int(np.prod(shape)) != n:
    raise ValueError(f"mesh_shape {tuple(shape)} needs {int(np.prod(shape))} devices, but "
                     f"{n} are available.")
  devices = np.asarray(jax.devices()).reshape(shape)
  return Mesh(devices, MESH_AXES)


def _param_spec(x, fsdp: int) -> P:
  """Shard the largest axis divisible by the fsdp size; replicate otherwise."""
  shape = getattr(x, "shape", ())
  if fsdp <= 1 or not shape:
    return P()
  order = sorted(range(len(shape)), key=lambda i: -shape[i])
  for i in order:
    if shape[i] % fsdp == 0 and shape[i] >= fsdp:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(state: PyTree, mesh: Mesh) -> PyTree:
  """``NamedSharding`` for every leaf of a train state (FSDP over params/opt state)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, _param_spec(x, fsdp)), state)


def batch_spec(x, mesh: Mesh) -> P:
  """Split a task-grouped batch leaf ``[N, b, ...]`` over all devices.

  The per-task example axis ``b`` (axis 1) is split over ``('data', 'fsdp')``
  when divisible, else the task axis; otherwise the leaf is replicated.
  """
  total = mesh.shape["data"] * mesh.shape["fsdp"]
  shape = np.shape(x)
  for axis in (1, 0):
    if len(shape) > axis and shape[axis] % total == 0:
      spec = [None] * len(shape)
      spec[axis] = ("data", "fsdp")
      return P(*spec)
  return P()


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
  """Places a (global, host-local in single-process runs) batch on the mesh.

  In multi-process runs each process passes its own slice and the global
  array is assembled with ``jax.make_array_from_process_local_data``.
  """
  if mesh.size == 1 and jax.process_count() == 1:
    return batch

  def put(x):
    sh = NamedSharding(mesh, batch_spec(x, mesh))
    if jax.process_count() == 1:
      return jax.device_put(x, sh)
    return jax.make_array_from_process_local_data(sh, np.asarray(x))

  return jax.tree_util.tree_map(put, batch)
