"""The one registry of what kerasbn knows about layers.

Two tables, both keyed by class and looked up along the MRO (the most
specific registered class wins, so a subclass behaves like its parent
unless it registers itself). Every tool reads them: `fold` and `export`,
`recalibrate`, `diagnose`, `freeze`, `convert_to_mabn` and
`load_tf1_batch_norm`.

- **Normalization kinds** (`register_normalization`): a layer whose
  inference form is a per-channel `y = scale * x + shift` on one axis. A
  kind is declared once, as a `NormalizationKind`: its inference scale and
  shift (what fold moves into a neighbour), its channel axis, and its
  statistics (`StatisticsKind`: what it stores, how to write it, its
  moving averages and step counter; what the statistics tools need).
  Keras' `BatchNormalization` (renorm and synchronized included, and so
  every kerasbn subclass of it) and kerasbn's MABN are registered below.
  A layer that defines `inference_scale_shift()` is treated as a
  normalization for folding even unregistered, and that method is preferred
  over the registered function.
- **Linear layers** (`register_linear`): a layer that is linear in its
  input before its activation, with a kernel in one of the `LAYOUTS`; a
  normalization folds into it from either side (into the layer before it,
  "backward", or the layer after it, "forward"). Keras' Dense and
  convolution layers and kerasbn's weight-centred layers are registered
  below.

>>> import keras, kerasbn
>>> kind = kerasbn.registry.find_normalization(keras.layers.BatchNormalization())
>>> kind.axis(keras.layers.BatchNormalization(axis=1)), kind.statistics.subtracts_mean
(1, True)
>>> kerasbn.registry.find_linear(keras.layers.DepthwiseConv2D(3)).layout
'depthwise'
"""

import dataclasses
from typing import Callable, Optional

import keras
import numpy as np
from keras import ops

from kerasbn import _keras_internal
from kerasbn import _numerics
from kerasbn import rules
from kerasbn.layers.centered import CENTERED_LAYERS
from kerasbn.layers.mabn import MovingAverageBatchNormalization

_NORMALIZATIONS = {}
_LINEAR = {}


def _class_of(cls, what):
    if not isinstance(cls, type):
        raise TypeError(f"{what} expects a layer class. Received: cls={cls!r}.")
    return cls


def _lookup(table, layer):
    for cls in type(layer).__mro__:
        entry = table.get(cls)
        if entry is not None:
            return entry
    return None


# ============================================================================
# Normalization kinds.


@dataclasses.dataclass(frozen=True)
class Averages:
    """A layer's moving averages, as far as the layer knows them.

    Attributes:
        momentum: Weight kept by the stored statistics at each update.
        steps: Training updates so far, or None if the layer does not count.
        plain: Names of the statistics that are ordinary exponential moving
            averages started at their initializer (so after `t` updates
            they still hold `momentum**t` of it); zero-debiased statistics
            are not listed.

    A plain moving mean after 100 updates with momentum 0.99 still holds
    `0.99**100` of its initializer (what `diagnose` flags):

    >>> import kerasbn
    >>> averages = kerasbn.registry.Averages(
    ...     momentum=0.99, steps=100, plain=("moving_mean", "moving_variance"))
    >>> round(averages.momentum ** averages.steps, 3)
    0.366
    """

    momentum: float
    steps: Optional[int]
    plain: tuple


@dataclasses.dataclass(frozen=True)
class StatisticsKind:
    """How the statistics tools read and write one normalization kind.

    Attributes:
        from_moments: `(mean, variance) -> (center, spread)`, float64
            arrays: the population mean and (biased) variance of the
            layer's inputs as the pair the layer keeps; `center` is None
            for a kind that keeps no mean.
        stored: `layer -> (center, spread)` as stored, float64.
        write: `(layer, center, spread) -> None`: store them (every
            statistic of the layer that depends on them).
        averages: `layer -> Averages`: momentum, step counter (None if the
            layer keeps none), which averages are plain EMAs.
        subtracts_mean: Whether the layer subtracts a (batch or moving)
            mean, which cancels any per-channel bias added before it.

    A kind that keeps a second moment and no mean, as MABN does:

    >>> import numpy as np, kerasbn
    >>> kind = kerasbn.registry.StatisticsKind(
    ...     from_moments=lambda mean, variance: (None, variance + mean**2),
    ...     stored=lambda layer: (None, layer.moving_variance.numpy()),
    ...     write=lambda layer, _, moment: layer.moving_variance.assign(moment),
    ...     averages=lambda layer: kerasbn.registry.Averages(
    ...         layer.momentum, None, ("moving_variance",)),
    ...     subtracts_mean=False)
    >>> kind.from_moments(np.array([1.0]), np.array([3.0]))
    (None, array([4.]))
    """

    from_moments: Callable
    stored: Callable
    write: Callable
    averages: Callable
    subtracts_mean: bool = True


