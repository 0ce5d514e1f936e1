"""kerasbn: batch normalization for Keras 3, and the tools to fold it away.

- `kerasbn.layers`: BatchNormalization (zero-debiased statistics),
  BatchRenormalization (with its schedule), MovingAverageBatchNormalization
  (MABN) and weight-centred convolutions, ScaleShift.
- `kerasbn.fold(model)`: fold every foldable BN into its neighbours.
- `kerasbn.export(model, directory)`: fold, export to SavedModel / ONNX /
  Keras / TFLite, verify each artifact in its own runtime.
- `kerasbn.recalibrate`, `freeze`, `unfreeze`, `diagnose`,
  `load_tf1_batch_norm`: statistics tools.
- `kerasbn.convert_to_mabn(model)`: BN model -> MABN + centred convolutions.

>>> import kerasbn
>>> layer = kerasbn.layers.BatchNormalization(zero_debias="mean")
"""

from kerasbn import layers
from kerasbn import fold
from kerasbn import export
from kerasbn import stats
from kerasbn.convert import ConversionResult
from kerasbn.convert import convert_to_mabn
from kerasbn.export import ExportResult
from kerasbn.fold import FoldResult
from kerasbn.stats import diagnose
from kerasbn.stats import freeze
from kerasbn.stats import load_tf1_batch_norm
from kerasbn.stats import recalibrate
from kerasbn.stats import unfreeze

__version__ = "0.1.0"

__all__ = [
    "ConversionResult",
    "ExportResult",
    "FoldResult",
    "__version__",
    "convert_to_mabn",
    "diagnose",
    "export",
    "fold",
    "freeze",
    "layers",
    "load_tf1_batch_norm",
    "recalibrate",
    "stats",
    "unfreeze",
]
