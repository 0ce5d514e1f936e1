"""kerasbn's normalization layers, drop-in in any Keras 3 model.

>>> import numpy as np, kerasbn
>>> tuple(kerasbn.layers.MABN()(np.ones((2, 3), "float32")).shape)
(2, 3)
"""

from kerasbn.layers.batch_normalization import BatchNormalization
from kerasbn.layers.batch_renormalization import BatchRenormalization
from kerasbn.layers.centered import CenteredConv1D
from kerasbn.layers.centered import CenteredConv2D
from kerasbn.layers.centered import CenteredConv3D
from kerasbn.layers.centered import CenteredDense
from kerasbn.layers.mabn import MABN
from kerasbn.layers.mabn import MovingAverageBatchNormalization
from kerasbn.layers.quantized import ActivationQuantizer
from kerasbn.layers.quantized import QuantizedLinear
from kerasbn.layers.scale_shift import ScaleShift
from kerasbn.layers.tf_function import TFFunction

__all__ = [
    "ActivationQuantizer",
    "BatchNormalization",
    "BatchRenormalization",
    "CenteredConv1D",
    "CenteredConv2D",
    "CenteredConv3D",
    "CenteredDense",
    "MABN",
    "MovingAverageBatchNormalization",
    "QuantizedLinear",
    "ScaleShift",
    "TFFunction",
]
