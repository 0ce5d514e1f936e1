"""What `export` and `kerasbn-fold` accept, checked without TensorFlow.

Defaults, format names, artifact names and the ONNX opset range live in
this module, which imports nothing heavy: `kerasbn-fold` refuses a bad
argument in well under a second, before TensorFlow is imported (~4 s).
"""

import re

from kerasbn.exporting.formats import FORMATS

DEFAULT_FORMATS = ("saved_model", "onnx")
DEFAULT_OPSET = 17
# Relative error bound, as a fraction of max|reference output|. Folding in
# float64 and casting gives ~3e-7; the runtimes' own kernels (oneDNN, ONNX
# Runtime's MLAS, TFLite's) reorder sums and use other conv algorithms, which
# costs up to ~1e-5 on deep networks. A wrong fold is off by O(1).
DEFAULT_RTOL = 1e-4

# The oldest ONNX opset kerasbn exports. ONNX Runtime, which verifies every
# ONNX artifact, supports opset 7 and higher only
# (https://onnxruntime.ai/docs/reference/compatibility.html); below that,
# a graph with an Add fails in it ("Could not find an implementation for
# Add(6)") and tf2onnx's opset-1 Dense fails `onnx.checker`. From 7 on,
# tf2onnx 1.17 converts kerasbn's graphs (Conv, depthwise and separable
# Conv, MatMul, the ScaleShift Mul/Add, Reshape with a dynamic batch) and
# ONNX Runtime reproduces them. tf2onnx itself tests 14-18 and says 6-13
# "should work"; 7-13 stay allowed because older runtimes (TensorRT 7,
# older OpenVINO) need them, and verification catches a bad conversion.
MIN_OPSET = 7
# The newest opset that every supported tf2onnx (>= 1.16) converts; a newer
# tf2onnx may convert newer ones (`formats.newest_onnx_opset()` asks it).
KNOWN_MAX_OPSET = 18

# The progress line `export` prints just before it moves the verified
# artifacts into place (the CLI defers signals from there until it returns).
COMMIT_STAGE = "moving the artifacts into"

_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def parse_formats(formats):
    """Format names from an iterable or a comma-separated string, checked.

    Returns them in the order given, each once. Raises `ValueError` naming
    the unknown ones (or the empty selection).

    >>> parse_formats("onnx, keras,onnx")
    ['onnx', 'keras']
    """
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(
            f"Unknown export format(s) {unknown or formats!r}. Choose from "
            f"{list(FORMATS)}."
        )
    return formats


def is_safe_name(name):
    """Whether `name` can name an artifact file: no separators, no dot first.

    >>> is_safe_name("resnet50-v1.2"), is_safe_name("../evil")
    (True, False)
    """
    return bool(_SAFE_NAME.match(name))
