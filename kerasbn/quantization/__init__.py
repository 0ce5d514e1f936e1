"""Int8 numerics of folded models, and cross-layer equalization.

- `kerasbn.quantization_report(model, data)`: per linear layer of the
  folded model, the weight range spread folding left, per-tensor vs
  per-channel int8 SQNR, degenerate channels, output SQNR on data, and
  what to do (`report`).
- `kerasbn.equalize(model)`: cross-layer equalization (Nagel et al.
  2019), an exact rewrite that evens out channel ranges before
  per-tensor int8 (`equalize`); `kerasbn.export(..., equalize=True)`
  applies it after folding.

- `kerasbn.quantization.prepare_qat(model)`: quantization-aware training
  with batch normalization folded in training (Krishnamoorthi 2018), with
  `freeze_batch_statistics`, `freeze_ranges` and the `FreezeBatchStatistics`
  callback; `kerasbn.export` writes the integer artifacts it trained for
  (`qat`; the layers are `kerasbn.layers.quantized`).

The arithmetic of the int8 schemes is in `_arrays` (NumPy only).
"""

from kerasbn.quantization.equalize import EqualizationResult
from kerasbn.quantization.equalize import equalize
from kerasbn.quantization.report import QuantizationEntry
from kerasbn.quantization.report import QuantizationReport
from kerasbn.quantization.qat import FreezeBatchStatistics
from kerasbn.quantization.qat import QATSummary
from kerasbn.quantization.qat import freeze_batch_statistics
from kerasbn.quantization.qat import freeze_ranges
from kerasbn.quantization.qat import prepare_qat
from kerasbn.layers.quantized import ActivationQuantizer
from kerasbn.layers.quantized import QuantizedLinear
from kerasbn.quantization.report import quantization_report

__all__ = ["ActivationQuantizer", "EqualizationResult",
           "FreezeBatchStatistics", "QATSummary", "QuantizationEntry",
           "QuantizationReport", "QuantizedLinear", "equalize",
           "freeze_batch_statistics", "freeze_ranges", "prepare_qat",
           "quantization_report"]
