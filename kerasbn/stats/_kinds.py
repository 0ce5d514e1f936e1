"""What each normalization kind stores, and how to read and write it.

The statistics tools see a normalization layer through one `StatisticsKind`:

- `from_moments(mean, variance)` turns the population mean and (biased)
  variance of the layer's inputs into the pair `(center, spread)` the layer
  keeps: `(mean, variance)` for batch normalization, `(None, E[x**2])` for
  MABN, which keeps only a second moment;
- `stored(layer)` reads that pair from the layer, `write(layer, center,
  spread)` stores it (every statistic of the layer that depends on it);
- `averages(layer)` describes its moving averages (momentum, step counter,
  which ones are zero-debiased) for the convergence check;
- `subtracts_mean`: whether a bias right before the layer is cancelled.

Kinds are looked up along the class's MRO, so a subclass of Keras'
`BatchNormalization` (kerasbn's own layers included) is covered by the Keras
entry. A new layer kind is one `register_statistics_kind` call.
"""

import dataclasses
from typing import Callable, Optional

import keras
import numpy as np
from keras import ops

from kerasbn.layers.mabn import MovingAverageBatchNormalization

_KINDS = {}


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
    >>> averages = kerasbn.stats.Averages(
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
            arrays; `center` is None for a kind that keeps no mean.
        stored: `layer -> (center, spread)` as stored, float64.
        write: `(layer, center, spread) -> None`.
        averages: `layer -> Averages`.
        subtracts_mean: Whether the layer subtracts a (batch or moving)
            mean, which cancels any per-channel bias added before it.

    A kind that keeps a second moment and no mean, as MABN does:

    >>> import numpy as np, kerasbn
    >>> kind = kerasbn.stats.StatisticsKind(
    ...     from_moments=lambda mean, variance: (None, variance + mean**2),
    ...     stored=lambda layer: (None, layer.moving_variance.numpy()),
    ...     write=lambda layer, _, moment: layer.moving_variance.assign(moment),
    ...     averages=lambda layer: kerasbn.stats.Averages(
    ...         layer.momentum, None, ("moving_variance",)),
    ...     subtracts_mean=False)
    >>> kind.from_moments(np.array([1.0]), np.array([3.0]))
    (None, array([4.]))
    >>> mabn = kerasbn.layers.MABN()
    >>> mabn.build((None, 1))
    >>> kind.stored(mabn)
    (None, array([1.], dtype=float32))
    """

    from_moments: Callable
    stored: Callable
    write: Callable
    averages: Callable
    subtracts_mean: bool = True


def register_statistics_kind(cls, kind):
    """Teach the statistics tools a normalization layer class.

    Args:
        cls: A layer class; its subclasses are covered unless they register
            themselves.
        kind: A `StatisticsKind`.

    A layer dividing by a stored second moment, then recalibrated:

    >>> import keras, numpy as np, kerasbn
    >>> class RMSNorm(keras.layers.Layer):  # x / sqrt(E[x**2] + epsilon)
    ...     axis, epsilon, momentum = -1, 1e-3, 0.99
    ...     def build(self, shape):
    ...         self.moving_variance = self.add_weight(
    ...             shape=shape[-1:], initializer="ones", trainable=False)
    ...     def call(self, x):
    ...         return x / keras.ops.sqrt(self.moving_variance + self.epsilon)
    >>> kerasbn.stats.register_statistics_kind(RMSNorm, kerasbn.stats.StatisticsKind(
    ...     from_moments=lambda mean, variance: (None, variance + mean**2),
    ...     stored=lambda layer: (None, layer.moving_variance.numpy()),
    ...     write=lambda layer, _, moment: layer.moving_variance.assign(moment),
    ...     averages=lambda layer: kerasbn.stats.Averages(
    ...         layer.momentum, None, ("moving_variance",)),
    ...     subtracts_mean=False))
    >>> model = keras.Sequential([keras.Input((2,)), RMSNorm()])
    >>> _ = kerasbn.recalibrate(model, np.full((4, 2), 3.0), inplace=True,
    ...                         verbose=0)
    >>> model.layers[0].moving_variance.numpy().tolist()
    [9.0, 9.0]
    """
    if not isinstance(cls, type):
        raise TypeError(
            "register_statistics_kind expects a layer class. Received: "
            f"cls={cls!r}."
        )
    if not isinstance(kind, StatisticsKind):
        raise TypeError(
            "Argument `kind` must be a kerasbn.stats.StatisticsKind. "
            f"Received: kind={kind!r}."
        )
    _KINDS[cls] = kind


def find_kind(layer):
    """The `StatisticsKind` of `layer`, or None if it is not a known kind."""
    for cls in type(layer).__mro__:
        kind = _KINDS.get(cls)
        if kind is not None:
            return kind
    return None


def channel_axis(layer, rank):
    """The non-negative channel axis of `layer` for inputs of `rank`."""
    axis = layer.axis
    if isinstance(axis, (list, tuple)):
        if len(axis) != 1:
            raise ValueError(
                f"Layer '{layer.name}' normalizes over several axes "
                f"({axis}); the statistics tools support one channel axis."
            )
        axis = axis[0]
    return int(axis) % rank


def _numpy(variable):
    return np.asarray(ops.convert_to_numpy(variable), np.float64)


def _assign(variable, value):
    variable.assign(np.asarray(value).astype(variable.dtype))


def _step_of(variable):
    if variable is None:
        return None
    return int(ops.convert_to_numpy(variable))


# -- Keras' BatchNormalization, renorm included, and its kerasbn subclasses.


def _bn_from_moments(mean, variance):
    return mean, variance


def _bn_stored(layer):
    return _numpy(layer.moving_mean), _numpy(layer.moving_variance)


def _bn_write(layer, mean, variance):
    _assign(layer.moving_mean, mean)
    _assign(layer.moving_variance, variance)
    if getattr(layer, "renorm", False):
        # Keras keeps moving_variance = relu(moving_stddev**2 - epsilon).
        # The training averages renorm_mean/renorm_stddev get the same
        # population values, so training resumed from here starts its
        # corrections r and d from the recalibrated statistics.
        stddev = np.sqrt(variance + np.float64(layer.epsilon))
        _assign(layer.moving_stddev, stddev)
        _assign(layer.renorm_mean, mean)
        _assign(layer.renorm_stddev, stddev)


def _bn_averages(layer):
    zero_debias = getattr(layer, "zero_debias", False)
    if getattr(layer, "renorm", False):
        # kerasbn's BatchRenormalization counts its training calls; its
        # zero_debias only concerns renorm_mean/renorm_stddev.
        return Averages(
            momentum=float(layer.momentum),
            steps=_step_of(getattr(layer, "renorm_step", None)),
            plain=("moving_mean", "moving_variance"),
        )
    if zero_debias == "mean_and_variance":
        plain = ()
    elif zero_debias:
        plain = ("moving_variance",)
    else:
        plain = ("moving_mean", "moving_variance")
    return Averages(
        momentum=float(layer.momentum),
        steps=_step_of(getattr(layer, "debias_step", None)),
        plain=plain,
    )


# -- MABN: a running second moment, no mean.


def _mabn_from_moments(mean, variance):
    return None, variance + mean * mean


def _mabn_stored(layer):
    return None, _numpy(layer.moving_variance)


def _mabn_write(layer, center, second_moment):
    # Step counter and ring buffers are training state, not statistics:
    # they stay as they are.
    _assign(layer.moving_variance, second_moment)


def _mabn_averages(layer):
    return Averages(
        momentum=float(layer.momentum),
        steps=_step_of(layer.step),
        plain=("moving_variance",),
    )


register_statistics_kind(
    keras.layers.BatchNormalization,
    StatisticsKind(
        from_moments=_bn_from_moments,
        stored=_bn_stored,
        write=_bn_write,
        averages=_bn_averages,
    ),
)
register_statistics_kind(
    MovingAverageBatchNormalization,
    StatisticsKind(
        from_moments=_mabn_from_moments,
        stored=_mabn_stored,
        write=_mabn_write,
        averages=_mabn_averages,
        subtracts_mean=False,
    ),
)


def normalization_layers(model):
    """Every layer of `model` (nested ones included) with a known kind.

    In the order of `model`'s layer tree; `model` itself may be one layer.
    """
    if find_kind(model) is not None:
        return [model]
    found = []
    seen = set()
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if id(layer) not in seen and find_kind(layer) is not None:
            seen.add(id(layer))
            found.append(layer)
    return found


def select_layers(model, layers, what):
    """The normalization layers of `model` named or given in `layers`.

    `layers=None` means all of them. Names must be unique in the model.
    """
    available = normalization_layers(model)
    if layers is None:
        return available
    if isinstance(layers, (str, keras.layers.Layer)):
        layers = [layers]
    everything = list(
        model._flatten_layers(include_self=False, recursive=True)
    )
    chosen = []
    for item in layers:
        if isinstance(item, str):
            matches = [layer for layer in everything if layer.name == item]
            if not matches:
                raise ValueError(
                    f"{what}: model '{model.name}' has no layer named "
                    f"{item!r}. Its normalization layers are "
                    f"{[layer.name for layer in available]}."
                )
            if len({id(m) for m in matches}) > 1:
                raise ValueError(
                    f"{what}: model '{model.name}' has several layers named "
                    f"{item!r} (in nested models); pass the layer objects "
                    "instead of the name."
                )
            layer = matches[0]
        elif isinstance(item, keras.layers.Layer):
            layer = item
            if not any(layer is other for other in everything):
                raise ValueError(
                    f"{what}: layer '{layer.name}' is not part of model "
                    f"'{model.name}'."
                )
        else:
            raise TypeError(
                f"{what}: argument `layers` must hold layer names or layer "
                f"objects. Received an item {item!r}."
            )
        if find_kind(layer) is None:
            raise ValueError(
                f"{what}: layer '{layer.name}' ({type(layer).__name__}) is "
                "not a normalization layer the statistics tools know (Keras' "
                "BatchNormalization and its subclasses, kerasbn's layers). "
                "Register its kind with "
                "kerasbn.stats.register_statistics_kind."
            )
        if not any(layer is c for c in chosen):
            chosen.append(layer)
    return chosen
