"""kerasbn.fold on hand-built models: every producer and BN kind, forward
folds, what cannot fold and why, nesting, options, errors, saving."""

import json

import keras
import numpy as np
import pytest

import kerasbn
from tests.helpers import assert_same_outputs
from tests.helpers import count_batch_norms
from tests.helpers import count_scale_shift
from tests.helpers import fold_and_check
from tests.helpers import inputs_for
from tests.helpers import randomize_normalizations
from tests.helpers import weights_snapshot

pytestmark = pytest.mark.any_backend

L = keras.layers

# name -> (factory(use_bias), input shape without batch, channel axis)
PRODUCERS = {
    "conv1d_strided": (
        lambda b: L.Conv1D(6, 3, strides=2, use_bias=b), (11, 4), -1),
    "conv2d_grouped_dilated": (
        lambda b: L.Conv2D(6, 3, groups=2, dilation_rate=2, use_bias=b),
        (9, 9, 4), -1),
    "conv2d_channels_first": (
        lambda b: L.Conv2D(
            5, 3, strides=2, data_format="channels_first", use_bias=b),
        (3, 9, 9), 1),
    "conv3d": (lambda b: L.Conv3D(4, 2, use_bias=b), (5, 5, 5, 3), -1),
    "depthwise1d_multiplier2": (
        lambda b: L.DepthwiseConv1D(3, depth_multiplier=2, use_bias=b),
        (10, 3), -1),
    "depthwise2d_multiplier3": (
        lambda b: L.DepthwiseConv2D(
            3, strides=2, depth_multiplier=3, padding="same", use_bias=b),
        (8, 8, 3), -1),
    "depthwise2d_channels_first": (
        lambda b: L.DepthwiseConv2D(
            3, depth_multiplier=2, data_format="channels_first", use_bias=b),
        (3, 7, 7), 1),
    "separable1d": (
        lambda b: L.SeparableConv1D(5, 3, depth_multiplier=2, use_bias=b),
        (10, 3), -1),
    "separable2d": (
        lambda b: L.SeparableConv2D(
            5, 3, depth_multiplier=2, padding="same", use_bias=b),
        (8, 8, 3), -1),
    "conv1d_transpose": (
        lambda b: L.Conv1DTranspose(4, 3, strides=2, use_bias=b),
        (6, 3), -1),
    "conv2d_transpose": (
        lambda b: L.Conv2DTranspose(
            5, 3, strides=2, padding="same", use_bias=b),
        (5, 5, 3), -1),
    "conv2d_transpose_channels_first": (
        lambda b: L.Conv2DTranspose(
            4, 2, strides=2, data_format="channels_first", use_bias=b),
        (3, 5, 5), 1),
    "conv3d_transpose": (
        lambda b: L.Conv3DTranspose(3, 2, use_bias=b), (4, 4, 4, 2), -1),
    "dense": (lambda b: L.Dense(5, use_bias=b), (7,), -1),
    "dense_rank3": (lambda b: L.Dense(5, use_bias=b), (4, 7), -1),
}

BN_KINDS = {
    "keras": lambda axis: L.BatchNormalization(axis=axis),
    "keras_renorm": lambda axis: L.BatchNormalization(axis=axis, renorm=True),
    # synchronized=True is TensorFlow-only in Keras.
    **({"keras_synchronized": lambda axis: L.BatchNormalization(
        axis=axis, synchronized=True)}
       if keras.backend.backend() == "tensorflow" else {}),
    "kerasbn_debias_mean": lambda axis: kerasbn.layers.BatchNormalization(
        axis=axis, zero_debias="mean"),
    "kerasbn_debias_both": lambda axis: kerasbn.layers.BatchNormalization(
        axis=axis, zero_debias=True),
}


