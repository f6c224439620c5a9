"""Config `cifar10_dit_s2`: see wdmjax.train.presets.cifar10_dit_s2 for the values and why."""

from wdmjax.train.presets import cifar10_dit_s2


def get_config():
  return cifar10_dit_s2()
