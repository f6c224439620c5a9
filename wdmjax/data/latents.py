"""Latent data sets: pre-encoded VAE latents (e.g. ImageNet through the Stable Diffusion VAE),
the input of latent diffusion models such as DiT-XL/2.

Encoding needs the VAE and the images, which stay outside wdmjax: encode each image with the
VAE's encoder (DiT: `stabilityai/sd-vae-ft-ema`, a sample of the posterior times 0.18215),
and write shards `*.npz` with `latents` float [N, R, R, 4] (R = image side / 8) and
`labels` int [N] into one directory. `prepare_latents` (or `wdmjax latents`) turns them
into a TFDS array_record data set, `imagenet_latents/256` (R = 32) or `imagenet_latents/512`
(R = 64), which the input pipeline reads by random access, each host only its own examples.

`ae_latents/<data>` holds the same for wdmjax's own small autoencoder
(`wdmjax.models.autoencoder`): `wdmjax autoencoder train` encodes an embedded image set
(`mnist5k`: 7x7x4 latents, 10 classes; `photos32`: 8x8x4, 1 class) and builds it with
`prepare_ae_latents` into the autoencoder's workdir.
"""

from __future__ import annotations

import glob
import os
import shutil
import stat
import zipfile

import numpy as np
import tensorflow_datasets as tfds

from wdmjax.data.builders import FILE_FORMAT, resolve_data_dir
from wdmjax.errors import WdmjaxError

LATENT_CHANNELS = 4
NUM_CLASSES = 1000
F16_MAX = float(np.finfo(np.float16).max)  # 65504: the sets store float16


class LatentConfig(tfds.core.BuilderConfig):
  def __init__(self, *, image_size: int, **kwargs):
    super().__init__(name=str(image_size), **kwargs)
    self.image_size = image_size
    self.latent_size = image_size // 8