def producer_then_bn(producer, bn_kind, use_bias, seed=0):
    factory, shape, axis = PRODUCERS[producer]
    inputs = keras.Input(shape)
    x = factory(use_bias)(inputs)
    outputs = BN_KINDS[bn_kind](axis)(x)
    # Step counters as after some training (fold must not care).
    return randomize_normalizations(keras.Model(inputs, outputs), seed,
                                    steps=7)


@pytest.mark.parametrize("bn_kind", sorted(BN_KINDS))
@pytest.mark.parametrize("producer", sorted(PRODUCERS))
def test_backward_fold_every_producer_and_kind(producer, bn_kind):
    model = producer_then_bn(producer, bn_kind, use_bias=False)
    folded, report = fold_and_check(model)
    assert count_batch_norms(folded) == 0
    assert count_scale_shift(folded) == 0
    (entry,) = report.entries
    assert entry.action == "folded" and entry.direction == "backward"
    assert entry.into == (model.layers[1].name,)
    # The producer had no bias; the folded one holds the BN's shift.
    assert folded.layers[1].use_bias


@pytest.mark.parametrize("producer", sorted(PRODUCERS))
def test_backward_fold_producer_with_bias(producer):
    model = producer_then_bn(producer, "keras", use_bias=True, seed=3)
    # A non-zero bias, so that `b * s` is exercised too.
    layer = model.layers[1]
    layer.bias.assign(np.linspace(-1.0, 1.0, layer.bias.shape[0]))
    folded, report = fold_and_check(model)
    assert report.folded_backward == 1 and count_batch_norms(folded) == 0


def test_input_model_and_weights_are_untouched():
    model = producer_then_bn("conv2d_grouped_dilated", "keras", False)
    before = weights_snapshot(model)
    layers = list(model.layers)
    folded, _ = kerasbn.fold(model)
    assert list(model.layers) == layers
    assert all(
        np.array_equal(a, b) for a, b in zip(before, weights_snapshot(model))
    )
    assert not any(new is old for new in folded.layers for old in layers)
    # Same configs, initializers included (only use_bias changed).
    config = dict(folded.layers[1].get_config(), use_bias=False)
    assert config == model.layers[1].get_config()
    # Writing to the folded model's weights leaves the original alone.
    folded.layers[1].kernel.assign(np.zeros(folded.layers[1].kernel.shape))
    assert np.array_equal(before[0], model.get_weights()[0])


# -- forward folds -------------------------------------------------------


def bn_then(layer, shape, axis=-1, zero_shift=False, seed=0):
    inputs = keras.Input(shape)
    bn = L.BatchNormalization(axis=axis, center=not zero_shift)
    outputs = layer(bn(inputs))
    model = randomize_normalizations(keras.Model(inputs, outputs), seed)
    if zero_shift:
        bn.moving_mean.assign(np.zeros(bn.moving_mean.shape))
    return model


FORWARD_EXACT = {
    "conv2d_valid_strided": (
        lambda: L.Conv2D(4, 3, strides=2, dilation_rate=1), (9, 9, 3)),
    "conv2d_valid_dilated_grouped": (
        lambda: L.Conv2D(4, 3, dilation_rate=2, groups=2), (9, 9, 4)),
    "conv2d_1x1_same_strided": (
        lambda: L.Conv2D(4, 1, strides=2, padding="same"), (7, 7, 3)),
    "conv1d_causal_1x1": (lambda: L.Conv1D(4, 1, padding="causal"), (8, 3)),
    "depthwise_valid": (
        lambda: L.DepthwiseConv2D(3, depth_multiplier=2), (7, 7, 3)),
    "separable_valid": (
        lambda: L.SeparableConv2D(5, 3, depth_multiplier=2), (7, 7, 3)),
    "separable1d_1x1_same": (
        lambda: L.SeparableConv1D(5, 1, padding="same", use_bias=False),
        (7, 3)),
    "transpose_1x1_stride1": (
        lambda: L.Conv2DTranspose(4, 1, use_bias=False), (5, 5, 3)),
    "dense": (lambda: L.Dense(4, activation="relu"), (6,)),
    "dense_rank3": (lambda: L.Dense(4), (3, 6)),
}


