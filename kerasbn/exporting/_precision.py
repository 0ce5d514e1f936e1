"""Export of models trained in mixed precision (issue 32).

A model built under "mixed_float16" or "mixed_bfloat16" keeps float32
weights and computes in float16/bfloat16. What it *means* is its float32
twin: the same weights, every layer computing in float32
(`kerasbn._models.float32_twin`). Checking an artifact against the mixed
model itself cannot work at float32 tolerance (float16 compute alone moves
MobileNetV2's outputs by 6e-4 of their scale), and loosening the tolerance
to that size would let wrong artifacts through. So:

- `precision="float32"` (default): the twin is folded and exported, and
  every artifact is checked against the twin at the usual `rtol`; the gap
  between the user's mixed model and the twin is measured on the same
  inputs and reported, as what deploying in float32 changes for them.
  This also serves bfloat16 models in every format (ONNX has no bfloat16
  convolution).
- `precision="policy"`: the folded model keeps its compute dtype, and is
  checked against the twin at `max(rtol, 2 x gap, 2 x eps)` where `gap` is
  the measured gap of the unfolded mixed model and `eps` its compute
  dtype's machine epsilon: folding moves where the reduced precision
  rounds (one rounding per folded convolution instead of two), not how
  much, so the folded model's gap is of the same size as the unfolded
  one's; 2x is the room for a different rounding pattern of that size,
  2 eps the floor when the gap measured on a few inputs is near zero. A
  gap too large for such a bound to mean anything (over `MAX_POLICY_RTOL`,
  e.g. a model whose float16 activations overflow or underflow) is
  refused.
"""

import re
import warnings

import keras
import numpy as np

from kerasbn import _models

WHERE = "kerasbn.export"
PRECISIONS = ("float32", "policy")
# Above this a bound derived from the mixed model's own gap would pass a
# wrong artifact: refuse precision="policy" instead.
MAX_POLICY_RTOL = 0.05
# What precision="policy" can write in each reduced compute dtype. ONNX
# Runtime and TFLite have no bfloat16 convolutions; TFLite converts no
# float16 compute graph (its float16 form is float16 *weights*, the
# tflite_fp16 format); the int8 and fp16 formats quantize the float32 model.
POLICY_FORMATS = {"float16": ("saved_model", "onnx", "keras"),
                  "bfloat16": ("saved_model", "keras")}


# Why precision="policy" refuses a format, per compute dtype.
WHY_NOT = {
    "float16": {"tflite": "TFLite converts no float16 compute graph; its "
                          "float16 form is float16 weights, tflite_fp16"},
    "bfloat16": {"onnx": "ONNX Runtime has no bfloat16 convolution",
                 "tflite": "TFLite has no bfloat16 kernels"},
    # The IR's compute precision is OpenVINO's setting, not the graph's:
    # export the float32 twin and pin it with openvino_precision.
    "openvino": "OpenVINO sets the compute precision when it compiles, "
                "whatever the IR holds: export the float32 twin and choose "
                "f32 or bf16 with openvino_precision (CLI "
                "--openvino-precision)",
    "reduced": "the int8 and fp16 formats quantize the float32 model: "
               "export them with precision='float32'",
}


def plan(model, precision, formats, progress):
    """`(model to export, model it must reproduce, precision info or None)`.

    The info dict becomes `ExportResult.precision` once `measure` has
    filled in the gap.
    """
    if precision not in PRECISIONS:
        raise ValueError(
            f"{WHERE}: Argument `precision` must be one of {PRECISIONS}; "
            f"received {precision!r}.")
    policy = _models.mixed_policy(model)
    if policy is None:
        return model, model, None
    compute = keras.dtype_policies.get(policy).compute_dtype
    if precision == "policy":
        refused = [f for f in formats if f not in POLICY_FORMATS[compute]]
        if refused:
            why = {f: WHY_NOT[compute].get(f, WHY_NOT.get(
                f, WHY_NOT["reduced"])) for f in refused}
            raise ValueError(
                f"{WHERE}: precision='policy' keeps {policy}'s {compute} "
                f"compute, which these formats cannot hold: "
                + "; ".join(f"{f} ({reason})" for f, reason in why.items())
                + f". In {compute}: {', '.join(POLICY_FORMATS[compute])}. "
                "Export the others with precision='float32' (the default: "
                "the model's float32 twin, verified).")
    twin = _models.float32_twin(model, WHERE)
    info = {"policy": policy, "reference": "float32 twin"}
    if precision == "float32":
        progress(f"mixed precision ({policy}): exporting its float32 twin")
        info["deployed"] = "float32"
        return twin, twin, info
    progress(f"mixed precision ({policy}): exporting in {compute}")
    info["deployed"] = compute
    return model, twin, info


