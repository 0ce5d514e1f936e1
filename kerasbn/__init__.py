"""kerasbn: batch normalization for Keras 3, and the tools to fold it away.

>>> import kerasbn
>>> layer = kerasbn.layers.BatchNormalization(zero_debias="mean")
"""

from kerasbn import layers

__version__ = "0.1.0"

__all__ = ["layers", "__version__"]
