"""Config `cifar10_unet`: see wdmjax.train.presets.cifar10_unet for the values and why."""

from wdmjax.train.presets import cifar10_unet


def get_config():
  return cifar10_unet()
