"""Tests for the weight-centred layers, their folding and `convert_to_mabn`.

Oracles: Keras' own Conv1D/2D/3D and Dense given a kernel centred in NumPy
(outputs), the same Keras layers' gradients projected by NumPy centring
(the Jacobian of `W -> W - mean(W)` is that projection, so
`dL/dW = G - mean(G)` with `G` the plain layer's kernel gradient), and the
unfolded / unconverted model itself for folding and conversion.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from kerasbn.layers import CenteredConv1D
from kerasbn.layers import CenteredConv2D
from kerasbn.layers import CenteredConv3D
from kerasbn.layers import CenteredDense
from kerasbn.layers import MABN
from tests.helpers import assert_close_to_scale
from tests.helpers import random_batch
from tests.helpers import randomize_normalizations
from tests.helpers import run_layer_test
from tests.helpers import to_numpy

pytestmark = pytest.mark.any_backend

L = keras.layers


def numpy_center(kernel):
    kernel = np.asarray(kernel, np.float64)
    axes = tuple(range(kernel.ndim - 1))
    return kernel - kernel.mean(axis=axes, keepdims=True)


CASES = {
    "conv1d": (CenteredConv1D, L.Conv1D, dict(filters=4, kernel_size=3),
               (2, 9, 3)),
    "conv1d_causal_dilated": (
        CenteredConv1D, L.Conv1D,
        dict(filters=3, kernel_size=3, padding="causal", dilation_rate=2),
        (2, 9, 2)),
    "conv2d": (CenteredConv2D, L.Conv2D,
               dict(filters=5, kernel_size=3, padding="same", strides=2),
               (2, 7, 7, 3)),
    "conv2d_groups_bias_relu": (
        CenteredConv2D, L.Conv2D,
        dict(filters=4, kernel_size=(3, 2), groups=2, activation="relu"),
        (2, 6, 6, 4)),
    "conv3d": (CenteredConv3D, L.Conv3D, dict(filters=2, kernel_size=2),
               (2, 4, 4, 4, 3)),
    "dense": (CenteredDense, L.Dense, dict(units=4), (3, 5)),
    "dense_rank3": (CenteredDense, L.Dense, dict(units=2, use_bias=False),
                    (2, 3, 5)),
}


def _pair(case):
    centred_cls, plain_cls, kwargs, shape = CASES[case]
    centred = centred_cls(**kwargs)
    centred.build(shape)
    rng = np.random.default_rng(0)
    weights = [rng.normal(0.3, 1.0, w.shape).astype("float32")
               for w in centred.get_weights()]
    centred.set_weights(weights)
    plain = plain_cls(**kwargs)
    plain.build(shape)
    plain.set_weights([numpy_center(weights[0]).astype("float32")]
                      + weights[1:])
    return centred, plain, shape


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="gradients through tf.GradientTape; training on "
                    "JAX/PyTorch is checked by test_mabn's fit tests")
@pytest.mark.parametrize("case", sorted(CASES))
def test_output_and_gradients_equal_plain_layer_with_centred_kernel(case):
    centred, plain, shape = _pair(case)
    x = tf.constant(random_batch(shape, seed=1, loc=0.5))
    assert_close_to_scale(to_numpy(centred(x)), to_numpy(plain(x)), 1e-6)

    upstream = tf.constant(random_batch(plain(x).shape, seed=2))
    grads = []
    for layer in (centred, plain):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        grads.append(tape.gradient(y, [x] + layer.trainable_weights,
                                   output_gradients=upstream))
    (cx, ck, *cb), (px, pk, *pb) = grads
    assert_close_to_scale(to_numpy(cx), to_numpy(px), 1e-6, "input grad")
    assert_close_to_scale(to_numpy(ck), numpy_center(to_numpy(pk)), 1e-5,
                          "kernel grad")
    for a, b in zip(cb, pb):
        assert_close_to_scale(to_numpy(a), to_numpy(b), 1e-6, "bias grad")
    # The stored kernel's gradient has zero mean over the centred axes.
    ck = to_numpy(ck)
    assert np.allclose(ck.mean(axis=tuple(range(ck.ndim - 1))), 0,
                       atol=1e-6 * np.abs(ck).max())


@pytest.mark.parametrize("case", ["conv1d", "conv2d", "conv3d", "dense"])
def test_layer_contract(case):
    centred_cls, plain_cls, kwargs, shape = CASES[case]
    out_shape = plain_cls(**kwargs).compute_output_shape(shape)
    run_layer_test(centred_cls, kwargs, shape, 2, 0,
                   expected_output_shape=out_shape)


def test_is_a_drop_in_subclass_and_refuses_quantization():
    layer = CenteredConv2D(3, 3, name="c")
    assert isinstance(layer, L.Conv2D)
    assert layer.get_config() == L.Conv2D(3, 3, name="c").get_config()
    dense = CenteredDense(2)
    dense.build((None, 3))
    with pytest.raises(NotImplementedError, match="Fold the model first"):
        dense.quantize("int8")


# --------------------------------------------------------------------------
# Folding: centred layers + MABN fold away.


def _centred_mabn_model():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 3))
    h = CenteredConv2D(6, 3, padding="same", use_bias=False)(inputs)
    h = MABN(buffer_size=2, warmup_steps=2, clip_start_step=3)(h)
    h = L.ReLU()(h)
    h = CenteredConv2D(8, 3, strides=2)(h)
    h = MABN(buffer_size=2, warmup_steps=2, clip_start_step=3)(h)
    h = L.GlobalAveragePooling2D()(L.ReLU()(h))
    h = CenteredDense(5, use_bias=False)(h)
    h = MABN(buffer_size=2)(h)
    outputs = L.Dense(3)(h)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    x = random_batch((24, 8, 8, 3), seed=4, loc=0.5, scale=2.0)
    model.fit(x, random_batch((24, 3), seed=5), batch_size=4, verbose=0)
    return model, x


def test_fold_removes_every_mabn_and_keeps_outputs():
    model, x = _centred_mabn_model()
    for layer in model.layers:
        if isinstance(layer, MABN):
            assert int(to_numpy(layer.step)) == 6
            gamma = to_numpy(layer.gamma)
            layer.gamma.assign(gamma * np.linspace(0.5, 2.0, gamma.size))
    folded, report = kerasbn.fold(model)
    assert report.normalizations_after == 0
    assert report.folded_backward == 3
    assert [type(layer) for layer in folded.layers[1:]] == [
        L.Conv2D, L.ReLU, L.Conv2D, L.ReLU, L.GlobalAveragePooling2D,
        L.Dense, L.Dense]
    want = to_numpy(model(x, training=False))
    assert_close_to_scale(to_numpy(folded(x)), want, 1e-5)


# --------------------------------------------------------------------------
# convert_to_mabn.


def _bn_model(centred_kernels=False):
    keras.utils.set_random_seed(9)
    inputs = keras.Input((8, 8, 3))
    h = L.Conv2D(6, 3, padding="same", use_bias=False, name="c1")(inputs)
    h = L.BatchNormalization(name="bn1")(h)
    h = L.ReLU()(h)
    h = L.Conv2D(4, 3, name="c2")(h)
    h = kerasbn.layers.BatchNormalization(epsilon=1e-3, scale=False,
                                          name="bn2")(h)
    h = L.GlobalAveragePooling2D()(L.ReLU()(h))
    outputs = L.Dense(2, name="head")(h)
    model = keras.Model(inputs, outputs)
    randomize_normalizations(model, seed=0, gamma=(0.5, 2.0), shift=1.0)
    for layer in model.layers:
        if centred_kernels and isinstance(layer, L.Conv2D):
            layer.kernel.assign(numpy_center(to_numpy(layer.kernel)))
    return model


def test_convert_centres_kernels_and_keeps_inference_of_centred_model():
    model = _bn_model()
    x = random_batch((3, 8, 8, 3), seed=6, loc=0.5)
    before = [to_numpy(w).copy() for w in model.weights]
    converted, changes = kerasbn.convert_to_mabn(model, buffer_size=4)
    assert [c[1:] for c in changes] == [
        ("Conv2D", "CenteredConv2D"),
        ("BatchNormalization", "MovingAverageBatchNormalization"),
        ("Conv2D", "CenteredConv2D"),
        ("BatchNormalization", "MovingAverageBatchNormalization")]
    # The input model is untouched.
    for w, b in zip(model.weights, before):
        np.testing.assert_array_equal(to_numpy(w), b)
    layers = {layer.name: layer for layer in converted.layers}
    for name in ("c1", "c2"):
        kernel = to_numpy(layers[name].kernel)
        assert_close_to_scale(kernel, numpy_center(model.get_layer(
            name).kernel), 1e-6)
    assert layers["bn1"].buffer_size == 4 and layers["bn2"].axis == -1
    # Preserved: the original network with its kernels centred.
    oracle = _bn_model()
    for name in ("c1", "c2"):
        oracle.get_layer(name).kernel.assign(
            numpy_center(to_numpy(oracle.get_layer(name).kernel)))
    assert_close_to_scale(to_numpy(converted(x)), to_numpy(oracle(x)), 1e-5)
    # ... and, when the kernels were centred already, the original itself.
    centred = _bn_model(centred_kernels=True)
    new, _ = kerasbn.convert_to_mabn(centred)
    assert_close_to_scale(to_numpy(new(x)), to_numpy(centred(x)), 1e-5)
    # It trains, and folds back.
    new.compile(optimizer="sgd", loss="mse")
    new.fit(x, np.zeros((3, 2), "float32"), batch_size=3, verbose=0)
    assert int(to_numpy(new.get_layer("bn1").step)) == 1
    assert kerasbn.fold(new).report.normalizations_after == 0


def test_convert_dense_and_refusals():
    inputs = keras.Input((4,))
    h = L.Dense(3, use_bias=False)(inputs)
    model = keras.Model(inputs, L.BatchNormalization()(h))
    new, changes = kerasbn.convert_to_mabn(model, dense=True)
    assert [c[2] for c in changes] == ["CenteredDense",
                                       "MovingAverageBatchNormalization"]
    with pytest.raises(ValueError, match="axis=1"):
        kerasbn.convert_to_mabn(model, axis=1)

    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="functional or Sequential"):
        kerasbn.convert_to_mabn(Sub())
