"""CARE: Contrastive Augmentation-induced Rotational Equivariance."""

from care.errors import CareError

__version__ = "0.1.0"
__all__ = ["CareError", "__version__"]
