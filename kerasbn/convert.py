"""Convert a BN network to MABN with weight-centred layers, for fine-tuning.

`convert_to_mabn(model)` returns a new model (the input is not modified) in
which every `Conv1D`/`Conv2D`/`Conv3D` is the matching `CenteredConv*`
holding its kernel *centred*, and every `BatchNormalization` is a
`MovingAverageBatchNormalization` with the same inference-mode map. The
MABN authors' advice for pretrained weights (MABN issue #2) is to centre
them before fine-tuning; this does that.

What is preserved, exactly (up to float rounding):

- Every MABN reproduces its BN's inference map on the same inputs: BN's
  `gamma * (x - mean) / sqrt(var + eps) + beta` is written as MABN's
  `gamma' * x / sqrt(moving_variance + eps') + beta'` with
  `moving_variance = var + mean**2` (BN's estimate of the second moment,
  the statistic MABN tracks), `gamma' = gamma * sqrt(moving_variance +
  eps') / sqrt(var + eps)` and `beta' = beta - mean * gamma / sqrt(var +
  eps)`. MABN's step counter and buffers start empty.
- A centred layer computes what the plain layer computes with the centred
  kernel. So the converted model's inference outputs equal the original
  model's after centring its kernels; they equal the original model's own
  outputs when the kernels were already centred. Otherwise centring
  changes the function (by the kernel means), which is the point:
  fine-tuning adapts to it, and MABN's statistics re-estimate within
  about `1 / (1 - momentum)` steps.

Only Keras functional and Sequential models (nested ones included) can be
converted; other layers are copied with their weights.
"""

import typing

import keras
import numpy as np

from kerasbn import _keras_internal
from kerasbn import _models
from kerasbn import registry
from kerasbn.rules import center_kernel
from kerasbn.layers.centered import CENTERED_LAYERS
from kerasbn.layers.mabn import MovingAverageBatchNormalization


class ConversionResult(typing.NamedTuple):
    """`model`: the new model; `converted`: `(layer name, old class, new
    class)` for every layer that changed class.

    >>> import keras, kerasbn
    >>> model = keras.Sequential([
    ...     keras.Input((6, 6, 2)),
    ...     keras.layers.Conv2D(3, 3, use_bias=False, name="conv"),
    ...     keras.layers.BatchNormalization(name="bn"),
    ... ])
    >>> result = kerasbn.convert_to_mabn(model, buffer_size=4)
    >>> result.converted
    (('conv', 'Conv2D', 'CenteredConv2D'),
     ('bn', 'BatchNormalization', 'MovingAverageBatchNormalization'))
    >>> [type(layer).__name__ for layer in result.model.layers]
    ['CenteredConv2D', 'MovingAverageBatchNormalization']
    """

    model: keras.Model
    converted: tuple


def _mabn_weights(bn, mabn):
    """MABN weights with the same inference map as the batch norm `bn`."""
    scale, shift = registry.find_normalization(bn).scale_shift(bn)
    mean, variance = registry.BATCH_NORM_STATISTICS.stored(bn)
    second_moment = variance + mean ** 2
    return {
        "gamma": scale * np.sqrt(second_moment + mabn.epsilon),
        "beta": shift,
        "moving_variance": second_moment,
    }


def _is_batch_norm(layer):
    """A layer holding Keras BN's statistics (`kerasbn.registry`)."""
    return (registry.find_statistics(layer) is registry.BATCH_NORM_STATISTICS
            and registry.find_normalization(layer) is not None)


def convert_to_mabn(model, *, dense=False, **mabn_kwargs):
    """A copy of `model` with centred convolutions and MABN for BN.

    Args:
        model: A functional or Sequential Keras model (built).
        dense: Also turn `Dense` layers into `CenteredDense` (default
            False: the reference centres convolutions only).
        **mabn_kwargs: Arguments for every new
            `MovingAverageBatchNormalization` (e.g. `buffer_size`,
            `warmup_steps`, `momentum`, `epsilon`); `axis` is taken from
            each BN, and `center`/`scale` stay True.

    Returns:
        `ConversionResult(model, converted)`; see the module docstring for
        what the new model preserves.

    >>> import keras, kerasbn
    >>> model = keras.Sequential([
    ...     keras.Input((8, 8, 3)),
    ...     keras.layers.Conv2D(4, 3, use_bias=False),
    ...     keras.layers.BatchNormalization(),
    ... ])
    >>> new, converted = kerasbn.convert_to_mabn(model, buffer_size=8)
    >>> [c[2] for c in converted]
    ['CenteredConv2D', 'MovingAverageBatchNormalization']
    """
    if not isinstance(model, keras.Model) or not _keras_internal.is_graph_model(model):
        raise TypeError(
            "convert_to_mabn needs a functional or Sequential keras.Model. "
            f"Received: {type(model).__name__}. Rebuild subclassed models "
            "with kerasbn.layers.CenteredConv2D and "
            "kerasbn.layers.MovingAverageBatchNormalization directly."
        )
    fixed = sorted({"axis", "center", "scale"} & set(mabn_kwargs))
    if fixed:
        raise ValueError(
            f"Arguments {fixed} cannot be set for the new MABN layers: each "
            "takes the axis of the BatchNormalization it replaces, and "
            "keeps gamma and beta (they absorb BN's mean). Received: "
            + ", ".join(f"{k}={mabn_kwargs[k]!r}" for k in fixed) + "."
        )
    targets = dict(CENTERED_LAYERS)
    if not dense:
        targets.pop(keras.layers.Dense)
    pairs = []
    converted = []

    def clone_layer(layer):
        config = layer.get_config()
        new_cls = targets.get(type(layer))
        if new_cls is not None:
            new = new_cls.from_config(config)
        elif _is_batch_norm(layer):
            new = MovingAverageBatchNormalization(
                axis=layer.axis, name=layer.name, dtype=layer.dtype_policy,
                trainable=layer.trainable, **mabn_kwargs,
            )
        else:
            new = type(layer).from_config(config)
        if type(new) is not type(layer):
            converted.append(
                (layer.name, type(layer).__name__, type(new).__name__)
            )
        pairs.append((layer, new))
        return new

    new_model = keras.models.clone_model(
        model, clone_function=clone_layer, recursive=True
    )
    for old, new in pairs:
        if isinstance(new, MovingAverageBatchNormalization):
            for name, value in _mabn_weights(old, new).items():
                variable = getattr(new, name)
                if variable is not None:
                    registry.assign(variable, value)
        elif type(new) is not type(old):
            _models.copy_weights(old, new, "kerasbn.convert_to_mabn")
            registry.assign(new.kernel, center_kernel(
                keras.ops.convert_to_numpy(new.kernel), -1))
        else:
            _models.copy_weights(old, new, "kerasbn.convert_to_mabn")
    return ConversionResult(new_model, tuple(converted))
