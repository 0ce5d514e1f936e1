"""Which layers fold: normalization kinds and the linear layers they fold into.

Two registries, both keyed by class and looked up along the MRO (the most
specific registered class wins), so a subclass folds like its parent unless
it registers itself:

- normalizations (`register_normalization`): a layer whose inference form is
  a per-channel `y = scale * x + shift` on one axis. A kind declares that
  map once, as a function returning float64 `(scale, shift)`, and then folds
  into every producer and consumer below. A layer that defines its own
  `inference_scale_shift()` method (every kerasbn normalization does) is
  recognised without registering, and that method is preferred over the
  registered function.
- producers (`register_producer`): a layer that is linear in its input
  (before its activation), with a kernel in one of the layouts of
  `kerasbn.fold.rules`. A weight-centred layer, whose call uses a
  transformed kernel, passes that transform as `kernel_transform`; and if
  the folded layer must be a different class (a centred layer that would
  otherwise centre again), `rebuild` returns the class and config to use.

Keras' own layers are registered at import, below.
"""

import dataclasses
from typing import Callable, Optional

import keras
import numpy as np
from keras import ops

from kerasbn import _numerics
from kerasbn.fold import rules

_NORMALIZATIONS = {}
_PRODUCERS = {}

LAYOUTS = ("dense", "conv", "depthwise", "separable", "transpose")


@dataclasses.dataclass(frozen=True)
class NormalizationRule:
    """How a normalization kind reads as `y = scale * x + shift`.

    Attributes:
        scale_shift: `layer -> (scale, shift)`, float64 arrays of shape
            `(channels,)`.
        axis: `layer -> int`, the channel axis the layer normalizes.
    """

    scale_shift: Callable
    axis: Callable


def _default_axis(layer):
    return layer.axis


def register_normalization(cls, scale_shift, *, axis=None):
    """Declare a normalization kind's inference-mode scale and shift.

    Args:
        cls: The layer class (subclasses are covered unless they register
            themselves).
        scale_shift: Callable `layer -> (scale, shift)` giving float64
            arrays of shape `(channels,)` such that the layer computes
            `outputs = scale * inputs + shift` per channel at inference.
        axis: Optional callable `layer -> int`, the channel axis; by default
            `layer.axis`.

    >>> import keras
    >>> class Affine(keras.layers.Layer):
    ...     axis = -1
    >>> register_normalization(Affine, lambda layer: (np.ones(1), np.zeros(1)))
    >>> find_normalization(Affine()) is not None
    True
    >>> unregister(Affine)
    """
    if not isinstance(cls, type):
        raise TypeError(
            "register_normalization expects a layer class. Received: "
            f"cls={cls!r}."
        )
    if not callable(scale_shift):
        raise TypeError(
            "Argument `scale_shift` must be a callable `layer -> (scale, "
            f"shift)`. Received: scale_shift={scale_shift!r}."
        )
    _NORMALIZATIONS[cls] = NormalizationRule(
        scale_shift=scale_shift, axis=axis or _default_axis
    )


def _own_scale_shift(layer):
    return layer.inference_scale_shift()


def find_normalization(layer):
    """The `NormalizationRule` for `layer`, or None if it is not one.

    >>> import keras, kerasbn
    >>> bn = keras.layers.BatchNormalization(epsilon=1e-3)
    >>> bn.build((None, 2))
    >>> _ = bn.moving_mean.assign([1.0, 2.0])
    >>> _ = bn.moving_variance.assign([3.999, 0.249])
    >>> rule = kerasbn.fold.find_normalization(bn)
    >>> scale, shift = rule.scale_shift(bn)   # inference: scale * x + shift
    >>> scale.round(6).tolist(), shift.round(6).tolist(), rule.axis(bn)
    ([0.5, 2.0], [-0.5, -4.0], -1)
    >>> kerasbn.fold.find_normalization(keras.layers.Dense(2)) is None
    True
    """
    for cls in type(layer).__mro__:
        rule = _NORMALIZATIONS.get(cls)
        if rule is not None:
            if callable(getattr(layer, "inference_scale_shift", None)):
                return dataclasses.replace(rule, scale_shift=_own_scale_shift)
            return rule
    if isinstance(layer, keras.layers.Layer) and callable(
        getattr(layer, "inference_scale_shift", None)
    ):
        return NormalizationRule(
            scale_shift=_own_scale_shift, axis=_default_axis
        )
    return None


