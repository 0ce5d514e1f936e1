"""Freeze normalization statistics for fine-tuning, and undo it.

In Keras a layer with `trainable = False` runs in inference mode even when
the model trains (`training=True`): a frozen BatchNormalization normalizes
with its stored statistics and does not update them. That is the usual way
to fine-tune with small batches or on a few samples, where batch statistics
would be noisy and would overwrite statistics learned on much more data.
"""

import keras

from kerasbn import registry
from kerasbn.stats._select import select_layers

_WHAT = "kerasbn.freeze"


class FrozenNormalizations:
    """What `freeze` changed, and the way back.

    Attributes:
        layers: The normalization layers that `freeze` set to
            `trainable = False` (all it considered, frozen or not before).
        previous: Their `trainable` flags before `freeze`, in the same
            order.

    `restore()` puts those flags back (once; later calls do nothing). The
    object is also a context manager that restores on exit:

    >>> import keras, kerasbn
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2),
    ...                           keras.layers.BatchNormalization()])
    >>> with kerasbn.freeze(model):
    ...     model.layers[1].trainable
    False
    >>> model.layers[1].trainable
    True
    """

    def __init__(self, layers, previous):
        self.layers = tuple(layers)
        self.previous = tuple(previous)
        self._restored = False

    def restore(self):
        """Give every layer its `trainable` flag from before `freeze`."""
        if self._restored:
            return
        for layer, flag in zip(self.layers, self.previous):
            layer.trainable = flag
        self._restored = True

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.restore()
        return False

    def __repr__(self):
        names = [layer.name for layer in self.layers]
        return f"FrozenNormalizations(layers={names})"


def _targets(model, layers, what):
    if isinstance(model, keras.layers.Layer) and not isinstance(
        model, keras.Model
    ):
        if registry.find_statistics(model) is None:
            raise TypeError(
                f"{what} expects a keras.Model or a normalization layer. "
                f"Received: layer '{model.name}' of type "
                f"{type(model).__name__}."
            )
        return [model]
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"{what} expects a keras.Model. Received: {type(model).__name__}."
        )
    return select_layers(model, layers, what)


def freeze(model, *, layers=None):
    """Put every normalization layer in inference mode for further training.

    Sets `trainable = False` on each BatchNormalization-like layer (Keras'
    and kerasbn's, MABN included) and on nothing else. In Keras that means,
    during `fit` or any call with `training=True`: the layer normalizes with
    its stored statistics, does not update them (nor its step counters or
    buffers), and its `gamma` and `beta` are frozen too (Keras has no way to
    train a layer's weights while it runs in inference mode; to keep
    training them, leave the layer trainable and accept batch statistics).

    Re-compile the model after `freeze` (and after undoing it) before
    training: `compile` is what makes `fit` pick up the new set of trainable
    weights.

    Args:
        model: A `keras.Model` (nested models included) or one
            normalization layer.
        layers: Optional layer names or objects: freeze only these.

    Returns:
        A `FrozenNormalizations` whose `restore()` puts back each layer's
        previous flag (also a context manager); `unfreeze(model)` instead
        makes every normalization layer trainable.

    Example:

    >>> import keras, kerasbn
    >>> model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2),
    ...                           keras.layers.BatchNormalization()])
    >>> handle = kerasbn.freeze(model)
    >>> [layer.trainable for layer in model.layers]
    [True, False]
    >>> handle.restore()
    >>> [layer.trainable for layer in model.layers]
    [True, True]
    """
    targets = _targets(model, layers, _WHAT)
    previous = [layer.trainable for layer in targets]
    for layer in targets:
        layer.trainable = False
    return FrozenNormalizations(targets, previous)


def unfreeze(model, *, layers=None):
    """Make every normalization layer trainable again (training mode in fit).

    The opposite of `freeze`, without its memory: every BatchNormalization-
    like layer (or those in `layers`) gets `trainable = True`. To put back
    exactly the flags from before a `freeze`, call the `restore()` of the
    object `freeze` returned instead. Re-compile before training.

    Returns:
        The layers made trainable, a list.

    >>> import keras, kerasbn
    >>> model = keras.Sequential([
    ...     keras.Input((2,)), keras.layers.Dense(2),
    ...     keras.layers.BatchNormalization(name="bn", trainable=False),
    ... ])
    >>> [layer.name for layer in kerasbn.unfreeze(model)]
    ['bn']
    >>> model.get_layer("bn").trainable
    True
    """
    targets = _targets(model, layers, "kerasbn.unfreeze")
    for layer in targets:
        layer.trainable = True
    return targets
