"""Config `dit_xl2_imagenet256`: see wdmjax.train.presets.dit_xl2_imagenet256 for the values
and why."""

from wdmjax.train.presets import dit_xl2_imagenet256


def get_config():
  return dit_xl2_imagenet256()
