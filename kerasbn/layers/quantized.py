"""The layers of a quantization-aware training (QAT) model.

`kerasbn.quantization.prepare_qat` rewrites a trained float model with these; they
serialize as `.keras` with kerasbn registered, on every backend.

- `QuantizedLinear`: one Conv/DepthwiseConv/Dense, with the normalization
  that `kerasbn.fold` would fold backward into it and the activation after
  them, as one layer that trains with the weights an integer runtime will
  use (Krishnamoorthi 2018, section 3.2; Jacob et al. 2018, section 3.2).
  The kernel is folded with the *moving* statistics, `W * gamma / sigma`,
  and fake-quantized per output channel (symmetric, narrow range: int8 in
  [-127, 127], int4 in [-7, 7]). While the statistics train, the layer
  normalizes with the batch statistics of what that quantized kernel
  computes, so that the correction `sigma / sigma_B` makes the output
  exactly a batch-normalized one and the moving statistics keep training.
  Once frozen (`freeze_batch_statistics`, `FreezeBatchStatistics`, or in
  inference), the output is `conv(x, Q(W gamma / sigma)) + b'`: the folded
  layer the runtime runs. Batch moments come from the quantized
  convolution, divided back by `gamma / sigma` (one convolution per step,
  as `torch.ao.nn.intrinsic.qat.ConvBn2d` does; the whitepaper's separate
  float convolution for the moments would double the cost).
- `ActivationQuantizer`: fake-quantizes a tensor where the runtime holds
  it in 8 bits (after each fused layer's activation, the model inputs,
  additions, poolings that average, ...). Its range is a moving min/max:
  the first training batch sets it, then an exponential moving average
  (`momentum`) follows the batches; it always contains 0 so that zero
  (padding, ReLU) is exact. For the first `warmup_steps` training steps
  it only observes (the output is not quantized), so fine-tuning does not
  start from a range one batch chose. A moving min/max, not a learned
  scale (LSQ): it needs no learning rate of its own and behaves the same
  under every optimizer a user fine-tunes with, and from a trained float
  model the observed ranges are already the right ones.

Both count their training steps in a variable, and freeze at a step held
in a variable (`statistics_frozen_at`, `range_frozen_at`): a callback
sets that step before `fit` starts, so freezing happens inside the
compiled step, the same on JAX (whose trainer holds the variables while
it runs) as on TensorFlow.
"""

import keras
from keras import ops

NEVER = 2.0 ** 60  # A step no training reaches: "not frozen".
# A range narrower than this held one value, zero (ranges contain 0): any
# width quantizes it exactly, and integer runtimes refuse scales near 0
# (XNNPACK: "failed to prepare"), so such a range is made [low, low + 1].
_EMPTY = 1e-6

_CONVS = ("Conv1D", "Conv2D", "Conv3D")
_DEPTHWISE = ("DepthwiseConv1D", "DepthwiseConv2D")


def fake_quantize_weights(kernel, bits, per_channel=True):
    """Symmetric narrow-range fake quantization of a kernel whose last axis
    holds the output channels, per channel or per tensor, with a
    straight-through gradient (the range is the kernel's own max |w|, so
    nothing is clipped). A channel of zeros gets a tiny range: its codes
    are all 0 either way.

    On TensorFlow the TF op itself, on the kernel as it is: that is the
    pattern the TFLite converter turns into integer weights (Keras' own
    `fake_quant_with_min_max_vars` transposes the kernel around it).
    """
    reduce = tuple(range(len(kernel.shape) - (1 if per_channel else 0)))
    bound = ops.max(ops.abs(ops.stop_gradient(kernel)), axis=reduce)
    bound = ops.stop_gradient(ops.maximum(bound, 1e-30))
    if keras.backend.backend() == "tensorflow":
        return _tf_weight_fake_quant(kernel, -bound, bound, bits,
                                     per_channel)
    return keras.quantizers.fake_quant_with_min_max_vars(
        kernel, -bound, bound, num_bits=bits, narrow_range=True,
        axis=-1 if per_channel else None)