def default_axis(layer):
    """A normalization's channel axis: `layer.axis`."""
    return layer.axis


@dataclasses.dataclass(frozen=True)
class NormalizationKind:
    """Everything kerasbn needs to know about one normalization class.

    Attributes:
        scale_shift: `layer -> (scale, shift)`, float64 arrays of shape
            `(channels,)` with `outputs = scale * inputs + shift` per channel
            at inference; None for a kind fold must leave alone.
        axis: `layer -> int`, the channel axis the layer normalizes.
        statistics: A `StatisticsKind`, or None for a kind the statistics
            tools must leave alone.
    """

    scale_shift: Optional[Callable] = None
    axis: Callable = default_axis
    statistics: Optional[StatisticsKind] = None


def register_normalization(cls, scale_shift=_numerics.layer_scale_shift, *,
                           axis=None, statistics=None):
    """Declare a normalization kind, once, for every kerasbn tool.

    Args:
        cls: The layer class (subclasses are covered unless they register
            themselves).
        scale_shift: Callable `layer -> (scale, shift)` giving float64
            arrays of shape `(channels,)` such that the layer computes
            `outputs = scale * inputs + shift` per channel at inference.
            The default reads BatchNormalization's weights (`gamma` if
            `layer.scale`, `beta` if `layer.center`, `moving_mean`,
            `moving_variance`, `epsilon`); None: fold leaves the layer be.
        axis: Optional callable `layer -> int`, the channel axis; by default
            `layer.axis`.
        statistics: Optional `StatisticsKind` for `recalibrate`,
            `diagnose`, `freeze`; `BATCH_NORM_STATISTICS` for a layer that
            stores `moving_mean` and `moving_variance` as Keras' does. None:
            the statistics tools leave the layer be.

    A custom BN-like layer, declared once, folds and recalibrates:

    >>> import keras, numpy as np, kerasbn
    >>> class MyNorm(keras.layers.BatchNormalization):
    ...     pass
    >>> kerasbn.registry.register_normalization(
    ...     MyNorm, statistics=kerasbn.registry.BATCH_NORM_STATISTICS)
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2),
    ...                           MyNorm()])
    >>> kerasbn.fold(model).report.folded
    1
    >>> new = kerasbn.recalibrate(model, np.ones((4, 2)), verbose=0)
    >>> kerasbn.registry.unregister(MyNorm)
    """
    _class_of(cls, "register_normalization")
    for name, value in (("scale_shift", scale_shift), ("axis", axis)):
        if value is not None and not callable(value):
            raise TypeError(
                f"Argument `{name}` must be a callable taking the layer, or "
                f"None. Received: {name}={value!r}."
            )
    if statistics is not None and not isinstance(statistics, StatisticsKind):
        raise TypeError(
            "Argument `statistics` must be a kerasbn.registry.StatisticsKind "
            f"or None. Received: statistics={statistics!r}."
        )
    _NORMALIZATIONS[cls] = NormalizationKind(
        scale_shift=scale_shift, axis=axis or default_axis,
        statistics=statistics,
    )


def register_statistics_kind(cls, kind):
    """Set only the statistics of `cls`'s kind (`kerasbn.stats`' older API).

    Keeps what is already registered for folding; a class not registered
    yet is not folded (register it with `register_normalization` and
    `statistics=kind` to declare both at once).
    """
    _class_of(cls, "register_statistics_kind")
    if not isinstance(kind, StatisticsKind):
        raise TypeError(
            "Argument `kind` must be a kerasbn.registry.StatisticsKind. "
            f"Received: kind={kind!r}."
        )
    current = _NORMALIZATIONS.get(cls) or NormalizationKind()
    _NORMALIZATIONS[cls] = dataclasses.replace(current, statistics=kind)


