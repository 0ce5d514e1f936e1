"""kerasbn.rules against NumPy convolutions written out loop by loop.

Each rule must satisfy, for the layer it rewrites:
    backward: layer'(x) == scale * layer(x) + shift
    forward:  layer'(x) == layer(scale * x + shift)   ('valid' windows)
The layers here are plain-NumPy 1-D reference implementations of Keras'
kernel layouts, independent of Keras and of the rules.
"""

import numpy as np
import pytest

from kerasbn import rules

pytestmark = pytest.mark.any_backend


def conv1d(x, kernel, bias, groups=1):
    """'valid' 1-D convolution, kernel [k, in // groups, out]."""
    k, in_per_group, out = kernel.shape
    steps = x.shape[0] - k + 1
    out_per_group = out // groups
    y = np.zeros((steps, out))
    for t in range(steps):
        for o in range(out):
            g = o // out_per_group
            window = x[t:t + k, g * in_per_group:(g + 1) * in_per_group]
            y[t, o] = np.sum(window * kernel[:, :, o])
    return y + (0.0 if bias is None else bias)


def depthwise1d(x, kernel, bias):
    """'valid' depthwise 1-D convolution, kernel [k, C, M], out c * M + m."""
    k, channels, multiplier = kernel.shape
    steps = x.shape[0] - k + 1
    y = np.zeros((steps, channels * multiplier))
    for t in range(steps):
        for c in range(channels):
            for m in range(multiplier):
                y[t, c * multiplier + m] = np.sum(
                    x[t:t + k, c] * kernel[:, c, m])
    return y + (0.0 if bias is None else bias)


def transpose1d(x, kernel, bias, stride):
    """'valid' transposed 1-D convolution, kernel [k, out, in]."""
    k, out, _ = kernel.shape
    y = np.zeros(((x.shape[0] - 1) * stride + k, out))
    for t in range(x.shape[0]):
        y[t * stride:t * stride + k] += np.einsum("i,koi->ko", x[t], kernel)
    return y + (0.0 if bias is None else bias)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def affine(rng, channels):
    return rng.uniform(0.5, 2.0, channels), rng.normal(size=channels)


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("with_bias", [False, True])
def test_conv_rules(rng, groups, with_bias):
    x = rng.normal(size=(9, 4))
    kernel = rng.normal(size=(3, 4 // groups, 6))
    bias = rng.normal(size=6) if with_bias else None
    scale, shift = affine(rng, 6)
    k, b = rules.backward_dense(kernel, bias, scale, shift)
    np.testing.assert_allclose(
        conv1d(x, k, b, groups), scale * conv1d(x, kernel, bias, groups) + shift)
    scale, shift = affine(rng, 4)
    k, b = rules.forward_dense(kernel, bias, scale, shift, groups)
    np.testing.assert_allclose(
        conv1d(x, k, b, groups), conv1d(scale * x + shift, kernel, bias, groups))


@pytest.mark.parametrize("multiplier", [1, 3])
def test_depthwise_rules(rng, multiplier):
    x = rng.normal(size=(8, 3))
    kernel = rng.normal(size=(3, 3, multiplier))
    scale, shift = affine(rng, 3 * multiplier)
    k, b = rules.backward_depthwise(kernel, None, scale, shift)
    np.testing.assert_allclose(
        depthwise1d(x, k, b), scale * depthwise1d(x, kernel, None) + shift)
    scale, shift = affine(rng, 3)
    bias = rng.normal(size=3 * multiplier)
    k, b = rules.forward_depthwise(kernel, bias, scale, shift)
    np.testing.assert_allclose(
        depthwise1d(x, k, b), depthwise1d(scale * x + shift, kernel, bias))


def test_separable_rules(rng):
    x = rng.normal(size=(8, 3))
    depthwise = rng.normal(size=(3, 3, 2))
    pointwise = rng.normal(size=(1, 6, 4))
    bias = rng.normal(size=4)

    def separable(x, d, p, b):
        return conv1d(depthwise1d(x, d, None), p, b)

    scale, shift = affine(rng, 4)
    p, b = rules.backward_dense(pointwise, bias, scale, shift)
    np.testing.assert_allclose(
        separable(x, depthwise, p, b),
        scale * separable(x, depthwise, pointwise, bias) + shift)
    scale, shift = affine(rng, 3)
    d, p, b = rules.forward_separable(depthwise, pointwise, bias, scale, shift)
    np.testing.assert_allclose(
        separable(x, d, p, b),
        separable(scale * x + shift, depthwise, pointwise, bias))


def test_transpose_rules(rng):
    x = rng.normal(size=(5, 3))
    kernel = rng.normal(size=(3, 4, 3))
    scale, shift = affine(rng, 4)
    k, b = rules.backward_transpose(kernel, None, scale, shift)
    np.testing.assert_allclose(
        transpose1d(x, k, b, 2), scale * transpose1d(x, kernel, None, 2) + shift)
    # Forward is exact for a 1x1 kernel with stride 1 only.
    kernel = kernel[:1]
    scale, shift = affine(rng, 3)
    k, b = rules.forward_transpose(kernel, None, scale, shift)
    np.testing.assert_allclose(
        transpose1d(x, k, b, 1), transpose1d(scale * x + shift, kernel, None, 1))


def test_forward_with_same_padding_is_not_exact(rng):
    # Why fold refuses it: zero padding at the border is not BN's shift.
    x = rng.normal(size=(6, 2))
    kernel = rng.normal(size=(3, 2, 2))
    scale, shift = affine(rng, 2)
    k, b = rules.forward_dense(kernel, None, scale, shift)
    pad = np.zeros((1, 2))
    folded = conv1d(np.concatenate([pad, x, pad]), k, b)
    reference = conv1d(np.concatenate([pad, scale * x + shift, pad]), kernel, None)
    np.testing.assert_allclose(folded[1:-1], reference[1:-1])
    assert np.abs(folded[[0, -1]] - reference[[0, -1]]).max() > 1e-3


def test_center_kernel_zero_mean_per_output(rng):
    kernel = rng.normal(size=(3, 3, 4, 5)) + 2.0
    centred = rules.center_kernel(kernel)
    np.testing.assert_allclose(centred.mean(axis=(0, 1, 2)), 0.0, atol=1e-12)
    # What was removed is one constant per output channel.
    removed = kernel - centred
    np.testing.assert_allclose(
        removed, np.broadcast_to(removed[:1, :1, :1, :], removed.shape))
