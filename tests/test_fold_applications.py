"""kerasbn.fold on keras.applications models (random weights, small inputs).

The expected counts come from the architectures:
- ResNet50, MobileNetV2, EfficientNetB0: every BatchNormalization follows a
  bias-free, linear Conv2D/DepthwiseConv2D whose output feeds only it, so
  all fold backward and none is left.
- DenseNet121 (121 BNs): conv1/bn and the BN after each dense layer's 1x1
  convolution (58 of them) fold backward: 59. The other 62 (the first BN of
  each of the 58 dense layers, the 3 transition BNs and the final bn) read a
  Concatenate or a pooling output that the concatenation also uses, and
  feed a ReLU: no linear neighbour, so they become ScaleShift layers.
"""

import keras
import pytest

import kerasbn
from tests.helpers import assert_same_outputs
from tests.helpers import count_batch_norms
from tests.helpers import count_scale_shift
from tests.helpers import inputs_for
from tests.helpers import randomize_normalizations

APPLICATIONS = {
    # name: (constructor, BNs before, folded, replaced)
    "ResNet50": (keras.applications.ResNet50, 53, 53, 0),
    "MobileNetV2": (keras.applications.MobileNetV2, 52, 52, 0),
    "EfficientNetB0": (keras.applications.EfficientNetB0, 49, 49, 0),
    "DenseNet121": (keras.applications.DenseNet121, 121, 59, 62),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(APPLICATIONS))
def test_application_folds_to_what_the_algebra_allows(name):
    constructor, before, folded_count, replaced = APPLICATIONS[name]
    model = constructor(weights=None, input_shape=(32, 32, 3), classes=10)
    randomize_normalizations(model, seed=11)
    result = kerasbn.fold(model)
    report = result.report
    assert report.normalizations_before == before
    assert count_batch_norms(model) == before
    assert report.folded_backward == folded_count
    assert report.folded_forward == 0
    assert report.replaced == replaced
    assert count_batch_norms(result.model) == 0
    assert count_scale_shift(result.model) == replaced
    for entry in report.not_folded:
        assert entry.codes == (
            "after_nonlinear_layer", "before_nonlinear_layer"), entry
    assert_same_outputs(model, result.model, inputs_for(model, batch=2))


@pytest.mark.slow
def test_application_as_nested_backbone():
    backbone = keras.applications.MobileNetV2(
        weights=None, include_top=False, input_shape=(32, 32, 3))
    inputs = keras.Input((32, 32, 3))
    x = backbone(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(8, use_bias=False)(x)
    x = keras.layers.BatchNormalization(name="head_bn")(x)
    model = randomize_normalizations(keras.Model(inputs, x), seed=5)
    folded, report = kerasbn.fold(model)
    assert report.folded_backward == 53 and report.replaced == 0
    assert {e.layer for e in report.entries if "/" not in e.layer} == {
        "head_bn"}
    assert count_batch_norms(folded) == 0
    assert_same_outputs(model, folded, inputs_for(model))