@pytest.mark.parametrize("case", sorted(FORWARD_EXACT))
def test_forward_fold_where_exact(case):
    factory, shape = FORWARD_EXACT[case]
    model = bn_then(factory(), shape)
    folded, report = fold_and_check(model)
    (entry,) = report.entries
    assert (entry.action, entry.direction) == ("folded", "forward")
    assert entry.into == (model.layers[2].name,)
    assert count_batch_norms(folded) == 0 and count_scale_shift(folded) == 0


@pytest.mark.parametrize(
    "factory",
    [
        lambda: L.Conv2D(4, 3, padding="same"),
        lambda: L.DepthwiseConv2D(3, padding="same"),
        lambda: L.Conv2DTranspose(4, 3, strides=2),
    ],
    ids=["conv_same", "depthwise_same", "transpose_3x3"],
)
def test_forward_fold_with_zero_shift_is_exact_with_any_padding(factory):
    model = bn_then(factory(), (6, 6, 3), zero_shift=True)
    folded, report = fold_and_check(model)
    assert report.folded_forward == 1 and count_batch_norms(folded) == 0


@pytest.mark.parametrize(
    "factory, words",
    [
        (lambda: L.Conv2D(4, 3, padding="same"), "padding='same'"),
        (lambda: L.Conv1D(4, 3, padding="causal"), "padding='causal'"),
        (lambda: L.Conv2DTranspose(4, 3), "transposed convolution"),
    ],
    ids=["conv_same_3x3", "conv1d_causal", "transpose_3x3"],
)
def test_forward_fold_refused_where_not_exact(factory, words):
    layer = factory()
    shape = (8, 3) if isinstance(layer, L.Conv1D) else (6, 6, 3)
    model = bn_then(layer, shape)
    folded, report = fold_and_check(model)
    (entry,) = report.entries
    assert entry.action == "replaced" and entry.direction is None
    assert entry.codes == ("after_model_input", "forward_not_exact")
    assert words in entry.reason and "model input" in entry.reason
    assert count_batch_norms(folded) == 0 and count_scale_shift(folded) == 1


def test_forward_fold_disabled():
    model = bn_then(L.Dense(3), (4,))
    folded, report = fold_and_check(model, forward=False)
    (entry,) = report.entries
    assert entry.action == "replaced"
    assert entry.codes == ("after_model_input", "forward_disabled")
    assert report.forward is False


def test_forward_fold_into_every_consumer():
    inputs = keras.Input((6, 6, 3))
    x = L.BatchNormalization()(inputs)
    a = L.Conv2D(4, 3, name="a")(x)
    b = L.Conv2D(4, 1, padding="same", use_bias=False, name="b")(x)
    c = L.DepthwiseConv2D(3, name="c")(x)
    outputs = L.Concatenate()([L.Cropping2D(((0, 0), (0, 0)))(a), c])
    model = randomize_normalizations(keras.Model(inputs, [outputs, b]))
    folded, report = fold_and_check(model)
    (entry,) = report.entries
    assert entry.direction == "forward" and sorted(entry.into) == list("abc")


def test_forward_fold_refused_if_one_consumer_is_not_exact():
    inputs = keras.Input((6, 6, 3))
    x = L.BatchNormalization()(inputs)
    a = L.Conv2D(4, 3, name="a")(x)
    b = L.Conv2D(4, 3, padding="same", name="b")(x)
    model = randomize_normalizations(keras.Model(inputs, [a, b]))
    folded, report = fold_and_check(model)
    (entry,) = report.entries
    assert entry.action == "replaced"
    assert entry.codes[-1] == "forward_not_exact" and "'b'" in entry.reason


# -- chains, both directions on one layer -------------------------------


