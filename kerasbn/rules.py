"""Pure float64 rewrites that move a per-channel affine map into a kernel.

An inference-mode normalization is `y = s * x + t` per channel (see
`kerasbn._numerics.bn_scale_shift`). These functions fold it into the
weights of a neighbouring linear layer and return new arrays; they read no
layer and touch no variable, so they are tested against NumPy directly.

Backward fold (normalization AFTER the layer, `y = s * (W x + b) + t`):

    W' = W * s   on the OUTPUT-channel axis,   b' = b * s + t

Forward fold (normalization BEFORE the layer, `y = W (s * x + t) + b`):

    W' = W * s   on the INPUT-channel axis,    b' = b + sum(W * t)

the sum running over the kernel window and the input channels. The forward
form is exact only where every output position sees a full window of real
inputs ('valid' padding, 1x1 kernels) or where `t == 0`; zero padding would
otherwise insert zeros where the normalization produced `t`. Deciding that is
the caller's job (`kerasbn.registry`); these functions only do algebra.

Keras kernel layouts, by the functions' names:

- `*_dense`: Dense and Conv1D/2D/3D (also a SeparableConv's pointwise
  kernel): `[..., in // groups, out]`.
- `*_depthwise`: DepthwiseConv1D/2D: `[..., C, M]`, output channel
  `c * M + m`.
- `*_transpose`: Conv1D/2D/3DTranspose: `[..., out, in]`.

A missing bias is passed as `None` and comes back as an array.
"""

import numpy as np


def _as_float64(array):
    return np.asarray(array, dtype=np.float64)


def _bias_or_zeros(bias, channels):
    if bias is None:
        return np.zeros((channels,), dtype=np.float64)
    return _as_float64(bias)


def center_kernel(kernel, out_axis=-1):
    """Subtract each output channel's mean over every other kernel axis.

    A weight-centred layer uses `W - mean(W)` at every call (the mean over
    all axes except the output-channel axis); folding must start from that
    centred kernel, not the stored one. A `kernel_transform` for
    `kerasbn.registry.register_linear`.

    >>> k = np.array([[1.0, 10.0], [3.0, 20.0]])
    >>> center_kernel(k).tolist()
    [[-1.0, -5.0], [1.0, 5.0]]
    """
    kernel = _as_float64(kernel)
    out_axis = out_axis % kernel.ndim
    axes = tuple(a for a in range(kernel.ndim) if a != out_axis)
    return kernel - kernel.mean(axis=axes, keepdims=True)


def backward_dense(kernel, bias, scale, shift):
    """Fold `y = scale * layer(x) + shift` into a `[..., in, out]` kernel.

    >>> k, b = backward_dense(np.ones((2, 3)), None, [1.0, 2.0, 3.0],
    ...                       [0.5, 0.0, -1.0])
    >>> k.tolist(), b.tolist()
    ([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]], [0.5, 0.0, -1.0])
    """
    kernel, scale, shift = (_as_float64(a) for a in (kernel, scale, shift))
    bias = _bias_or_zeros(bias, kernel.shape[-1])
    return kernel * scale, bias * scale + shift


def backward_depthwise(kernel, bias, scale, shift):
    """Fold `y = scale * layer(x) + shift` into a depthwise `[..., C, M]`.

    Output channel `c * M + m` comes from `kernel[..., c, m]`, so the
    per-output `scale` is laid out as a `(C, M)` matrix (row-major).

    >>> k, b = backward_depthwise(np.ones((1, 2, 2)), [1.0, 1.0, 1.0, 1.0],
    ...                           [1.0, 2.0, 3.0, 4.0], [0.0] * 4)
    >>> k[0].tolist(), b.tolist()
    ([[1.0, 2.0], [3.0, 4.0]], [1.0, 2.0, 3.0, 4.0])
    """
    kernel, scale, shift = (_as_float64(a) for a in (kernel, scale, shift))
    channels, multiplier = kernel.shape[-2:]
    bias = _bias_or_zeros(bias, channels * multiplier)
    new_kernel = kernel * scale.reshape(channels, multiplier)
    return new_kernel, bias * scale + shift


def backward_transpose(kernel, bias, scale, shift):
    """Fold `y = scale * layer(x) + shift` into a `[..., out, in]` kernel.

    >>> k, b = backward_transpose(np.ones((1, 2, 3)), None, [2.0, 5.0],
    ...                           [1.0, 1.0])
    >>> k[0].tolist(), b.tolist()
    ([[2.0, 2.0, 2.0], [5.0, 5.0, 5.0]], [1.0, 1.0])
    """
    kernel, scale, shift = (_as_float64(a) for a in (kernel, scale, shift))
    bias = _bias_or_zeros(bias, kernel.shape[-2])
    return kernel * scale[:, None], bias * scale + shift


