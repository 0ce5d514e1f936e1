"""Weight-centred convolutions and Dense ("CenConv" of the MABN paper).

Each layer is a drop-in subclass of its Keras layer (same arguments, weights
and config) whose every call uses

    W' = W - mean(W over all kernel axes except the output-channel axis)

instead of the stored kernel `W`; gradients flow through the centring, so
the stored kernel's gradient is the centred kernel's gradient minus its
mean over the same axes. MABN keeps no running mean and relies on this
centring (with `use_bias=False`, as the reference recommends) to keep the
pre-normalization activations centred. Weights trained elsewhere should be
centred before fine-tuning: see `kerasbn.convert_to_mabn`.

`kerasbn.registry` registers these layers as linear layers: a following
normalization folds into the centred kernel and the folded layer is a plain
Keras `Conv1D`/`Conv2D`/`Conv3D`/`Dense`.
"""

import keras
from keras import ops



def center_kernel(kernel):
    """`kernel` minus its mean over every axis but the last (output) one.

    Keras kernels are `[..., in, out]` (Conv1D/2D/3D, grouped or not, and
    Dense), so this is the per-output-channel mean of the reference.

    >>> import numpy as np
    >>> k = center_kernel(np.array([[1.0, 10.0], [3.0, 20.0]]))
    >>> keras.ops.convert_to_numpy(k).tolist()
    [[-1.0, -5.0], [1.0, 5.0]]
    """
    kernel = ops.convert_to_tensor(kernel)
    axes = tuple(range(len(kernel.shape) - 1))
    return kernel - ops.mean(kernel, axis=axes, keepdims=True)


class _CenteredMixin:
    """Shared refusals: quantization would bypass the centred call."""

    def quantize(self, *args, **kwargs):
        raise NotImplementedError(
            f"{type(self).__name__} cannot be quantized: a quantized layer "
            "runs Keras' own kernel path, which skips the weight centring. "
            "Fold the model first (`kerasbn.fold`, which turns centred "
            "layers into plain ones holding the centred kernel), then "
            "quantize the folded model."
        )


class _CenteredConv(_CenteredMixin):
    def convolution_op(self, inputs, kernel):
        # Keras' convolution `call` (causal padding, bias, activation
        # included) runs as it is; only the kernel it applies is centred.
        return super().convolution_op(inputs, center_kernel(kernel))


@keras.saving.register_keras_serializable(package="kerasbn")
class CenteredConv1D(_CenteredConv, keras.layers.Conv1D):
    """`keras.layers.Conv1D` whose calls use the centred kernel.

    The kernel `[width, in // groups, filters]` is centred over its first
    two axes for each filter. Same arguments as `keras.layers.Conv1D`
    (`padding="causal"` included); `use_bias=False` is recommended before
    MABN.

    >>> import numpy as np
    >>> layer = CenteredConv1D(2, 3, use_bias=False)
    >>> y = layer(np.ones((1, 5, 4), "float32"))   # constant input ...
    >>> float(np.abs(y).max()) < 1e-6              # ... gives zero output
    True
    """

    def call(self, inputs):
        # Keras' Conv1D.call applies `self.kernel` directly (not through
        # convolution_op), so the 1D layer writes its call out.
        padding = self.padding
        if padding == "causal":
            left = self.dilation_rate[0] * (self.kernel_size[0] - 1)
            time_axis = 1 if self.data_format == "channels_last" else 2
            pads = [[0, 0], [0, 0], [0, 0]]
            pads[time_axis] = [left, 0]
            inputs = ops.pad(inputs, pads)
            padding = "valid"
        outputs = ops.conv(
            inputs,
            center_kernel(self.kernel),
            strides=list(self.strides),
            padding=padding,
            dilation_rate=self.dilation_rate,
            data_format=self.data_format,
        )
        if self.use_bias:
            if self.data_format == "channels_last":
                bias_shape = (1, 1, self.filters)
            else:
                bias_shape = (1, self.filters, 1)
            outputs = ops.add(outputs, ops.reshape(self.bias, bias_shape))
        if self.activation is not None:
            return self.activation(outputs)
        return outputs


@keras.saving.register_keras_serializable(package="kerasbn")
class CenteredConv2D(_CenteredConv, keras.layers.Conv2D):
    """`keras.layers.Conv2D` whose calls use the centred kernel.

    The kernel `[kh, kw, in // groups, filters]` is centred over its first
    three axes for each filter (the reference's `CenConv2d`). Same
    arguments as `keras.layers.Conv2D`; `use_bias=False` is recommended
    before MABN.

    `kerasbn.fold` turns it into a plain `Conv2D` holding the centred
    kernel with the normalization folded in:

    >>> import keras, kerasbn
    >>> model = keras.Sequential([
    ...     keras.Input((5, 5, 2)),
    ...     kerasbn.layers.CenteredConv2D(3, 3, use_bias=False),
    ...     keras.layers.BatchNormalization(),
    ... ])
    >>> folded, report = kerasbn.fold(model)
    >>> [type(layer).__name__ for layer in folded.layers], report.folded
    (['Conv2D'], 1)
    """


@keras.saving.register_keras_serializable(package="kerasbn")
class CenteredConv3D(_CenteredConv, keras.layers.Conv3D):
    """`keras.layers.Conv3D` whose calls use the centred kernel.

    The kernel `[kd, kh, kw, in // groups, filters]` is centred over its
    first four axes for each filter. Same arguments as
    `keras.layers.Conv3D`.

    >>> import numpy as np, kerasbn
    >>> layer = kerasbn.layers.CenteredConv3D(2, 2, use_bias=False)
    >>> y = layer(np.ones((1, 3, 3, 3, 1), "float32"))  # constant input ...
    >>> tuple(y.shape), float(np.abs(y).max()) < 1e-6     # ... zero output
    ((1, 2, 2, 2, 2), True)
    """


@keras.saving.register_keras_serializable(package="kerasbn")
class CenteredDense(_CenteredMixin, keras.layers.Dense):
    """`keras.layers.Dense` whose calls use the centred kernel.

    The kernel `[in, units]` is centred over its input axis for each unit.
    Same arguments as `keras.layers.Dense`.

    >>> import numpy as np, kerasbn
    >>> layer = kerasbn.layers.CenteredDense(2, use_bias=False)
    >>> layer.build((None, 3))
    >>> kernel = layer.kernel.numpy()
    >>> x = np.array([[1.0, 2.0, 4.0]], "float32")
    >>> np.allclose(layer(x), x @ (kernel - kernel.mean(axis=0)), atol=1e-6)
    True
    """

    def call(self, inputs, training=None):
        outputs = ops.matmul(inputs, center_kernel(self.kernel))
        if self.bias is not None:
            outputs = ops.add(outputs, self.bias)
        if self.activation is not None:
            outputs = self.activation(outputs)
        return outputs


CENTERED_LAYERS = {
    keras.layers.Conv1D: CenteredConv1D,
    keras.layers.Conv2D: CenteredConv2D,
    keras.layers.Conv3D: CenteredConv3D,
    keras.layers.Dense: CenteredDense,
}

