"""Keras' BatchNormalization plus zero-debiased moving statistics."""

import keras
from keras import ops

from kerasbn import _keras_internal
from kerasbn import _numerics
from kerasbn import _checks

_ZERO_DEBIAS_MODES = {
    False: False,
    None: False,
    "mean": "mean",
    True: "mean_and_variance",
    "mean_and_variance": "mean_and_variance",
}


def _canonical_zero_debias(value):
    try:
        return _ZERO_DEBIAS_MODES[value]
    except (KeyError, TypeError):
        pass
    raise ValueError(
        "Argument `zero_debias` must be one of False, 'mean', True or "
        f"'mean_and_variance'. Received: zero_debias={value!r}. Use 'mean' "
        "for TF1's zero_debias_moving_mean=True, True to debias both the "
        "moving mean and the moving variance."
    )


def add_step_counter(layer, name):
    """An int64 training-step counter weight, saved with the layer.

    Every replica computes the same count, so the first replica's write is
    the write (`aggregation="only_first_replica"`).
    """
    return layer.add_weight(
        shape=(), name=name, initializer="zeros", dtype="int64",
        trainable=False, autocast=False, aggregation="only_first_replica")


@keras.saving.register_keras_serializable(package="kerasbn")
class BatchNormalization(keras.layers.BatchNormalization):
    """Keras' `BatchNormalization` with optional zero-debiased statistics.

    A drop-in replacement for `keras.layers.BatchNormalization` (and an
    instance of it): every argument, default, weight and behaviour of the
    Keras layer is kept, so with `zero_debias=False` (the default) a model
    gives the same outputs, the same updated statistics and reads the same
    weight files as with Keras' layer. See Keras' documentation for the
    shared arguments.

    With `zero_debias`, the moving statistics are exponential moving averages
    corrected for their start at zero, as TF1's
    `tf.contrib.layers.batch_norm(zero_debias_moving_mean=True)` did. After
    `t` training steps with batch statistics `v_1..v_t` and `d = momentum`:

        moving = (1 - d) * sum_k d**(t - k) * v_k / (1 - d**t)

    i.e. a properly weighted average of the batches seen so far, instead of
    an average that still holds `d**t` of its initial value. This matters
    for large momenta (0.99, 0.999) early in training, or when a model is
    evaluated after few steps.

    The layer stores the debiased value directly in `moving_mean` /
    `moving_variance` (so inference, folding and export read them as usual)
    and keeps one extra non-trainable weight, `debias_step`, the number of
    training updates so far; it is saved with the model and the weights
    file, so training resumes with the right correction. Each update is
    `moving = w_old * moving + w_new * v` with `w_new = (1 - d) / (1 - d**t)`
    and `w_old = 1 - w_new`, which reproduces TF's
    `assign_moving_average(..., zero_debias=True)` without its `biased` and
    `local_step` shadow variables.

    Before any training step (`debias_step == 0`) nothing is divided: the
    layer normalizes with the initial statistics, `moving_mean_initializer`
    and `moving_variance_initializer` (zeros and ones by default), like
    Keras' layer. The first training step replaces a debiased statistic by
    the batch statistic whatever its initial value was.

    Args:
        zero_debias: `False` (default, Keras' behaviour); `"mean"` to debias
            the moving mean only while the moving variance stays an ordinary
            moving average started at `moving_variance_initializer` (TF1's
            `zero_debias_moving_mean=True`); `True` or `"mean_and_variance"`
            to debias both (Haiku and Sonnet 2 semantics). Not supported
            with `renorm=True` (renorm's corrections are computed from its
            own `renorm_mean`/`renorm_stddev`, and debiasing those changes
            the training maths, not only the reported statistics).
        momentum: As in Keras, in `[0, 1]`; with `zero_debias` it must be
            below 1 (a momentum of 1 never updates, and `1 - d**t` is 0).
        **kwargs: Every other argument of `keras.layers.BatchNormalization`.

    With `synchronized=True` under a `tf.distribute` strategy the batch
    statistics are cross-replica, so every replica applies the same update
    and a run on N replicas matches one replica on the same global batch.
    Unlike Keras' layer, the cross-replica variance is centred (no
    `E[x^2] - E[x]^2` cancellation at a large mean) and a mask is honoured
    across replicas: `kerasbn/layers/_synchronized.py`.

    Example:

    >>> import numpy as np
    >>> import kerasbn
    >>> bn = kerasbn.layers.BatchNormalization(momentum=0.999,
    ...                                        zero_debias="mean")
    >>> x = np.full((4, 3), 5.0, dtype="float32")
    >>> _ = bn(x, training=True)
    >>> [float(v) for v in bn.moving_mean.numpy()]
    [5.0, 5.0, 5.0]
    >>> int(bn.debias_step.numpy())
    1
    """

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, *args,
                 zero_debias=False, **kwargs):
        _checks.check_axis(axis)
        momentum = _checks.check_momentum(
            "momentum", momentum,
            hint="It is the weight kept by the moving average; typical "
            "values are 0.9 to 0.999.")
        _checks.check_number("epsilon", epsilon, 0.0)
        zero_debias = _canonical_zero_debias(zero_debias)
        if zero_debias and momentum == 1.0:
            raise ValueError(
                "Argument `momentum` must be below 1 with zero_debias: a "
                "momentum of 1 never updates the statistics and its debias "
                f"factor 1 - momentum**t is 0. Received: momentum={momentum}, "
                f"zero_debias={zero_debias!r}."
            )
        super().__init__(axis, momentum, epsilon, *args, **kwargs)
        if zero_debias and self.renorm:
            raise ValueError(
                f"zero_debias={zero_debias!r} cannot be combined with "
                "renorm=True: batch renormalization corrects each step with "
                "its own renorm_mean/renorm_stddev averages. Use "
                "zero_debias=False with renorm=True."
            )
        self.zero_debias = zero_debias
        self.debias_step = None

    def build(self, input_shape):
        _checks.channels_of(self.axis, input_shape)
        super().build(input_shape)
        if self.zero_debias:
            self.debias_step = add_step_counter(self, "debias_step")

    def call(self, inputs, training=None, mask=None):
        if not (self.zero_debias and training and self.trainable):
            return super().call(inputs, training=training, mask=mask)
        # Statistics in at least float32, as Keras does for float16/bfloat16.
        inputs, mean, variance = _keras_internal.training_moments(
            self, inputs, mask)
        self._update_debiased_statistics(mean, variance)
        gamma = ops.cast(self.gamma, inputs.dtype) if self.scale else None
        beta = ops.cast(self.beta, inputs.dtype) if self.center else None
        outputs = ops.batch_normalization(
            inputs, mean, variance, axis=self.axis, offset=beta,
            scale=gamma, epsilon=self.epsilon)
        return ops.cast(outputs, self.compute_dtype)

    def _moments(self, inputs, mask):
        # Keras' call() takes its batch moments here: synchronized ones
        # without cancellation (kerasbn/layers/_synchronized.py).
        return _keras_internal.batch_norm_moments(self, inputs, mask)

    def _update_debiased_statistics(self, mean, variance):
        self.debias_step.assign_add(ops.ones((), dtype="int64"))
        w_old, w_new = (
            ops.cast(w, mean.dtype)
            for w in _numerics.debias_weights(self.momentum, self.debias_step)
        )
        moving_mean = ops.cast(self.moving_mean, mean.dtype)
        self.moving_mean.assign(w_old * moving_mean + w_new * mean)
        moving_variance = ops.cast(self.moving_variance, variance.dtype)
        if self.zero_debias == "mean_and_variance":
            new_variance = w_old * moving_variance + w_new * variance
        else:
            # Keras' own update, so the variance matches its layer exactly.
            new_variance = moving_variance * self.momentum + variance * (
                1.0 - self.momentum
            )
        self.moving_variance.assign(new_variance)

    def inference_scale_shift(self):
        """Float64 NumPy `(scale, shift)` of the inference-mode layer.

        Inference computes `outputs = scale * inputs + shift` per channel,
        which is what `kerasbn.fold` moves into a neighbouring layer.
        """
        return _numerics.layer_scale_shift(self)

    def get_config(self):
        config = super().get_config()
        config["zero_debias"] = self.zero_debias
        return config
