"""Random-access image sources: the embedded builders or prepared TFDS catalog sets.

Reading goes through `builder.as_data_source`, i.e. array_record random access, so no
TensorFlow is needed. Embedded sets are built on first use; catalog sets (`mnist`,
`cifar10`, `celeb_a`, ...) must have been prepared beforehand with
`tfds build NAME --file_format=array_record`.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from wdmjax.data.builders import EMBEDDED_BUILDERS, embedded_builder, resolve_data_dir
from wdmjax.data.latents import prepared_builder
from wdmjax.errors import WdmjaxError, check

# Examples per `__getitems__` call: large enough to amortise the per-call overhead.
_READ_CHUNK = 1024


class ImageLabelSource:
  """A random-access sequence of `{'image': uint8 [H, W, C], 'label': int}` dicts.

  Wraps a TFDS data source; data sets without a `label` feature (e.g. unconditional
  ones) get label 0 everywhere. Other features are dropped.
  """

  def __init__(self, source: Sequence[dict[str, Any]], num_classes: int, name: str):
    self._source = source
    self.num_classes = num_classes
    self.name = name

  def __len__(self) -> int:
    return len(self._source)

  def _convert(self, example: dict[str, Any]) -> dict[str, Any]:
    image = np.asarray(example['image'])
    if image.ndim == 2:  # some catalog sets store grey images without a channel axis
      image = image[..., None]
    return {'image': image, 'label': int(example.get('label', 0))}

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._convert(self._source[index])

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    getitems = getattr(self._source, '__getitems__', None)
    examples = getitems(list(indices)) if getitems else [self._source[i] for i in indices]
    return [self._convert(e) for e in examples]

  def __repr__(self) -> str:
    return f'ImageLabelSource(name={self.name!r}, len={len(self)})'


def _catalog_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except (tfds.core.registered.DatasetNotFoundError, ValueError) as e:
    raise WdmjaxError(
        f'name: expected an embedded data set {sorted(EMBEDDED_BUILDERS)} or a TFDS '
        f'catalog name, got {name!r}'
    ) from e
  if not builder.is_prepared():
    raise WdmjaxError(
        f'name: data set {name!r} is not prepared in data_dir {data_dir!r}; prepare it '
        f'with `tfds build {name} --data_dir={data_dir} --file_format=array_record`'
    )
  return builder


def _not_prepared(name: str, data_dir: str) -> str:
  """The error of a prepared (latent) set missing from `data_dir`: how to build it."""
  base, _, config = name.partition('/')
  if base == 'ae_latents':
    how = (f'build it with `wdmjax autoencoder train --workdir AE --data {config}` and set '
           f'data.data_dir=AE/tfds')
  else:
    how = (f'build it from latent shards with `wdmjax latents --npz-dir DIR --image-size '
           f'{config} --data-dir {data_dir}`')
  return f'name: data set {name!r} is not prepared in data_dir {data_dir!r}; {how}'


@functools.cache
def _load_source_cached(name: str, split: str, data_dir: str) -> ImageLabelSource:
  if name in EMBEDDED_BUILDERS:
    builder = embedded_builder(name, data_dir)
  elif (builder := prepared_builder(name, data_dir)) is not None:
    if not builder.is_prepared():
      raise WdmjaxError(_not_prepared(name, data_dir))
  else:
    builder = _catalog_builder(name, data_dir)
  features = builder.info.features
  if 'image' not in features:
    raise WdmjaxError(
        f'name: expected a data set with an `image` feature, got {name!r} with features '
        f'{sorted(features.keys())}'
    )
  splits = sorted(builder.info.splits.keys())
  try:
    source = builder.as_data_source(split)
  except NotImplementedError as e:
    fmt = builder.info.file_format.value if builder.info.file_format else None
    raise WdmjaxError(
        f'name: data set {name!r} in {data_dir!r} is stored as {fmt}, expected '
        f'array_record for random access; rebuild it with `tfds build {name} '
        f'--data_dir={data_dir} --file_format=array_record`'
    ) from e
  except (ValueError, KeyError) as e:
    raise WdmjaxError(
        f'split: expected one of {splits} (optionally sliced, e.g. "train[:90%]") for '
        f'{name!r}, got {split!r}'
    ) from e
  label = features['label'] if 'label' in features else None
  num_classes = label.num_classes if isinstance(label, tfds.features.ClassLabel) else 1
  return ImageLabelSource(source, num_classes=num_classes, name=name)


def load_source(
    name: str, split: str = 'train', data_dir: str | os.PathLike | None = None
) -> ImageLabelSource:
  """A random-access source of `{'image': uint8 [H, W, C], 'label': int}` examples.

  Args:
    name: an embedded set (`mnist5k`, `digits`; built into `data_dir` on first use) or a
      TFDS catalog name prepared in `data_dir` as array_record (e.g. `mnist`, `cifar10`).
    split: a TFDS split string, e.g. `train` or `train[:90%]`.
    data_dir: TFDS data directory; default `$WDMJAX_DATA_DIR` or
      `~/.cache/wdmjax/tensorflow_datasets`.

  Cached in-process per (name, split, data_dir).
  """
  if not isinstance(name, str) or not name:
    raise WdmjaxError(f'name: expected a non-empty data set name, got {name!r}')
  if not isinstance(split, str) or not split:
    raise WdmjaxError(f'split: expected a non-empty split string, got {split!r}')
  return _load_source_cached(name, split, resolve_data_dir(data_dir))


@functools.cache
def _load_arrays_cached(name: str, split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
  source = _load_source_cached(name, split, data_dir)
  n = len(source)
  if n == 0:
    raise WdmjaxError(f'split: expected a non-empty split of {name!r}, got {split!r} (0 examples)')
  images, labels = [], []
  for start in range(0, n, _READ_CHUNK):
    for example in source.__getitems__(range(start, min(start + _READ_CHUNK, n))):
      images.append(example['image'])
      labels.append(example['label'])
  shapes = {im.shape for im in images}
  if len(shapes) != 1:
    raise WdmjaxError(
        f'name: expected images of one shape to load {name!r} into memory, got {len(shapes)} '
        f'shapes, e.g. {sorted(shapes)[:3]}'
    )
  images = np.stack(images)
  if not np.issubdtype(images.dtype, np.floating):  # latents stay float
    images = images.astype(np.uint8, copy=False)
  labels = np.asarray(labels, np.int32)
  # Shared by every caller through the cache, so nobody may change them in place.
  images.flags.writeable = False
  labels.flags.writeable = False
  return images, labels


def load_arrays(
    name: str, split: str = 'train', data_dir: str | os.PathLike | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """The whole split in memory: images uint8 [N, H, W, C] (float for latent sets), labels
  int32 [N] (read-only).

  Meant for small data sets. Cached in-process per (name, split, data_dir).
  """
  load_source(name, split, data_dir)  # validates the arguments
  return _load_arrays_cached(name, split, resolve_data_dir(data_dir))


MNIST5K_TRAIN = 4000  # of mnist5k's 5,000 digits (sorted by class: the split is a permutation)


def mnist5k_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The classifier split of mnist5k (LeNet's): (train x, train y, held-out x, held-out y),
  images float32 [N, 28, 28, 1] in [0, 1]; MNIST5K_TRAIN digits train, the other 1,000 are
  held out."""
  images, labels = load_arrays("mnist5k", "train")
  order = np.random.default_rng(seed).permutation(len(labels))
  x = np.asarray(images, np.float32)[order] / 255.0
  y = np.asarray(labels, np.int32)[order]
  n = MNIST5K_TRAIN
  return x[:n], y[:n], x[n:], y[n:]


