"""Property test: fold random small graphs, check equivalence and that no
replaced normalization could have been folded.

The "could have been folded" check is written here, on the folded model's
own graph and with the rules stated independently of kerasbn.fold's
planner: a ScaleShift left behind must have neither a linear single-use
producer before it (backward) nor only exact linear consumers after it
(forward).
"""

import keras
import numpy as np
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import kerasbn
from tests.helpers import assert_same_outputs
from tests.helpers import count_batch_norms
from tests.helpers import inputs_for
from tests.helpers import randomize_normalizations
from tests.helpers import weights_snapshot

L = keras.layers
LINEAR = (
    L.Conv2D, L.DepthwiseConv2D, L.SeparableConv2D, L.Conv2DTranspose,
    L.Dense,
)


def linear_layer(data, spatial):
    kind = data.draw(st.sampled_from(
        ["conv", "depthwise", "separable", "transpose", "dense"]))
    kernel = data.draw(st.sampled_from([1, 3] if spatial >= 5 else [1]))
    padding = data.draw(st.sampled_from(["valid", "same"]))
    activation = data.draw(st.sampled_from([None, None, "relu"]))
    use_bias = data.draw(st.booleans())
    filters = data.draw(st.integers(2, 4))
    common = dict(activation=activation, use_bias=use_bias)
    if kind == "conv":
        return L.Conv2D(filters, kernel, padding=padding, **common)
    if kind == "depthwise":
        return L.DepthwiseConv2D(
            kernel, padding=padding,
            depth_multiplier=data.draw(st.integers(1, 2)), **common)
    if kind == "separable":
        return L.SeparableConv2D(
            filters, kernel, padding=padding, depth_multiplier=2, **common)
    if kind == "transpose":
        return L.Conv2DTranspose(filters, kernel, padding="same", **common)
    return L.Dense(filters, **common)


def build_model(data):
    inputs = keras.Input((6, 6, data.draw(st.integers(2, 3))))
    pool = [inputs]
    for _ in range(data.draw(st.integers(3, 8))):
        step = data.draw(st.sampled_from(
            ["linear_bn", "linear_bn", "bn_linear", "linear", "bn", "relu",
             "add"]))
        x = data.draw(st.sampled_from(pool))
        if step == "linear_bn":
            x = L.BatchNormalization()(linear_layer(data, x.shape[1])(x))
        elif step == "bn_linear":
            x = linear_layer(data, x.shape[1])(L.BatchNormalization()(x))
        elif step == "linear":
            x = linear_layer(data, x.shape[1])(x)
        elif step == "bn":
            x = L.BatchNormalization()(x)
        elif step == "relu":
            x = L.ReLU()(x)
        else:
            same = [y for y in pool if y.shape == x.shape]
            x = L.Add()([x, data.draw(st.sampled_from(same))])
        pool.append(x)
    outputs = [pool[-1]]
    if data.draw(st.booleans()):
        head = L.GlobalAveragePooling2D()(pool[-1])
        if data.draw(st.booleans()):
            head = L.BatchNormalization()(head)
        head = L.Dense(3)(head)
        outputs = [L.BatchNormalization()(head)]
    extra = data.draw(st.sampled_from(pool[1:] or [None]))
    if extra is not None and extra is not pool[-1]:
        outputs.append(extra)
    return keras.Model(inputs, outputs)


def consumers_in(model):
    """id(tensor) -> list of layers reading it, and the model outputs."""
    consumers = {}
    for layer in model.layers:
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                consumers.setdefault(id(tensor), []).append(layer)
    for tensor in model.outputs:
        consumers.setdefault(id(tensor), []).append("output")
    return consumers


def forward_exact(layer):
    kernel = tuple(getattr(layer, "kernel_size", (1,)))
    if isinstance(layer, L.Dense):
        return True
    if isinstance(layer, L.Conv2DTranspose):
        return set(kernel) == {1} and set(layer.strides) == {1}
    return set(kernel) == {1} or layer.padding == "valid"


def assert_nothing_foldable_left(folded):
    consumers = consumers_in(folded)
    for layer in folded.layers:
        if not isinstance(layer, kerasbn.layers.ScaleShift):
            continue
        (node,) = layer._inbound_nodes
        (tensor,) = node.input_tensors
        producer = tensor._keras_history.operation
        backward = (
            isinstance(producer, LINEAR)
            and producer.activation is keras.activations.linear
            and consumers[id(tensor)] == [layer]
        )
        readers = consumers.get(id(node.outputs[0]), [])
        forward = readers and all(
            isinstance(r, LINEAR) and forward_exact(r) for r in readers
        )
        assert not backward, f"{layer.name} could fold into {producer.name}"
        assert not forward, f"{layer.name} could fold forward"


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.data())
def test_random_graphs_fold_exactly_and_completely(data):
    model = randomize_normalizations(
        build_model(data), seed=data.draw(st.integers(0, 9)))
    before = weights_snapshot(model)
    folded, report = kerasbn.fold(model)
    assert_same_outputs(model, folded, inputs_for(model, batch=2))
    assert all(
        np.array_equal(a, b) for a, b in zip(before, weights_snapshot(model))
    )
    assert count_batch_norms(folded) == 0
    assert report.folded + report.replaced == len(report.entries)
    assert report.replaced == report.scale_shift_layers
    assert_nothing_foldable_left(folded)
