"""kerasbn.fold inside custom (subclassed) layers: traced calls, refusals.

The oracle is always the untouched model's own inference output
(`fold_and_check`); what is asserted beyond it is which normalizations
went where and what the report says about those that could not.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from tests.helpers import count_batch_norms
from tests.helpers import count_scale_shift
from tests.helpers import fold_and_check
from tests.helpers import inputs_for
from tests.helpers import randomize_normalizations

pytestmark = pytest.mark.any_backend

L = keras.layers


class ConvBlock(L.Layer):
    """conv -> BN -> relu -> conv -> BN, plus the input (keras.ops add).

    Not registered as serializable: the original model cannot be saved to
    .keras and reloaded, the folded one (plain Keras layers) can.
    """

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv1 = L.Conv2D(filters, 3, padding="same", use_bias=False,
                              name="conv1")
        self.bn1 = L.BatchNormalization(name="bn1")
        self.conv2 = L.Conv2D(filters, 1, use_bias=False, name="conv2")
        self.bn2 = L.BatchNormalization(name="bn2")

    def call(self, x, training=None):
        y = keras.ops.relu(self.bn1(self.conv1(x), training=training))
        return x + self.bn2(self.conv2(y), training=training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


class Stage(L.Layer):
    """Two ConvBlocks: a custom layer inside a custom layer."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.blocks = [ConvBlock(filters, name=f"block{k}") for k in (0, 1)]

    def call(self, x):
        for block in self.blocks:
            x = block(x)
        return x

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


def _image_model(*layers, channels=4, size=8):
    inputs = keras.Input((size, size, channels))
    x = inputs
    for layer in layers:
        x = layer(x)
    return randomize_normalizations(keras.Model(inputs, x))


def test_custom_layers_fold_inside_and_the_result_reloads(tmp_path):
    stem = L.Conv2D(4, 3, padding="same", use_bias=False, name="stem")
    model = _image_model(stem, L.BatchNormalization(name="stem_bn"),
                         Stage(4, name="stage"),
                         L.BatchNormalization(name="head_bn"))
    assert count_batch_norms(model) == 6
    folded, report = fold_and_check(model)
    entries = {e.layer: e for e in report.entries}
    # Full paths of the BNs inside the nested custom layers.
    assert entries["stage/block0/bn1"].into == ("conv1",)
    assert entries["stage/block1/bn2"].action == "folded"
    assert report.folded == 5 and count_batch_norms(folded) == 0
    # head_bn follows the residual add: no kernel, ScaleShift.
    assert entries["head_bn"].action == "replaced"
    assert count_scale_shift(folded) == 1
    # The two blocks' sublayers have the same names: one pair is renamed.
    names = [layer.name for layer in folded.layers]
    assert len(names) == len(set(names))
    assert "conv1" in names and "stage_block1_conv1" in names
    # The original model cannot be saved and reloaded without its classes;
    # the folded one holds Keras layers only.
    path = str(tmp_path / "folded.keras")
    folded.save(path)
    reloaded = keras.saving.load_model(path)
    x = inputs_for(model)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(folded(x)),
                                  keras.ops.convert_to_numpy(reloaded(x)))


def test_the_users_layers_get_no_new_calls():
    stage = Stage(4, name="stage")
    model = _image_model(L.Conv2D(4, 1, name="stem"), stage)
    inner = [stage.blocks[0].conv1, stage.blocks[1].bn2]
    calls_before = [len(layer._inbound_nodes) for layer in inner]
    fold_and_check(model)
    assert [len(layer._inbound_nodes) for layer in inner] == calls_before


def test_sequential_with_a_custom_layer_becomes_functional():
    model = keras.Sequential([keras.Input((8, 8, 4)), ConvBlock(4, name="b")])
    randomize_normalizations(model)
    folded, report = fold_and_check(model)
    assert report.folded == 2 and count_batch_norms(folded) == 0


def test_a_shared_custom_layer_keeps_its_shared_kernels():
    block = ConvBlock(4, name="shared")
    model = _image_model(block, block)
    folded, report = fold_and_check(model)
    # Each inner conv is called twice: folding into it would change its
    # other call, so its BNs become ScaleShift layers, once each.
    assert {e.codes[0] for e in report.entries} == {"shared_producer"}
    assert count_batch_norms(folded) == 0 and count_scale_shift(folded) == 2


class UsesTensorFlow(ConvBlock):
    def call(self, x, training=None):
        return tf.nn.relu(self.bn1(self.conv1(x), training=training))


class UsesOwnVariable(ConvBlock):
    def build(self, input_shape):
        self.gain = self.add_weight(shape=(), initializer="ones", name="gain")

    def call(self, x, training=None):
        return self.bn1(self.conv1(x), training=training) * self.gain


class TracedDifferently(ConvBlock):
    def call(self, x, training=None):
        y = self.bn1(self.conv1(x), training=training)
        return y * (2.0 if isinstance(x, keras.KerasTensor) else 1.0)


@pytest.mark.parametrize("cls, why", [
    pytest.param(UsesTensorFlow, "cannot run on symbolic Keras tensors",
                 marks=pytest.mark.skipif(
                     keras.backend.backend() != "tensorflow",
                     reason="a layer written with tf.* ops")),
    (UsesOwnVariable, "uses a variable directly"),
    (TracedDifferently, "does not reproduce the layer's output"),
])
def test_untraceable_layers_are_kept_with_the_reason(cls, why):
    model = _image_model(cls(4, name="custom"))
    folded, report = fold_and_check(model)
    entries = {e.layer: e for e in report.entries}
    entry = entries["custom/bn1"]
    assert entry.action == "kept" and entry.codes == ("inside_layer",)
    assert why in entry.reason
    assert count_batch_norms(folded) == count_batch_norms(model)


def test_a_custom_layer_called_in_training_mode_is_kept():
    inputs = keras.Input((8, 8, 4))
    outputs = ConvBlock(4, name="b")(inputs, training=True)
    model = randomize_normalizations(keras.Model(inputs, outputs))
    report = kerasbn.fold(model).report
    assert {e.action for e in report.entries} == {"kept"}
    assert "training=True" in report.entries[0].reason


class TwoOutputs(L.Layer):
    """Returns its input untouched beside the normalized branch."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv = L.Dense(3, use_bias=False, name="inner_dense")
        self.bn = L.BatchNormalization(name="inner_bn")

    def call(self, x):
        return x, self.bn(self.conv(x))


def test_layer_returning_its_input_and_a_tuple():
    inputs = keras.Input((5,))
    passthrough, normalized = TwoOutputs(name="two")(inputs)
    outputs = L.Concatenate()([L.Dense(3, name="side")(passthrough),
                               normalized])
    model = randomize_normalizations(keras.Model(inputs, outputs))
    folded, report = fold_and_check(model)
    assert report.folded == 1 and count_batch_norms(folded) == 0