def test_chains_fold_completely():
    inputs = keras.Input((9, 9, 3))
    x = L.BatchNormalization(name="bn_in_1")(inputs)
    x = L.BatchNormalization(name="bn_in_2")(x)
    x = L.Conv2D(4, 3, use_bias=False, name="conv")(x)
    x = L.BatchNormalization(name="bn_out_1")(x)
    x = L.BatchNormalization(name="bn_out_2")(x)
    model = randomize_normalizations(keras.Model(inputs, x))
    folded, report = fold_and_check(model)
    directions = {e.layer: (e.direction, e.into) for e in report.entries}
    assert directions == {
        "bn_in_1": ("forward", ("conv",)),
        "bn_in_2": ("forward", ("conv",)),
        "bn_out_1": ("backward", ("conv",)),
        "bn_out_2": ("backward", ("conv",)),
    }
    assert [type(layer).__name__ for layer in folded.layers] == [
        "InputLayer", "Conv2D"]


# -- what cannot fold, and why -------------------------------------------


def test_unfoldable_normalizations_are_replaced_with_reasons():
    inputs = keras.Input((8, 8, 3))
    a = L.Conv2D(4, 3, padding="same", name="conv_a")(inputs)
    b = L.Conv2D(4, 3, padding="same", activation="relu", name="conv_b")(
        inputs)
    add = L.Add(name="add")([a, b])
    bn_add = L.BatchNormalization(name="bn_after_add")(add)
    bn_act = L.BatchNormalization(name="bn_after_relu_conv")(b)
    relu = L.ReLU(name="relu")(bn_add)
    shared = L.Conv2D(4, 1, name="conv_shared_out")(relu)
    bn_shared = L.BatchNormalization(name="bn_after_shared_output")(shared)
    other = L.ReLU(name="other_consumer")(shared)
    concat = L.Concatenate(name="concat")([bn_shared, other, bn_act])
    bn_out = L.BatchNormalization(name="bn_output")(concat)
    model = randomize_normalizations(keras.Model(inputs, bn_out))
    folded, report = fold_and_check(model)
    entries = {e.layer: e for e in report.entries}
    assert entries["bn_after_add"].codes == (
        "after_nonlinear_layer", "before_nonlinear_layer")
    assert "Add 'add'" in entries["bn_after_add"].reason
    assert "ReLU 'relu'" in entries["bn_after_add"].reason
    assert entries["bn_after_relu_conv"].codes[0] == "producer_activation"
    assert "'relu'" in entries["bn_after_relu_conv"].reason
    assert entries["bn_after_shared_output"].codes[0] == (
        "producer_output_shared")
    assert "ReLU 'other_consumer'" in entries[
        "bn_after_shared_output"].reason
    assert entries["bn_output"].codes == (
        "after_nonlinear_layer", "model_output")
    assert all(e.action == "replaced" for e in report.entries)
    assert report.replaced == 4 and report.scale_shift_layers == 4
    assert report.normalizations_after == 0
    replaced = [layer for layer in folded.layers
                if isinstance(layer, kerasbn.layers.ScaleShift)]
    assert sorted(layer.name for layer in replaced) == sorted(entries)


def test_keep_unfolded_keeps_the_layers():
    inputs = keras.Input((5,))
    x = L.Dense(4, activation="relu")(inputs)
    x = L.BatchNormalization(name="kept")(x)
    x = L.Dense(3, use_bias=False)(x)
    x = L.BatchNormalization(name="folded")(x)
    model = randomize_normalizations(keras.Model(inputs, x))
    folded, report = fold_and_check(model, forward=False, keep_unfolded=True)
    assert [(e.layer, e.action) for e in report.entries] == [
        ("kept", "kept"), ("folded", "folded")]
    assert count_batch_norms(folded) == 1 and count_scale_shift(folded) == 0
    assert report.normalizations_before == 2
    assert report.normalizations_after == 1