class ImagenetLatents(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """ImageNet as VAE latents: image float16 [R, R, 4] (the latent), label 0..999."""

  name = 'imagenet_latents'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [LatentConfig(image_size=256), LatentConfig(image_size=512)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = __doc__
  code_path = tfds.core.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    r = self.builder_config.latent_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'ImageNet {self.builder_config.image_size}px encoded by a VAE to '
                    f'{r}x{r}x{LATENT_CHANNELS} latents (scaled as the diffusion model sees them).',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(r, r, LATENT_CHANNELS), dtype=np.float16),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
    return {'train': self._generate_examples(os.fspath(dl_manager.manual_dir))}

  def _generate_examples(self, manual_dir: str):
    return _shard_examples(manual_dir, self.builder_config.latent_size, NUM_CLASSES)


class AeLatentConfig(tfds.core.BuilderConfig):
  def __init__(self, *, name: str, latent_size: int, num_classes: int, **kwargs):
    super().__init__(name=name, **kwargs)
    self.latent_size = latent_size
    self.num_classes = num_classes


class AeLatents(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """An embedded image set as latents of wdmjax's autoencoder: image float16 [r, r, 4] (scaled
  as the latent diffusion model sees them), label."""

  name = 'ae_latents'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [AeLatentConfig(name='mnist5k', latent_size=7, num_classes=10),
                     AeLatentConfig(name='photos32', latent_size=8, num_classes=1)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Built by `wdmjax autoencoder train` (see wdmjax.data.latents).'
  code_path = tfds.core.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    c = self.builder_config
    r = c.latent_size
    return tfds.core.DatasetInfo(
        builder=self,
        description=f'{c.name} encoded by a wdmjax autoencoder to {r}x{r}x{LATENT_CHANNELS} '
                    f'latents (scaled as the diffusion model sees them).',
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(r, r, LATENT_CHANNELS), dtype=np.float16),
            'label': tfds.features.ClassLabel(num_classes=c.num_classes),
        }),
        supervised_keys=('image', 'label'),
        disable_shuffling=True,  # example i is image i of the source set
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
    return {'train': self._generate_examples(os.fspath(dl_manager.manual_dir))}

  def _generate_examples(self, manual_dir: str):
    c = self.builder_config
    return _shard_examples(manual_dir, c.latent_size, c.num_classes)


def _shard_examples(manual_dir: str, r: int, num_classes: int):
  """(key, example) of every latent of the shards in `manual_dir`, in shard order."""
  for path in latent_shards(manual_dir):
    with np.load(path) as z:
      latents, labels = z['latents'], z['labels']
    _check_shard(path, latents.shape, latents.dtype, labels, r, num_classes)
    stem = os.path.basename(path)
    for i, (x, y) in enumerate(zip(latents.astype(np.float16), labels, strict=True)):
      yield f'{stem}:{i}', {'image': x, 'label': int(y)}


def latent_shards(directory: str) -> list[str]:
  """The *.npz shards in `directory`, sorted; each a regular file (a FIFO would block the
  reader forever)."""
  if not os.path.isdir(directory):
    raise WdmjaxError(f'--npz-dir: expected a directory of *.npz latent shards, got '
                      f'{directory!r}')
  paths = sorted(glob.glob(os.path.join(glob.escape(directory), '*.npz')))
  if not paths:
    raise WdmjaxError(f'--npz-dir: expected *.npz latent shards in {directory!r}, found none')
  for path in paths:
    try:
      regular = stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
      regular = False
    if not regular:
      raise WdmjaxError(f'{path}: expected a regular .npz file of latents, got a special file '
                        f'or a broken link')
  return paths


def _check_values(path: str, latents: np.ndarray) -> None:
  """Refuses latents that are NaN, infinite, or beyond float16 (the set stores float16: they
  would become inf), naming the shard, the array and the first bad example."""
  bad = np.flatnonzero(~np.all(np.isfinite(latents.reshape(len(latents), -1)), axis=1))
  if bad.size:
    raise WdmjaxError(f'{path}: array `latents`: expected finite values, got NaN or inf in '
                      f'example {bad[0]} ({bad.size} examples in all)')
  big = np.flatnonzero(np.abs(latents.reshape(len(latents), -1)).max(axis=1, initial=0.0)
                       > F16_MAX)
  if big.size:
    raise WdmjaxError(f'{path}: array `latents`: expected values within float16\'s range '
                      f'(|x| <= {F16_MAX:g}), got {np.abs(latents[big[0]]).max():g} in example '
                      f'{big[0]} ({big.size} examples in all)')


def _array_header(zf: zipfile.ZipFile, name: str) -> tuple[tuple, np.dtype]:
  """(shape, dtype) of the array `name` of an open .npz, from its header alone."""
  with zf.open(f'{name}.npy') as f:
    major, _ = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if major == 1
            else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read(f)
  return shape, dtype


def check_shards(paths: list[str], r: int, num_classes: int = NUM_CLASSES) -> None:
  """Reads every shard's array headers, labels and latents (one shard at a time) and raises
  WdmjaxError naming the first bad shard and array, so that a bad one fails before any data
  set file is written: wrong shapes or dtypes, labels out of range, latents that are not
  finite or overflow float16."""
  for path in paths:
    try:
      with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        if not {'latents.npy', 'labels.npy'} <= names:
          raise WdmjaxError(f'{path}: expected arrays `latents` and `labels`, got '
                            f'{sorted(n.removesuffix(".npy") for n in names)}')
        shape, dtype = _array_header(zf, 'latents')
      with np.load(path, allow_pickle=False) as z:
        labels = z['labels']
        _check_shard(path, shape, dtype, labels, r, num_classes)
        _check_values(path, z['latents'])
    except (zipfile.BadZipFile, ValueError, EOFError, KeyError, OSError) as e:
      if isinstance(e, WdmjaxError):
        raise
      raise WdmjaxError(f'{path}: expected a .npz file of latents and labels, got an unreadable '
                        f'file ({type(e).__name__}: {str(e)[:200]})') from None


def _check_shard(path: str, shape: tuple, dtype: np.dtype, labels: np.ndarray, r: int,
                 num_classes: int = NUM_CLASSES) -> None:
  """`shape` and `dtype`: the latents'."""
  want = (r, r, LATENT_CHANNELS)
  if len(shape) != 4 or tuple(shape[1:]) != want or not np.issubdtype(dtype, np.floating):
    raise WdmjaxError(f'{path}: expected `latents` float [N, {r}, {r}, {LATENT_CHANNELS}], got '
                      f'{dtype} {tuple(shape)}')
  if labels.shape != (shape[0],) or not np.issubdtype(labels.dtype, np.integer):
    raise WdmjaxError(f'{path}: expected `labels` int [{shape[0]}], got {labels.dtype} '
                      f'{labels.shape}')
  if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
    raise WdmjaxError(f'{path}: expected labels in [0, {num_classes}), got '
                      f'[{labels.min()}, {labels.max()}]')


PREPARED_BUILDERS = {ImagenetLatents.name: ImagenetLatents, AeLatents.name: AeLatents}


def prepared_builder(name: str, data_dir: str | os.PathLike | None = None
                     ) -> tfds.core.GeneratorBasedBuilder | None:
  """The builder of `imagenet_latents/256`, `ae_latents/mnist5k` (etc.) in `data_dir`, or None
  for other names."""
  base, _, config = name.partition('/')
  if base not in PREPARED_BUILDERS:
    return None
  cls = PREPARED_BUILDERS[base]
  configs = [c.name for c in cls.BUILDER_CONFIGS]
  if config not in configs:
    raise WdmjaxError(f'data.name: expected one of {[f"{base}/{c}" for c in configs]}, '
                      f'got {name!r}')
  return cls(config=config, data_dir=resolve_data_dir(data_dir), file_format=FILE_FORMAT)


def prepare_latents(npz_dir: str, image_size: int = 256,
                    data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
  """Builds `imagenet_latents/{image_size}` in `data_dir` from the shards in `npz_dir`."""
  return _prepare(f'{ImagenetLatents.name}/{image_size}', npz_dir, data_dir)


def prepare_ae_latents(npz_dir: str, config_name: str,
                       data_dir: str | os.PathLike | None = None) -> tfds.core.DatasetBuilder:
  """Builds `ae_latents/{config_name}` (`mnist5k`, `photos32`) in `data_dir` from the shards
  in `npz_dir` (latents float [N, r, r, 4], labels int [N])."""
  return _prepare(f'{AeLatents.name}/{config_name}', npz_dir, data_dir)


def _prepare(name: str, npz_dir: str, data_dir: str | os.PathLike | None
             ) -> tfds.core.DatasetBuilder:
  """Builds the prepared set `name` from latent shards; a failed build leaves nothing."""
  builder = prepared_builder(name, data_dir)
  base, _, config = name.partition('/')
  c = builder.builder_config
  # Clear errors before TFDS starts, and nothing left behind when it fails all the same.
  check_shards(latent_shards(npz_dir), c.latent_size, getattr(c, 'num_classes', NUM_CLASSES))
  root = os.fspath(builder.data_dir_root)
  made = [os.path.join(root, *parts) for parts in (
      (), ('downloads',), (base,), (base, '.config'), (base, config))]
  made = [p for p in made if not os.path.exists(p)]
  try:
    builder.download_and_prepare(
        file_format=FILE_FORMAT,
        download_config=tfds.download.DownloadConfig(manual_dir=npz_dir))
  except BaseException:
    for path in reversed(made):  # the deepest first
      shutil.rmtree(path, ignore_errors=True)
    raise
  return prepared_builder(name, data_dir)
