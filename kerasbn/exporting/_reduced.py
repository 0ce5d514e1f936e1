"""Reduced-precision artifacts: calibration data in, fit-for-purpose checks.

int8 and float16 artifacts cannot match the float model to 1e-4; what
matters is whether they give the same answers. Each is checked on real
inputs (`validation=`, else the calibration data) by:

- top-1 agreement with the float model, for outputs shaped like class
  scores (`[batch, classes]`, classes > 1): the share of samples whose
  argmax is the same;
- relative RMS error of every output: RMS(artifact - float) / RMS(float);
- for int8, the worst layer: the folded layer whose weights (in the
  artifact's scheme) and output (uint8, per tensor, ranges from the
  validation data) lose most in int8 arithmetic, by SQNR
  (`kerasbn.quantization_report`, simulated on the float model).

An artifact passes when its agreement is at least `min_agreement` and its
worst relative RMS error at most `max_rel_rms`.

The quantizers are the runtimes' own (onnxruntime.quantization, the
TFLite converter): kerasbn only feeds them the folded model and the
calibration batches, and checks the result.
"""

import numpy as np

from kerasbn import _batches
from kerasbn import _checks

INT8_FORMATS = ("onnx_int8", "tflite_int8")
FP16_FORMATS = ("onnx_fp16", "tflite_fp16")
REDUCED_FORMATS = INT8_FORMATS + FP16_FORMATS
DEFAULT_MIN_AGREEMENT = 0.98
# Relative RMS error bounds when `max_rel_rms` is not given. int8: one
# quantization step is 1/255 of a tensor's range, and ~50 layers of
# per-channel int8 (ONNX Runtime, ResNet50) gave 1.3% here (issue 17);
# 10% still catches a broken artifact (a wrong scale is off by O(1)).
# float16: 11-bit mantissa, rounding 5e-4 per op, 1% leaves the margin
# of a deep network.
DEFAULT_MAX_REL_RMS = {"int8": 0.1, "fp16": 0.01}


def precision(fmt):
    """"int8", "fp16", or None for a float32 format."""
    if fmt in INT8_FORMATS:
        return "int8"
    if fmt in FP16_FORMATS:
        return "fp16"
    return None


def check_thresholds(min_agreement, max_rel_rms, where):
    _checks.check_number("min_agreement", min_agreement, 0.0, 1.0,
                         where=where, hint="It is a share of samples, "
                         f"default {DEFAULT_MIN_AGREEMENT}.")
    if max_rel_rms is not None:
        _checks.check_number("max_rel_rms", max_rel_rms, 0.0, where=where,
                             low_open=True, hint="It bounds RMS(artifact - "
                             "float) / RMS(float) of every output.")


def read_batches(signature, data, what, where):
    """`data` as a list of flat input batches for `signature`'s inputs,
    checked (`kerasbn._batches.read_batches`)."""
    return _batches.read_batches(signature.inputs(), data, what, where,
                                 cli_flag=f"--{what}")


joined = _batches.joined


def agreement(reference, outputs):
    """Top-1 agreement over the class-score-shaped outputs, or None."""
    shares = []
    for ref, out in zip(reference, outputs):
        ref, out = np.asarray(ref), np.asarray(out)
        if ref.ndim == 2 and ref.shape[1] > 1 and out.shape == ref.shape:
            shares.append(float(np.mean(np.argmax(ref, axis=1)
                                        == np.argmax(out, axis=1))))
    return min(shares) if shares else None


def relative_rms(reference, outputs):
    """The worst RMS(out - ref) / RMS(ref) over the outputs (inf on a
    shape mismatch or a non-finite value)."""
    worst = 0.0
    if len(reference) != len(outputs):
        return float("inf")
    for ref, out in zip(reference, outputs):
        ref = np.asarray(ref, np.float64)
        out = np.asarray(out, np.float64)
        if ref.shape != out.shape or not np.isfinite(out).all():
            return float("inf")
        if not ref.size:
            continue
        scale = np.sqrt(np.mean(ref ** 2))
        error = np.sqrt(np.mean((out - ref) ** 2))
        worst = max(worst, float(error / scale) if scale > 0
                    else float(error))
    return worst


def worst_layer(fmt, numerics, reduced):
    """`{"layer", "sqnr_db"}` of the layer with the lowest simulated int8
    SQNR (weights in the scheme `fmt` uses, its output per tensor), or
    None (float16, or no report)."""
    if numerics is None or precision(fmt) != "int8":
        return None
    per_channel = fmt == "tflite_int8" or reduced.get("per_channel", True)
    entry = numerics.worst_for(per_channel)
    if entry is None:
        return None
    return {"layer": entry.layer, "sqnr_db": entry.sqnr(per_channel)}


def check(fmt, reference, outputs, min_agreement, max_rel_rms, worst=None):
    """One verification record for a reduced-precision artifact."""
    bound = (DEFAULT_MAX_REL_RMS[precision(fmt)] if max_rel_rms is None
             else max_rel_rms)
    share = agreement(reference, outputs)
    rms = relative_rms(reference, outputs)
    passed = rms <= bound and (share is None or share >= min_agreement)
    return {"format": fmt, "batch": int(np.shape(reference[0])[0]),
            "agreement": share, "rel_rms": rms,
            "min_agreement": min_agreement, "max_rel_rms": bound,
            "worst_layer": worst, "passed": bool(passed)}
