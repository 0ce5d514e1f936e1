"""Folding batch normalization in TensorFlow graphs (no Keras code).

The graphs are written with TensorFlow's own ops (`tf.nn.conv2d`,
`tf.compat.v1.nn.fused_batch_norm`, `tf.nn.batch_normalization`, ...) and
saved as SavedModels or frozen GraphDefs; the oracle for every folded
artifact is the source function as TensorFlow runs it, unfolded. Keras 3
`model.export()` directories are checked against the Keras model itself.

Tolerance: 1e-5 of the output's largest magnitude. Folding reorders a few
float32 products (W * s instead of (W x) * s), which costs a few ulps
(~1e-7 relative) per layer; a wrong fold is off by O(1).
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from kerasbn.folding import tfgraph
from kerasbn.sources import saved_model as sources_saved_model
from tests.helpers import assert_close_to_scale

RTOL = 1e-5


def _stats(channels, seed):
    rng = np.random.default_rng(seed)
    return [tf.constant(v.astype("float32")) for v in (
        rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.5, channels),
        rng.normal(0, 1, channels), rng.uniform(0.5, 2.0, channels))]


def _normalize(x, form, stats, epsilon=1e-3):
    gamma, beta, mean, variance = stats
    if form == "fused":
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            x, gamma, beta, mean, variance, epsilon=epsilon,
            is_training=False)
        return y
    return tf.nn.batch_normalization(x, mean, variance, beta, gamma, epsilon)


def _kernel(shape, seed=3):
    return tf.constant(np.random.default_rng(seed).normal(
        0, 0.3, shape).astype("float32"))


# op name -> (input shape, out channels, function of (x, kernel), kernel shape)
LINEAR = {
    "Conv2D": ((8, 8, 3), 4, lambda x, w: tf.nn.conv2d(x, w, 1, "SAME"),
               (3, 3, 3, 4)),
    "Conv3D": ((4, 4, 4, 2), 3,
               lambda x, w: tf.nn.conv3d(x, w, [1] * 5, "SAME"),
               (2, 2, 2, 2, 3)),
    "DepthwiseConv2dNative": (
        (8, 8, 3), 6,
        lambda x, w: tf.nn.depthwise_conv2d(x, w, [1] * 4, "SAME"),
        (3, 3, 3, 2)),
    "Conv2DBackpropInput": (
        (5, 5, 3), 4,
        lambda x, w: tf.nn.conv2d_transpose(
            x, w, tf.stack([tf.shape(x)[0], 10, 10, 4]), 2, "SAME"),
        (3, 3, 4, 3)),
    # tf-keras' Conv1D: ExpandDims, Conv2D, Squeeze (the fold walks
    # through the Squeeze, which keeps the channels last).
    "Conv2D(conv1d)": ((8, 3), 4,
                       lambda x, w: tf.nn.conv1d(x, w, 1, "SAME"),
                       (3, 3, 4)),
    "MatMul": ((5,), 4, tf.matmul, (5, 4)),
    "MatMul(transpose_b)": ((5,), 4,
                            lambda x, w: tf.matmul(x, w, transpose_b=True),
                            (4, 5)),
    "BatchMatMulV2": ((3, 5), 4, tf.matmul, (5, 4)),
}


def _save(path, function, specs):
    module = tf.Module()
    module.serve = tf.function(function, input_signature=specs)
    tf.saved_model.save(module, str(path), signatures={
        "serving_default": module.serve.get_concrete_function()})
    return module.serve


def _graph_ops(saved_model_dir, key="serving_default"):
    """The folded SavedModel's serving graph, frozen and inlined."""
    source = sources_saved_model.load_saved_model(str(saved_model_dir), key)
    return source.graph_def


def _random(shape, batch=3, seed=0):
    return np.random.default_rng(seed).normal(
        size=(batch,) + tuple(shape)).astype("float32")


# FusedBatchNorm takes 4-D (NHWC) inputs; the Mul/Add chain any rank.
CASES = [(op, form) for op in sorted(LINEAR) for form in ("fused", "chain")
         if form == "chain" or len(LINEAR[op][0]) == 3]