def _own_scale_shift(layer):
    return layer.inference_scale_shift()


def find_normalization(layer):
    """The foldable `NormalizationKind` of `layer`, or None.

    >>> import keras, kerasbn
    >>> bn = keras.layers.BatchNormalization(epsilon=1e-3)
    >>> bn.build((None, 2))
    >>> _ = bn.moving_mean.assign([1.0, 2.0])
    >>> _ = bn.moving_variance.assign([3.999, 0.249])
    >>> kind = kerasbn.registry.find_normalization(bn)
    >>> scale, shift = kind.scale_shift(bn)   # inference: scale * x + shift
    >>> scale.round(6).tolist(), shift.round(6).tolist(), kind.axis(bn)
    ([0.5, 2.0], [-0.5, -4.0], -1)
    >>> kerasbn.registry.find_normalization(keras.layers.Dense(2)) is None
    True
    """
    kind = _lookup(_NORMALIZATIONS, layer)
    own = isinstance(layer, keras.layers.Layer) and callable(
        getattr(layer, "inference_scale_shift", None))
    if own:
        return dataclasses.replace(kind or NormalizationKind(),
                                   scale_shift=_own_scale_shift)
    if kind is None or kind.scale_shift is None:
        return None
    return kind


def find_statistics(layer):
    """The `StatisticsKind` of `layer`, or None if the tools do not know it."""
    kind = _lookup(_NORMALIZATIONS, layer)
    return None if kind is None else kind.statistics


def is_normalization(layer):
    """Whether any kerasbn tool treats `layer` as a normalization."""
    return (find_normalization(layer) is not None
            or find_statistics(layer) is not None)


def channel_axis(layer, rank):
    """The non-negative channel axis of a normalization for inputs of `rank`.

    >>> import keras
    >>> channel_axis(keras.layers.BatchNormalization(axis=1), 4)
    1
    """
    kind = _lookup(_NORMALIZATIONS, layer) or NormalizationKind()
    axis = kind.axis(layer)
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise ValueError(
                f"Layer '{layer.name}' normalizes over several axes "
                f"({axis}); kerasbn supports one channel axis."
            )
        axis = axis[0]
    return int(axis) % rank


def normalization_layers(model, statistics=True):
    """Every normalization layer of `model` (nested ones included), once.

    With `statistics=True` those the statistics tools know, else those fold
    knows; in the order of the layer tree. `model` itself may be one.
    """
    find = find_statistics if statistics else find_normalization
    if find(model) is not None:
        return [model]
    return [layer for layer in _keras_internal.sublayers(model)
            if find(layer) is not None]


# -- Statistics of the built-in kinds. ---------------------------------------


def _numpy(variable):
    return np.asarray(ops.convert_to_numpy(variable), np.float64)


def assign(variable, value):
    """Assign a NumPy value, cast to the variable's dtype."""
    variable.assign(np.asarray(value).astype(variable.dtype))


def _step_of(variable):
    return None if variable is None else int(ops.convert_to_numpy(variable))


def _bn_write(layer, mean, variance):
    assign(layer.moving_mean, mean)
    assign(layer.moving_variance, variance)
    if getattr(layer, "renorm", False):
        # Keras keeps moving_variance = relu(moving_stddev**2 - epsilon).
        # The training averages renorm_mean/renorm_stddev get the same
        # population values, so training resumed from here starts its
        # corrections r and d from the recalibrated statistics.
        stddev = np.sqrt(variance + np.float64(layer.epsilon))
        assign(layer.moving_stddev, stddev)
        assign(layer.renorm_mean, mean)
        assign(layer.renorm_stddev, stddev)


