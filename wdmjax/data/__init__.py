"""Data: TFDS builders for embedded sets, random-access sources, the input pipeline."""

from wdmjax.data.builders import (
    DATA_DIR_ENV,
    EMBEDDED_BUILDERS,
    Digits,
    Mnist5k,
    Photos32,
    default_data_dir,
    embedded_builder,
)
from wdmjax.data.latents import AeLatents, prepare_ae_latents
from wdmjax.data.pipeline import (
    InputPipeline,
    preprocess,
    shard_batch,
)
from wdmjax.data.sources import (
    ImageLabelSource,
    labelled_split,
    load_arrays,
    load_source,
    mnist5k_split,
)

__all__ = [
    'AeLatents',
    'DATA_DIR_ENV',
    'EMBEDDED_BUILDERS',
    'Digits',
    'ImageLabelSource',
    'InputPipeline',
    'Mnist5k',
    'Photos32',
    'default_data_dir',
    'embedded_builder',
    'labelled_split',
    'load_arrays',
    'load_source',
    'mnist5k_split',
    'prepare_ae_latents',
    'preprocess',
    'shard_batch',
]
