"""Shared helpers of the fold tests: random statistics and the output oracle."""

import keras
import numpy as np

import kerasbn


def randomize_normalizations(model, seed=0):
    """Give every BatchNormalization non-trivial parameters and statistics.

    With the default gamma=1, beta=0, mean=0, variance=1 a BN is almost the
    identity and a fold that drops it, or applies it on the wrong axis,
    would still pass; random values per channel expose both.
    """
    rng = np.random.default_rng(seed)
    draws = {
        "gamma": lambda shape: rng.uniform(0.5, 1.5, shape),
        "beta": lambda shape: rng.normal(0.0, 0.5, shape),
        "moving_mean": lambda shape: rng.normal(0.0, 0.5, shape),
        "moving_variance": lambda shape: rng.uniform(0.5, 2.0, shape),
    }
    for layer in model._flatten_layers():
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        for variable in layer.weights:
            draw = draws.get(variable.name)
            if draw is not None:
                variable.assign(draw(tuple(variable.shape)).astype("float32"))
            elif variable.name == "debias_step":
                variable.assign(7)
    return model


def inputs_for(model, batch=2, seed=1):
    rng = np.random.default_rng(seed)
    arrays = [
        rng.normal(size=(batch,) + tuple(x.shape[1:])).astype("float32")
        for x in model.inputs
    ]
    return arrays[0] if len(arrays) == 1 else arrays


def assert_same_outputs(original, folded, inputs, rtol=1e-5):
    """Folded and original inference outputs agree relative to their scale.

    The reference is Keras' own inference pass of the untouched model. The
    fold is computed in float64 and cast to float32 (about 3e-7 relative
    rounding per weight); the convolutions then accumulate in a different
    order with rescaled kernels, about 1e-6 of max|y|. 1e-5 of max|y| leaves
    a margin of ten over that while a wrong axis or a missing shift is off
    by order 1e-1.
    """
    expected = keras.tree.flatten(original(inputs, training=False))
    actual = keras.tree.flatten(folded(inputs, training=False))
    assert len(expected) == len(actual)
    for e, a in zip(expected, actual):
        e = keras.ops.convert_to_numpy(e).astype(np.float64)
        a = keras.ops.convert_to_numpy(a).astype(np.float64)
        assert e.shape == a.shape
        scale = max(np.abs(e).max(), 1e-6)
        error = np.abs(e - a).max()
        assert error <= rtol * scale, (
            f"max error {error:.3g} > {rtol} * max|y| ({scale:.3g})"
        )


def weights_snapshot(model):
    return [np.array(w) for w in model.get_weights()]


def count_batch_norms(model):
    """BatchNormalization layers (Keras' or kerasbn's) left in `model`."""
    return sum(
        1
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization)
    )


def count_scale_shift(model):
    return sum(
        1
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, kerasbn.layers.ScaleShift)
    )
