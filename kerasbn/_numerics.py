"""Small pure functions shared by kerasbn's layers and its fold rules.

Layers call the tensor functions (written with `keras.ops`, backend-neutral);
the fold rules and the statistics tools call the NumPy ones. Keeping both here
means a layer's training maths and the algebra that removes it at deployment
are written once.
"""

import math

import numpy as np
from keras import backend
from keras import ops


def at_least_float32(dtype):
    """The dtype a layer computes statistics in for inputs of `dtype`:
    float16/bfloat16 (and integers) -> float32, float32/float64 kept.

    (`keras.backend.result_type(dtype, "float32")` gives float32 for
    float64 on JAX without x64 and on PyTorch.)
    """
    name = backend.standardize_dtype(dtype)
    if name in ("float32", "float64"):
        return name
    return "float32"


def decay_power(momentum, step, dtype="float32"):
    """`(1 - momentum**step, momentum**step)` for a tensor or number `step`.

    The one place the package computes a decay power. Both values are exact
    at `step == 0` (0 and 1); `1 - momentum**step` is taken as
    `-expm1(step * log(momentum))` with `log(momentum)` in float64 on the
    host, so it keeps its relative precision when it is small: in float32,
    `1 - 0.999` alone is off by 1.3e-5 relative, the error TF's own float32
    op carries.

    >>> [round(float(v), 6) for v in decay_power(0.5, 3.0, "float64")]
    [0.875, 0.125]
    """
    step = ops.cast(step, dtype)
    if momentum == 0.0:
        fresh = ops.cast(ops.equal(step, 0.0), dtype)
        return 1.0 - fresh, fresh
    exponent = step * math.log(momentum)
    return -ops.expm1(exponent), ops.exp(exponent)


def debias_weights(momentum, step):
    """Weights `(w_old, w_new)` of one zero-debiased moving-average update.

    A zero-debiased exponential moving average with decay `d` (TF1's
    `assign_moving_average(..., zero_debias=True)`) keeps a biased average
    `b_t = d * b_{t-1} + (1 - d) * v_t` started at zero and reports
    `avg_t = b_t / (1 - d**t)`. Written on the reported value alone the
    same sequence is `avg_t = w_old * avg_{t-1} + w_new * v_t` with

        w_old = d * (1 - d**(t-1)) / (1 - d**t),
        w_new = (1 - d) / (1 - d**t),

    so `w_old + w_new = 1`, the first update (`t = 1`) takes the value as it
    is whatever `avg_0` held (`w_old` is exactly 0, `w_new` exactly 1), and
    for large `t` the weights tend to the ordinary EMA's `(d, 1 - d)`.

    Args:
        momentum: Python float `d` in `[0, 1)`.
        step: Scalar tensor, the number of updates including this one
            (`t >= 1`).

    Returns:
        Two scalar float32 tensors.
    """
    step = ops.cast(step, "float32")
    denominator, _ = decay_power(momentum, step)
    before, _ = decay_power(momentum, step - 1.0)
    first, _ = decay_power(momentum, ops.ones((), "float32"))
    return momentum * before / denominator, first / denominator


def bn_scale_shift(gamma, beta, mean, variance, epsilon):
    """Per-channel `(scale, shift)` of an inference-mode normalization.

    `y = gamma * (x - mean) / sqrt(variance + epsilon) + beta` is the affine
    map `y = scale * x + shift` with `scale = gamma / sqrt(variance + eps)` and
    `shift = beta - mean * scale`. Computed in float64; `gamma=None` means 1,
    `beta=None` and `mean=None` mean 0.

    >>> s, t = bn_scale_shift([2.0], [1.0], [3.0], [3.0], 1.0)
    >>> float(s[0]), float(t[0])
    (1.0, -2.0)
    """
    variance = np.asarray(variance, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        # Corrupt statistics give NaN/inf here; fold and diagnose say so.
        scale = 1.0 / np.sqrt(variance + np.float64(epsilon))
    if gamma is not None:
        scale = scale * np.asarray(gamma, dtype=np.float64)
    shift = np.zeros_like(scale)
    if mean is not None:
        shift = shift - np.asarray(mean, dtype=np.float64) * scale
    if beta is not None:
        shift = shift + np.asarray(beta, dtype=np.float64)
    return scale, shift


def layer_scale_shift(layer):
    """`bn_scale_shift` of a layer holding BN-style weights.

    Reads `gamma` (if `layer.scale`), `beta` (if `layer.center`),
    `moving_mean` (absent for MABN, which keeps no mean), `moving_variance`
    and `epsilon`: Keras' BatchNormalization with or without renorm or
    synchronized (renorm's extra averages only matter in training), every
    kerasbn subclass of it, and MABN.
    """
    moving_mean = getattr(layer, "moving_mean", None)
    return bn_scale_shift(
        ops.convert_to_numpy(layer.gamma) if layer.scale else None,
        ops.convert_to_numpy(layer.beta) if layer.center else None,
        None if moving_mean is None else ops.convert_to_numpy(moving_mean),
        ops.convert_to_numpy(layer.moving_variance),
        layer.epsilon,
    )