@dataclasses.dataclass(frozen=True)
class ProducerRule:
    """How to fold into one kind of linear layer.

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

    # -- reading the layer ------------------------------------------------

    def channel_axis(self, layer, rank):
        """Axis of the layer's channels (input and output) for this rank."""
        if self.layout == "dense":
            return rank - 1
        if getattr(layer, "data_format", "channels_last") == "channels_first":
            return 1
        return rank - 1

    def obstacle(self, layer):
        """Why this layer cannot take a fold at all, or None."""
        if getattr(layer, "lora_enabled", False):
            return (
                "producer_unsupported",
                f"'{layer.name}' has LoRA enabled; merge the LoRA weights "
                "into its kernel before folding",
            )
        if getattr(layer, "quantization_mode", None):
            return (
                "producer_unsupported",
                f"'{layer.name}' is quantized "
                f"({layer.quantization_mode}); fold before quantizing",
            )
        return None

    def read(self, layer):
        """The layer's weights as float64 arrays (bias None if absent)."""
        variables = {v.name: v for v in layer.weights}

        def get(name):
            variable = variables.get(name)
            if variable is None:
                return None
            return np.asarray(ops.convert_to_numpy(variable), np.float64)

        if self.layout == "separable":
            weights = {
                "depthwise_kernel": get("depthwise_kernel"),
                "pointwise_kernel": get("pointwise_kernel"),
            }
        else:
            weights = {"kernel": get("kernel")}
            if self.kernel_transform is not None:
                weights["kernel"] = self.kernel_transform(
                    weights["kernel"], layer
                )
        weights["bias"] = get("bias") if layer.use_bias else None
        return weights

    # -- folding ----------------------------------------------------------

    def backward(self, weights, layer, scale, shift):
        """Weights after folding `scale * layer(x) + shift`."""
        weights = dict(weights)
        if self.layout in ("dense", "conv"):
            weights["kernel"], weights["bias"] = rules.backward_dense(
                weights["kernel"], weights["bias"], scale, shift
            )
        elif self.layout == "separable":
            weights["pointwise_kernel"], weights["bias"] = (
                rules.backward_dense(
                    weights["pointwise_kernel"], weights["bias"], scale, shift
                )
            )
        elif self.layout == "depthwise":
            weights["kernel"], weights["bias"] = rules.backward_depthwise(
                weights["kernel"], weights["bias"], scale, shift
            )
        else:
            weights["kernel"], weights["bias"] = rules.backward_transpose(
                weights["kernel"], weights["bias"], scale, shift
            )
        return weights

    def forward_obstacle(self, layer, shift):
        """Why folding `layer(scale * x + shift)` would not be exact, or None.

        Every output position must see a full window of real inputs ('valid'
        padding, 1x1 kernels; for transposed convolutions 1x1 kernels with
        stride 1), unless the shift is zero everywhere.
        """
        if self.layout == "dense" or not np.any(shift):
            return None
        kernel_size = tuple(layer.kernel_size)
        ones = all(k == 1 for k in kernel_size)
        if self.layout == "transpose":
            if ones and all(s == 1 for s in layer.strides):
                return None
            return (
                "forward_not_exact",
                f"'{layer.name}' is a transposed convolution with kernel "
                f"{kernel_size} and strides {tuple(layer.strides)}: its "
                "border outputs sum fewer kernel taps, so the shift would "
                "not become a constant bias (exact only for 1x1 kernels "
                "with stride 1, or a zero shift)",
            )
        if ones or layer.padding == "valid":
            return None
        return (
            "forward_not_exact",
            f"'{layer.name}' uses padding='{layer.padding}' with kernel "
            f"{kernel_size}: its zero padding stands where the "
            "normalization would give its shift, so border outputs would "
            "change (exact only for padding='valid', 1x1 kernels, or a "
            "zero shift)",
        )

    def forward(self, weights, layer, scale, shift):
        """Weights after folding `layer(scale * x + shift)`."""
        weights = dict(weights)
        if self.layout in ("dense", "conv"):
            groups = getattr(layer, "groups", 1) or 1
            weights["kernel"], weights["bias"] = rules.forward_dense(
                weights["kernel"], weights["bias"], scale, shift, groups
            )
        elif self.layout == "separable":
            (
                weights["depthwise_kernel"],
                weights["pointwise_kernel"],
                weights["bias"],
            ) = rules.forward_separable(
                weights["depthwise_kernel"],
                weights["pointwise_kernel"],
                weights["bias"],
                scale,
                shift,
            )
        elif self.layout == "depthwise":
            weights["kernel"], weights["bias"] = rules.forward_depthwise(
                weights["kernel"], weights["bias"], scale, shift
            )
        else:
            weights["kernel"], weights["bias"] = rules.forward_transpose(
                weights["kernel"], weights["bias"], scale, shift
            )
        return weights

    # -- writing the folded layer -----------------------------------------

    def new_layer(self, layer):
        """A fresh, unbuilt copy of `layer` with a bias."""
        config = layer.get_config()
        config["use_bias"] = True
        cls = type(layer)
        if self.rebuild is not None:
            cls, config = self.rebuild(layer, config)
        return cls.from_config(config)


