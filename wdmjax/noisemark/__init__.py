"""Generation-time watermarks in the initial noise, for comparison with WDM and Stable
Signature: Tree-Ring (a ring key in the noise's Fourier transform) and Gaussian Shading
(message bits in the noise's signs through a stream cipher). Both are detected by DDIM
inversion (`wdmjax.diffusion.inversion`) with the owner's model."""

from wdmjax.noisemark import gaussian_shading, tree_ring
from wdmjax.noisemark.gaussian_shading import GaussianShadingKey
from wdmjax.noisemark.tree_ring import TreeRingKey

__all__ = ["GaussianShadingKey", "TreeRingKey", "gaussian_shading", "tree_ring"]
