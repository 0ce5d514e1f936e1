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

from kerasbn import stats
from kerasbn.stats import recalibrate
from kerasbn.stats import freeze
from kerasbn.stats import unfreeze
from kerasbn.stats import diagnose
from kerasbn.stats import load_tf1_batch_norm

__version__ = "0.1.0"

__all__ = ["layers", "fold", "FoldResult", "export", "ExportResult",
           "convert_to_mabn", "ConversionResult", "__version__"]
__all__ += ["stats", "recalibrate", "freeze", "unfreeze", "diagnose",
            "load_tf1_batch_norm"]