@pytest.mark.parametrize("op,form", CASES)
def test_each_linear_op_and_form_folds_exactly(tmp_path, op, form):
    shape, channels, apply, kernel_shape = LINEAR[op]
    kernel, bias = _kernel(kernel_shape), _kernel((channels,), seed=4)
    stats = _stats(channels, seed=5)

    def serve(x):
        return _normalize(tf.nn.bias_add(apply(x, kernel), bias), form,
                          stats)

    spec = tf.TensorSpec((None,) + shape, tf.float32, name="x")
    function = _save(tmp_path / "src", serve, [spec])
    result = kerasbn.fold_saved_model(tmp_path / "src", tmp_path / "out")
    (entry,) = result.fold_report.entries
    assert entry.action == "folded", entry
    source = _graph_ops(tmp_path / "src")
    (into,) = [n for n in source.node
               if tfgraph.readable(n.name) == entry.into[0]]
    assert into.op == op.split("(")[0]
    folded = _graph_ops(result.artifacts["saved_model"])
    assert tfgraph.census(folded) == {}
    assert not [n.op for n in folded.node if n.op in tfgraph.FUSED_OPS]
    x = _random(shape)
    expected = function(tf.constant(x)).numpy()
    loaded = tf.saved_model.load(result.artifacts["saved_model"])
    actual = loaded.signatures["serving_default"](x=tf.constant(x))
    assert_close_to_scale(actual["output_0"].numpy(), expected, RTOL)


def test_unfoldable_normalizations_say_why(tmp_path):
    kernel = _kernel((3, 3, 3, 4))
    stats = _stats(4, seed=1)

    def serve(x):
        conv = tf.nn.conv2d(x, kernel, 1, "SAME")
        after_relu = _normalize(tf.nn.relu(conv), "chain", stats)
        on_input = _normalize(x, "fused", _stats(3, seed=2))
        shared = tf.nn.conv2d(x, kernel, 1, "SAME")
        return {"relu": after_relu, "input": on_input, "raw": shared,
                "shared": _normalize(shared, "fused", stats)}

    spec = tf.TensorSpec((None, 6, 6, 3), tf.float32, name="x")
    function = _save(tmp_path / "src", serve, [spec])
    result = kerasbn.fold_saved_model(tmp_path / "src", tmp_path / "out")
    codes = sorted(e.codes[0] for e in result.fold_report.entries)
    assert codes == ["after_model_input", "after_nonlinear_layer",
                     "producer_output_shared"]
    # Each becomes one precomputed multiply-add (the graph's ScaleShift).
    report = result.fold_report
    assert (report.replaced, report.scale_shift_layers, report.kept,
            report.folded, report.normalizations_after) == (3, 3, 0, 0, 0)
    assert tfgraph.census(_graph_ops(result.artifacts["saved_model"])) == {}
    x = _random((6, 6, 3))
    expected = function(tf.constant(x))
    loaded = tf.saved_model.load(result.artifacts["saved_model"])
    actual = loaded.signatures["serving_default"](x=tf.constant(x))
    for key, value in expected.items():
        assert_close_to_scale(actual[key].numpy(), value.numpy(), RTOL)


