"""Kernel layouts and int8 arithmetic on NumPy arrays (no Keras here).

A linear layer's kernel is read per output channel (what per-channel int8
gives one scale each) and per input channel (what cross-layer equalization
rescales), for each `registry.LAYOUTS` entry. The int8 simulation is the
arithmetic of the runtimes' schemes: symmetric int8 weights (scale
max|w| / 127, zero point 0), asymmetric uint8 activations (range widened
to hold 0, 255 steps), both round-to-nearest.
"""

import math

import numpy as np

WEIGHT_LEVELS = 127
ACTIVATION_LEVELS = 255


def by_output_channel(layout, weights):
    """`[(name, [elements, out channels] array)]` of a layer's kernels.

    Per-channel int8 gives each column its own scale: the last axis for
    Dense and convolutions (ONNX's output channel, TFLite's), the
    `C * M` outputs of a depthwise kernel, the output axis (-2) of a
    transposed convolution.
    """
    matrices = []
    for name, kernel in _kernels(layout, weights):
        kind = ("depthwise" if name == "depthwise_kernel" else
                "conv" if name == "pointwise_kernel" else layout)
        if kind == "depthwise":
            matrix = kernel.reshape(-1, kernel.shape[-2] * kernel.shape[-1])
        elif kind == "transpose":
            matrix = np.moveaxis(kernel, -2, -1).reshape(-1, kernel.shape[-2])
        else:
            matrix = kernel.reshape(-1, kernel.shape[-1])
        matrices.append((name, matrix))
    return matrices


def _kernels(layout, weights):
    if layout == "separable":
        return [(n, weights[n]) for n in ("depthwise_kernel",
                                          "pointwise_kernel")]
    return [("kernel", weights["kernel"])]


def output_ranges(layout, weights):
    """Largest |w| per output channel of the kernel a scale multiplies
    when it is folded backward (the pointwise one of a separable layer)."""
    matrix = by_output_channel(layout, weights)[-1][1]
    return np.max(np.abs(matrix), axis=0)


def input_ranges(layout, weights):
    """Largest |w| per input channel of the kernel a scale multiplies when
    it is folded forward (the depthwise one of a separable layer)."""
    kernel = weights["depthwise_kernel" if layout == "separable"
                     else "kernel"]
    axis = {"dense": 0, "transpose": kernel.ndim - 1}.get(
        layout, kernel.ndim - 2)
    others = tuple(a for a in range(kernel.ndim) if a != axis)
    return np.max(np.abs(kernel), axis=others)


def spread(ranges):
    """Largest / smallest nonzero channel range (1.0 if none is nonzero)."""
    ranges = np.asarray(ranges, np.float64)
    live = ranges[ranges > 0]
    return float(live.max() / live.min()) if live.size else 1.0


def quantize_weights(matrix, per_channel):
    """Symmetric int8 round trip of a `[elements, channels]` matrix."""
    peak = np.max(np.abs(matrix), axis=0 if per_channel else None)
    step = np.where(peak > 0, peak, 1.0) / WEIGHT_LEVELS
    return np.clip(np.round(matrix / step), -WEIGHT_LEVELS,
                   WEIGHT_LEVELS) * step


def quantize_activations(values, low, high):
    """Asymmetric uint8 round trip of `values` with calibration range
    `[low, high]` (widened to hold 0, as both runtimes do)."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    if high == low:
        return np.zeros_like(values)
    step = (high - low) / ACTIVATION_LEVELS
    zero = round(-low / step)
    codes = np.clip(np.round(values / step) + zero, 0, ACTIVATION_LEVELS)
    return (codes - zero) * step


def weight_sqnr(layout, weights, per_channel):
    """SQNR (dB) of a layer's int8 weights, channel by channel.

    Each output channel is a feature of its own downstream (its
    normalization gave them all a similar scale before folding), so each
    is scored against its own error: the mean over the nonzero channels
    of each channel's SQNR against its own error. A whole-kernel SQNR would hide a
    per-tensor scale that leaves the small channels a few levels, since
    the large channels dominate its sums. Channels held exactly (no
    error) are left out of the mean; inf if every channel is.
    """
    signal, noise = [], []
    for _, matrix in by_output_channel(layout, weights):
        error = quantize_weights(matrix, per_channel) - matrix
        signal.append(np.sum(matrix ** 2, axis=0))
        noise.append(np.sum(error ** 2, axis=0))
    return mean_channel_sqnr(np.concatenate(signal), np.concatenate(noise))


def mean_channel_sqnr(signal, noise):
    """Mean over channels of `10 log10(signal_c / noise_c)` (dB), from
    per-channel sums of squares; channels with no signal, or no error,
    are left out (inf if every channel with signal has no error)."""
    signal = np.asarray(signal, np.float64).reshape(-1)
    noise = np.asarray(noise, np.float64).reshape(-1)
    scored = (signal > 0) & (noise > 0)
    if not np.any(scored):
        return math.inf
    return float(np.mean(10 * np.log10(signal[scored] / noise[scored])))