def _bn_averages(layer):
    zero_debias = getattr(layer, "zero_debias", False)
    if getattr(layer, "renorm", False):
        # kerasbn's BatchRenormalization counts its training calls; its
        # zero_debias only concerns renorm_mean/renorm_stddev.
        return Averages(float(layer.momentum),
                        _step_of(getattr(layer, "renorm_step", None)),
                        ("moving_mean", "moving_variance"))
    plain = {"mean_and_variance": (), "mean": ("moving_variance",)}.get(
        zero_debias, ("moving_mean", "moving_variance"))
    return Averages(float(layer.momentum),
                    _step_of(getattr(layer, "debias_step", None)), plain)


BATCH_NORM_STATISTICS = StatisticsKind(
    from_moments=lambda mean, variance: (mean, variance),
    stored=lambda layer: (_numpy(layer.moving_mean),
                          _numpy(layer.moving_variance)),
    write=_bn_write,
    averages=_bn_averages,
)
"""Keras' BatchNormalization convention: `moving_mean`, `moving_variance`
(plus renorm's averages when `layer.renorm`), `momentum`, and kerasbn's
`debias_step` / `renorm_step` counters where present."""


def _mabn_write(layer, center, second_moment):
    # Step counter and ring buffers are training state, not statistics:
    # they stay as they are.
    del center
    assign(layer.moving_variance, second_moment)


MABN_STATISTICS = StatisticsKind(
    from_moments=lambda mean, variance: (None, variance + mean * mean),
    stored=lambda layer: (None, _numpy(layer.moving_variance)),
    write=_mabn_write,
    averages=lambda layer: Averages(float(layer.momentum),
                                    _step_of(layer.step),
                                    ("moving_variance",)),
    subtracts_mean=False,
)
"""MABN: a running second moment `moving_variance = E[x**2]`, no mean."""


# ============================================================================
# Linear layers.

LAYOUTS = ("dense", "conv", "depthwise", "separable", "transpose")


def _kernel_rewrite(function, *extra):
    """A `(weights, layer, scale, shift) -> weights` from a `rules` function
    of `(kernel, bias, scale, shift, *extra(layer))`."""

    def rewrite(weights, layer, scale, shift):
        new = dict(weights)
        arguments = [f(layer) for f in extra]
        new["kernel"], new["bias"] = function(
            weights["kernel"], weights["bias"], scale, shift, *arguments)
        return new

    return rewrite


def _separable_backward(weights, layer, scale, shift):
    new = dict(weights)
    new["pointwise_kernel"], new["bias"] = rules.backward_dense(
        weights["pointwise_kernel"], weights["bias"], scale, shift)
    return new


def _separable_forward(weights, layer, scale, shift):
    new = dict(weights)
    (new["depthwise_kernel"], new["pointwise_kernel"],
     new["bias"]) = rules.forward_separable(
        weights["depthwise_kernel"], weights["pointwise_kernel"],
        weights["bias"], scale, shift)
    return new


def _groups(layer):
    return getattr(layer, "groups", 1) or 1


# layout -> (kernel weight names, backward rewrite, forward rewrite).
_LAYOUT_RULES = {
    "dense": (("kernel",), _kernel_rewrite(rules.backward_dense),
              _kernel_rewrite(rules.forward_dense, _groups)),
    "conv": (("kernel",), _kernel_rewrite(rules.backward_dense),
             _kernel_rewrite(rules.forward_dense, _groups)),
    "depthwise": (("kernel",), _kernel_rewrite(rules.backward_depthwise),
                  _kernel_rewrite(rules.forward_depthwise)),
    "separable": (("depthwise_kernel", "pointwise_kernel"),
                  _separable_backward, _separable_forward),
    "transpose": (("kernel",), _kernel_rewrite(rules.backward_transpose),
                  _kernel_rewrite(rules.forward_transpose)),
}


