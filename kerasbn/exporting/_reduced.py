"""Reduced-precision artifacts: calibration data in, fit-for-purpose checks.

int8 and float16 artifacts cannot match the float model to 1e-4; what
matters is whether they give the same answers. Each is checked on real
inputs (`validation=`, else the calibration data) by:

- top-1 agreement with the float model, for outputs shaped like class
  scores (`[batch, classes]`, classes > 1): the share of samples whose
  argmax is the same;
- relative RMS error of every output: RMS(artifact - float) / RMS(float).

An artifact passes when its agreement is at least `min_agreement` and its
worst relative RMS error at most `max_rel_rms`.

The quantizers are the runtimes' own (onnxruntime.quantization, the
TFLite converter): kerasbn only feeds them the folded model and the
calibration batches, and checks the result.
"""

import numpy as np

from kerasbn import _checks
from kerasbn.exporting import _pipeline

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
CALIBRATION_BATCH = 32


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
    """`data` as a list of flat input batches, checked.

    `data`: arrays (one, a list in the model's input order, or a dict by
    input name; cut into batches of 32), or an iterable of such batches
    (a `tf.data.Dataset`, a generator; `(x, y)` pairs give their `x`).
    Every batch must fit the model's inputs and hold only finite values;
    there must be at least one sample. Errors name `what` (the argument).
    """
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        raise TypeError(
            f"{where}: argument `{what}` must be arrays (NumPy, a list or a "
            "dict by input name), a tf.data.Dataset or a generator of "
            f"batches, not a path ({data!r}); load the file first (e.g. "
            "dict(np.load(path))) or use the CLI's --calibration.")
    if _is_arrays(data):
        flat = _flatten(signature, data, what, where, 0)
        total = flat[0].shape[0]
        batches = [[a[i:i + CALIBRATION_BATCH] for a in flat]
                   for i in range(0, total, CALIBRATION_BATCH)]
    else:
        try:
            iterator = iter(data)
        except TypeError:
            raise TypeError(
                f"{where}: argument `{what}` must be arrays (NumPy, a list "
                "or a dict by input name), a tf.data.Dataset or a generator "
                f"of batches. Received: {type(data).__name__}.") from None
        batches = [_flatten(signature, _inputs_of(element), what, where, i)
                   for i, element in enumerate(iterator)]
    batches = [b for b in batches if b[0].shape[0] > 0]
    if not batches:
        raise ValueError(
            f"{where}: argument `{what}` holds no samples. Pass a few "
            "hundred representative inputs (e.g. training images).")
    return batches


def _is_arrays(data):
    if isinstance(data, dict):
        return True
    if isinstance(data, (list, tuple)):
        return all(hasattr(v, "shape") for v in data)
    return hasattr(data, "shape") and hasattr(data, "dtype")


def _inputs_of(element):
    """A dataset element's model inputs: `x` of `(x, y[, w])`."""
    if isinstance(element, tuple) and len(element) in (2, 3):
        return element[0]
    return element


def _flatten(signature, batch, what, where, index):
    if hasattr(batch, "numpy") and not hasattr(batch, "shape"):
        batch = batch.numpy()
    try:
        flat = signature.flatten_sample(_to_numpy(batch), what=what)
    except ValueError as error:
        raise ValueError(f"{where}: batch {index} of {error}") from None
    for name, array in zip(signature.input_names, flat):
        bad = _pipeline.nonfinite_count([array])
        if bad:
            raise ValueError(
                f"{where}: argument `{what}` must hold finite values; "
                f"batch {index}, input {name!r} has {bad} NaN or infinite "
                f"value(s) out of {array.size}. Quantization ranges taken "
                "from them would be meaningless: clean the data (e.g. "
                "drop those samples).")
    return flat


def _to_numpy(value):
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_numpy(v) for v in value]
    if hasattr(value, "numpy"):
        return value.numpy()
    return value


def joined(batches, limit=None):
    """The batches as one flat batch (at most `limit` samples)."""
    flat = [np.concatenate(parts, axis=0) for parts in zip(*batches)]
    return flat if limit is None else [a[:limit] for a in flat]


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


def check(fmt, reference, outputs, min_agreement, max_rel_rms):
    """One verification record for a reduced-precision artifact."""
    bound = (DEFAULT_MAX_REL_RMS[precision(fmt)] if max_rel_rms is None
             else max_rel_rms)
    share = agreement(reference, outputs)
    rms = relative_rms(reference, outputs)
    passed = rms <= bound and (share is None or share >= min_agreement)
    return {"format": fmt, "batch": int(np.shape(reference[0])[0]),
            "agreement": share, "rel_rms": rms,
            "min_agreement": min_agreement, "max_rel_rms": bound,
            "passed": bool(passed)}
