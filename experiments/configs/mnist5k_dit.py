"""Config `mnist5k_dit`: see wdmjax.train.presets.mnist5k_dit for the values and why."""

from wdmjax.train.presets import mnist5k_dit


def get_config():
  return mnist5k_dit()
