"""In-memory input pipeline: preprocessing, step-addressed batches, device sharding.

A batch is a pure function of the step: the example stream is the concatenation of
seeded per-epoch permutations, the global batch at step s is stream positions
[s*B, (s+1)*B), and process p takes the contiguous slice [p*B/P, (p+1)*B/P) of it.
Training therefore resumes bit-for-bit from any step and every host reads its own
disjoint share without coordination.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from wdmjax.data.sources import load_arrays, load_source
from wdmjax.errors import WdmjaxError

# Images are resized this many at a time, to bound the memory of the float copies.
_RESIZE_CHUNK = 1024
# Per-epoch permutations kept; a batch straddles at most a few epochs.
_PERM_CACHE = 4


def _is_int(x) -> bool:
  return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def preprocess(images: np.ndarray, resolution: int, channels: int) -> np.ndarray:
  """uint8 images -> float32 in [-1, 1] at `resolution` with `channels` channels.

  Images a little smaller than the target (by at most a quarter of `resolution` per
  side, e.g. 28 -> 32) are padded symmetrically with black, keeping the pixels exact;
  otherwise non-square images are centre-cropped to a square and resized bilinearly
  (antialiased when shrinking). Grey becomes RGB by repetition, RGB grey by the mean.

  Args:
    images: uint8 [N, H, W, C] with C in {1, 3}.
    resolution: target side R >= 1.
    channels: 1 or 3.

  Returns:
    float32 [N, R, R, channels] in [-1, 1].
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise WdmjaxError(f'images: expected shape [N, H, W, C], got shape {images.shape}')
  if images.dtype != np.uint8:
    raise WdmjaxError(f'images: expected dtype uint8, got {images.dtype}')
  if images.shape[-1] not in (1, 3):
    raise WdmjaxError(f'images: expected 1 or 3 channels, got shape {images.shape}')
  if not _is_int(resolution) or resolution < 1:
    raise WdmjaxError(f'resolution: expected an int >= 1, got {resolution!r}')
  if not _is_int(channels) or channels not in (1, 3):
    raise WdmjaxError(f'channels: expected 1 or 3, got {channels!r}')
  n, h, w, c = images.shape
  r = int(resolution)
  if c == 3 and channels == 1:
    # Mean before the spatial step, which is linear, so the order does not matter.
    x = images.astype(np.float32).mean(axis=-1, keepdims=True)
  else:
    x = images.astype(np.float32)
  x = x / 127.5 - 1.0

  pad_h, pad_w = r - h, r - w
  if 0 <= pad_h <= r / 4 and 0 <= pad_w <= r / 4:
    # Black is -1 after scaling.
    x = np.pad(
        x,
        ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2), (0, 0)),
        constant_values=-1.0,
    )
  else:
    if h != w:
      side = min(h, w)
      top, left = (h - side) // 2, (w - side) // 2
      x = x[:, top:top + side, left:left + side]
    out = np.empty((n, r, r, x.shape[-1]), np.float32)
    for i in range(0, n, _RESIZE_CHUNK):
      chunk = x[i:i + _RESIZE_CHUNK]
      out[i:i + len(chunk)] = jax.image.resize(chunk, (len(chunk), r, r, chunk.shape[-1]),
                                               'bilinear')
    x = np.clip(out, -1.0, 1.0)  # guards against rounding past the ends

  if x.shape[-1] == 1 and channels == 3:
    x = np.repeat(x, 3, axis=-1)
  return np.ascontiguousarray(x, dtype=np.float32)


def prepare_images(images: np.ndarray, resolution: int, channels: int) -> np.ndarray:
  """`preprocess` for uint8 images; float arrays are latents, taken as they are.

  Latents (e.g. `imagenet_latents/256`) are already what the model sees, so they cannot be
  resized or recoloured: their shape must be [N, resolution, resolution, channels].
  """
  images = np.asarray(images)
  if not np.issubdtype(images.dtype, np.floating):
    return preprocess(images, resolution, channels)
  want = (resolution, resolution, channels)
  if images.ndim != 4 or images.shape[1:] != want:
    raise WdmjaxError(
        f'data.resolution, data.channels: the data set holds latents of shape '
        f'{images.shape[1:]}, expected {want}; set data.resolution={images.shape[1]} '
        f'data.channels={images.shape[-1]}'
    )
  return np.ascontiguousarray(images, dtype=np.float32)


