"""kerasbn.freeze / unfreeze: frozen statistics do not move during fit."""

import keras
import numpy as np
import pytest

import kerasbn
from tests.helpers import random_batch

pytestmark = pytest.mark.any_backend

L = keras.layers


def _model():
    inner = keras.Sequential([keras.Input((6,)), L.Dense(6, use_bias=False),
                              kerasbn.layers.MABN(name="mabn")],
                             name="inner")
    inputs = keras.Input((4,))
    h = L.Dense(6, use_bias=False)(inputs)
    h = L.BatchNormalization(name="bn_keras")(h)
    h = kerasbn.layers.BatchNormalization(zero_debias="mean",
                                          name="bn_debiased")(h)
    h = inner(h)
    outputs = L.Dense(1, name="head")(h)
    return keras.Model(inputs, outputs)


def _normalizations(model):
    return [
        layer for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, (L.BatchNormalization, kerasbn.layers.MABN))
    ]


def _snapshot(layers):
    return {layer.name: [np.array(w.numpy()) for w in layer.weights]
            for layer in layers}


def _fit(model):
    x = random_batch((64, 4), seed=1, loc=2.0)
    y = random_batch((64, 1), seed=2)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)


def test_frozen_statistics_and_affine_weights_do_not_move():
    model = _model()
    normalizations = _normalizations(model)
    assert len(normalizations) == 3
    head_before = model.get_layer("head").kernel.numpy().copy()
    before = _snapshot(normalizations)
    handle = kerasbn.freeze(model)
    assert [layer.name for layer in handle.layers] == [
        "bn_keras", "bn_debiased", "mabn"]
    assert all(not layer.trainable for layer in normalizations)
    _fit(model)
    for name, values in _snapshot(normalizations).items():
        for b, a in zip(before[name], values):
            np.testing.assert_array_equal(b, a, err_msg=name)
    # The rest of the model trained.
    assert not np.array_equal(head_before,
                              model.get_layer("head").kernel.numpy())

    handle.restore()
    assert all(layer.trainable for layer in normalizations)
    _fit(model)
    after = _snapshot(normalizations)
    assert not np.array_equal(before["bn_keras"][2], after["bn_keras"][2])
    assert int(model.get_layer("inner").get_layer("mabn").step.numpy()) == 4
    assert int(model.get_layer("bn_debiased").debias_step.numpy()) == 4


def test_restore_keeps_previous_flags_and_unfreeze_sets_all():
    model = _model()
    model.get_layer("bn_keras").trainable = False
    with kerasbn.freeze(model, layers=["bn_keras", "bn_debiased"]) as handle:
        assert handle.previous == (False, True)
        assert not model.get_layer("bn_debiased").trainable
        assert model.get_layer("inner").get_layer("mabn").trainable
    assert not model.get_layer("bn_keras").trainable
    assert model.get_layer("bn_debiased").trainable
    handle.restore()  # A second restore changes nothing.
    assert not model.get_layer("bn_keras").trainable

    changed = kerasbn.unfreeze(model)
    assert len(changed) == 3
    assert all(layer.trainable for layer in _normalizations(model))
    # Only normalization layers are touched.
    kerasbn.freeze(model)
    assert model.get_layer("head").trainable
    assert model.get_layer("inner").trainable


def test_freeze_one_layer_and_errors():
    layer = L.BatchNormalization()
    handle = kerasbn.freeze(layer)
    assert not layer.trainable
    handle.restore()
    assert layer.trainable
    with pytest.raises(TypeError, match="normalization layer"):
        kerasbn.freeze(L.Dense(2))
    with pytest.raises(ValueError, match="not a normalization layer"):
        kerasbn.freeze(_model(), layers=["head"])
