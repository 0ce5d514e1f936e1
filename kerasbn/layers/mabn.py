"""Moving Average Batch Normalization (MABN, Yan et al., ICLR 2020)."""

import keras
from keras import backend
from keras import constraints
from keras import initializers
from keras import ops
from keras import regularizers

from kerasbn import _numerics
from kerasbn import _checks


_TRAINING_BACKENDS = ("tensorflow", "jax", "torch")


def _check_backend(layer_name):
    if backend.backend() not in _TRAINING_BACKENDS:
        raise RuntimeError(
            f"{layer_name} trains on the TensorFlow, JAX and PyTorch "
            f"backends only (its backward pass has its own rule); the "
            f"'{backend.backend()}' backend cannot train. Set KERAS_BACKEND "
            "to one of those, or fold the trained model (kerasbn.fold) to "
            "run it anywhere."
        )


# --------------------------------------------------------------------------
# The maths, as small pure functions on tensors. TensorFlow keeps its own
# (`tf.custom_gradient` writes the buffer, cross-replica sums under
# tf.distribute); JAX and PyTorch share the `keras.ops` ones further down.


def _channel_mean(tf, values, reduction_axes):
    """Per-channel mean over `reduction_axes`, across replicas when in one.

    Under a `tf.distribute` strategy with several replicas the local sums
    and element counts are all-reduced, so the mean is that of the global
    batch (exact also when replicas get batches of different sizes).
    """
    total = tf.reduce_sum(values, axis=reduction_axes)
    count = tf.cast(tf.size(values), values.dtype) / tf.cast(
        tf.size(total), values.dtype
    )
    context = tf.distribute.get_replica_context()
    if context is not None and context.num_replicas_in_sync > 1:
        total, count = context.all_reduce(
            tf.distribute.ReduceOp.SUM, [total, count]
        )
    return total / count


def _ring_write(tf, buffer, index, value):
    """`buffer` with row `index` replaced by `value` (a new tensor)."""
    return tf.tensor_scatter_nd_update(
        buffer, tf.reshape(index, (1, 1)), value[None]
    )


def _mabn_forward_statistics(tf, chi, step, running_var, buffer_x2, *,
                             buffer_size, warmup_steps, clip_start_step,
                             r_max, epsilon):
    """One training step's `(v, r, new_buffer_x2, use_batch)`.

    `chi` is this batch's per-channel second moment, `step` the counter
    after its increment (t >= 1), `running_var` the value before this
    step's update.
    """
    index = tf.cast(step % buffer_size, tf.int32)
    new_buffer = _ring_write(tf, buffer_x2, index, chi)
    use_batch = tf.logical_or(step <= buffer_size, step < warmup_steps)
    v = tf.where(use_batch, chi, tf.reduce_mean(new_buffer, axis=0))
    r = tf.sqrt(v + epsilon) / tf.sqrt(running_var + epsilon)
    clipped = tf.clip_by_value(r, 1.0 / r_max, r_max)
    r = tf.where(step <= max(clip_start_step, warmup_steps),
                 tf.ones_like(r), clipped)
    return v, r, new_buffer, use_batch


def _ops_mean(x, axis):
    """`ops.mean` as a sum over a count: Keras' `ops.mean` on PyTorch (and
    JAX without x64) sums float64 in float32."""
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    count = 1
    for a in axes:
        count *= x.shape[a]
    return ops.sum(x, axis=axes) / count


def _ops_forward_statistics(chi, step, running_var, buffer_x2, *,
                            buffer_size, warmup_steps, clip_start_step,
                            r_max, epsilon):
    """`_mabn_forward_statistics` in `keras.ops` (JAX, PyTorch).

    Returns `(v, r, new_buffer_x2, write, use_batch)`: `write` is the
    `(buffer_size, 1)` boolean row selector of this step's slot.
    """
    write = ops.expand_dims(
        ops.equal(ops.arange(buffer_size, dtype=step.dtype),
                  step % buffer_size), -1)
    new_buffer = ops.where(write, chi[None], buffer_x2)
    use_batch = ops.logical_or(step <= buffer_size, step < warmup_steps)
    v = ops.where(use_batch, chi, _ops_mean(new_buffer, 0))
    r = ops.sqrt(v + epsilon) / ops.sqrt(running_var + epsilon)
    clipped = ops.clip(r, 1.0 / r_max, r_max)
    r = ops.where(step <= max(clip_start_step, warmup_steps),
                  ops.ones_like(r), clipped)
    return v, r, new_buffer, write, use_batch