class InputPipeline:
  """Step-addressed batches of a data set, held in memory (preprocessed once) or read by
  random access batch by batch (`in_memory=False`, for data sets larger than a host's
  memory: each process then reads only the examples of its own share of each batch).

  `batch(step)` is a pure function of `step` (see the module docstring), so a run
  resumed at step s sees exactly the batches it would have seen, and the P processes'
  local batches concatenate, in process order, to the single-process global batch.

  Args:
    name: data set name for `load_source` (`mnist5k`, `digits`, or a prepared TFDS set).
    batch_size: global batch size B, divisible by `process_count`.
    resolution: image side R after `preprocess`.
    channels: 1 or 3.
    seed: non-negative seed of the per-epoch permutations.
    labels: keep only these classes (original label ids are kept); None keeps all.
    split: TFDS split string.
    data_dir: TFDS data directory (default: see `wdmjax.data.default_data_dir`).
    process_index: this process, default `jax.process_index()`.
    process_count: number of processes P, default `jax.process_count()`.
    in_memory: load and preprocess the whole split once (small sets), or read each batch
      from the array_record files (large sets; `labels` filtering needs in_memory).
  """

  def __init__(
      self,
      name: str,
      batch_size: int,
      resolution: int,
      channels: int,
      seed: int = 0,
      labels: Sequence[int] | None = None,
      split: str = 'train',
      data_dir: str | os.PathLike | None = None,
      process_index: int | None = None,
      process_count: int | None = None,
      in_memory: bool = True,
  ):
    process_count = jax.process_count() if process_count is None else process_count
    process_index = jax.process_index() if process_index is None else process_index
    if not _is_int(process_count) or process_count < 1:
      raise WdmjaxError(f'process_count: expected an int >= 1, got {process_count!r}')
    if not _is_int(process_index) or not 0 <= process_index < process_count:
      raise WdmjaxError(
          f'process_index: expected an int in [0, {process_count}), got {process_index!r}'
      )
    if not _is_int(batch_size) or batch_size < 1 or batch_size % process_count:
      raise WdmjaxError(
          f'batch_size: expected a positive multiple of process_count={process_count}, '
          f'got {batch_size!r}'
      )
    if not _is_int(seed) or seed < 0:
      raise WdmjaxError(f'seed: expected a non-negative int, got {seed!r}')

    source = load_source(name, split, data_dir)
    self._num_classes = source.num_classes
    self.name = name
    self.split = split
    self.batch_size = int(batch_size)
    self.resolution = int(resolution)
    self.channels = int(channels)
    self.seed = int(seed)
    self.process_index = int(process_index)
    self.process_count = int(process_count)
    self.local_batch_size = self.batch_size // self.process_count
    self._perms: dict[int, np.ndarray] = {}
    self.in_memory = bool(in_memory)
    if not self.in_memory:
      if labels is not None:
        raise WdmjaxError(
            f'labels: filtering classes needs data.in_memory=True, got labels={list(labels)!r}'
        )
      if len(source) == 0:
        raise WdmjaxError(f'split: expected a non-empty split of {name!r}, got {split!r}')
      self._source, self._num = source, len(source)
      self.batch(0)  # a clear error now for a shape the model cannot take
      return
    images, all_labels = load_arrays(name, split, data_dir)
    if labels is not None:
      keep = np.unique(np.asarray(list(labels), dtype=np.int64))
      mask = np.isin(all_labels, keep)
      if not mask.any():
        present = np.unique(all_labels).tolist()
        raise WdmjaxError(
            f'labels: expected classes present in {name!r} {split!r} (one of {present}), '
            f'got {list(labels)!r}, which leaves no examples'
        )
      images, all_labels = images[mask], all_labels[mask]

    self._images = prepare_images(images, resolution, channels)
    self._labels = np.ascontiguousarray(all_labels, dtype=np.int32)
    self._images.flags.writeable = False
    self._labels.flags.writeable = False
    self._num = len(self._labels)

  @property
  def num_examples(self) -> int:
    """Examples per epoch (after the label filter)."""
    return self._num

  @property
  def num_classes(self) -> int:
    """Classes of the data set (the label space, not only those kept by `labels`)."""
    return self._num_classes

  @property
  def steps_per_epoch(self) -> float:
    """Global steps per pass over the data (not necessarily whole)."""
    return self.num_examples / self.batch_size

  def _permutation(self, epoch: int) -> np.ndarray:
    perm = self._perms.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
      if len(self._perms) >= _PERM_CACHE:
        self._perms.pop(next(iter(self._perms)))
      self._perms[epoch] = perm
    return perm

  def indices(self, step: int) -> np.ndarray:
    """Example indices of this process's batch at `step`: int64 [B_local]."""
    if not _is_int(step) or step < 0:
      raise WdmjaxError(f'step: expected a non-negative int, got {step!r}')
    n = self.num_examples
    start = int(step) * self.batch_size + self.process_index * self.local_batch_size
    stop = start + self.local_batch_size
    parts = []
    pos = start
    while pos < stop:  # the slice may straddle several epochs
      epoch, offset = divmod(pos, n)
      take = min(stop - pos, n - offset)
      parts.append(self._permutation(epoch)[offset:offset + take])
      pos += take
    return np.concatenate(parts).astype(np.int64, copy=False)

  def batch(self, step: int, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """This process's batch at `step`, or only its `rows` (positions in that batch; only
    those examples are read, e.g. the rows of the global batch a host's devices hold).

    Returns:
      `image`: float32 [B_local, R, R, C] in [-1, 1]; `label`: int32 [B_local] (B_local =
      len(rows) with rows).
    """
    idx = self.indices(step)
    if rows is not None:
      rows = np.asarray(rows)
      if rows.ndim != 1 or rows.size == 0 or rows.min() < 0 or rows.max() >= len(idx):
        raise WdmjaxError(
            f'rows: expected a non-empty 1-D array of positions in [0, {len(idx)}), got '
            f'shape {rows.shape}'
        )
      idx = idx[rows]
    if self.in_memory:
      return {'image': self._images[idx], 'label': self._labels[idx]}
    examples = self._source.__getitems__(idx.tolist())
    images = prepare_images(np.stack([e['image'] for e in examples]), self.resolution,
                            self.channels)
    return {'image': images, 'label': np.asarray([e['label'] for e in examples], np.int32)}

  def iterate(self, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches of steps start_step, start_step + 1, ... (endless)."""
    if not _is_int(start_step) or start_step < 0:
      raise WdmjaxError(f'start_step: expected a non-negative int, got {start_step!r}')
    step = int(start_step)
    while True:
      yield self.batch(step)
      step += 1

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self.iterate(0)

  def __repr__(self) -> str:
    return (
        f'InputPipeline(name={self.name!r}, split={self.split!r}, n={self.num_examples}, '
        f'batch_size={self.batch_size}, process={self.process_index}/{self.process_count}, '
        f'shape={self._images.shape[1:]})'
    )


def shard_batch(
    batch: Mapping[str, np.ndarray], mesh: Mesh, axis: str | tuple[str, ...] = 'data'
) -> dict[str, jax.Array]:
  """Process-local numpy batch -> global `jax.Array`s split along the leading dim.

  Args:
    batch: dict of arrays [B_local, ...], one leading size for all.
    mesh: the device mesh; `axis` must be one of its axes, spanning the processes.
    axis: the mesh axis (or axes, e.g. `('data', 'fsdp')`) that split the batch.

  Returns:
    dict of jax.Array [B_local * process_count, ...] with sharding
    `NamedSharding(mesh, P(axis))`.
  """
  axes = (axis,) if isinstance(axis, str) else tuple(axis)
  if not axes or any(a not in mesh.axis_names for a in axes):
    raise WdmjaxError(f'axis: expected one of the mesh axes {mesh.axis_names}, got {axis!r}')
  sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in batch.items()}
  if not sizes or len(set(sizes.values())) != 1 or None in sizes.values():
    raise WdmjaxError(
        f'batch: expected a non-empty dict of arrays with one leading size, got sizes {sizes}'
    )
  local = next(iter(sizes.values()))
  global_size = local * jax.process_count()
  axis_size = int(np.prod([mesh.shape[a] for a in axes]))
  if global_size % axis_size:
    raise WdmjaxError(
        f'batch: expected a global batch size divisible by mesh axis {axis!r} of size '
        f'{axis_size}, got {global_size}'
    )
  sharding = NamedSharding(mesh, PartitionSpec(axes))
  return {
      k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
      for k, v in batch.items()
  }