def test_corrupt_statistics_are_refused_naming_the_node(tmp_path):
    kernel = _kernel((1, 1, 3, 2))
    gamma, beta, mean, _ = _stats(2, seed=1)
    variance = tf.constant([1.0, -5.0])  # variance + epsilon < 0

    def serve(x):
        return _normalize(tf.nn.conv2d(x, kernel, 1, "SAME"), "fused",
                          (gamma, beta, mean, variance))

    _save(tmp_path / "src", serve,
          [tf.TensorSpec((None, 4, 4, 3), tf.float32, name="x")])
    with pytest.raises(ValueError, match=r"FusedBatchNormV3.*channel\(s\) "
                       r"\[1\]"):
        kerasbn.fold_saved_model(tmp_path / "src", tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


def test_keras3_export_folds_and_keeps_its_signature(tmp_path):
    inputs = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(6, 3, name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU()(x)
    # Keras runs a grouped convolution as an XLA function call marked not
    # to be inlined; the SavedModel reader inlines it all the same.
    x = keras.layers.Conv2D(6, 3, groups=2, name="grouped")(x)
    x = keras.layers.BatchNormalization(name="bn_grouped")(x)
    x = keras.layers.Dense(5, name="dense")(x)
    x = keras.layers.BatchNormalization(name="bn_dense")(x)
    model = keras.Model(inputs, x)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            stats = _stats(layer.moving_mean.shape[0], seed=7)
            for variable, value in zip(layer.weights, stats):
                variable.assign(value)
    model.export(str(tmp_path / "src"), verbose=False)
    result = kerasbn.fold_saved_model(tmp_path / "src", tmp_path / "out",
                                      signature="serve")
    report = result.fold_report
    assert (report.folded, report.replaced, report.kept) == (3, 0, 0)
    assert [e.into[0].split("/")[1] for e in report.entries] == [
        "conv_1", "grouped_1", "dense_1"]
    loaded = tf.saved_model.load(result.artifacts["saved_model"])
    assert list(loaded.signatures) == ["serve"]
    serve = loaded.signatures["serve"]
    (spec,) = serve.structured_input_signature[1].values()
    assert (spec.name, spec.dtype, tuple(spec.shape)) == (
        "image", tf.float32, (None, 12, 12, 3))
    x = _random((12, 12, 3), batch=5)
    expected = model(x, training=False).numpy()
    (actual,) = serve(image=tf.constant(x)).values()
    assert_close_to_scale(actual.numpy(), expected, RTOL)


def test_loading_keeps_the_weights_out_of_grappler(tmp_path, monkeypatch):
    """Reading a SavedModel freezes its signature and inlines the calls
    TensorFlow leaves (a grouped convolution's XLA call) with grappler,
    which copies a graph several times over: the weights go through it as
    placeholders and come back after (`kerasbn._graph_weights`; loading
    ConvNeXtLarge's SavedModel went from 13 GB to 6.3 GB, measured by the
    note's command). Checked here: what grappler received, the call
    inlined, and the graph's weights equal to the model's."""
    from tensorflow.python.grappler import tf_optimizer

    from kerasbn import _graph_weights
    from kerasbn import _keras_internal

    inputs = keras.Input((8, 8, 4), name="image")
    x = keras.layers.Conv2D(8, 3, groups=2, name="grouped")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="dense")(x))
    model.export(str(tmp_path / "src"), verbose=False)
    seen = []
    optimize = tf_optimizer.OptimizeGraph

    def recording(config, meta_graph, *args, **kwargs):
        seen.append(max((_graph_weights.constant_bytes(n)
                         for n in meta_graph.graph_def.node), default=0))
        return optimize(config, meta_graph, *args, **kwargs)

    monkeypatch.setattr(tf_optimizer, "OptimizeGraph", recording)
    monkeypatch.setattr(_graph_weights, "ASIDE_BYTES", 256)
    source = sources_saved_model.load_saved_model(str(tmp_path / "src"),
                                                  "serve")
    assert seen and max(seen) < 256
    graph_def = source.graph_def
    assert not [n for n in graph_def.node
                if n.op in _keras_internal.CALL_OPS]
    assert all("_output_shapes" in n.attr for n in graph_def.node
               if n.op != "NoOp")
    constants = [tf.make_ndarray(n.attr["value"].tensor)
                 for n in graph_def.node if n.op == "Const"]
    for weight in model.weights:
        value = weight.numpy()
        assert any(c.shape == value.shape and np.array_equal(c, value)
                   for c in constants), weight.path


def _frozen_graph_file(path):
    """A TF1 frozen GraphDef: Placeholder -> Conv2D -> FusedBatchNorm."""
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, (None, 6, 6, 3), name="in")
        conv = tf.nn.conv2d(x, _kernel((3, 3, 3, 4)), 1, "SAME")
        y = _normalize(conv, "fused", _stats(4, seed=9))
        tf.identity(tf.nn.relu(y), name="out")
    with open(path, "wb") as f:
        f.write(graph.as_graph_def().SerializeToString())
    return graph