def test_shared_producer_is_not_folded():
    inputs = keras.Input((6, 6, 3))
    conv = L.Conv2D(4, 3, padding="same", name="shared_conv")
    a = L.BatchNormalization(name="bn_a")(conv(inputs))
    b = L.BatchNormalization(name="bn_b")(conv(L.ReLU()(inputs)))
    model = randomize_normalizations(keras.Model(inputs, L.Add()([a, b])))
    _, report = fold_and_check(model)
    for entry in report.entries:
        assert entry.codes[0] == "shared_producer"
        assert "called 2 times" in entry.reason


def test_shared_normalization_layer_folds_per_call():
    inputs = keras.Input((6,))
    bn = L.BatchNormalization(name="shared_bn")
    a = bn(L.Dense(6, use_bias=False, name="dense_a")(inputs))
    b = bn(L.Add()([inputs, inputs]))
    model = randomize_normalizations(keras.Model(inputs, [a, b]))
    folded, report = fold_and_check(model)
    assert sorted((e.call, e.action) for e in report.entries) == [
        (0, "folded"), (1, "replaced")]
    assert count_scale_shift(folded) == 1


def test_axis_mismatch_is_not_folded():
    inputs = keras.Input((6, 5, 4))
    x = L.Conv2D(6, 1, name="conv")(inputs)
    x = L.BatchNormalization(axis=1, name="bn_axis1")(x)
    model = randomize_normalizations(keras.Model(inputs, L.ReLU()(x)))
    folded, report = fold_and_check(model)
    (entry,) = report.entries
    assert entry.codes[0] == "axis_mismatch"
    assert "axis 1" in entry.reason and "axis 3" in entry.reason


def test_training_true_call_is_kept():
    inputs = keras.Input((4,))
    x = L.Dense(3)(inputs)
    x = L.BatchNormalization(name="always_training")(x, training=True)
    model = keras.Model(inputs, x)
    _, report = kerasbn.fold(model)
    (entry,) = report.entries
    assert entry.action == "kept" and entry.codes == ("training_mode",)


# -- model structures ----------------------------------------------------


def small_block(name, shape=(8, 8, 3)):
    inputs = keras.Input(shape)
    x = L.Conv2D(4, 3, padding="same", use_bias=False)(inputs)
    x = L.BatchNormalization(name=f"{name}_bn")(x)
    x = L.ReLU()(x)
    return keras.Model(inputs, x, name=name)


def test_nested_models_fold_inside():
    inner = small_block("inner")
    middle_in = keras.Input((8, 8, 3))
    middle = keras.Model(
        middle_in, L.BatchNormalization(name="mid_bn")(inner(middle_in)),
        name="middle")
    seq = keras.Sequential(
        [keras.Input((8, 8, 4)), L.Conv2D(2, 1, use_bias=False),
         L.BatchNormalization(name="seq_bn")], name="seq")
    inputs = keras.Input((8, 8, 3))
    x = middle(inputs)
    x = seq(x)
    y = inner(inputs)  # The same nested model called twice.
    model = randomize_normalizations(keras.Model(inputs, [x, y], name="top"))
    folded, report = fold_and_check(model)
    layers = {e.layer: e for e in report.entries}
    assert set(layers) == {
        "middle/inner/inner_bn", "middle/mid_bn", "seq/seq_bn"}
    assert layers["middle/inner/inner_bn"].action == "folded"
    # A BN after a nested model is not folded across its boundary.
    assert layers["middle/mid_bn"].codes[0] == "after_nested_model"
    assert "'inner'" in layers["middle/mid_bn"].reason
    assert layers["seq/seq_bn"].direction == "backward"
    assert isinstance(folded.get_layer("seq"), keras.Sequential)
    # One folded copy of `inner`, shared like the original.
    assert folded.get_layer("middle").get_layer("inner") is folded.get_layer(
        "inner")
    assert report.normalizations_before == 3
    assert count_batch_norms(folded) == 0