def _tf_weight_fake_quant(kernel, low, high, bits, per_channel):
    """TensorFlow's own narrow-range fake-quant op on a kernel (per channel
    on the last axis, or per tensor)."""
    import tensorflow as tf

    quantize = (tf.quantization.fake_quant_with_min_max_vars_per_channel
                if per_channel else
                tf.quantization.fake_quant_with_min_max_vars)
    return quantize(kernel, low, high, num_bits=bits, narrow_range=True)


def _read(variable):
    """A variable's value as a tensor that later assigns leave as it is
    (on TensorFlow, `variable.value` and `ops.convert_to_tensor` give
    the variable itself, which reads its new value after an assign)."""
    return ops.copy(variable)


def _broadcast(vector, rank, axis):
    shape = [1] * rank
    shape[axis] = -1
    return ops.reshape(vector, shape)


@keras.saving.register_keras_serializable(package="kerasbn")
class ActivationQuantizer(keras.layers.Layer):
    """Fake quantization of activations with a moving min/max range.

    Args:
        bits: 2..16; 8 is what integer runtimes run.
        momentum: of the moving average of the batch min and max.
        warmup_steps: training steps that only observe the range.
        nonnegative: the input is never negative (a ReLU's output): the
            range's minimum is 0 without reading it.
    """

    def __init__(self, bits=8, momentum=0.99, warmup_steps=16,
                 nonnegative=False, **kwargs):
        super().__init__(**kwargs)
        # Set for the output of a ReLU/ReLU6: its minimum is 0, not read.
        self.nonnegative = bool(nonnegative)
        if not 2 <= int(bits) <= 16:
            raise ValueError(
                f"ActivationQuantizer: bits must be in 2..16; got {bits!r}.")
        if not 0.0 <= float(momentum) < 1.0:
            raise ValueError("ActivationQuantizer: momentum must be in "
                             f"[0, 1); got {momentum!r}.")
        self.bits = int(bits)
        self.momentum = float(momentum)
        self.warmup_steps = int(warmup_steps)
        self.supports_masking = True
        # Set by the exporter to `export_range()`: then the layer is the
        # plain fake-quant op with that range as constants.
        self.exporting = None

    def build(self, input_shape):
        def state(name, value):
            return self.add_weight(
                name=name, shape=(), initializer=keras.initializers.Constant(
                    value), trainable=False, dtype="float32")

        self.range_min = state("range_min", 0.0)
        self.range_max = state("range_max", 0.0)
        self.steps = state("steps", 0.0)
        self.range_frozen_at = state("range_frozen_at", NEVER)

    def fake_quantize(self, x, low, high):
        high = ops.where(ops.less(high - low, _EMPTY), low + 1.0, high)
        return keras.quantizers.fake_quant_with_min_max_vars(
            x, low, high, num_bits=self.bits, narrow_range=False)

    def call(self, inputs, training=False):
        x = inputs
        if self.exporting is not None:
            return self.exported(x)
        if not training:
            # Untrained (no range yet): the float tensor, unquantized.
            seen = ops.greater(_read(self.steps), 0.0)
            return ops.where(seen, self.fake_quantize(
                x, _read(self.range_min), _read(self.range_max)), x)
        steps = _read(self.steps)
        old_min, old_max = _read(self.range_min), _read(self.range_max)
        frozen = ops.greater_equal(steps, _read(self.range_frozen_at))
        values = ops.cast(ops.stop_gradient(x), "float32")
        batch_min = (ops.convert_to_tensor(0.0) if self.nonnegative
                     else ops.minimum(ops.min(values), 0.0))
        batch_max = ops.maximum(ops.max(values), 0.0)
        first = ops.equal(steps, 0.0)
        m = self.momentum
        low = ops.where(first, batch_min,
                        m * old_min + (1.0 - m) * batch_min)
        high = ops.where(first, batch_max,
                         m * old_max + (1.0 - m) * batch_max)
        low = ops.where(frozen, old_min, low)
        high = ops.where(frozen, old_max, high)
        self.range_min.assign(low)
        self.range_max.assign(high)
        self.steps.assign(steps + 1.0)
        observing = ops.less(steps, float(self.warmup_steps))
        observing = ops.logical_and(observing, ops.logical_not(frozen))
        # One branch runs (a select would compute both over the tensor).
        return ops.cond(observing, lambda: x,
                        lambda: self.fake_quantize(x, low, high))

    def export_range(self):
        """NumPy float32 `(min, max)` the layer quantizes with."""
        import numpy as np

        low = np.float32(ops.convert_to_numpy(self.range_min))
        high = np.float32(ops.convert_to_numpy(self.range_max))
        if high - low < np.float32(_EMPTY):
            high = low + np.float32(1.0)
        return float(low), float(high)

    def exported(self, x):
        """The fake-quant op with the learned range as constants, which the
        TFLite converter and the ONNX writer read as a quantization."""
        import tensorflow as tf

        low, high = self.exporting
        return tf.quantization.fake_quant_with_min_max_args(
            x, min=low, max=high, num_bits=self.bits, narrow_range=False)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(bits=self.bits, momentum=self.momentum,
                      warmup_steps=self.warmup_steps,
                      nonnegative=self.nonnegative)
        return config