def _group_input_matrix(vector, in_per_group, out_channels, groups):
    """`M[i, o] = vector[group(o) * in_per_group + i]` for grouped kernels."""
    out_per_group = out_channels // groups
    group_of_out = np.arange(out_channels) // out_per_group
    index = group_of_out[None, :] * in_per_group + np.arange(in_per_group)[
        :, None
    ]
    return vector[index]


def forward_dense(kernel, bias, scale, shift, groups=1):
    """Fold `y = layer(scale * x + shift)` into a `[..., in/groups, out]`.

    With `groups > 1` input channel `g * in_per_group + i` feeds only the
    outputs of group `g`, through `kernel[..., i, o]`.

    >>> k, b = forward_dense(np.ones((2, 1)), [1.0], [2.0, 3.0], [1.0, -4.0])
    >>> k.tolist(), b.tolist()
    ([[2.0], [3.0]], [-2.0])
    """
    kernel, scale, shift = (_as_float64(a) for a in (kernel, scale, shift))
    in_per_group, out_channels = kernel.shape[-2:]
    bias = _bias_or_zeros(bias, out_channels)
    scale_matrix = _group_input_matrix(
        scale, in_per_group, out_channels, groups
    )
    shift_matrix = _group_input_matrix(
        shift, in_per_group, out_channels, groups
    )
    window_axes = tuple(range(kernel.ndim - 2))
    contribution = (kernel * shift_matrix).sum(axis=window_axes + (-2,))
    return kernel * scale_matrix, bias + contribution


def forward_depthwise(kernel, bias, scale, shift):
    """Fold `y = layer(scale * x + shift)` into a depthwise `[..., C, M]`.

    >>> k, b = forward_depthwise(np.ones((3, 1, 2)), None, [2.0], [1.0])
    >>> k[0].tolist(), b.tolist()
    ([[2.0, 2.0]], [3.0, 3.0])
    """
    kernel, scale, shift = (_as_float64(a) for a in (kernel, scale, shift))
    channels, multiplier = kernel.shape[-2:]
    bias = _bias_or_zeros(bias, channels * multiplier)
    window_axes = tuple(range(kernel.ndim - 2))
    contribution = (kernel * shift[:, None]).sum(axis=window_axes)
    return kernel * scale[:, None], bias + contribution.reshape(-1)


def forward_transpose(kernel, bias, scale, shift):
    """Fold `y = layer(scale * x + shift)` into a `[..., out, in]` kernel.

    The bias term assumes every output position receives the whole kernel
    once, which holds for a 1x1 kernel with stride 1 (or `shift == 0`).

    >>> k, b = forward_transpose(np.ones((1, 1, 2)), None, [2.0, 3.0],
    ...                          [1.0, 1.0])
    >>> k[0].tolist(), b.tolist()
    ([[2.0, 3.0]], [2.0])
    """
    kernel, scale, shift = (_as_float64(a) for a in (kernel, scale, shift))
    bias = _bias_or_zeros(bias, kernel.shape[-2])
    window_axes = tuple(range(kernel.ndim - 2))
    contribution = (kernel * shift).sum(axis=window_axes + (-1,))
    return kernel * scale, bias + contribution


def forward_separable(depthwise_kernel, pointwise_kernel, bias, scale, shift):
    """Fold `y = pointwise(depthwise(scale * x + shift))`.

    The scale goes into the depthwise kernel; the constant the shift adds to
    each depthwise output channel goes through the pointwise kernel into the
    bias. Returns `(depthwise_kernel', pointwise_kernel, bias')`.

    >>> d, p, b = forward_separable(np.ones((1, 1, 1)), np.ones((1, 1, 2)),
    ...                             None, [3.0], [2.0])
    >>> d.tolist(), b.tolist()
    ([[[3.0]]], [2.0, 2.0])
    """
    pointwise_kernel = _as_float64(pointwise_kernel)
    depthwise_kernel, depthwise_constant = forward_depthwise(
        depthwise_kernel, None, scale, shift
    )
    bias = _bias_or_zeros(bias, pointwise_kernel.shape[-1])
    # The pointwise kernel is 1x1: a (C * M, out) matrix.
    matrix = pointwise_kernel.reshape(-1, pointwise_kernel.shape[-1])
    return depthwise_kernel, pointwise_kernel, bias + depthwise_constant @ matrix