def test_sequential_with_nested_functional():
    block = small_block("block")
    model = keras.Sequential(
        [keras.Input((8, 8, 3)), block, L.BatchNormalization(name="after"),
         L.GlobalAveragePooling2D(), L.Dense(2)], name="seq")
    randomize_normalizations(model)
    folded, report = fold_and_check(model)
    assert isinstance(folded, keras.Sequential)
    assert {e.layer: e.action for e in report.entries} == {
        "block/block_bn": "folded", "after": "replaced"}


def test_multiple_inputs_and_outputs_keep_their_structure():
    a_in = keras.Input((5,), name="a")
    b_in = keras.Input((3,), name="b")
    x = L.Concatenate()([a_in, b_in])
    x = L.Dense(4, use_bias=False)(x)
    x = L.BatchNormalization()(x)
    y = L.BatchNormalization()(L.Dense(2)(b_in))
    model = randomize_normalizations(
        keras.Model({"a": a_in, "b": b_in}, {"x": x, "y": y}))
    folded, report = kerasbn.fold(model)
    rng = np.random.default_rng(0)
    data = {"a": rng.normal(size=(2, 5)), "b": rng.normal(size=(2, 3))}
    assert_same_outputs(model, folded, data)
    assert set(folded(data)) == {"x", "y"}
    assert report.folded == 2


def test_keras_ops_in_the_graph():
    inputs = keras.Input((4,))
    x = L.Dense(4, use_bias=False)(inputs)
    x = keras.ops.tanh(L.BatchNormalization()(x))
    x = L.BatchNormalization()(keras.ops.add(x, inputs))
    model = randomize_normalizations(keras.Model(inputs, x))
    _, report = fold_and_check(model)
    assert [e.action for e in report.entries] == ["folded", "replaced"]


def test_trainable_flags_are_kept():
    inputs = keras.Input((4,))
    frozen = L.Dense(3, name="frozen", trainable=False)
    x = L.ReLU()(frozen(inputs))
    x = L.BatchNormalization(name="frozen_bn", trainable=False)(x)
    x = L.Dense(2, name="free")(L.ReLU()(x))
    folded, _ = kerasbn.fold(keras.Model(inputs, x))
    flags = {layer.name: layer.trainable for layer in folded.layers[1:]}
    assert flags["frozen"] is False and flags["frozen_bn"] is False
    assert flags["free"] is True
    seq = keras.Sequential([keras.Input((4,)), L.Dense(2)])
    seq.trainable = False
    assert kerasbn.fold(seq).model.trainable is False


# -- registry hooks -----------------------------------------------------


class CenteredDense(L.Dense):
    """A weight-centred Dense: every call uses kernel - mean(kernel, 0)."""

    def call(self, inputs):
        kernel = self.kernel - keras.ops.mean(self.kernel, axis=0)
        outputs = keras.ops.matmul(inputs, kernel)
        if self.use_bias:
            outputs = outputs + self.bias
        return outputs


class FrozenAffine(L.Layer):
    """A made-up normalization kind: only `inference_scale_shift` declared."""

    def __init__(self, axis=-1, **kwargs):
        super().__init__(**kwargs)
        self.axis = axis

    def build(self, input_shape):
        self.a = self.add_weight(shape=(input_shape[-1],), initializer="ones")
        self.b = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, inputs):
        return inputs * self.a * 2.0 + self.b

    def inference_scale_shift(self):
        a = keras.ops.convert_to_numpy(self.a).astype(np.float64)
        return 2.0 * a, keras.ops.convert_to_numpy(self.b).astype(np.float64)