@dataclasses.dataclass(frozen=True)
class LinearRule:
    """How a normalization folds into one kind of linear layer.

    Attributes:
        layout: One of `LAYOUTS`: "dense" (Dense, `[in, out]` on the last
            axis), "conv" (`[..., in // groups, out]`), "depthwise"
            (`[..., C, M]`), "separable" (depthwise then pointwise kernel)
            or "transpose" (`[..., out, in]`).
        kernel_transform: Optional `(kernel, layer) -> kernel` applied to the
            stored kernel (float64) to get the kernel the layer really uses,
            e.g. `rules.center_kernel` for weight-centred layers.
        rebuild: Optional `(layer, config) -> (cls, config)` giving the class
            and config of the folded layer; by default the layer's class with
            `use_bias=True`.
    """

    layout: str
    kernel_transform: Optional[Callable] = None
    rebuild: Optional[Callable] = None

    def channel_axis(self, layer, rank):
        """Axis of the layer's channels (input and output) for this rank."""
        if self.layout != "dense" and getattr(
                layer, "data_format", "channels_last") == "channels_first":
            return 1
        return rank - 1

    def obstacle(self, layer):
        """`(code, why)` if this layer cannot take a fold at all, else None."""
        if getattr(layer, "lora_enabled", False):
            return ("producer_unsupported",
                    f"'{layer.name}' has LoRA enabled; merge the LoRA weights "
                    "into its kernel before folding")
        if getattr(layer, "quantization_mode", None):
            return ("producer_unsupported",
                    f"'{layer.name}' is quantized "
                    f"({layer.quantization_mode}); fold before quantizing")
        return None

    def read(self, layer):
        """The layer's weights as float64 arrays (bias None if absent)."""
        variables = {v.name: v for v in layer.weights}
        weights = {name: _numpy(variables[name])
                   for name in _LAYOUT_RULES[self.layout][0]}
        if self.kernel_transform is not None and "kernel" in weights:
            weights["kernel"] = self.kernel_transform(weights["kernel"], layer)
        bias = variables.get("bias") if layer.use_bias else None
        weights["bias"] = None if bias is None else _numpy(bias)
        return weights

    def backward(self, weights, layer, scale, shift):
        """Weights after folding `scale * layer(x) + shift`."""
        return _LAYOUT_RULES[self.layout][1](weights, layer, scale, shift)

    def forward(self, weights, layer, scale, shift):
        """Weights after folding `layer(scale * x + shift)`."""
        return _LAYOUT_RULES[self.layout][2](weights, layer, scale, shift)

    def forward_obstacle(self, layer, shift):
        """`(code, why)` if folding `layer(scale * x + shift)` is not exact.

        Every output position must see a full window of real inputs
        ('valid' padding, 1x1 kernels; for transposed convolutions 1x1
        kernels with stride 1), unless the shift is zero everywhere.
        """
        if self.layout == "dense" or not np.any(shift):
            return None
        kernel_size = tuple(layer.kernel_size)
        ones = all(k == 1 for k in kernel_size)
        if self.layout == "transpose":
            if ones and all(s == 1 for s in layer.strides):
                return None
            return ("forward_not_exact",
                    f"'{layer.name}' is a transposed convolution with kernel "
                    f"{kernel_size} and strides {tuple(layer.strides)}: its "
                    "border outputs sum fewer kernel taps, so the shift "
                    "would not become a constant bias (exact only for 1x1 "
                    "kernels with stride 1, or a zero shift)")
        if ones or layer.padding == "valid":
            return None
        return ("forward_not_exact",
                f"'{layer.name}' uses padding='{layer.padding}' with kernel "
                f"{kernel_size}: its zero padding stands where the "
                "normalization would give its shift, so border outputs would "
                "change (exact only for padding='valid', 1x1 kernels, or a "
                "zero shift)")

    def new_layer(self, layer):
        """A fresh, unbuilt copy of `layer` with a bias."""
        config = layer.get_config()
        config["use_bias"] = True
        cls = type(layer)
        if self.rebuild is not None:
            cls, config = self.rebuild(layer, config)
        return cls.from_config(config)


