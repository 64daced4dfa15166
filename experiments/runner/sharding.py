"""Device meshes and shardings for multitask training (JAX SPMD).

One program runs on every device (and, multi-host, in every process) and
``jax.jit`` partitions it. The mesh has two axes, ``('data', 'fsdp')``
(``train_and_evaluate.mesh_shape``, e.g. ``gin_configs/mesh/*.gin``):

* batches are split over both axes: a task-grouped leaf ``[N, b, ...]`` along
  the per-task example axis ``b`` (see :func:`batch_spec` for the fallbacks
  when ``b`` is not divisible);
* parameters, and the optimizer-state leaves shaped like them (momenta...),
  are split over ``fsdp`` along their largest divisible axis (FSDP / ZeRO-3);
  small leaves (< ``min_shard_size`` elements) are replicated;
* the task-weighting state (task weights ``w``, interaction matrix ``A``...),
  the step, the PRNG key and the other scalars are replicated: every device
  sees the same task weights.

The train step is written for the *global* batch, so per-task losses, the
per-task gradients and the Gram matrix are global (XLA inserts the
reductions); :func:`ldro.train.make_train_step` takes ``param_shardings`` to
keep the per-task gradients ``[N, ...]`` sharded like the parameters.

Multi-host: :func:`initialize_distributed` calls ``jax.distributed.initialize``
(before any other JAX call). Every process then computes the same global
batch description, keeps its own part (:func:`process_slice`) and the global
``jax.Array`` is assembled with ``jax.make_array_from_process_local_data``
(:func:`shard_batch`). Code that needs whole values on the host (evaluation)
goes through :func:`host_local`.
"""

from typing import Any, Optional, Sequence

from absl import logging
import gin
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

PyTree = Any

MESH_AXES = ("data", "fsdp")

# Leaves with fewer elements are replicated rather than FSDP-sharded.
MIN_SHARD_SIZE = 1024


