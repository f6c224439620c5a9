"""Device meshes and shardings: data parallelism and FSDP over a (`data`, `fsdp`) mesh.

The global batch is split over every device of the mesh (both axes). Under FSDP (fully
sharded data parallelism, ZeRO-3) each parameter, its EMA copy and its optimizer moments are
also split over the `fsdp` axis along one dimension; `jax.jit` then all-gathers a weight where
the forward pass needs it and reduce-scatters its gradient, so a device holds about 1/fsdp of
the state. The rule looks only at a leaf's shape, so a parameter and its Adam moments (same
shape) always share a sharding, as do the shapes of a checkpoint restored on another mesh.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import chex
import jax
import numpy as np
from jax.experimental import mesh_utils, multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from wdmjax.configs import FSDP_MIN_SIZE
from wdmjax.errors import check

MESH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 2-D mesh with axes (`data`, `fsdp`) of shape (data, fsdp).

  Args:
    data: data-parallel size; -1 takes every remaining device (len(devices) // fsdp).
    fsdp: the size of the axis that parameters and optimizer state are sharded over.
    devices: default `jax.devices()` (all processes' devices). With several processes the
      mesh must span all of them, because every process feeds its share of the batch.
  """
  devices = list(jax.devices() if devices is None else devices)
  check(isinstance(fsdp, int) and fsdp >= 1, f"mesh.fsdp: expected an integer >= 1, got {fsdp!r}")
  check(len(devices) % fsdp == 0 or data != -1,
        f"mesh.fsdp: expected a divisor of the {len(devices)} devices, got {fsdp}")
  if data == -1:
    data = len(devices) // fsdp
  check(isinstance(data, int) and data >= 1,
        f"mesh.data: expected -1 or an integer >= 1, got {data!r}")
  n = data * fsdp
  check(n <= len(devices), f"mesh: data x fsdp = {data} x {fsdp} = {n} exceeds the "
                           f"{len(devices)} devices")
  check(jax.process_count() == 1 or n == len(devices),
        f"mesh: expected data x fsdp to cover all {len(devices)} devices of the "
        f"{jax.process_count()} processes, got {data} x {fsdp} = {n}")
  if n == len(devices):  # topology-aware order on TPU slices (ICI neighbours stay close)
    grid = mesh_utils.create_device_mesh((data, fsdp), devices)
  else:
    grid = np.asarray(devices[:n]).reshape(data, fsdp)
  return Mesh(grid, MESH_AXES)


def local_mesh() -> Mesh:
  """A 1 x 1 mesh on this process's first device: for loading a workdir on every process
  of a multi-host run (each gets its own full copy), or on a single machine."""
  return Mesh(np.asarray(jax.local_devices()[:1]).reshape(1, 1), MESH_AXES)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over: every batch-parallel axis present."""
  return tuple(a for a in MESH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The batch's leading dimension split over `batch_axes(mesh)`."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def fsdp_spec(shape: Sequence[int], fsdp: int, min_size: int = FSDP_MIN_SIZE) -> P:
  """The partition of one leaf: its largest dimension divisible by `fsdp` goes over the
  `fsdp` axis (the last such on ties, the output side of a kernel); small leaves and leaves
  with no divisible dimension stay replicated."""
  if fsdp <= 1 or math.prod(shape) < min_size:
    return P()
  dims = [i for i, s in enumerate(shape) if s % fsdp == 0]
  if not dims:
    return P()
  best = max(dims, key=lambda i: (shape[i], i))
  return P(*[("fsdp" if i == best else None) for i in range(len(shape))])


def state_shardings(tree: chex.ArrayTree, mesh: Mesh,
                    min_size: int = FSDP_MIN_SIZE) -> chex.ArrayTree:
  """A NamedSharding for every leaf of `tree` (arrays or `jax.ShapeDtypeStruct`s): FSDP over
  the mesh's `fsdp` axis where it has one, replicated otherwise."""
  fsdp = dict(mesh.shape).get("fsdp", 1)
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(np.shape(x), fsdp, min_size)),
                      tree)


def bytes_per_device(tree: chex.ArrayTree) -> dict[jax.Device, int]:
  """Bytes of `tree`'s shards held by each of this process's devices."""
  out: dict[jax.Device, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out


def to_host(tree: chex.ArrayTree) -> chex.ArrayTree:
  """The full value of every leaf as numpy on this process. With several processes this is a
  collective (all must call it): sharded leaves are all-gathered across hosts."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def process_batch_rows(mesh: Mesh, global_batch: int) -> np.ndarray:
  """The rows of the global batch that this process's devices hold, in increasing order:
  int64 [global_batch / process_count]. The input pipeline reads exactly these, and
  `jax.make_array_from_process_local_data` places them (it maps a process's slices in
  increasing order onto its local data), so the global batch is the same whatever the
  device order of the mesh, e.g. a TPU slice whose hosts interleave along the data axis."""
  index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  blocks = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
                   for s in index_map.values()})
  rows = np.concatenate([np.arange(a, b) for a, b in blocks])
  check(len(rows) * jax.process_count() == global_batch,
        f"mesh: this process's devices hold {len(rows)} rows of the batch of {global_batch}, "
        f"expected {global_batch // jax.process_count()}")
  return rows