def register_producer(
    cls, layout, *, kernel_transform=None, rebuild=None
):
    """Declare a linear layer kind that normalizations fold into.

    Args:
        cls: The layer class (subclasses are covered unless they register
            themselves). It must have `use_bias`, `activation` and, for the
            convolution layouts, `kernel_size`, `strides`, `padding` and
            `data_format` attributes, like Keras' layers.
        layout: How its kernel is laid out, one of "dense", "conv",
            "depthwise", "separable", "transpose" (see `ProducerRule`).
        kernel_transform: Optional `(kernel, layer) -> kernel` returning the
            kernel the layer actually applies, for layers that transform
            their stored kernel at every call, e.g. weight centring:
            `lambda k, layer: rules.center_kernel(k, -1)`.
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
    >>> kerasbn.fold.register_producer(
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
    >>> unregister(DoubleDense)
    """
    if layout not in LAYOUTS:
        raise ValueError(
            f"Argument `layout` must be one of {LAYOUTS}. Received: "
            f"layout={layout!r}."
        )
    if not isinstance(cls, type):
        raise TypeError(
            f"register_producer expects a layer class. Received: cls={cls!r}."
        )
    _PRODUCERS[cls] = ProducerRule(
        layout=layout, kernel_transform=kernel_transform, rebuild=rebuild
    )


def find_producer(layer):
    """The `ProducerRule` for `layer`, or None if nothing folds into it.

    >>> import keras, kerasbn
    >>> kerasbn.fold.find_producer(keras.layers.Conv2D(4, 3)).layout
    'conv'
    >>> kerasbn.fold.find_producer(keras.layers.DepthwiseConv2D(3)).layout
    'depthwise'
    >>> kerasbn.fold.find_producer(keras.layers.ReLU()) is None
    True
    """
    for cls in type(layer).__mro__:
        rule = _PRODUCERS.get(cls)
        if rule is not None:
            return rule
    return None


def unregister(cls):
    """Remove `cls` from both registries (no error if absent)."""
    _NORMALIZATIONS.pop(cls, None)
    _PRODUCERS.pop(cls, None)


def is_normalization(layer):
    return find_normalization(layer) is not None


register_normalization(
    keras.layers.BatchNormalization, _numerics.layer_scale_shift
)

_L = keras.layers
register_producer(_L.Dense, "dense")
for _cls in (_L.Conv1D, _L.Conv2D, _L.Conv3D):
    register_producer(_cls, "conv")
for _cls in (_L.DepthwiseConv1D, _L.DepthwiseConv2D):
    register_producer(_cls, "depthwise")
for _cls in (_L.SeparableConv1D, _L.SeparableConv2D):
    register_producer(_cls, "separable")
for _cls in (_L.Conv1DTranspose, _L.Conv2DTranspose, _L.Conv3DTranspose):
    register_producer(_cls, "transpose")
del _L, _cls