def measure(info, model, signature, inputs, references, rtol):
    """Measure the mixed model's gap to its twin (`references`, flat, per
    verification batch) into `info`; returns the `rtol` to check with."""
    gap = 0.0
    for arrays, reference in zip(inputs, references):
        outputs = model(signature.pack([keras.ops.convert_to_tensor(a)
                                        for a in arrays]), training=False)
        for got, want in zip(keras.tree.flatten(outputs), reference):
            got = np.asarray(keras.ops.convert_to_numpy(got), np.float64)
            want = np.asarray(want, np.float64)
            if not np.isfinite(got).all():
                gap = float("inf")
                continue
            scale = float(np.max(np.abs(want))) if want.size else 0.0
            error = float(np.max(np.abs(got - want))) if want.size else 0.0
            gap = max(gap, error / scale if scale > 0 else error)
    info["mixed_vs_float32"] = gap
    if info["deployed"] == "float32":
        if gap == float("inf"):
            warnings.warn(
                f"{WHERE}: the {info['policy']} model itself outputs NaN or "
                "inf on the verification inputs (its reduced-precision "
                "activations overflow); its float32 twin, which is "
                "exported, does not. Check the model you trained.",
                stacklevel=3)
        return rtol
    eps = _epsilon(info["deployed"])
    bound = max(rtol, 2.0 * gap, 2.0 * eps)
    if not bound <= MAX_POLICY_RTOL:
        raise ValueError(
            f"{WHERE}: precision='policy': the {info['policy']} model itself "
            f"differs from its float32 twin by {gap:.3g} of output scale on "
            "the verification inputs (its reduced-precision activations "
            "overflow, underflow or lose the signal), so a bound derived "
            "from that gap would pass a wrong artifact. Export with "
            "precision='float32' (the default), or check the model in "
            f"{info['deployed']} first.")
    info["rtol"] = bound
    info["rtol_reason"] = (
        f"max(rtol {rtol:g}, 2 x the unfolded model's gap {gap:.2g}, "
        f"2 x {info['deployed']} eps {eps:.2g})")
    return bound


def _epsilon(dtype):
    """Machine epsilon of float16 (2**-10) or bfloat16 (2**-7)."""
    return {"float16": 2.0**-10, "bfloat16": 2.0**-7}[dtype]


def policy_write_error(info, error):
    """The clearer error for a reduced-precision ONNX graph tf2onnx could
    not convert (e.g. a bilinear resize under mixed_float16), or None."""
    from kerasbn.exporting._result import ExportError

    # In-process writers say "Writing the onnx artifact failed"; the
    # TensorFlow subprocess (JAX/PyTorch sessions) names the formats it
    # wrote, "Writing the onnx, tflite artifact(s) failed".
    written = re.match(r"Writing the (.+?) artifact(?:\(s\))? failed",
                       str(error))
    if info is None or info["deployed"] == "float32" or written is None or (
            "onnx" not in written.group(1).split(", ")):
        return None
    first = str(error).splitlines()[0]
    return ExportError(
        f"{WHERE}: precision='policy': tf2onnx could not convert the "
        f"model's {info['deployed']} graph ({first}). Export ONNX with "
        "precision='float32' (the default: its float32 twin, verified), "
        "and keep 'policy' for saved_model and keras.")
