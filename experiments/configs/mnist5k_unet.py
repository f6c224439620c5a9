"""Config `mnist5k_unet`: see wdmjax.train.presets.mnist5k_unet for the values and why."""

from wdmjax.train.presets import mnist5k_unet


def get_config():
  return mnist5k_unet()
