"""Batch Renormalization (Ioffe 2017) with the paper's rmax/dmax schedule."""

import math
import numbers

import keras
from keras import ops

from kerasbn import _keras_internal
from kerasbn import _numerics
from kerasbn.layers.batch_normalization import BatchNormalization
from kerasbn.layers.batch_normalization import add_step_counter
from kerasbn import _checks

_SCHEDULE_ARGS = ("rmax", "rmin", "dmax")


# --------------------------------------------------------------------------
# Pure functions: the schedule and the training-mode maths.


def linear_ramp(step, start, end):
    """0 before `start`, 1 from `end` on, linear in between.

    `step` is a float tensor; `start <= end` are Python ints. With
    `start == end` the ramp is a step function that is 1 from `start` on.
    """
    if end == start:
        return ops.cast(ops.greater_equal(step, float(start)), step.dtype)
    return ops.clip((step - float(start)) / float(end - start), 0.0, 1.0)


def renorm_corrections(mean, stddev, renorm_mean, renorm_stddev, epsilon,
                       rmin, rmax, dmax):
    """The clipped corrections `(r, d)`, cut off from the gradient.

    `s = max(renorm_stddev, sqrt(epsilon))`, `r = clip(stddev / s, rmin,
    rmax)` and `d = clip((mean - renorm_mean) / s, -dmax, dmax)`. The
    maximum with `sqrt(epsilon)` keeps a zero-initialized average from
    dividing by zero. The clip bounds may be Python floats or tensors.
    """
    floor = ops.sqrt(ops.cast(epsilon, mean.dtype))
    s = ops.maximum(renorm_stddev, floor)
    r = ops.divide(stddev, s)
    d = ops.divide(ops.subtract(mean, renorm_mean), s)
    r = ops.minimum(ops.maximum(r, rmin), rmax)
    d = ops.clip(d, -dmax, dmax)
    return ops.stop_gradient(r), ops.stop_gradient(d)


def compose_scale_offset(r, d, gamma, beta):
    """Scale and offset of `(xhat * r + d) * gamma + beta`.

    That is `xhat * (r * gamma) + (d * gamma + beta)`; `gamma=None` means 1
    and `beta=None` means 0.
    """
    if gamma is None:
        scale, offset = r, d
    else:
        scale, offset = ops.multiply(r, gamma), ops.multiply(d, gamma)
    if beta is not None:
        offset = ops.add(offset, beta)
    return scale, offset


# --------------------------------------------------------------------------
# Argument checks.


def _is_serializable(fn):
    """Whether Keras can save and reload the callable `fn` by name."""
    if isinstance(fn, type):
        return False
    def registered(obj):
        name = keras.saving.get_registered_name(obj)
        return keras.saving.get_registered_object(name) is obj

    if hasattr(fn, "get_config"):
        cls = type(fn)
        return registered(cls) or cls.__module__.startswith("keras.")
    return hasattr(fn, "__name__") and registered(fn)


def _check_bound(name, value, low, high, hint):
    if callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise _checks.argument_error(
            name, "a number or a callable `step -> value`", value)
    value = float(value)
    if not (math.isfinite(value) and low <= value <= high):
        raise _checks.argument_error(name, hint, value)
    return value


def _check_steps(name, value):
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and (
        float(value).is_integer() and value >= 0
    ):
        return int(value)
    raise _checks.argument_error(
        name, "a non-negative integer number of training steps", value)