def initialize_distributed(coordinator_address: Optional[str] = None,
                           num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """``jax.distributed.initialize``: explicit arguments, or the environment's.

  Without arguments JAX detects the cluster (Cloud TPU pod slices, SLURM,
  Open MPI, ``JAX_COORDINATOR_ADDRESS``...). Must run before any other JAX
  call. A second call is a no-op.
  """
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id.")
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  elif num_processes is not None or process_id is not None:
    raise ValueError("--num_processes/--process_id need --coordinator_address (or use "
                     "--multihost for the environment's defaults).")
  jax.distributed.initialize(**kwargs)


def _resolve_shape(mesh_shape: Optional[Sequence[int]], n: int) -> list[int]:
  shape = [int(s) for s in mesh_shape] if mesh_shape is not None else [n, 1]
  if len(shape) != 2:
    raise ValueError(f"mesh_shape must have 2 entries (data, fsdp), got {mesh_shape}.")
  if shape.count(-1) > 1:
    raise ValueError(f"at most one mesh_shape entry may be -1, got {mesh_shape}.")
  if any(s < 1 for s in shape if s != -1):
    raise ValueError(f"mesh_shape entries must be >= 1 (or -1), got {mesh_shape}.")
  if -1 in shape:
    known = int(np.prod([s for s in shape if s != -1]))
    if n % known:
      raise ValueError(f"mesh_shape {tuple(mesh_shape)}: {n} devices are not divisible by "
                       f"{known}.")
    shape[shape.index(-1)] = n // known
  return shape


def _device_grid(shape: Sequence[int], devices: Sequence[Any]) -> np.ndarray:
  """Devices arranged as ``shape`` (topology-aware where JAX knows how)."""
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top
  num_slices = len({getattr(d, "slice_index", 0) for d in devices})
  if num_slices > 1:  # multi-slice TPU: 'data' spans the slices (DCN), 'fsdp' stays inside
    if shape[0] % num_slices:
      raise ValueError(f"mesh_shape {tuple(shape)}: the data axis must be divisible by the "
                       f"number of slices ({num_slices}).")
    return mesh_utils.create_hybrid_device_mesh(
        (shape[0] // num_slices, shape[1]), (num_slices, 1), devices,
        allow_split_physical_axes=True)
  try:
    return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (ValueError, NotImplementedError, AssertionError):
    return np.asarray(devices).reshape(shape)


def make_mesh(mesh_shape: Optional[Sequence[int]] = None) -> Mesh:
  """A ``('data', 'fsdp')`` mesh (default ``(n_devices, 1)``: data parallel).

  One entry may be -1 (inferred). A single-process run may ask for fewer
  devices than it has (e.g. ``(1, 1)`` to debug); it then uses the first ones.
  """
  devices = jax.devices()
  n = len(devices)
  shape = _resolve_shape(mesh_shape, n)
  size = int(np.prod(shape))
  if size > n or (size < n and jax.process_count() > 1):
    raise ValueError(f"mesh_shape {tuple(shape)} needs {size} devices, but {n} are available"
                     + (f" in {jax.process_count()} processes" if jax.process_count() > 1
                        else "") + ".")
  if size < n:
    logging.warning("mesh_shape %s uses %d of %d devices.", tuple(shape), size, n)
    devices = devices[:size]
  return Mesh(_device_grid(shape, devices), MESH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------
# Train state.
# ----------------------------------------------------------------------------


def param_spec(shape: Sequence[int], fsdp_size: int, min_shard_size: int = MIN_SHARD_SIZE) -> P:
  """FSDP spec of a parameter: its largest axis divisible by ``fsdp_size``.

  Replicated when ``fsdp_size == 1``, for scalars, for leaves with fewer than
  ``min_shard_size`` elements and when no axis is divisible. Depends on the
  shape only, so optimizer moments get the spec of their parameter.
  """
  shape = tuple(int(s) for s in shape)
  if fsdp_size <= 1 or not shape or int(np.prod(shape)) < max(min_shard_size, fsdp_size):
    return P()
  for i in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[i] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[i] = "fsdp"
      return P(*spec)
  return P()


def _is_weighting_state(x) -> bool:
  # Every ldro task-weighting method state is a NamedTuple with a task_weights field.
  return hasattr(x, "_fields") and "task_weights" in x._fields


@gin.configurable(denylist=["state", "mesh"])
def state_shardings(state: PyTree, mesh: Mesh, min_shard_size: int = MIN_SHARD_SIZE) -> PyTree:
  """``NamedSharding`` for every leaf of a train state.

  Parameters and optimizer-state leaves: :func:`param_spec` (FSDP over
  ``fsdp``). Replicated: task-weighting method states (task weights,
  interaction matrix...), and for an :class:`ldro.train.TrainState` the step,
  PRNG key and non-finite counters.

  Args:
    state: a ``TrainState`` (or any pytree of arrays, sharded as parameters).
    mesh: the ``('data', 'fsdp')`` mesh.
    min_shard_size: leaves with fewer elements are replicated (gin-configurable).

  Returns:
    A pytree of ``NamedSharding`` like ``state``.
  """
  fsdp = mesh.shape["fsdp"]
  rep = replicated(mesh)

  def leaf(x):
    return NamedSharding(mesh, param_spec(np.shape(x), fsdp, min_shard_size))

  def tree(t):
    return jax.tree_util.tree_map(
        lambda x: jax.tree_util.tree_map(lambda _: rep, x) if _is_weighting_state(x) else leaf(x),
        t, is_leaf=_is_weighting_state)

  from ldro import train as ldro_train  # pylint: disable=g-import-not-at-top
  if isinstance(state, ldro_train.TrainState):
    out = jax.tree_util.tree_map(lambda _: rep, state)
    return out._replace(params=tree(state.params), opt_state=tree(state.opt_state))
  return tree(state)


# ----------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------


# Ways to split a batch leaf, in order of preference: {batch axis: mesh axes}.
_GROUPED_SPLITS = (
    {1: ("data", "fsdp")}, {0: ("data", "fsdp")}, {0: ("data",), 1: ("fsdp",)},
    {1: ("data",), 0: ("fsdp",)}, {1: ("data",)}, {0: ("data",)}, {1: ("fsdp",)}, {0: ("fsdp",)})
_PLAIN_SPLITS = ({0: ("data", "fsdp")}, {0: ("data",)}, {0: ("fsdp",)})


def batch_spec(shape: Sequence[int], mesh: Mesh, task_grouped: bool = True) -> P:
  """How a batch leaf is split over the mesh.

  A task-grouped leaf ``[N, b, ...]`` is split over as many devices as its
  sizes allow; among equally good splits the first of: the per-task example
  axis ``b`` over all devices (``('data', 'fsdp')``), the task axis ``N`` over
  all devices, ``N`` over ``data`` and ``b`` over ``fsdp``, ``b`` over
  ``data`` and ``N`` over ``fsdp``, then one axis over ``data`` or ``fsdp``
  only; a leaf nothing divides (scalars, odd sizes) is replicated. Every
  choice gives the same global values (the step computes on the global
  batch); only speed differs. Pick ``b`` divisible by the device count for
  the plain split. An ordinary batch (``task_grouped=False``, leaves
  ``[B, ...]``) is split along ``B``.
  """
  shape = tuple(shape)
  sizes = dict(mesh.shape)
  best, best_size = P(), 1
  for split in (_GROUPED_SPLITS if task_grouped else _PLAIN_SPLITS):
    if any(axis >= len(shape) for axis in split):
      continue
    parts = {axis: int(np.prod([sizes[a] for a in names])) for axis, names in split.items()}
    size = int(np.prod(list(parts.values())))
    if size <= best_size or any(shape[axis] % k for axis, k in parts.items()):
      continue
    spec = [None] * len(shape)
    for axis, names in split.items():
      spec[axis] = names if len(names) > 1 else names[0]
    best, best_size = P(*spec), size
  return best


_WARNED_REPLICATED = set()


def batch_shardings(batch: PyTree, mesh: Mesh, task_grouped: bool = True) -> PyTree:
  """``NamedSharding`` of every leaf of a (global) batch (see :func:`batch_spec`)."""

  def one(x):
    shape = np.shape(x)
    spec = batch_spec(shape, mesh, task_grouped)
    key = (shape, tuple(mesh.shape.items()))
    if (spec == P() and mesh.size > 1 and int(np.prod(shape)) >= MIN_SHARD_SIZE
        and key not in _WARNED_REPLICATED):  # tiny leaves (e.g. synthetic) are fine replicated
      _WARNED_REPLICATED.add(key)
      logging.warning("batch leaf of shape %s cannot be split over the %s mesh: every device "
                      "computes on all of it (choose a per-task batch divisible by the "
                      "device count).", shape, dict(mesh.shape))
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map(one, batch)


def _local_indices(device_indices: Sequence[tuple], shape: Sequence[int]) -> tuple:
  """Per axis, the part of a global array held by one process's devices.

  ``device_indices`` are the index tuples (of slices) of the process's devices;
  per axis the union of their ranges, in increasing order (the layout
  ``jax.make_array_from_process_local_data`` expects), as a ``slice`` when it is
  contiguous and an index array otherwise.
  """
  out = []
  for axis, dim in enumerate(shape):
    ranges = sorted({sl[axis].indices(dim)[:2] for sl in device_indices})
    if len(ranges) == 1 or all(a[1] == b[0] for a, b in zip(ranges, ranges[1:])):
      out.append(slice(ranges[0][0], ranges[-1][1]))
    else:
      merged = []
      for start, stop in ranges:  # overlapping ranges (replication) count once
        if merged and start < merged[-1][1]:
          merged[-1] = (merged[-1][0], max(stop, merged[-1][1]))
        else:
          merged.append((start, stop))
      out.append(np.concatenate([np.arange(a, b) for a, b in merged]))
  return tuple(out)


def process_indices(shape: Sequence[int], sharding: NamedSharding) -> tuple:
  """Index (one ``slice`` or index array per axis) of this process's part of a global array.

  E.g. for a task-grouped leaf ``[N, b, ...]`` split along ``b`` and 2
  processes, process 0 gets ``(slice(0, N), slice(0, b // 2), ...)``: a data
  pipeline may load only that part.
  """
  shape = tuple(shape)
  if not shape:
    return ()
  idx = list(sharding.addressable_devices_indices_map(shape).values())
  return _local_indices(idx, shape)


def process_slice(batch: PyTree, mesh: Mesh, task_grouped: bool = True) -> PyTree:
  """This process's part of a global (host) batch, for :func:`shard_batch`.

  Every process describes the same global batch (e.g. ``experiment.train_batch(step)``
  is a pure function of the step); each keeps the part its own devices hold
  under :func:`batch_spec`, e.g. its slice of the per-task example axis ``b``
  of a task-grouped ``[N, b, ...]`` leaf (replicated leaves are kept whole).
  Single process: the batch itself.
  """
  if jax.process_count() == 1:
    return batch

  def local(x, sh):
    x = np.asarray(x)
    out = x
    for axis, ind in enumerate(process_indices(x.shape, sh)):
      if isinstance(ind, slice):
        out = out[(slice(None),) * axis + (ind,)]
      else:
        out = np.take(out, ind, axis=axis)
    return out

  return jax.tree_util.tree_map(local, batch, batch_shardings(batch, mesh, task_grouped))


def shard_batch(batch: PyTree, mesh: Mesh, task_grouped: bool = True,
                global_shapes: Optional[PyTree] = None) -> PyTree:
  """Places a batch on the mesh as global ``jax.Array`` s.

  Args:
    batch: single process: the global batch. Multi-process: this process's
      part of it (:func:`process_slice`), with ``global_shapes``; or the whole
      global batch (without ``global_shapes``), which is then sliced here.
    mesh: the mesh.
    task_grouped: leaves are ``[N, b, ...]`` (else ordinary ``[B, ...]``).
    global_shapes: the global shape of every leaf (multi-process, when
      ``batch`` is already process-local).

  Returns:
    The batch as global arrays sharded by :func:`batch_spec`.
  """
  if jax.process_count() == 1:
    return jax.device_put(batch, batch_shardings(batch, mesh, task_grouped))
  if global_shapes is None:
    global_shapes = jax.tree_util.tree_map(np.shape, batch)
    batch = process_slice(batch, mesh, task_grouped)
  leaves, treedef = jax.tree_util.tree_flatten(batch)
  shapes = treedef.flatten_up_to(global_shapes)
  out = []
  for x, shape in zip(leaves, shapes):
    sh = NamedSharding(mesh, batch_spec(shape, mesh, task_grouped))
    out.append(jax.make_array_from_process_local_data(sh, np.asarray(x), tuple(shape)))
  return jax.tree_util.tree_unflatten(treedef, out)


def host_local(tree: PyTree) -> PyTree:
  """Whole values usable by process-local code (e.g. an experiment's evaluation).

  Single process: the tree itself (arrays stay on device). Multi-process:
  every process gets the full values as numpy arrays (``process_allgather``;
  all processes must call it).
  """
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


# ----------------------------------------------------------------------------
# Per-process input: which part of the global batch a process reads.
# ----------------------------------------------------------------------------


def process_blocks(prefix: Sequence[int], mesh: Mesh, task_grouped: bool = True) -> list[tuple]:
  """Per process, the global positions it holds along a batch's leading axes.

  ``prefix`` is the batch's leading shape: ``(N, b)`` (task-grouped: tasks x
  examples per task) or ``(B,)`` (ordinary batch). The batch is split as
  :func:`batch_spec` splits a leaf of that shape (every leaf ``[N, b, ...]``
  of a batch is split the same way, on those two axes only). Entry ``p`` is a
  tuple of sorted ``int64`` index arrays, one per leading axis: process ``p``
  holds ``batch[np.ix_(*blocks[p])]``, in that order (the layout
  ``jax.make_array_from_process_local_data`` expects).

  Raises:
    ValueError: the split does not give every process its own, equal part
      (a process would read examples another process also reads): the
      per-host batch does not divide. The message says which axis to resize.
  """
  prefix = tuple(int(s) for s in prefix)
  sharding = NamedSharding(mesh, batch_spec(prefix, mesh, task_grouped))
  per_process: dict[int, list] = {}
  for device, index in sharding.devices_indices_map(prefix).items():
    per_process.setdefault(device.process_index, []).append(index)
  procs = sorted(per_process)
  blocks = []
  for p in procs:
    block = []
    for ind in _local_indices(per_process[p], prefix):
      if isinstance(ind, slice):
        ind = np.arange(*ind.indices(10**18))
      block.append(np.asarray(ind, np.int64))
    blocks.append(tuple(block))
  owners = np.zeros(prefix, np.int64)
  for block in blocks:
    owners[np.ix_(*block)] += 1
  if len(procs) > 1 and not np.all(owners == 1):
    raise ValueError(per_host_error(prefix, mesh, task_grouped, len(procs)))
  return blocks


def per_host_error(prefix: Sequence[int], mesh: Mesh, task_grouped: bool, processes: int) -> str:
  """The message of a batch that does not divide over the processes (how to resize it)."""
  devices = mesh.size
  local = devices // processes
  spec = batch_spec(prefix, mesh, task_grouped)
  if task_grouped:
    n, b = prefix
    what = (f"the task-grouped batch [N={n} tasks, b={b} examples per task] (split {spec} over "
            f"the mesh {dict(mesh.shape)})")
    fix = (f"make the per-task example axis b divisible by {devices} (the device count), or "
           f"the task axis N by the 'data' size {mesh.shape['data']} and b by the 'fsdp' size "
           f"{mesh.shape['fsdp']}; at the least, N or b must be divisible by {processes} "
           f"processes x the split of each host's {local} devices")
  else:
    what = f"the batch of B={prefix[0]} rows (split {spec} over the mesh {dict(mesh.shape)})"
    fix = f"make B divisible by {devices} (the device count)"
  return (f"per-host input: {what} cannot be split into {processes} disjoint, equal per-process "
          f"parts, so processes would read the same examples. To size the per-host batch, "
          f"{fix} (docs/scale_out.md, 'Per-host input').")


def process_block(prefix: Sequence[int], mesh: Mesh, task_grouped: bool = True) -> tuple:
  """This process's entry of :func:`process_blocks` (every position if single-process)."""
  if jax.process_count() == 1:
    return tuple(np.arange(int(s), dtype=np.int64) for s in prefix)
  return process_blocks(prefix, mesh, task_grouped)[jax.process_index()]


def assemble_batch(local: PyTree, prefix: Sequence[int], mesh: Mesh,
                   task_grouped: bool = True) -> PyTree:
  """Global ``jax.Array`` s from every process's own part (:func:`process_block`).

  ``local``'s leaves are ``[len(block[0]), len(block[1]), ...]`` (the part of
  the leading axes ``prefix`` this process holds, any trailing axes); the
  global leaf is ``prefix + trailing``, split by :func:`batch_spec` of
  ``prefix`` and assembled with ``jax.make_array_from_process_local_data``.
  Single process: ``local`` is the whole batch, placed as :func:`shard_batch` does.
  """
  if jax.process_count() == 1:
    return shard_batch(local, mesh, task_grouped)
  prefix = tuple(int(s) for s in prefix)
  spec = tuple(batch_spec(prefix, mesh, task_grouped))
  spec = spec + (None,) * (len(prefix) - len(spec))

  def one(x):
    x = np.asarray(x)
    if x.ndim < len(prefix):
      raise ValueError(f"per-host batch leaf of shape {x.shape} lacks the leading axes "
                       f"{prefix} of the batch.")
    shape = prefix + x.shape[len(prefix):]
    sh = NamedSharding(mesh, P(*spec))
    return jax.make_array_from_process_local_data(sh, x, shape)

  return jax.tree_util.tree_map(one, local)


def sum_over_processes(tree: PyTree) -> PyTree:
  """Every process's numpy sums added up (exactly, float64), on every process.

  For evaluation split across processes: each process sums its share (e.g.
  per-task loss sums and counts), this adds the shares in process order.
  float64 values travel bit-exactly (as pairs of uint32), so no precision is
  lost even without ``jax_enable_x64``. Single process: the tree itself.
  """
  if jax.process_count() == 1:
    return tree
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  leaves = [np.ascontiguousarray(np.asarray(x, np.float64)) for x in leaves]
  packed = [x.reshape(-1).view(np.uint32) for x in leaves]
  gathered = multihost_utils.process_allgather(packed)  # [P, 2 * size] each
  out = []
  for x, g in zip(leaves, gathered):
    parts = np.asarray(g, np.uint32).reshape(jax.process_count(), -1)
    per_process = [parts[p].view(np.float64).reshape(x.shape) for p in range(parts.shape[0])]
    total = per_process[0].copy()
    for y in per_process[1:]:
      total += y
    out.append(total)
  return jax.tree_util.tree_unflatten(treedef, out)
