"""kerasbn: batch normalization for Keras 3, and the tools to fold it away.

>>> import kerasbn
>>> layer = kerasbn.layers.BatchNormalization(zero_debias="mean")
"""

from kerasbn import layers
from kerasbn import fold
from kerasbn.fold import FoldResult
from kerasbn import export
from kerasbn.export import ExportResult
from kerasbn.convert import ConversionResult
from kerasbn.convert import convert_to_mabn

__version__ = "0.1.0"

__all__ = ["layers", "fold", "FoldResult", "export", "ExportResult",
           "convert_to_mabn", "ConversionResult", "__version__"]
