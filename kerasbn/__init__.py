"""kerasbn: batch normalization for Keras 3, and the tools to fold it away.

- `kerasbn.layers`: BatchNormalization (zero-debiased statistics),
  BatchRenormalization (with its schedule), MovingAverageBatchNormalization
  (MABN) and weight-centred convolutions, ScaleShift.
- `kerasbn.fold(model)`: fold every foldable BN into its neighbours
  (`kerasbn.folding` holds the machinery).
- `kerasbn.export(model, directory)`: fold, export to SavedModel / ONNX /
  Keras / TFLite, verify each artifact in its own runtime
  (`kerasbn.exporting`).
- `kerasbn.recalibrate`, `freeze`, `unfreeze`, `diagnose`,
  `load_tf1_batch_norm`: statistics tools (`kerasbn.stats`).
- `kerasbn.convert_to_mabn(model)`: BN model -> MABN + centred convolutions.
- `kerasbn.registry`: what every tool knows about layers; one
  `register_normalization` call teaches all of them a new kind.

>>> import kerasbn
>>> layer = kerasbn.layers.BatchNormalization(zero_debias="mean")
"""

from kerasbn import layers
from kerasbn import registry
from kerasbn import rules
from kerasbn.convert import ConversionResult
from kerasbn.convert import convert_to_mabn
from kerasbn.exporting import ExportError
from kerasbn.exporting import ExportResult
from kerasbn.exporting import VerificationError
from kerasbn.exporting import export
from kerasbn.folding import FoldResult
from kerasbn.folding import fold
from kerasbn.folding import strip_normalization
from kerasbn.registry import register_linear
from kerasbn.registry import register_normalization
from kerasbn import stats
from kerasbn.stats import diagnose
from kerasbn.stats import freeze
from kerasbn.stats import load_tf1_batch_norm
from kerasbn.stats import recalibrate
from kerasbn.stats import unfreeze

__version__ = "0.1.0"

__all__ = [
    "ConversionResult",
    "ExportError",
    "ExportResult",
    "FoldResult",
    "VerificationError",
    "__version__",
    "convert_to_mabn",
    "diagnose",
    "export",
    "fold",
    "freeze",
    "layers",
    "load_tf1_batch_norm",
    "recalibrate",
    "register_linear",
    "register_normalization",
    "registry",
    "rules",
    "stats",
    "strip_normalization",
    "unfreeze",
]
