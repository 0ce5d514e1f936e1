"""The registry: one declaration serves every tool, and tools leave the
user's Keras session as they found it."""

import keras
import numpy as np
import pytest

import kerasbn

pytestmark = pytest.mark.any_backend


class _FirstAxisNorm(keras.layers.Layer):
    """Stores BN-style statistics of axis 1; `axis` says otherwise on
    purpose, so only the registered `axis` function gives the right one."""

    axis = -1
    momentum = 0.9
    epsilon = 1e-3

    def build(self, shape):
        self.moving_mean = self.add_weight(
            shape=(shape[1],), initializer="zeros", trainable=False)
        self.moving_variance = self.add_weight(
            shape=(shape[1],), initializer="ones", trainable=False)

    def call(self, x):
        return x


def test_statistics_only_kind_uses_its_registered_axis():
    kerasbn.registry.register_normalization(
        _FirstAxisNorm, scale_shift=None, axis=lambda layer: 1,
        statistics=kerasbn.registry.BATCH_NORM_STATISTICS)
    assert kerasbn.registry.channel_axis(_FirstAxisNorm(), 4) == 1
    x = np.random.default_rng(0).normal(3.0, 2.0, (8, 3, 4, 5))
    model = keras.Sequential([keras.Input((3, 4, 5)), _FirstAxisNorm()])
    new = kerasbn.recalibrate(model, x.astype("float32"), verbose=0)
    layer = new.layers[0]
    # Oracle: NumPy moments over every axis but 1; float32 storage.
    np.testing.assert_allclose(layer.moving_mean.numpy(),
                               x.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(),
                               x.var(axis=(0, 2, 3)), rtol=1e-5)


def test_fold_leaves_keras_auto_names_alone():
    # Folding must not create auto-named layers of its own: the user's next
    # keras.layers.Dense() is still "dense" (conftest clears the session).
    model = keras.Sequential([
        keras.Input((3,), name="x"),
        keras.layers.Dense(2, use_bias=False, name="d"),
        keras.layers.BatchNormalization(name="b"),
    ], name="named")
    kerasbn.fold(model)
    assert keras.layers.Dense(2).name == "dense"
    assert keras.layers.BatchNormalization().name == "batch_normalization"