def _ops_backward(dy, z, gamma, r, inv_std, buffer_gz, write, use_batch,
                  axes):
    """MABN's backward rule in `keras.ops`: `(dx, dgamma, dbeta,
    new_buffer_gz)`; `gamma`, `r`, `inv_std` in the broadcast shape,
    `dgamma`/`dbeta` too (summed with keepdims); `write` and `use_batch`
    are 0/1 floats (JAX gives no cotangent to booleans)."""
    g = dy * gamma * r
    psi_t = _ops_mean(g * z, axes)
    new_buffer = ops.where(write > 0.5, psi_t[None], buffer_gz)
    psi = ops.where(use_batch > 0.5, psi_t, _ops_mean(new_buffer, 0))
    dx = (g - z * ops.reshape(psi, gamma.shape)) * inv_std
    dgamma = ops.sum(dy * r * z, axis=axes, keepdims=True)
    dbeta = ops.sum(dy, axis=axes, keepdims=True)
    return dx, dgamma, dbeta, new_buffer


_JAX_NORMALIZE = []


def _jax_normalize():
    """`y = gamma * r * x * inv_std + beta` with MABN's backward rule.

    JAX has no state in a backward pass, so the new `buffer_gz` leaves it
    as the cotangent of the `buffer_gz` input: the layer's `buffer_gz`
    variable is trainable with `overwrite_with_gradient=True` on JAX, and
    the optimizer assigns that "gradient" to it (Keras' own mechanism for
    float8 scale histories). The other constant inputs get zero
    cotangents.
    """
    if _JAX_NORMALIZE:
        return _JAX_NORMALIZE[0]
    import jax

    def normalize(axes, x, gamma, beta, buffer_gz, inv_std, r, write,
                  use_batch):
        return gamma * r * (x * inv_std) + beta

    def forward(axes, x, gamma, beta, buffer_gz, inv_std, r, write,
                use_batch):
        z = x * inv_std
        saved = (z, gamma, r, inv_std, buffer_gz, write, use_batch)
        return gamma * r * z + beta, saved

    def backward(axes, saved, dy):
        z, gamma, r, inv_std, buffer_gz, write, use_batch = saved
        dx, dgamma, dbeta, new_buffer = _ops_backward(
            dy, z, gamma, r, inv_std, buffer_gz, write, use_batch, axes)
        return (dx, dgamma, dbeta, new_buffer, ops.zeros_like(inv_std),
                ops.zeros_like(r), ops.zeros_like(write),
                ops.zeros_like(use_batch))

    normalize = jax.custom_vjp(normalize, nondiff_argnums=(0,))
    normalize.defvjp(forward, backward)
    _JAX_NORMALIZE.append(normalize)
    return normalize


_TORCH_NORMALIZE = []


def _torch_normalize():
    """The same as `_jax_normalize` as a `torch.autograd.Function`, whose
    backward writes the new buffer into the `buffer_gz` variable."""
    if _TORCH_NORMALIZE:
        return _TORCH_NORMALIZE[0]
    import torch

    class Normalize(torch.autograd.Function):
        @staticmethod
        def forward(ctx, axes, x, gamma, beta, variable, inv_std, r, write,
                    use_batch):
            z = x * inv_std
            ctx.save_for_backward(z, gamma, r, inv_std, write, use_batch)
            ctx.variable, ctx.axes = variable, axes
            return gamma * r * z + beta

        @staticmethod
        def backward(ctx, dy):
            z, gamma, r, inv_std, write, use_batch = ctx.saved_tensors
            variable = ctx.variable
            dx, dgamma, dbeta, new_buffer = _ops_backward(
                dy, z, gamma, r, inv_std,
                ops.cast(variable.value, dy.dtype), write, use_batch,
                ctx.axes)
            variable.assign(ops.cast(new_buffer, variable.dtype))
            return None, dx, dgamma, dbeta, None, None, None, None, None

    _TORCH_NORMALIZE.append(Normalize.apply)
    return Normalize.apply


