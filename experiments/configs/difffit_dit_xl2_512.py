"""Config `difffit_dit_xl2_512`: see wdmjax.train.presets.difffit_dit_xl2_512 for the values
and why."""

from wdmjax.train.presets import difffit_dit_xl2_512


def get_config():
  return difffit_dit_xl2_512()
