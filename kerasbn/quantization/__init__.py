"""Int8 numerics of folded models, and cross-layer equalization.

- `kerasbn.quantization_report(model, data)`: per linear layer of the
  folded model, the weight range spread folding left, per-tensor vs
  per-channel int8 SQNR, degenerate channels, output SQNR on data, and
  what to do (`report`).
- `kerasbn.equalize(model)`: cross-layer equalization (Nagel et al.
  2019), an exact rewrite that evens out channel ranges before
  per-tensor int8 (`equalize`); `kerasbn.export(..., equalize=True)`
  applies it after folding.

The arithmetic of the int8 schemes is in `_arrays` (NumPy only).
"""

from kerasbn.quantization.equalize import EqualizationResult
from kerasbn.quantization.equalize import equalize
from kerasbn.quantization.report import QuantizationEntry
from kerasbn.quantization.report import QuantizationReport
from kerasbn.quantization.report import quantization_report

__all__ = ["EqualizationResult", "QuantizationEntry", "QuantizationReport",
           "equalize", "quantization_report"]