def test_registered_centred_producer_and_new_normalization_kind():
    # The conftest fixture restores the registry after the test.
    kerasbn.registry.register_linear(
        CenteredDense,
        "dense",
        kernel_transform=lambda kernel, layer: kerasbn.rules.center_kernel(
            kernel, -1),
        rebuild=lambda layer, config: (L.Dense, config),
    )
    inputs = keras.Input((5,))
    x = CenteredDense(4, use_bias=False, name="centred")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    affine = FrozenAffine(name="affine")
    x = affine(L.ReLU()(x))
    x = CenteredDense(3, name="centred_2")(x)
    model = randomize_normalizations(keras.Model(inputs, x))
    rng = np.random.default_rng(0)
    affine.a.assign(rng.uniform(0.5, 2.0, 4))
    affine.b.assign(rng.normal(size=4))
    folded, report = fold_and_check(model)
    assert [(e.layer, e.direction) for e in report.entries] == [
        ("bn", "backward"), ("affine", "forward")]
    assert [type(layer) for layer in folded.layers[1:]] == [
        L.Dense, L.ReLU, L.Dense]
    # Unregistered, the subclass falls back to its parent's rule.
    kerasbn.registry.unregister(CenteredDense)
    assert kerasbn.registry.find_linear(
        CenteredDense(2)) is kerasbn.registry.find_linear(L.Dense(2))
    # The old names are aliases.
    assert kerasbn.registry.register_producer is (
        kerasbn.registry.register_linear)
    assert kerasbn.registry.find_producer is kerasbn.registry.find_linear


# -- precision, saving ---------------------------------------------------


def test_mixed_precision_policy_is_kept():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        inputs = keras.Input((6, 6, 3))
        x = L.Conv2D(4, 3, use_bias=False)(inputs)
        x = L.BatchNormalization()(x)
        x = L.BatchNormalization()(L.ReLU()(x))
        model = randomize_normalizations(keras.Model(inputs, x))
    finally:
        keras.config.set_dtype_policy(previous)
    folded, report = kerasbn.fold(model)
    assert report.dtype_policy == "mixed_float16"
    assert "dtype policy mixed_float16 kept" in report.headline()
    for layer in folded.layers[1:]:
        assert layer.dtype_policy.name == "mixed_float16"
    assert folded.layers[1].kernel.dtype == "float32"
    assert folded.layers[-1].scale.dtype == "float32"
    x = inputs_for(model)
    # float16 activations: compare at float16 resolution.
    assert_same_outputs(model, folded, x, rtol=2e-3)
    assert folded(x).dtype == model(x).dtype


def test_folded_model_saves_and_reloads(tmp_path):
    inputs = keras.Input((6, 6, 3))
    x = L.SeparableConv2D(4, 3, use_bias=False)(inputs)
    x = kerasbn.layers.BatchNormalization(zero_debias="mean")(x)
    x = L.BatchNormalization()(L.ReLU()(x))
    model = randomize_normalizations(keras.Model(inputs, x))
    folded, _ = kerasbn.fold(model)
    path = tmp_path / "folded.keras"
    folded.save(path)
    reloaded = keras.saving.load_model(path)
    assert isinstance(reloaded.layers[-1], kerasbn.layers.ScaleShift)
    assert_same_outputs(model, reloaded, inputs_for(model))


# -- report --------------------------------------------------------------


def test_report_formats():
    inputs = keras.Input((4,))
    x = L.BatchNormalization(name="bn_in")(inputs)
    x = L.Dense(3, name="dense")(x)
    x = L.BatchNormalization(name="bn_last")(L.ReLU()(x))
    model = randomize_normalizations(keras.Model(inputs, x, name="m"))
    result = kerasbn.fold(model)
    folded, report = result
    assert folded is result.model and report is result.report
    text = str(report)
    assert text.splitlines()[0] == (
        "m: normalization layers 2 -> 0; 1 folded (0 backward, 1 forward), "
        "1 replaced by ScaleShift, 0 kept")
    assert "bn_in" in text and "folded forward" in text and "dense" in text
    data = json.loads(report.to_json())
    assert data == report.to_dict()
    assert data["summary"]["replaced"] == 1
    assert data["entries"][1]["codes"] == [
        "after_nonlinear_layer", "model_output"]
    assert "FoldResult" in repr(result)