@keras.saving.register_keras_serializable(package="kerasbn")
class QuantizedLinear(keras.layers.Layer):
    """A Conv/DepthwiseConv/Dense (+ batch normalization) (+ activation)
    trained with folded, fake-quantized weights and a quantized output.

    Made by `prepare_qat` from a trained model; `linear` is the linear
    layer's class name and config, `normalization` the normalization's
    `axis`/`epsilon`/`momentum`/`center`/`scale` or None, `activation` a
    Keras activation name ("linear", "relu", "relu6", ...).
    """

    def __init__(self, linear, normalization=None, activation="linear",
                 weight_bits=8, per_channel=True, activation_bits=8,
                 range_momentum=0.99, warmup_steps=16, **kwargs):
        super().__init__(**kwargs)
        self.linear = dict(linear)
        kind = self.linear["class_name"]
        if kind not in _CONVS + _DEPTHWISE + ("Dense",):
            raise ValueError(f"QuantizedLinear: no rule for {kind}.")
        if not 2 <= int(weight_bits) <= 16:
            raise ValueError("QuantizedLinear: weight_bits must be in 2..16; "
                             f"got {weight_bits!r}.")
        self.normalization = None if normalization is None else dict(
            normalization)
        self.activation = activation
        self._activation = keras.activations.get(activation)
        self.weight_bits = int(weight_bits)
        self.per_channel = bool(per_channel)
        self.activation_bits = activation_bits
        self.range_momentum = float(range_momentum)
        self.warmup_steps = int(warmup_steps)
        # Set by the exporter to `(kernel, bias)` NumPy constants of the
        # frozen fold: the kernel's range is then a constant too, which the
        # TFLite converter and the ONNX writer read as its quantization.
        self.exporting = None
        self.output_quantizer = None
        if activation_bits is not None:
            self.output_quantizer = ActivationQuantizer(
                bits=activation_bits, momentum=range_momentum,
                warmup_steps=warmup_steps, name="output_quantizer",
                nonnegative=activation in ("relu", "relu6"),
                dtype=self.dtype_policy)

    # -- the linear operation -------------------------------------------

    @property
    def kind(self):
        return self.linear["class_name"]

    @property
    def _config(self):
        return self.linear["config"]

    def channel_axis(self, rank):
        if self.kind == "Dense":
            return rank - 1
        first = self._config.get("data_format") == "channels_first"
        return 1 if first else rank - 1

    def kernel_shape(self, input_shape):
        config = self._config
        rank = len(input_shape)
        if self.kind == "Dense":
            return (input_shape[-1], config["units"])
        channels = input_shape[self.channel_axis(rank)]
        size = tuple(config["kernel_size"])
        if self.kind in _DEPTHWISE:
            return size + (channels, config["depth_multiplier"])
        groups = config.get("groups", 1)
        return size + (channels // groups, config["filters"])

    def linear_op(self, x, kernel):
        config = self._config
        if self.kind == "Dense":
            return ops.matmul(x, kernel)
        arguments = dict(strides=tuple(config["strides"]),
                         padding=config["padding"],
                         data_format=config["data_format"],
                         dilation_rate=tuple(config["dilation_rate"]))
        if arguments["padding"] == "causal":  # 1-D, channels last
            left = arguments["dilation_rate"][0] * (kernel.shape[0] - 1)
            x = ops.pad(x, [[0, 0], [left, 0], [0, 0]])
            arguments["padding"] = "valid"
        if self.kind in _DEPTHWISE:
            return ops.depthwise_conv(x, kernel, **arguments)
        return ops.conv(x, kernel, **arguments)

    def to_channels_last(self, kernel):
        """The kernel with its output channels as one last axis."""
        if self.kind in _DEPTHWISE:
            shape = tuple(kernel.shape)
            return ops.reshape(kernel, shape[:-2] + (shape[-2] * shape[-1],))
        return kernel

    def from_channels_last(self, kernel, shape):
        return ops.reshape(kernel, shape) if self.kind in _DEPTHWISE else (
            kernel)

    # -- variables ------------------------------------------------------

    def build(self, input_shape):
        shape = self.kernel_shape(input_shape)
        self._kernel_shape = shape
        channels = shape[-1] if self.kind not in _DEPTHWISE else (
            shape[-2] * shape[-1])
        self.channels = channels

        def vector(name, init, trainable=True):
            return self.add_weight(name=name, shape=(channels,),
                                   initializer=init, trainable=trainable)

        self.kernel = self.add_weight(name="kernel", shape=shape,
                                      initializer="glorot_uniform")
        self.bias = None
        if self._config.get("use_bias", False):
            self.bias = vector("bias", "zeros")
        self.gamma = self.beta = None
        self.moving_mean = self.moving_variance = None
        if self.normalization is not None:
            if self.normalization.get("scale", True):
                self.gamma = vector("gamma", "ones")
            if self.normalization.get("center", True):
                self.beta = vector("beta", "zeros")
            self.moving_mean = vector("moving_mean", "zeros", False)
            self.moving_variance = vector("moving_variance", "ones", False)
            self.steps = self.add_weight(
                name="steps", shape=(), initializer="zeros", trainable=False,
                dtype="float32")
            self.statistics_frozen_at = self.add_weight(
                name="statistics_frozen_at", shape=(),
                initializer=keras.initializers.Constant(NEVER),
                trainable=False, dtype="float32")
        if self.output_quantizer is not None:
            output_shape = self.compute_output_shape(input_shape)
            self.output_quantizer.build(output_shape)

    # -- the computation ------------------------------------------------

    def folded_kernel(self, multiplier=None):
        """The kernel times a per-output-channel multiplier, quantized."""
        kernel = self.to_channels_last(self.kernel)
        if multiplier is not None:
            kernel = kernel * multiplier
        kernel = self.quantize_kernel(kernel)
        return self.from_channels_last(kernel, self._kernel_shape)

    def quantize_kernel(self, kernel):
        return fake_quantize_weights(kernel, self.weight_bits,
                                     self.per_channel)

    def affine(self):
        """gamma, beta, sigma of the normalization (ones/zeros if absent)."""
        epsilon = self.normalization["epsilon"]
        gamma = self.gamma if self.gamma is not None else ops.ones(
            (self.channels,))
        beta = self.beta if self.beta is not None else ops.zeros(
            (self.channels,))
        sigma = ops.sqrt(self.moving_variance + epsilon)
        return gamma, beta, sigma

    def _frozen_shift(self, beta, multiplier):
        """`beta + (b - mu) gamma / sigma`: the frozen fold's bias, with
        `conv(x, Q(W gamma / sigma))`."""
        bias = self.bias if self.bias is not None else 0.0
        return beta + (bias - self.moving_mean) * multiplier

    def call(self, inputs, training=False):
        x = inputs
        rank = len(x.shape)
        axis = self.channel_axis(rank)
        if self.exporting is not None:
            return self.exported(x, rank, axis)
        if self.normalization is None:
            y = self.linear_op(x, self.folded_kernel())
            if self.bias is not None:
                y = y + _broadcast(self.bias, rank, axis)
        else:
            y = self._normalized(x, rank, axis, training)
        return self._finish(y, training)

    def _normalized(self, x, rank, axis, training):
        gamma, beta, sigma = self.affine()
        multiplier = gamma / sigma
        y = self.linear_op(x, self.folded_kernel(multiplier))
        bias = self.bias if self.bias is not None else 0.0
        frozen_shift = self._frozen_shift(beta, multiplier)
        if not training:
            return y + _broadcast(frozen_shift, rank, axis)
        # Batch statistics of z = conv(x, Q(W gamma / sigma)) sigma / gamma
        # + b, the quantized convolution with the fold undone (a channel
        # with gamma = 0 has y = 0, so any divisor gives z = b there).
        safe = ops.where(ops.equal(multiplier, 0.0), 1.0, multiplier)
        reduce = [i for i in range(rank) if i != axis]
        y_mean, y_variance = ops.moments(y, axes=reduce)
        batch_mean = y_mean / safe + bias
        batch_variance = y_variance / ops.square(safe)
        epsilon = self.normalization["epsilon"]
        batch_sigma = ops.sqrt(batch_variance + epsilon)
        # gamma (z - mu_B) / sigma_B + beta = (sigma / sigma_B)(y - mean y)
        # + beta: the whitepaper's correction of the moving-sigma fold.
        # Both are one multiply-add per channel on y; choosing between the
        # per-channel vectors keeps it one pass over the tensor.
        scale = gamma / batch_sigma * ops.where(
            ops.equal(multiplier, 0.0), 0.0, 1.0 / safe)
        shift = beta - y_mean * scale
        steps = _read(self.steps)
        frozen = ops.greater_equal(steps, _read(self.statistics_frozen_at))
        scale = ops.where(frozen, ops.ones_like(scale), scale)
        shift = ops.where(frozen, frozen_shift, shift)
        output = y * _broadcast(scale, rank, axis) + _broadcast(
            shift, rank, axis)
        m = self.normalization["momentum"]
        batch_mean = ops.stop_gradient(batch_mean)
        batch_variance = ops.stop_gradient(batch_variance)
        old_mean = _read(self.moving_mean)
        old_variance = _read(self.moving_variance)
        self.moving_mean.assign(ops.where(
            frozen, old_mean, old_mean * m + batch_mean * (1.0 - m)))
        self.moving_variance.assign(ops.where(
            frozen, old_variance,
            old_variance * m + batch_variance * (1.0 - m)))
        self.steps.assign(steps + 1.0)
        return output

    def compute_output_shape(self, input_shape):
        config = self._config
        if self.kind == "Dense":
            return tuple(input_shape[:-1]) + (config["units"],)
        layer = keras.layers.deserialize(
            {"class_name": self.kind, "config": config,
             "module": "keras.layers"})
        return layer.compute_output_shape(input_shape)

    # -- what the runtime runs -------------------------------------------

    def exported(self, x, rank, axis):
        """The frozen fold with constant weights and weight ranges, each
        kernel fake-quantized in the very shape its op reads it (the TFLite
        converter cannot carry per-channel scales through a reshape or a
        transpose of a quantized constant)."""
        import numpy as np
        import tensorflow as tf

        kernel, bias = self.exporting
        kernel = np.asarray(kernel, np.float32)
        if self.kind in ("Conv1D", "DepthwiseConv1D"):
            return self._exported_1d(x, kernel, bias)
        if self.kind == "Dense":
            # As a 1x1 convolution: the converter keeps per-channel scales
            # through a convolution's kernel, not a fully connected one's.
            kernel = kernel.reshape((1, 1) + kernel.shape)
        quantized = self._constant_fake_quant(kernel)
        if self.kind == "Dense":
            # conv, bias, activation and the output's quantization on the
            # 4-D tensor, the shape given back after them: the converter
            # fuses the four into one integer op only when they follow
            # each other.
            units = int(kernel.shape[-1])
            flat = tf.reshape(x, (-1, 1, 1, int(kernel.shape[2])))
            y = tf.nn.conv2d(flat, quantized, strides=1, padding="VALID")
            y = self._finish(y + tf.constant(bias), training=False)
            return tf.reshape(y, [-1] + list(x.shape[1:-1]) + [units])
        y = self.linear_op(x, quantized) + _broadcast(
            tf.constant(bias), rank, axis)
        return self._finish(y, training=False)

    def _finish(self, y, training):
        y = self._activation(y)
        if self.output_quantizer is not None:
            y = self.output_quantizer(y, training=training)
        return y

    def _exported_1d(self, x, kernel, bias):
        """A 1-D convolution as the 2-D one TensorFlow runs it as, with the
        kernel quantized in its 2-D shape (channels last; see
        `exported`)."""
        import tensorflow as tf

        config = self._config
        stride = tuple(config["strides"])[0]
        dilation = tuple(config["dilation_rate"])[0]
        padding = config["padding"]
        rows = tf.expand_dims(x, 1)
        if padding == "causal":
            left = dilation * (kernel.shape[0] - 1)
            rows = tf.pad(rows, [[0, 0], [0, 0], [left, 0], [0, 0]])
            padding = "valid"
        quantized = self._constant_fake_quant(kernel.reshape(
            (1,) + kernel.shape))
        if self.kind == "Conv1D":
            y = tf.nn.conv2d(rows, quantized, strides=(1, stride),
                             padding=padding.upper(),
                             dilations=(1, dilation))
        else:
            y = tf.nn.depthwise_conv2d(rows, quantized,
                                       strides=(1, 1, stride, 1),
                                       padding=padding.upper(),
                                       dilations=(1, dilation))
        y = self._finish(y + tf.constant(bias), training=False)
        return tf.squeeze(y, 1)

    def _constant_fake_quant(self, kernel):
        import tensorflow as tf

        if self.kind in _DEPTHWISE and self.per_channel:
            # Channels are (input, multiplier) pairs, the kernel's last two
            # axes: quantize them as one axis, then give the shape back.
            shape = kernel.shape
            flat = kernel.reshape(shape[:-2] + (shape[-2] * shape[-1],))
            quantized = self._constant_fake_quant_last(flat)
            return tf.reshape(quantized, shape)
        return self._constant_fake_quant_last(kernel)

    def _constant_fake_quant_last(self, kernel):
        import numpy as np
        import tensorflow as tf

        # The range from NumPy: constants in the graph, as the converters
        # need them.
        reduce = tuple(range(kernel.ndim - (1 if self.per_channel else 0)))
        bound = np.maximum(np.max(np.abs(kernel), axis=reduce),
                           np.float32(1e-30)).astype(np.float32)
        return _tf_weight_fake_quant(
            tf.constant(kernel), tf.constant(-bound), tf.constant(bound),
            self.weight_bits, self.per_channel)

    def folded_float(self):
        """NumPy float32 `(kernel, bias)` of the frozen fold, before the
        kernel's quantization: `W gamma / sigma` and
        `beta + (b - mu) gamma / sigma` (the kernel and bias as they are
        without a normalization)."""
        import numpy as np

        kernel = self.kernel
        if self.normalization is None:
            shift = (self.bias if self.bias is not None
                     else ops.zeros((self.channels,)))
        else:
            gamma, beta, sigma = self.affine()
            multiplier = gamma / sigma
            shift = self._frozen_shift(beta, multiplier)
            kernel = self.from_channels_last(
                self.to_channels_last(kernel) * multiplier,
                self._kernel_shape)
        return (np.asarray(ops.convert_to_numpy(kernel), np.float32),
                np.asarray(ops.convert_to_numpy(shift), np.float32))

    def get_config(self):
        config = super().get_config()
        config.update(linear=self.linear, normalization=self.normalization,
                      activation=self.activation,
                      weight_bits=self.weight_bits,
                      per_channel=self.per_channel,
                      activation_bits=self.activation_bits,
                      range_momentum=self.range_momentum,
                      warmup_steps=self.warmup_steps)
        return config

