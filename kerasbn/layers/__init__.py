"""kerasbn's normalization layers, drop-in in any Keras 3 model."""

from kerasbn.layers.batch_normalization import BatchNormalization

__all__ = ["BatchNormalization"]
