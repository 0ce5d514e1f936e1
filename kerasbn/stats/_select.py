"""Which normalization layers of a model a statistics tool works on."""

import keras

from kerasbn import _keras_internal
from kerasbn import registry


def select_layers(model, layers, what):
    """The normalization layers of `model` named or given in `layers`.

    `layers=None` means all the layers the statistics tools know (see
    `kerasbn.registry`). Names must be unique in the model.
    """
    available = registry.normalization_layers(model)
    if layers is None:
        return available
    if isinstance(layers, (str, keras.layers.Layer)):
        layers = [layers]
    everything = _keras_internal.sublayers(model)
    chosen = []
    for item in layers:
        layer = _resolve(model, item, everything, available, what)
        if registry.find_statistics(layer) is None:
            raise ValueError(
                f"{what}: layer '{layer.name}' ({type(layer).__name__}) is "
                "not a normalization layer the statistics tools know (Keras' "
                "BatchNormalization and its subclasses, kerasbn's layers). "
                "Declare its kind with kerasbn.register_normalization(cls, "
                "statistics=...)."
            )
        if not any(layer is c for c in chosen):
            chosen.append(layer)
    return chosen


def _resolve(model, item, everything, available, what):
    if isinstance(item, str):
        matches = [layer for layer in everything if layer.name == item]
        if not matches:
            raise ValueError(
                f"{what}: model '{model.name}' has no layer named {item!r}. "
                "Its normalization layers are "
                f"{[layer.name for layer in available]}."
            )
        if len(matches) > 1:
            raise ValueError(
                f"{what}: model '{model.name}' has several layers named "
                f"{item!r} (in nested models); pass the layer objects "
                "instead of the name."
            )
        return matches[0]
    if isinstance(item, keras.layers.Layer):
        if not any(item is other for other in everything):
            raise ValueError(
                f"{what}: layer '{item.name}' is not part of model "
                f"'{model.name}'."
            )
        return item
    raise TypeError(
        f"{what}: argument `layers` must hold layer names or layer objects. "
        f"Received an item {item!r}."
    )