def labelled_split(name: str, seed: int = 0, held_out: float = 0.2,
                   data_dir: str | os.PathLike | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """A classifier split of a small labelled set: (train x, train y, held-out x, held-out y),
  images float32 [N, H, W, C] in [-1, 1], labels int32.

  mnist5k is split as `mnist5k_split(seed)` (4,000 / 1,000, whatever `held_out`); other sets
  by a `seed` permutation with a `held_out` share (in (0, 1)) held out.
  """
  check(isinstance(held_out, float | int) and 0.0 < held_out < 1.0,
        f"held_out: expected a share in (0, 1), got {held_out!r}")
  if name == "mnist5k":
    x, y, xh, yh = mnist5k_split(seed)
    return x * 2.0 - 1.0, y, xh * 2.0 - 1.0, yh
  images, labels = load_arrays(name, "train", data_dir)
  check(images.dtype == np.uint8, f"name: expected a labelled image set, got {name!r} "
                                  f"(dtype {images.dtype})")
  order = np.random.default_rng(seed).permutation(len(labels))
  x = np.asarray(images, np.float32)[order] / 127.5 - 1.0
  y = np.asarray(labels, np.int32)[order]
  n = len(y) - max(1, int(round(held_out * len(y))))
  return x[:n], y[:n], x[n:], y[n:]
