"""kerasbn's normalization layers, drop-in in any Keras 3 model."""

from kerasbn.layers.batch_normalization import BatchNormalization
from kerasbn.layers.batch_renormalization import BatchRenormalization
from kerasbn.layers.scale_shift import ScaleShift

__all__ = ["BatchNormalization", "BatchRenormalization", "ScaleShift"]