@keras.saving.register_keras_serializable(package="kerasbn")
class MovingAverageBatchNormalization(keras.layers.Layer):
    """Moving Average Batch Normalization (MABN), for batches of 1 to 4.

    MABN (Yan et al., ICLR 2020, "Towards Stabilizing Batch Statistics in
    Backward Propagation of Batch Normalization") replaces the two batch
    statistics that make BN fail at small batch sizes by moving averages
    over the last `buffer_size` steps: the second moment of the inputs in
    the forward pass and `psi = mean(g * z)` in the backward pass. It keeps
    no mean (the preceding layer should be weight-centred, e.g.
    `kerasbn.layers.CenteredConv2D`, with no bias). This layer reproduces
    the authors' PyTorch reference exactly. Per channel, with the step
    counter `t` incremented before use (the first training step is
    `t = 1`), `K = buffer_size`, `W = warmup_steps` and every reduction
    over all axes except `axis`:

        chi_t = mean(x**2);   buffer_x2[t % K] = chi_t
        v     = chi_t  if t <= K or t < W  else  mean(buffer_x2)
        z     = x / sqrt(v + eps)
        r     = sqrt(v + eps) / sqrt(moving_variance + eps)  (before update)
        r     = 1  if t <= max(clip_start_step, W)  else clip(r, 1/r_max, r_max)
        y     = gamma * r * z + beta
        moving_variance <- momentum * moving_variance + (1 - momentum) * v

    The backward pass is not the derivative of the above: `r` and `v` are
    constants and the batch statistic `mean(g * z)` is averaged too. With
    `g = dL/dy * gamma * r`:

        psi_t = mean(g * z);   buffer_gz[t % K] = psi_t   (written in backward)
        psi   = psi_t  if t <= K or t < W  else  mean(buffer_gz)
        dL/dx = (g - z * psi) / sqrt(v + eps)
        dL/dgamma = sum(dL/dy * r * z);   dL/dbeta = sum(dL/dy)

    While `t <= K` or `t < W` this is the exact gradient of
    `gamma * x / sqrt(mean(x**2) + eps) + beta`. In inference the layer is
    `gamma * x / sqrt(moving_variance + eps) + beta`, a per-channel scale
    and shift that `kerasbn.fold` removes.

    As in Keras, the layer uses the training branch only when called with
    `training=True` *and* `trainable` is True; a frozen layer normalizes
    with `moving_variance` and updates nothing. Its state (`moving_variance`,
    the step counter `step` and the two `(buffer_size, channels)` ring
    buffers `buffer_x2` and `buffer_gz`) are non-trainable weights, saved
    in `.keras` and weights files, so training resumes exactly where it
    stopped. `buffer_gz` is written by the backward pass: a training call
    without a gradient (e.g. `model(x, training=True)` outside a tape)
    advances the counter and `buffer_x2` but leaves `buffer_gz` as it is,
    as in the reference.

    Distribution: under JAX's `keras.distribution.DataParallel` the
    statistics are those of the global batch (SPMD means reduce over the
    sharded batch). Under a `tf.distribute` strategy with several replicas
    (e.g. `MirroredStrategy`) `chi_t` and `psi_t` are cross-replica, like
    `SyncBatchNorm`: each replica's sums are all-reduced, so every replica
    holds the same state and N replicas match one device on the global
    batch. (The reference computes them per GPU; with mirrored state
    variables that cannot hold one buffer per replica, cross-replica
    statistics are the exact and well-defined choice. It costs two small
    all-reduces per layer and step; the buffer of length `K` still
    averages over `K` global batches.) To simulate an effective batch of
    `B` with per-step batches of `b` the reference uses `buffer_size =
    B // b` (the default 16 is batch 32 at batch 2).

    Backends: TensorFlow (eager, `tf.function`/`model.fit`, XLA), PyTorch
    (a `torch.autograd.Function` whose backward writes `buffer_gz`) and
    JAX. JAX has no state in a backward pass, so there `buffer_gz` is a
    trainable variable with `overwrite_with_gradient=True`: the backward
    rule returns the new buffer as its "gradient" and Keras' optimizer
    assigns it (exactly, no descent step). That happens in `model.fit` and
    in custom loops that pass the layer's trainable variables and their
    gradients to a Keras optimizer (`optimizer.apply`); a loop that
    applies gradients itself must assign `buffer_gz`'s gradient to it, and
    `gradient_accumulation_steps` (which takes a max of such "gradients")
    or `use_ema` do not apply to it. `.keras` and weights files hold the
    same variables in the same order on every backend. The three backends
    match the reference step by step (the tests run each). Other backends
    construct the layer and run inference; a training call raises. Inputs
    in float16/bfloat16 are normalized in float32. Masks are not
    supported.

    Args:
        axis: The channel axis (int). Default -1.
        momentum: Weight kept by `moving_variance` at each step, in `[0, 1]`.
            Default 0.98 (the reference's).
        epsilon: Positive float added to the variances. Default 1e-5.
        buffer_size: `K`, the number of steps in each moving average
            (integer >= 1). Default 16.
        warmup_steps: `W`: batch statistics are used while `t < W`
            (integer >= 0). Default 100.
        clip_start_step: `r` is 1 while `t <= max(clip_start_step, W)` and
            clipped to `[1 / r_max, r_max]` afterwards (integer >= 0).
            Default 1000 (fixed in the reference).
        r_max: Clipping bound of `r`, >= 1. Default 5.0.
        center: Whether to add the learned offset `beta`.
        scale: Whether to multiply by the learned `gamma`.
        beta_initializer, gamma_initializer, moving_variance_initializer:
            Initializers (default zeros, ones, ones).
        beta_regularizer, gamma_regularizer: Optional regularizers.
        beta_constraint, gamma_constraint: Optional constraints.
        **kwargs: Base layer arguments (`name`, `dtype`, `trainable`).

    Example:

    >>> import numpy as np
    >>> import kerasbn
    >>> mabn = kerasbn.layers.MABN()
    >>> x = np.full((4, 3), 2.0, dtype="float32")
    >>> y = mabn(x, training=True)   # first step: batch second moment 4.0
    >>> [round(float(v), 4) for v in y[0]]
    [1.0, 1.0, 1.0]
    >>> int(mabn.step.numpy()), round(float(mabn.moving_variance[0]), 4)
    (1, 1.06)
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.98,
        epsilon=1e-5,
        buffer_size=16,
        warmup_steps=100,
        clip_start_step=1000,
        r_max=5.0,
        center=True,
        scale=True,
        beta_initializer="zeros",
        gamma_initializer="ones",
        moving_variance_initializer="ones",
        beta_regularizer=None,
        gamma_regularizer=None,
        beta_constraint=None,
        gamma_constraint=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _checks.check_axis(axis)
        momentum = _checks.check_momentum(
            "momentum", momentum,
            hint="It is the weight kept by moving_variance; the reference "
            "uses 0.98.")
        epsilon = _checks.check_number(
            "epsilon", epsilon, 0.0, low_open=True,
            hint="It keeps the square roots of the variances away from "
            "zero; the reference uses 1e-5.")
        _checks.check_int("buffer_size", buffer_size, 1,
                          hint="It is the number of steps averaged, e.g. 16 "
                          "to simulate a batch of 32 with batches of 2.")
        _checks.check_int("warmup_steps", warmup_steps, 0,
                          hint="Use 0 to average from step buffer_size + 1 "
                          "on.")
        _checks.check_int("clip_start_step", clip_start_step, 0,
                          hint="It is the last step with r = 1 (1000 in the "
                          "reference).")
        r_max = _checks.check_number(
            "r_max", r_max, 1.0,
            hint="r is clipped to [1 / r_max, r_max]; the reference uses "
            "5.0.")
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.buffer_size = buffer_size
        self.warmup_steps = warmup_steps
        self.clip_start_step = clip_start_step
        self.r_max = r_max
        self.center = bool(center)
        self.scale = bool(scale)
        self.beta_initializer = initializers.get(beta_initializer)
        self.gamma_initializer = initializers.get(gamma_initializer)
        self.moving_variance_initializer = initializers.get(
            moving_variance_initializer
        )
        self.beta_regularizer = regularizers.get(beta_regularizer)
        self.gamma_regularizer = regularizers.get(gamma_regularizer)
        self.beta_constraint = constraints.get(beta_constraint)
        self.gamma_constraint = constraints.get(gamma_constraint)
        self.supports_masking = False
        self.gamma = None
        self.beta = None

    def build(self, input_shape):
        rank = len(input_shape)
        if rank < 2:
            raise ValueError(
                "MovingAverageBatchNormalization expects inputs of rank >= 2 "
                f"(batch and channels). Received input shape "
                f"{tuple(input_shape)}."
            )
        channels = _checks.channels_of(self.axis, input_shape)
        axis = self.axis % rank
        shape = (channels,)
        if self.scale:
            self.gamma = self.add_weight(
                shape=shape, name="gamma",
                initializer=self.gamma_initializer,
                regularizer=self.gamma_regularizer,
                constraint=self.gamma_constraint,
                trainable=True, autocast=False,
            )
        if self.center:
            self.beta = self.add_weight(
                shape=shape, name="beta",
                initializer=self.beta_initializer,
                regularizer=self.beta_regularizer,
                constraint=self.beta_constraint,
                trainable=True, autocast=False,
            )
        # Every replica computes the same (cross-replica) values, so the
        # first replica's write is the write.
        state = dict(trainable=False, autocast=False,
                     aggregation="only_first_replica")
        self.moving_variance = self.add_weight(
            shape=shape, name="moving_variance",
            initializer=self.moving_variance_initializer, **state,
        )
        self.step = self.add_weight(
            shape=(), name="step", initializer="zeros", dtype="int64",
            **state,
        )
        buffer_shape = (self.buffer_size, channels)
        self.buffer_x2 = self.add_weight(
            shape=buffer_shape, name="buffer_x2", initializer="zeros",
            **state,
        )
        if backend.backend() == "jax":
            # Written through its "gradient" (see `_jax_normalize`).
            state = dict(trainable=True, autocast=False,
                         overwrite_with_gradient=True)
        self.buffer_gz = self.add_weight(
            shape=buffer_shape, name="buffer_gz", initializer="zeros",
            **state,
        )
        self._reduction_axes = [a for a in range(rank) if a != axis]
        self._broadcast_shape = [1] * rank
        self._broadcast_shape[axis] = channels

    def compute_output_shape(self, input_shape):
        return input_shape

    def _param(self, weight, dtype, fill):
        if weight is None:
            return ops.full(self.moving_variance.shape, fill, dtype=dtype)
        return ops.cast(weight, dtype)

    def call(self, inputs, training=None, mask=None):
        if mask is not None:
            raise NotImplementedError(
                f"{type(self).__name__} does not support masks (the "
                "reference has no masked statistics). Received a mask of "
                f"shape {tuple(mask.shape)}. Remove the masking upstream or "
                "use kerasbn.layers.BatchNormalization."
            )
        # Statistics in at least float32, as Keras does for float16/bfloat16.
        dtype = _numerics.at_least_float32(inputs.dtype)
        inputs = ops.cast(inputs, dtype)
        gamma = self._param(self.gamma, dtype, 1.0)
        beta = self._param(self.beta, dtype, 0.0)
        if training and self.trainable:
            outputs = self._train_step(inputs, gamma, beta)
        else:
            inv = ops.rsqrt(ops.cast(self.moving_variance, dtype)
                            + self.epsilon)
            outputs = inputs * ops.reshape(gamma * inv, self._broadcast_shape)
            outputs = outputs + ops.reshape(beta, self._broadcast_shape)
        return ops.cast(outputs, self.compute_dtype)

    def _state_in_file_order(self):
        """gamma, beta, moving_variance, step, buffer_x2, buffer_gz: the
        order `.keras` and weights files hold them in on every backend
        (on JAX `buffer_gz` is trainable, which would move it)."""
        return [w for w in (self.gamma, self.beta, self.moving_variance,
                            self.step, self.buffer_x2, self.buffer_gz)
                if w is not None]

    def save_own_variables(self, store):
        for i, variable in enumerate(self._state_in_file_order()):
            store[f"{i}"] = variable

    def load_own_variables(self, store):
        variables = self._state_in_file_order()
        if len(store.keys()) != len(variables):
            raise ValueError(
                f"Layer '{self.name}' ({type(self).__name__}) holds "
                f"{len(variables)} variables but the file holds "
                f"{len(store.keys())} for it. Was it saved with other "
                "`center`/`scale` arguments?"
            )
        for i, variable in enumerate(variables):
            variable.assign(store[f"{i}"])

    def _train_step(self, inputs, gamma, beta):
        _check_backend(type(self).__name__)
        if backend.backend() != "tensorflow":
            return self._train_step_ops(inputs, gamma, beta)
        import tensorflow as tf

        dtype = inputs.dtype
        axes = self._reduction_axes
        shape = self._broadcast_shape
        epsilon = tf.constant(self.epsilon, dtype)

        step = tf.convert_to_tensor(self.step) + 1
        self.step.assign(step)
        running_var = tf.cast(self.moving_variance, dtype)
        chi = _channel_mean(tf, tf.square(inputs), axes)
        v, r, buffer_x2, use_batch = _mabn_forward_statistics(
            tf, chi, step, running_var, tf.cast(self.buffer_x2, dtype),
            buffer_size=self.buffer_size, warmup_steps=self.warmup_steps,
            clip_start_step=self.clip_start_step, r_max=self.r_max,
            epsilon=epsilon,
        )
        self.buffer_x2.assign(tf.cast(buffer_x2, self.buffer_x2.dtype))
        self.moving_variance.assign(tf.cast(
            self.momentum * running_var + (1.0 - self.momentum) * v,
            self.moving_variance.dtype,
        ))
        v = tf.stop_gradient(tf.reshape(v, shape))
        r = tf.stop_gradient(tf.reshape(r, shape))
        index = tf.cast(step % self.buffer_size, tf.int32)
        buffer_gz_var = self.buffer_gz

        @tf.custom_gradient
        def normalize(x, gamma, beta):
            inv_std = tf.math.rsqrt(v + epsilon)
            z = x * inv_std
            y = tf.reshape(gamma, shape) * r * z + tf.reshape(beta, shape)

            def backward(dy):
                g = dy * tf.reshape(gamma, shape) * r
                psi_t = _channel_mean(tf, g * z, axes)
                buffer_gz = _ring_write(
                    tf, tf.cast(buffer_gz_var, dtype), index, psi_t
                )
                buffer_gz_var.assign(tf.cast(buffer_gz, buffer_gz_var.dtype))
                psi = tf.where(use_batch, psi_t,
                               tf.reduce_mean(buffer_gz, axis=0))
                dx = (g - z * tf.reshape(psi, shape)) * inv_std
                dgamma = tf.reduce_sum(dy * r * z, axis=axes)
                dbeta = tf.reduce_sum(dy, axis=axes)
                return dx, dgamma, dbeta

            return y, backward

        return normalize(inputs, gamma, beta)

    def _train_step_ops(self, inputs, gamma, beta):
        """The training step on JAX and PyTorch (`keras.ops` statistics,
        the backend's own custom gradient)."""
        dtype = inputs.dtype
        shape = self._broadcast_shape
        step = ops.convert_to_tensor(self.step) + 1
        self.step.assign(step)
        running_var = ops.cast(self.moving_variance, dtype)
        chi = ops.stop_gradient(
            _ops_mean(ops.square(inputs), self._reduction_axes))
        v, r, buffer_x2, write, use_batch = _ops_forward_statistics(
            chi, step, running_var, ops.cast(self.buffer_x2, dtype),
            buffer_size=self.buffer_size, warmup_steps=self.warmup_steps,
            clip_start_step=self.clip_start_step, r_max=self.r_max,
            epsilon=self.epsilon,
        )
        self.buffer_x2.assign(ops.cast(buffer_x2, self.buffer_x2.dtype))
        self.moving_variance.assign(ops.cast(
            self.momentum * running_var + (1.0 - self.momentum) * v,
            self.moving_variance.dtype,
        ))
        constants = [
            ops.stop_gradient(ops.reshape(ops.rsqrt(v + self.epsilon),
                                          shape)),
            ops.stop_gradient(ops.reshape(r, shape)),
            ops.cast(write, dtype), ops.cast(use_batch, dtype),
        ]
        arguments = (tuple(self._reduction_axes), inputs,
                     ops.reshape(gamma, shape), ops.reshape(beta, shape))
        if backend.backend() == "jax":
            return _jax_normalize()(
                *arguments, ops.cast(self.buffer_gz, dtype), *constants)
        return _torch_normalize()(*arguments, self.buffer_gz, *constants)

    def inference_scale_shift(self):
        """Float64 NumPy `(scale, shift)` of the inference-mode layer.

        Inference is `gamma * x / sqrt(moving_variance + eps) + beta`, i.e.
        a normalization with mean 0; `kerasbn.fold` moves it into a
        neighbouring layer.
        """
        return _numerics.layer_scale_shift(self)

    def get_config(self):
        base_config = super().get_config()
        config = {
            "axis": self.axis,
            "momentum": self.momentum,
            "epsilon": self.epsilon,
            "buffer_size": self.buffer_size,
            "warmup_steps": self.warmup_steps,
            "clip_start_step": self.clip_start_step,
            "r_max": self.r_max,
            "center": self.center,
            "scale": self.scale,
            "beta_initializer": initializers.serialize(self.beta_initializer),
            "gamma_initializer": initializers.serialize(
                self.gamma_initializer
            ),
            "moving_variance_initializer": initializers.serialize(
                self.moving_variance_initializer
            ),
            "beta_regularizer": regularizers.serialize(self.beta_regularizer),
            "gamma_regularizer": regularizers.serialize(
                self.gamma_regularizer
            ),
            "beta_constraint": constraints.serialize(self.beta_constraint),
            "gamma_constraint": constraints.serialize(self.gamma_constraint),
        }
        return {**base_config, **config}


MABN = MovingAverageBatchNormalization