# -- errors --------------------------------------------------------------


def test_not_a_model():
    with pytest.raises(TypeError, match="keras.Model.*Dense"):
        kerasbn.fold(L.Dense(3))
    with pytest.raises(TypeError, match="ndarray"):
        kerasbn.fold(np.ones(3))


def test_subclassed_model():
    class Net(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = L.Dense(3)
            self.bn = L.BatchNormalization(name="inner_bn")

        def call(self, x):
            return self.bn(self.dense(x))

    net = Net()
    net(np.ones((1, 4)))
    with pytest.raises(TypeError, match="Net.*Functional model"):
        kerasbn.fold(net)


@keras.saving.register_keras_serializable(package="test_fold")
class Block(keras.Model):
    """A subclassed model holding a BN, used as a layer."""

    def __init__(self, units=3, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.dense = L.Dense(units)
        self.bn = L.BatchNormalization(name="inner_bn")

    def call(self, x):
        return self.bn(self.dense(x))

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def test_subclassed_model_inside_functional_is_traced():
    # Its call is traced: the inner BN folds into its Dense, and the outer
    # BN (now right after that Dense) too.
    inputs = keras.Input((4,))
    x = Block(name="block")(inputs)
    x = L.BatchNormalization(name="outer_bn")(x)
    model = randomize_normalizations(keras.Model(inputs, x))
    folded, report = fold_and_check(model)
    entries = {e.layer: e for e in report.entries}
    assert entries["block/inner_bn"].action == "folded"
    assert entries["outer_bn"].action == "folded"
    assert entries["outer_bn"].into == entries["block/inner_bn"].into
    assert report.normalizations_after == 0


def test_unbuilt_sequential():
    model = keras.Sequential([L.Dense(3), L.BatchNormalization()])
    with pytest.raises(ValueError, match="not built.*keras.Input"):
        kerasbn.fold(model)


def test_bad_option():
    model = keras.Sequential([keras.Input((2,)), L.Dense(2)])
    with pytest.raises(TypeError, match="forward=1"):
        kerasbn.fold(model, forward=1)
    with pytest.raises(TypeError, match="unexpected keyword"):
        kerasbn.fold(model, fast=True)


def test_adapted_normalization_survives_the_copy():
    # An adapted Normalization derives its mean/variance tensors from its
    # variables in finalize_state(), which Keras calls after adapt or load:
    # a copy given the weights by assignment alone normalized with zeros
    # and ones (issue 33's tabular model: folded output off by 80%). The
    # oracle: the Keras model itself, and NumPy for the recalibrated BN.
    x = np.random.default_rng(33).normal(3.0, 2.0, (64, 5)).astype("float32")
    normalization = L.Normalization()
    normalization.adapt(x)
    inputs = keras.Input((5,))
    dense = L.Dense(4)
    model = keras.Model(inputs, L.BatchNormalization()(
        dense(normalization(inputs))))
    model = randomize_normalizations(model)
    folded, _ = kerasbn.fold(model)
    assert_same_outputs(model, folded, x[:8])

    recalibrated = kerasbn.recalibrate(model, x, verbose=0)
    kernel, bias = (np.asarray(w, np.float64) for w in dense.get_weights())
    exact = x.astype(np.float64)
    z = (exact - exact.mean(0)) / np.sqrt(exact.var(0)) @ kernel + bias
    bn = recalibrated.layers[-1]
    # float32 activations (Normalization and Dense in float32) against a
    # float64 oracle: 1e-5 of the deviation / relative.
    np.testing.assert_allclose(
        (np.asarray(bn.moving_mean) - z.mean(0)) / z.std(0), 0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.moving_variance), z.var(0),
                               rtol=1e-5)