@keras.saving.register_keras_serializable(package="kerasbn")
class BatchRenormalization(keras.layers.BatchNormalization):
    """Batch Renormalization whose clipping relaxes during training.

    Batch Renormalization ([Ioffe, 2017](https://arxiv.org/abs/1702.03275))
    normalizes a training batch with its own statistics and then corrects
    the result towards what moving averages would have given. Per channel,
    with batch mean `mu_B`, `sigma_B = sqrt(var_B + epsilon)` and the
    training averages `renorm_mean`, `renorm_stddev` as they were BEFORE
    this step (`s = max(renorm_stddev, sqrt(epsilon))`):

        r = clip(sigma_B / s, rmin(t), rmax(t))
        d = clip((mu_B - renorm_mean) / s, -dmax(t), dmax(t))
        y = (x - mu_B) / sigma_B * (r * gamma) + (d * gamma + beta)

    `r` and `d` are constants for the gradient, which flows through `mu_B`
    and `sigma_B` as in batch normalization. Then `renorm_mean` and
    `renorm_stddev` move towards `mu_B` and `sigma_B` with
    `renorm_momentum`, and the inference statistics `moving_mean` and
    `moving_stddev` with `momentum`; `moving_variance` is kept equal to
    `max(moving_stddev**2 - epsilon, 0)`. Inference is exactly batch
    normalization on `moving_mean` and `moving_variance`, so the layer folds
    into a neighbouring layer like any `BatchNormalization`.

    Keras' `BatchNormalization(renorm=True)` clips with constants, and a
    schedule computed in Python would be frozen when the training step is
    traced. Here `t` is the layer's `renorm_step` weight, the number of
    training-mode calls so far, and the clip values are computed from it
    inside the graph (eager, `tf.function`, XLA, `tf.distribute`):

    - `t < warmup_steps`: `rmax = rmin = 1` and `dmax = 0`, so the layer is
      plain batch normalization while its averages settle;
    - then `rmax(t)` grows linearly from 1 to `rmax`, reached at
      `rmax_steps`, and `dmax(t)` from 0 to `dmax`, reached at `dmax_steps`;
      both stay constant afterwards;
    - `rmin(t) = 1 / rmax(t)` by default; a number `rmin` instead ramps
      linearly from 1 to `rmin` alongside `rmax`.

    The defaults are the paper's ImageNet schedule (5k steps of warm-up,
    `rmax = 3` at 40k steps, `dmax = 5` at 25k steps; the paper does not
    state the ramp's shape, linear is the common reading). With
    `warmup_steps = rmax_steps = dmax_steps = 0` the clipping is constant
    and the layer computes exactly what
    `keras.layers.BatchNormalization(renorm=True, renorm_clipping={"rmax":
    rmax, "rmin": rmin, "dmax": dmax})` computes, with the same weights.

    `renorm_step` advances once per training-mode call of the layer (once
    per training step for a layer used once in the model). It is saved with
    the model and in weight files, so training resumes mid-schedule. A
    layer with `trainable = False` runs in inference mode and does not
    advance. `clipping()` returns the current values, for logging.

    Args:
        axis: The channel axis (an integer).
        momentum: Momentum of the inference statistics `moving_mean` and
            `moving_stddev`, in `[0, 1]`.
        epsilon: Small float added to the variance.
        renorm_momentum: Momentum of the training averages `renorm_mean`
            and `renorm_stddev`, in `[0, 1]`.
        rmax: Final upper clip of `r`, a number `>= 1`, or a callable
            `step -> value` (see below).
        rmin: Final lower clip of `r`: `None` (default) for `1 / rmax(t)`, a
            number in `[0, 1]`, or a callable.
        dmax: Final clip of `|d|`, a number `>= 0`, or a callable.
        warmup_steps: Steps with `rmax = rmin = 1`, `dmax = 0`.
        rmax_steps: Step at which `rmax` (and a numeric `rmin`) is reached,
            `>= warmup_steps`.
        dmax_steps: Step at which `dmax` is reached, `>= warmup_steps`.
        zero_debias: If `True`, `renorm_mean` and `renorm_stddev` are the
            zero-debiased averages of TF 1.x's `tf.layers` renorm, which
            started them at zero with a weight: `renorm_mean` holds
            `(1 - m) * sum_k m**(t - k) * mu_k / (1 - m**t)` after `t` steps
            (`m = renorm_momentum`), whatever its initial value, and
            likewise `renorm_stddev` for `sigma_B`; and the corrections at
            step `t` use the average completed with the current batch,
            `(1 - m**t) * renorm_mean + m**t * mu_B` (likewise for the
            stddev), so the first step has `r = 1`, `d = 0`. Only those
            two averages change: `moving_mean` and `moving_stddev` stay
            plain exponential averages of the batch statistics (TF 1.x fed
            them the debiased averages instead). Default `False`, Keras'
            behaviour: plain averages started at the initializers.
        center: If `True`, add `beta`.
        scale: If `True`, multiply by `gamma`.
        synchronized: If `True`, under a `tf.distribute` strategy the batch
            statistics are computed over all replicas, so N replicas match
            one replica on the same global batch.
        **kwargs: The initializers, regularizers and constraints of
            `keras.layers.BatchNormalization`, and base layer arguments.
            `renorm` and `renorm_clipping` are not accepted (renorm is
            always on and the clipping is the schedule).

    Callables `step -> value` for `rmax`, `rmin` or `dmax` receive the step
    as a float32 scalar tensor and replace the built-in ramp for that value
    (the `*_steps` arguments then do not apply to it); they must use
    `keras.ops`, not Python control flow on the step. A
    `keras.optimizers.schedules.LearningRateSchedule` (such as
    `PolynomialDecay`) or a function registered with
    `keras.saving.register_keras_serializable` saves with the model; other
    callables train but `get_config` (and so `model.save`) raises.

    Example:

    >>> import numpy as np
    >>> import kerasbn
    >>> layer = kerasbn.layers.BatchRenormalization(
    ...     warmup_steps=2, rmax_steps=6, dmax_steps=4, rmax=3.0, dmax=2.0)
    >>> x = np.random.default_rng(0).normal(size=(8, 3)).astype("float32")
    >>> for _ in range(4):
    ...     _ = layer(x, training=True)
    >>> int(layer.renorm_step.numpy())
    4
    >>> {k: round(v, 3) for k, v in layer.clipping().items()}
    {'rmax': 2.0, 'rmin': 0.5, 'dmax': 2.0}
    """

    def __init__(
        self,
        axis=-1,
        momentum=0.99,
        epsilon=1e-3,
        renorm_momentum=0.99,
        rmax=3.0,
        rmin=None,
        dmax=5.0,
        warmup_steps=5000,
        rmax_steps=40000,
        dmax_steps=25000,
        center=True,
        scale=True,
        zero_debias=False,
        synchronized=False,
        **kwargs,
    ):
        for name in ("renorm", "renorm_clipping"):
            if name in kwargs:
                raise ValueError(
                    f"BatchRenormalization does not take `{name}` (received "
                    f"{name}={kwargs[name]!r}): renorm is always on and the "
                    "clipping follows rmax, rmin, dmax and their *_steps. "
                    "For constant clipping pass warmup_steps=rmax_steps="
                    "dmax_steps=0."
                )
        _checks.check_axis(axis)
        if zero_debias not in (True, False):
            raise ValueError(
                "Argument `zero_debias` must be True or False. Received: "
                f"zero_debias={zero_debias!r}."
            )
        momentum = _checks.check_momentum("momentum", momentum)
        renorm_momentum = _checks.check_momentum(
            "renorm_momentum", renorm_momentum, allow_one=not zero_debias,
            hint="With zero_debias=True it must be below 1: a momentum of 1 "
            "never updates and its debias factor 1 - momentum**t is 0."
            if zero_debias else "")
        _checks.check_number("epsilon", epsilon, 0.0)
        rmax = _check_bound("rmax", rmax, 1.0, math.inf,
                            "a finite number >= 1 (r is clipped to "
                            "[rmin, rmax] around 1)")
        if rmin is not None:
            rmin = _check_bound("rmin", rmin, 0.0, 1.0,
                                "in [0, 1], or None for 1 / rmax")
        dmax = _check_bound("dmax", dmax, 0.0, math.inf,
                            "a finite number >= 0 (d is clipped to "
                            "[-dmax, dmax])")
        warmup_steps = _check_steps("warmup_steps", warmup_steps)
        rmax_steps = _check_steps("rmax_steps", rmax_steps)
        dmax_steps = _check_steps("dmax_steps", dmax_steps)
        for name, value in (("rmax_steps", rmax_steps),
                            ("dmax_steps", dmax_steps)):
            if value < warmup_steps:
                raise ValueError(
                    f"Argument `{name}` must be >= warmup_steps (the ramp "
                    f"ends after the warm-up). Received: {name}={value}, "
                    f"warmup_steps={warmup_steps}."
                )
        super().__init__(
            axis=axis,
            momentum=momentum,
            epsilon=epsilon,
            center=center,
            scale=scale,
            renorm=True,
            renorm_clipping=None,
            renorm_momentum=renorm_momentum,
            synchronized=synchronized,
            **kwargs,
        )
        self.rmax = rmax
        self.rmin = rmin
        self.dmax = dmax
        self.warmup_steps = warmup_steps
        self.rmax_steps = rmax_steps
        self.dmax_steps = dmax_steps
        self.zero_debias = bool(zero_debias)
        self.renorm_step = None

    def build(self, input_shape):
        _checks.channels_of(self.axis, input_shape)
        super().build(input_shape)
        self.renorm_step = add_step_counter(self, "renorm_step")

    # -- schedule ----------------------------------------------------------

    def clip_values(self, step):
        """`(rmax, rmin, dmax)` at `step`, float32 scalar tensors.

        Usable inside a traced function; `clipping()` is the eager,
        Python-float version.
        """
        step = ops.cast(step, "float32")
        r_ramp = linear_ramp(step, self.warmup_steps, self.rmax_steps)
        r_done = ops.greater_equal(r_ramp, 1.0)

        def ramp_to(final, ramp, done):
            # From 1 at ramp 0 to `final` at ramp 1; once the ramp is over the
            # value is exactly `final`, as a constant clip would be.
            return ops.where(done, final, 1.0 + (final - 1.0) * ramp)

        if callable(self.rmax):
            rmax = ops.cast(self.rmax(step), "float32")
        else:
            rmax = ramp_to(self.rmax, r_ramp, r_done)
        if self.rmin is None:
            rmin = 1.0 / rmax
            if not callable(self.rmax):
                rmin = ops.where(r_done, 1.0 / self.rmax, rmin)
        elif callable(self.rmin):
            rmin = ops.cast(self.rmin(step), "float32")
        else:
            rmin = ramp_to(self.rmin, r_ramp, r_done)
        if callable(self.dmax):
            dmax = ops.cast(self.dmax(step), "float32")
        else:
            dmax = self.dmax * linear_ramp(step, self.warmup_steps,
                                           self.dmax_steps)
        return rmax, rmin, dmax

    def clipping(self, step=None):
        """The clip values as Python floats, e.g. for a logging callback.

        Args:
            step: The step to evaluate the schedule at; by default the
                layer's current `renorm_step` (the values its next training
                call will use; 0 before the layer is built).

        Returns:
            `{"rmax": ..., "rmin": ..., "dmax": ...}`.
        """
        if step is None:
            step = 0 if self.renorm_step is None else self.renorm_step.value
        values = self.clip_values(step)
        return {name: float(ops.convert_to_numpy(v))
                for name, v in zip(_SCHEDULE_ARGS, values)}

    # -- training and inference --------------------------------------------

    def call(self, inputs, training=None, mask=None):
        if not (training and self.trainable):
            # Inference: Keras' batch normalization on the moving statistics.
            return super().call(inputs, training=False, mask=mask)
        # Statistics in at least float32, as Keras does for float16/bfloat16.
        inputs, mean, variance = _keras_internal.training_moments(
            self, inputs, mask)
        dtype = inputs.dtype
        stddev = ops.sqrt(variance + self.epsilon)

        # Everything the corrections read is read before any update below.
        step = ops.cast(self.renorm_step, "float32")
        rmax, rmin, dmax = (ops.cast(v, dtype) for v in self.clip_values(step))
        renorm_mean = ops.cast(self.renorm_mean, dtype)
        renorm_stddev = ops.cast(self.renorm_stddev, dtype)
        if self.zero_debias:
            kept, fresh = _numerics.decay_power(self.renorm_momentum, step,
                                                dtype)
            ref_mean = kept * renorm_mean + fresh * mean
            ref_stddev = kept * renorm_stddev + fresh * stddev
        else:
            ref_mean, ref_stddev = renorm_mean, renorm_stddev
        r, d = renorm_corrections(mean, stddev, ref_mean, ref_stddev,
                                  self.epsilon, rmin, rmax, dmax)
        gamma = ops.cast(self.gamma, dtype) if self.scale else None
        beta = ops.cast(self.beta, dtype) if self.center else None
        scale, offset = compose_scale_offset(r, d, gamma, beta)
        outputs = ops.batch_normalization(
            inputs, mean, variance, axis=self.axis, offset=offset,
            scale=scale, epsilon=self.epsilon)

        self._update_statistics(mean, stddev, renorm_mean, renorm_stddev,
                                step)
        return ops.cast(outputs, self.compute_dtype)

    def _update_statistics(self, mean, stddev, renorm_mean, renorm_stddev,
                           step):
        dtype = mean.dtype
        self.renorm_step.assign_add(ops.ones((), dtype="int64"))
        if self.zero_debias:
            w_old, w_new = (
                ops.cast(w, dtype) for w in _numerics.debias_weights(
                    self.renorm_momentum, step + 1.0)
            )
        else:
            w_old, w_new = self.renorm_momentum, 1.0 - self.renorm_momentum
        self.renorm_mean.assign(renorm_mean * w_old + mean * w_new)
        self.renorm_stddev.assign(renorm_stddev * w_old + stddev * w_new)

        moving_mean = ops.cast(self.moving_mean, dtype)
        moving_stddev = ops.cast(self.moving_stddev, dtype)
        self.moving_mean.assign(
            moving_mean * self.momentum + mean * (1.0 - self.momentum)
        )
        new_stddev = moving_stddev * self.momentum + stddev * (
            1.0 - self.momentum
        )
        self.moving_stddev.assign(new_stddev)
        # The variance inference uses; relu guards against rounding below 0.
        self.moving_variance.assign(
            ops.relu(new_stddev * new_stddev - self.epsilon)
        )

    # Inference is plain BN on moving_mean/moving_variance.
    inference_scale_shift = BatchNormalization.inference_scale_shift

    # -- serialization -----------------------------------------------------

    def get_config(self):
        config = super().get_config()
        del config["renorm"], config["renorm_clipping"]
        for name in _SCHEDULE_ARGS:
            value = getattr(self, name)
            if callable(value):
                if not _is_serializable(value):
                    raise ValueError(
                        f"Argument `{name}` of layer '{self.name}' is a "
                        f"callable Keras cannot save: {name}={value!r}. Use "
                        "a keras.optimizers.schedules.LearningRateSchedule, "
                        "or a named function decorated with "
                        "@keras.saving.register_keras_serializable()."
                    )
                value = keras.saving.serialize_keras_object(value)
            config[name] = value
        config.update(
            warmup_steps=self.warmup_steps,
            rmax_steps=self.rmax_steps,
            dmax_steps=self.dmax_steps,
            zero_debias=self.zero_debias,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for name in _SCHEDULE_ARGS:
            if isinstance(config.get(name), dict):
                config[name] = keras.saving.deserialize_keras_object(
                    config[name])
        return super().from_config(config)