def test_frozen_graph_def_folds(tmp_path):
    graph = _frozen_graph_file(tmp_path / "frozen.pb")
    result = kerasbn.fold_saved_model(tmp_path / "frozen.pb",
                                      tmp_path / "out", formats="saved_model")
    assert result.fold_report.folded == 1
    # "in" is a Python keyword, which no tf.function argument can be.
    assert result.notes["source"] == [
        "input 'in' is served as 'in_' (a SavedModel input name must be a "
        "Python identifier)"]
    x = _random((6, 6, 3))
    with tf.compat.v1.Session(graph=graph) as session:
        expected = session.run("out:0", {"in:0": x})
    loaded = tf.saved_model.load(result.artifacts["saved_model"])
    actual = loaded.signatures["serving_default"](in_=tf.constant(x))
    assert_close_to_scale(actual["out"].numpy(), expected, RTOL)


def test_unknown_dimensions_need_a_sample(tmp_path):
    kernel = _kernel((3, 3, 3, 4))

    def serve(x):
        return _normalize(tf.nn.conv2d(x, kernel, 1, "SAME"), "fused",
                          _stats(4, seed=1))

    function = _save(tmp_path / "src", serve,
                     [tf.TensorSpec((None, None, None, 3), tf.float32,
                                    name="x")])
    with pytest.raises(ValueError, match=r"input 'x' has unknown dimensions "
                       r"\(None, None, None, 3\).*--sample"):
        kerasbn.fold_saved_model(tmp_path / "src", tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")
    x = _random((7, 5, 3), batch=2)
    result = kerasbn.fold_saved_model(tmp_path / "src", tmp_path / "out",
                                      sample={"x": x})
    assert [c["batch"] for c in result.checks] == [1, 1, 2, 2]
    loaded = tf.saved_model.load(result.artifacts["saved_model"])
    actual = loaded.signatures["serving_default"](x=tf.constant(x))
    assert_close_to_scale(actual["output_0"].numpy(),
                          function(tf.constant(x)).numpy(), RTOL)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["MobileNetV2", "hub_ResNet_v2"])
def test_keras_applications_exports_fold_like_kerasbn_fold(tmp_path, arch):
    """Models nobody here wrote, exported by Keras 3 itself: the graph
    pass folds the same BNs backward as `kerasbn.fold` does on the Keras
    model (two implementations, one on layers and one on TensorFlow ops),
    and the folded SavedModel reproduces the Keras model. MobileNetV2
    (alpha 0.35): BN after convolutions and depthwise convolutions;
    keras-hub's pre-activation ResNet: BN before convolutions, which the
    graph pass turns into multiply-adds where fold puts ScaleShift layers.
    (keras.applications' ResNet50V2 has the same pre-activation blocks but
    took 90 s here, its 24M weights frozen into the graph.)"""
    from tests import zoo
    from tests.helpers import randomize_normalizations

    model = (keras.applications.MobileNetV2(
        weights=None, input_shape=(32, 32, 3), alpha=0.35)
        if arch == "MobileNetV2" else zoo.ZOO[arch][0]())
    randomize_normalizations(model, seed=0)
    model.export(str(tmp_path / "src"), verbose=False)
    result = kerasbn.fold_saved_model(tmp_path / "src", tmp_path / "out",
                                      formats="saved_model")
    keras_report = kerasbn.fold(model).report
    graph_report = result.fold_report
    assert graph_report.normalizations_before == (
        keras_report.normalizations_before)
    assert graph_report.folded == keras_report.folded_backward > 0
    folded = _graph_ops(result.artifacts["saved_model"])
    assert graph_report.scale_shift_layers == keras_report.scale_shift_layers
    assert sum(tfgraph.census(folded).values()) == graph_report.kept == 0
    x = _random((32, 32, 3), batch=2)
    loaded = tf.saved_model.load(result.artifacts["saved_model"])
    (actual,) = loaded.signatures["serving_default"](
        **{model.inputs[0].name: tf.constant(x)}).values()
    assert_close_to_scale(actual.numpy(), model(x, training=False).numpy(),
                          RTOL)