def register_linear(cls, layout, *, kernel_transform=None, rebuild=None):
    """Declare a linear layer kind that normalizations fold into.

    Args:
        cls: The layer class (subclasses are covered unless they register
            themselves). It must have `use_bias`, `activation` and, for the
            convolution layouts, `kernel_size`, `strides`, `padding` and
            `data_format` attributes, like Keras' layers.
        layout: How its kernel is laid out, one of "dense", "conv",
            "depthwise", "separable", "transpose" (see `LinearRule`).
        kernel_transform: Optional `(kernel, layer) -> kernel` returning the
            kernel the layer actually applies, for layers that transform
            their stored kernel at every call, e.g. weight centring:
            `lambda k, layer: kerasbn.rules.center_kernel(k, -1)`.
        rebuild: Optional `(layer, config) -> (cls, config)` for the folded
            layer, e.g. to turn a weight-centred convolution into a plain
            `keras.layers.Conv2D` holding the centred, folded kernel.

    A `Dense` subclass that applies twice its kernel would otherwise fold
    as a plain `Dense` (wrongly); registered, it folds into a plain `Dense`
    holding `2 * kernel`:

    >>> import keras, numpy as np, kerasbn
    >>> class DoubleDense(keras.layers.Dense):
    ...     def call(self, inputs):
    ...         return super().call(2 * inputs)
    >>> kerasbn.registry.register_linear(
    ...     DoubleDense, "dense", kernel_transform=lambda k, layer: 2 * k,
    ...     rebuild=lambda layer, config: (keras.layers.Dense, config))
    >>> model = keras.Sequential([keras.Input((3,)), DoubleDense(2),
    ...                           keras.layers.BatchNormalization()])
    >>> folded, report = kerasbn.fold(model)
    >>> [type(layer).__name__ for layer in folded.layers], report.folded
    (['Dense'], 1)
    >>> x = np.ones((1, 3), "float32")
    >>> np.allclose(folded(x), model(x), atol=1e-5)
    True
    >>> kerasbn.registry.unregister(DoubleDense)
    """
    if layout not in LAYOUTS:
        raise ValueError(
            f"Argument `layout` must be one of {LAYOUTS}. Received: "
            f"layout={layout!r}."
        )
    _class_of(cls, "register_linear")
    _LINEAR[cls] = LinearRule(layout=layout,
                              kernel_transform=kernel_transform,
                              rebuild=rebuild)


def find_linear(layer):
    """The `LinearRule` for `layer`, or None if nothing folds into it.

    >>> import keras, kerasbn
    >>> kerasbn.registry.find_linear(keras.layers.Conv2D(4, 3)).layout
    'conv'
    >>> kerasbn.registry.find_linear(keras.layers.ReLU()) is None
    True
    """
    return _lookup(_LINEAR, layer)


# Earlier names, kept for code written against kerasbn 0.1.
register_producer = register_linear
find_producer = find_linear
ProducerRule = LinearRule
NormalizationRule = NormalizationKind


def unregister(cls):
    """Remove `cls` from both tables (no error if absent)."""
    _NORMALIZATIONS.pop(cls, None)
    _LINEAR.pop(cls, None)


def snapshot():
    """The registry's state, for `restore` (tests that register classes)."""
    return dict(_NORMALIZATIONS), dict(_LINEAR)


def restore(state):
    """Put back a state taken by `snapshot`."""
    normalizations, linear = state
    _NORMALIZATIONS.clear()
    _NORMALIZATIONS.update(normalizations)
    _LINEAR.clear()
    _LINEAR.update(linear)


# -- The built-in entries. ---------------------------------------------------

register_normalization(keras.layers.BatchNormalization,
                       statistics=BATCH_NORM_STATISTICS)
register_normalization(MovingAverageBatchNormalization,
                       statistics=MABN_STATISTICS)

_L = keras.layers
register_linear(_L.Dense, "dense")
for _cls in (_L.Conv1D, _L.Conv2D, _L.Conv3D):
    register_linear(_cls, "conv")
for _cls in (_L.DepthwiseConv1D, _L.DepthwiseConv2D):
    register_linear(_cls, "depthwise")
for _cls in (_L.SeparableConv1D, _L.SeparableConv2D):
    register_linear(_cls, "separable")
for _cls in (_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose):
    register_linear(_cls, "transpose")


def _centred_kernel(kernel, layer):
    return rules.center_kernel(kernel, -1)


for _plain, _centered in CENTERED_LAYERS.items():
    # A folded centred layer is the plain layer holding the centred kernel.
    register_linear(
        _centered, "dense" if _plain is _L.Dense else "conv",
        kernel_transform=_centred_kernel,
        rebuild=lambda layer, config, plain=_plain: (plain, config),
    )
del _L, _cls, _plain, _centered
