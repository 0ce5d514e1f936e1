"""Graph-level folding of Keras 2 (tf-keras) SavedModels of stock
applications, and of the normalizations no linear op absorbs.

The stock files are tf-keras' own `keras.applications` (code nobody here
wrote), built from their constructors (`weights=None`, 32x32, 10 classes,
logits) with random BN statistics and saved with `model.save(dir)` by
tf-keras itself, in a subprocess (`TF_USE_LEGACY_KERAS=1`; Keras 3 cannot
write them). Two of them, one per problem the SavedModel route had:

- EfficientNetB0: its swish activations are `tf.custom_gradient`s whose
  gradient functions the loaded source registers in this process; the
  folded SavedModel could not be written ("Found invalid capture
  .../stem_activation/beta"). Folded through the CLI, to SavedModel and ONNX.
- ResNet50V2: 17 pre-activation BNs (after an Add, before a ReLU) that no
  linear op absorbs; each becomes one precomputed multiply-add (the graph's
  `kerasbn.layers.ScaleShift`), so no normalization op is left.

The graph pass and `kerasbn.fold` on the same architecture in Keras 3 must
fold the same BNs and turn the same ones into ScaleShift / multiply-adds.

Tolerance: 1e-5 of the output's largest magnitude, against tf-keras' own
float32 output. Folding reorders float32 products (W * s instead of
(W x) * s, x * s + t instead of (x - m) / sqrt(v + eps) * g + b), a few
ulps per layer: over these 50..80-layer random networks the measured gap is
7e-7 (EfficientNetB0) and 1.2e-6 (ResNet50V2) of the output scale, about
what tf-keras' float32 output is off the folded one's source SavedModel run
in another runtime. A wrong fold, or a statistic read from the wrong
channel, moves the output by O(1) of its scale.
"""

import collections
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import kerasbn
from kerasbn import cli
from kerasbn.folding import tfgraph
from kerasbn.sources import saved_model as sources_saved_model
from tests.helpers import assert_close_to_scale
from tests.keras2_files import run_tf_keras

RTOL = 1e-5
SIZE = 32

_SCRIPT = r'''
import os
import sys

import numpy as np
import tf_keras as keras

out = sys.argv[1]
rng = np.random.default_rng(7)
for name in sys.argv[2].split(","):
    model = getattr(keras.applications, name)(
        input_shape=(32, 32, 3), weights=None, classes=10,
        classifier_activation=None)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
            layer.beta.assign(rng.normal(0.0, 0.5, layer.beta.shape))
            layer.moving_mean.assign(rng.normal(0.0, 0.5,
                                                layer.moving_mean.shape))
            layer.moving_variance.assign(
                rng.uniform(0.2, 3.0, layer.moving_variance.shape))
    x = (rng.normal(0.0, 1.0, (2, 32, 32, 3)) * 50 + 100).astype("float32")
    y = np.asarray(model(x, training=False))
    model.save(os.path.join(out, name))  # A SavedModel directory.
    np.savez(os.path.join(out, name + ".npz"), input_0=x, output_0=y)
print("done")
'''

STOCK = ("EfficientNetB0", "ResNet50V2")


@pytest.fixture(scope="session")
def stock_dir(tmp_path_factory):
    """tf-keras' EfficientNetB0 and ResNet50V2 SavedModels and their
    outputs (about 30 s, most of it tf-keras tracing the SavedModels)."""
    if importlib.util.find_spec("tf_keras") is None:
        pytest.skip("tf-keras is not installed (pip install 'kerasbn[test]')")
    directory = tmp_path_factory.mktemp("stock_savedmodels")
    script = directory / "write.py"
    script.write_text(_SCRIPT)
    run_tf_keras(script, [str(directory), ",".join(STOCK)],
                 "the stock SavedModels", 600)
    return pathlib.Path(directory)


def _bn_name(graph_name):
    """`resnet50v2/conv2_block1_preact_bn/FusedBatchNormV3` -> the layer."""
    return graph_name.split("/")[-2]


def _by_action(report, name=lambda n: n):
    """`{action: {layer}}` of a `FoldReport.to_dict()`."""
    actions = {}
    for entry in report["entries"]:
        actions.setdefault(entry["action"], set()).add(name(entry["layer"]))
    return actions


def _counts(report):
    summary = report["summary"]
    return (summary["folded"], summary["replaced"],
            summary["scale_shift_layers"])


def _assert_like_keras3_fold(arch, graph_report):
    """The graph pass folds the same BNs `kerasbn.fold` folds on the Keras
    3 build of `arch`, and makes multiply-adds of the ones fold makes
    ScaleShift layers (fold also folds forward: it finds none to fold
    here). `graph_report`: a `FoldReport.to_dict()`."""
    model = getattr(keras.applications, arch)(
        weights=None, input_shape=(SIZE, SIZE, 3), classes=10,
        classifier_activation=None)
    keras_report = kerasbn.fold(model).report.to_dict()
    assert _counts(graph_report) == _counts(keras_report)
    assert _by_action(graph_report, _bn_name) == _by_action(keras_report)


def _check_serving(saved_model_dir, oracle):
    """The folded SavedModel's serving function reproduces tf-keras, and
    no graph or function in it holds a normalization op (no fused op, no
    Rsqrt of a Mul/Add chain); returns `{op: count}` over all of them.
    (Read from saved_model.pb: freezing ResNet50V2's 24M weights again
    would take 7 s.)"""
    loaded = tf.saved_model.load(str(saved_model_dir))
    (actual,) = loaded.signatures["serving_default"](
        tf.constant(oracle["input_0"])).values()
    assert_close_to_scale(actual.numpy(), oracle["output_0"], RTOL,
                          "saved_model")
    saved = saved_model_pb2.SavedModel()
    saved.ParseFromString(
        (pathlib.Path(saved_model_dir) / "saved_model.pb").read_bytes())
    ops = collections.Counter()
    for meta_graph in saved.meta_graphs:
        ops.update(n.op for n in meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            ops.update(n.op for n in function.node_def)
    assert not [op for op in ops if op in tfgraph.FUSED_OPS + ("Rsqrt",)]
    return ops


def _variables_bytes(saved_model_dir):
    directory = pathlib.Path(saved_model_dir) / "variables"
    return sum(f.stat().st_size for f in directory.iterdir())


@pytest.mark.slow
def test_efficientnet_b0_savedmodel_exports_through_the_cli(
        stock_dir, tmp_path, capsys):
    out = tmp_path / "out"
    status = cli.main([str(stock_dir / "EfficientNetB0"), "-o", str(out),
                       "--format", "saved_model,onnx", "--json",
                       str(tmp_path / "r.json"), "--latency-runs", "0"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    report = json.loads((tmp_path / "r.json").read_text())["fold"]
    summary = report["summary"]
    assert (summary["folded"], summary["replaced"], summary["kept"],
            summary["normalizations_after"]) == (49, 0, 0, 0)
    oracle = np.load(stock_dir / "EfficientNetB0.npz")
    saved = out / "saved_model" / "EfficientNetB0" / "1"
    _check_serving(saved, oracle)
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "EfficientNetB0.onnx"),
                                   providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(
        None, {session.get_inputs()[0].name: oracle["input_0"]})
    assert_close_to_scale(onnx_out, oracle["output_0"], RTOL, "onnx")
    # The replaced kernels and statistics are gone, not carried along by
    # the source function's control dependencies on its variable reads
    # (they were: 29 MB of variables for the source's 16 MB).
    assert _variables_bytes(saved) <= _variables_bytes(
        stock_dir / "EfficientNetB0")
    _assert_like_keras3_fold("EfficientNetB0", report)


@pytest.mark.slow
def test_resnet50v2_preactivation_bns_become_multiply_adds(stock_dir,
                                                           tmp_path):
    result = kerasbn.fold_saved_model(stock_dir / "ResNet50V2",
                                      tmp_path / "out",
                                      formats="saved_model", batch_sizes=(2,))
    report = result.fold_report
    assert (report.normalizations_before, report.folded, report.replaced,
            report.scale_shift_layers, report.kept,
            report.normalizations_after) == (49, 32, 17, 17, 0, 0)
    replaced = [e for e in report.entries if e.action == "replaced"]
    assert {e.codes for e in replaced} == {("after_nonlinear_layer",)}
    # Every block's pre-activation BN (after pool1 or an Add) and post_bn.
    blocks = {2: 3, 3: 4, 4: 6, 5: 3}
    assert {_bn_name(e.layer) for e in replaced} == {"post_bn"} | {
        f"conv{stage}_block{b}_preact_bn" for stage, n in blocks.items()
        for b in range(1, n + 1)}
    ops = _check_serving(result.artifacts["saved_model"],
                         np.load(stock_dir / "ResNet50V2.npz"))
    assert ops["Mul"] == 17  # One per replaced BN; ResNet50V2 has no other.
    _assert_like_keras3_fold("ResNet50V2", report.to_dict())


# -- tf-keras SavedModels: grouped convolutions (XLA function calls,
# inlined), virtual batch and mixed precision BNs. ---------------------------


# One tf-keras process writes the SavedModels of the tests below (its
# start-up is most of their cost): `grouped/` with `grouped.npz`, and
# `ghost_mixed/`.
_TF_KERAS_SCRIPT = r'''
import sys

import numpy as np
import tf_keras as keras

L = keras.layers
OUT = sys.argv[1]


def grouped():
    rng = np.random.default_rng(11)
    inputs = keras.Input((8, 8, 4))
    h = L.Conv2D(6, 3, groups=2, padding="same", name="gconv")(inputs)
    h = L.ReLU()(L.BatchNormalization(name="bn")(h))
    model = keras.Model(inputs, h)
    bn = model.get_layer("bn")
    bn.gamma.assign(rng.uniform(0.5, 1.5, 6))
    bn.beta.assign(rng.normal(0.0, 0.5, 6))
    bn.moving_mean.assign(rng.normal(0.0, 0.5, 6))
    bn.moving_variance.assign(rng.uniform(0.2, 3.0, 6))
    x = rng.normal(0.0, 1.0, (2, 8, 8, 4)).astype("float32")
    y = np.asarray(model(x, training=False))
    model.save(OUT + "/grouped")  # A SavedModel directory.
    np.savez(OUT + "/grouped.npz", input_0=x, output_0=y)


def ghost_mixed():
    """A virtual-batch BN after a Conv2D; a mixed_float16 Dense and BN."""
    rng = np.random.default_rng(13)
    image = keras.Input((6, 6, 3), name="image")
    h = L.Conv2D(4, 3, padding="same", name="conv")(image)
    h = L.BatchNormalization(virtual_batch_size=2, name="bn_ghost")(h)
    ghost = L.ReLU(name="relu")(h)
    rows = keras.Input((5,), name="rows")
    d = L.Dense(4, dtype="mixed_float16", name="dense16")(rows)
    d = L.BatchNormalization(dtype="mixed_float16", name="bn16")(d)
    half = L.Activation("linear", dtype="float32", name="half")(d)
    model = keras.Model([image, rows], [ghost, half], name="ghost_mixed")
    for name in ("bn_ghost", "bn16"):
        layer = model.get_layer(name)
        gamma, beta, mean, variance = layer.get_weights()
        layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape),
                           rng.normal(0.0, 0.5, beta.shape),
                           rng.normal(0.0, 0.5, mean.shape),
                           rng.uniform(0.2, 3.0, variance.shape)])
    model.save(OUT + "/ghost_mixed")  # A SavedModel directory.


grouped()
ghost_mixed()
print("done")
'''


@pytest.fixture(scope="module")
def tf_keras_dir(tmp_path_factory):
    """The SavedModels `_TF_KERAS_SCRIPT` writes (one process, ~4 s)."""
    if importlib.util.find_spec("tf_keras") is None:
        pytest.skip("tf-keras is not installed (pip install 'kerasbn[test]')")
    directory = tmp_path_factory.mktemp("tf_keras_savedmodels")
    script = directory / "write.py"
    script.write_text(_TF_KERAS_SCRIPT)
    run_tf_keras(script, [str(directory)], "the SavedModels", 300)
    return pathlib.Path(directory)


# Runs the folded SavedModel without oneDNN; prints its error / scale.
_NO_ONEDNN_SCRIPT = r'''
import sys

import numpy as np
import tensorflow as tf

oracle = np.load(sys.argv[2])
serve = tf.saved_model.load(sys.argv[1]).signatures["serving_default"]
(y,) = serve(tf.constant(oracle["input_0"])).values()
expected = oracle["output_0"]
print(float(np.abs(y.numpy() - expected).max() / np.abs(expected).max()))
'''


def test_bn_after_a_grouped_convolution_folds(tf_keras_dir, tmp_path):
    """tf-keras (and Keras 3) run `Conv2D(groups>1)` as an XLA-compiled
    function marked not to be inlined; freezing left it a
    `PartitionedCall`, so the BN after it read a call, no linear op, and
    became a multiply-add (RegNetY004: 16 of its 53 BNs, all folded from
    the .h5). The SavedModel reader now inlines those calls too: the BN
    folds into the grouped `Conv2D`, which the folded SavedModel runs
    XLA-compiled again, as tf-keras did: a plain grouped `Conv2D` with
    the folded `BiasAdd` after it is what TensorFlow fuses, and its CPU
    kernel without oneDNN refuses that ("Fused conv implementation does
    not support grouped convolutions")."""
    source = sources_saved_model.load_saved_model(
        str(tf_keras_dir / "grouped"))
    ops = [n.op for n in source.graph_def.node]
    assert not [op for op in ops if "PartitionedCall" in op]
    assert not source.notes
    result = kerasbn.fold_saved_model(tf_keras_dir / "grouped",
                                      tmp_path / "out", formats="saved_model")
    report = result.fold_report
    (entry,) = report.entries
    assert (entry.action, report.folded, report.replaced,
            report.normalizations_after) == ("folded", 1, 0, 0), entry
    assert entry.into == ("model/gconv/Conv2D",)
    assert not result.notes.get("source")
    saved = result.artifacts["saved_model"]
    oracle = tf_keras_dir / "grouped.npz"
    ops = _check_serving(saved, np.load(oracle))
    assert (ops["Conv2D"], ops["PartitionedCall"]) == (1, 1)
    done = subprocess.run(
        [sys.executable, "-c", _NO_ONEDNN_SCRIPT, str(saved),
         str(oracle)], capture_output=True, text=True,
        timeout=300, env=dict(os.environ, TF_ENABLE_ONEDNN_OPTS="0",
                              TF_CPP_MIN_LOG_LEVEL="2"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) <= RTOL


def test_virtual_batch_bn_folds_and_mixed_precision_bn_says_why(
        tf_keras_dir, tmp_path):
    """tf-keras' `BatchNormalization(virtual_batch_size=2)` is, in
    inference, a Mul/Add chain between two Reshapes ((N, 6, 6, 4) ->
    (N, 1, 6, 6, 4) and back, to the shape of its input read by a `Shape`
    op); that `Shape` read of the conv's BiasAdd made it "also read
    elsewhere", so the BN became a multiply-add. A read of the shape alone
    no longer counts: it folds into the Conv2D, and the `Shape` reads the
    Conv2D (same shape), so the conv's old bias is gone.

    Under mixed_float16 the BN after a Dense reads a float16 -> float32
    `Cast`: folding it into the float16 MatMul would round its float32
    arithmetic in float16 (measured 5.5e-4 of the output's scale, one
    float16 step, over the default rtol 1e-4), so it stays a float32
    multiply-add and the report says why, not "not a linear op"."""
    source = tf_keras_dir / "ghost_mixed"
    result = kerasbn.fold_saved_model(source, tmp_path / "out",
                                      formats="saved_model")
    report = result.fold_report
    half, ghost = sorted(report.entries, key=lambda e: e.layer)
    assert (ghost.layer, ghost.action, ghost.into) == (
        "ghost_mixed/bn_ghost/batchnorm/add_1", "folded",
        ("ghost_mixed/conv/Conv2D",))
    assert (half.layer, half.action, half.codes) == (
        "ghost_mixed/bn16/batchnorm/add_1", "replaced",
        ("after_nonlinear_layer",))
    assert "Cast 'ghost_mixed/bn16/Cast', float16 -> float32" in half.reason
    assert "round in float16" in half.reason
    assert (report.folded, report.replaced, report.normalizations_after) == (
        1, 1, 0)
    folded = sources_saved_model.load_saved_model(
        result.artifacts["saved_model"]).graph_def
    names = {tfgraph.readable(n.name) for n in folded.node}
    assert "ghost_mixed/bn_ghost/Shape" in names
    assert "ghost_mixed/conv/BiasAdd" not in names  # Bypassed, then pruned.
    rng = np.random.default_rng(0)
    feeds = {"image": rng.normal(size=(4, 6, 6, 3)).astype("float32"),
             "rows": rng.normal(size=(4, 5)).astype("float32")}
    feeds = {k: tf.constant(v) for k, v in feeds.items()}
    expected = tf.saved_model.load(str(source)).signatures[
        "serving_default"](**feeds)
    actual = tf.saved_model.load(result.artifacts["saved_model"]).signatures[
        "serving_default"](**feeds)
    assert sorted(actual) == sorted(expected) == ["half", "relu"]
    # float32 folding reorders products (a few ulps): the module's RTOL.
    assert_close_to_scale(actual["relu"].numpy(), expected["relu"].numpy(),
                          RTOL, "virtual batch BN folded")
    # The float16 output: the multiply-add is float32 like the source's BN;
    # it may differ by float32 rounding, which can move a value across a
    # float16 rounding boundary: at most one float16 step of the largest
    # output, 2**-10 of it.
    assert_close_to_scale(actual["half"].numpy(), expected["half"].numpy(),
                          2.0**-10, "mixed precision BN as a multiply-add")


# -- Hand-written graphs: what becomes a multiply-add, what stays. -----------


def _stats(channels, seed):
    rng = np.random.default_rng(seed)
    return [tf.constant(v.astype("float32")) for v in (
        rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.5, channels),
        rng.normal(0, 1, channels), rng.uniform(0.5, 2.0, channels))]


def _fused(x, stats, **kwargs):
    y, _, _ = tf.compat.v1.nn.fused_batch_norm(x, *stats, epsilon=1e-3,
                                               **kwargs)
    return y


def _save(path, function, spec):
    module = tf.Module()
    module.serve = tf.function(function, input_signature=[spec])
    tf.saved_model.save(module, str(path), signatures={
        "serving_default": module.serve.get_concrete_function()})
    return module.serve


def test_unfoldable_normalizations_become_one_multiply_add(tmp_path):
    """Channels last and first (the broadcast shape follows data_format),
    float16 data (computed in float32 like the fused op), the Mul/Add
    chain; a training-mode normalization is no constant map and stays."""
    stats = _stats(4, seed=1)
    kernel = tf.constant(np.random.default_rng(2).normal(
        0, 0.3, (3, 3, 3, 4)).astype("float32"))

    def serve(x):
        h = tf.nn.relu(tf.nn.conv2d(x, kernel, 1, "SAME"))
        nchw = tf.transpose(_fused(tf.transpose(h, [0, 3, 1, 2]), stats,
                                   is_training=False, data_format="NCHW"),
                            [0, 2, 3, 1])
        half = tf.cast(_fused(tf.cast(h, tf.float16), stats,
                              is_training=False), tf.float32)
        gamma, beta, mean, variance = stats
        chain = tf.nn.batch_normalization(h, mean, variance, beta, gamma,
                                          1e-3)
        training = _fused(h, stats, is_training=True)
        return {"nchw": nchw, "half": half, "chain": chain,
                "training": training}

    spec = tf.TensorSpec((None, 6, 6, 3), tf.float32, name="x")
    function = _save(tmp_path / "src", serve, spec)
    result = kerasbn.fold_saved_model(tmp_path / "src", tmp_path / "out",
                                      formats="saved_model")
    report = result.fold_report
    actions = sorted((e.kind, e.action, e.codes[0]) for e in report.entries)
    assert actions == [
        ("FusedBatchNormV3", "kept", "training_mode"),
        ("FusedBatchNormV3", "replaced", "after_nonlinear_layer"),
        ("FusedBatchNormV3", "replaced", "axis_mismatch"),
        (tfgraph.CHAIN_KIND, "replaced", "after_nonlinear_layer")]
    assert (report.replaced, report.scale_shift_layers, report.kept,
            report.normalizations_after) == (3, 3, 1, 1)
    folded = sources_saved_model.load_saved_model(
        result.artifacts["saved_model"]).graph_def
    assert [n.op for n in folded.node if n.op in tfgraph.FUSED_OPS] == [
        "FusedBatchNormV3"]  # The training-mode one.
    assert tfgraph.census(folded) == {"FusedBatchNormV3": 1}
    x = np.random.default_rng(0).normal(size=(3, 6, 6, 3)).astype("float32")
    expected = function(tf.constant(x))
    actual = tf.saved_model.load(result.artifacts["saved_model"]).signatures[
        "serving_default"](x=tf.constant(x))
    for key, value in expected.items():
        # float16 data: the fused op rounds its output to float16 too.
        rel = 1e-3 if key == "half" else RTOL
        assert_close_to_scale(actual[key].numpy(), value.numpy(), rel, key)


def test_keep_unfolded_leaves_them_as_they_are():
    arrays = [s.numpy() for s in _stats(4, seed=3)]
    graph = tf.Graph()
    with graph.as_default():
        stats = [tf.constant(a) for a in arrays]
        x = tf.compat.v1.placeholder(tf.float32, (None, 4, 4, 4), name="x")
        tf.identity(_fused(tf.nn.relu(x), stats, is_training=False),
                    name="y")
    graph_def = graph.as_graph_def()
    folded, report = tfgraph.fold_graph_def(graph_def, ["y:0"],
                                            keep_unfolded=True)
    assert (report.kept, report.replaced) == (1, 0)
    assert tfgraph.census(folded) == {"FusedBatchNormV3": 1}
    folded, report = tfgraph.fold_graph_def(graph_def, ["y:0"])
    assert (report.kept, report.replaced, report.scale_shift_layers) == (
        0, 1, 1)
    assert tfgraph.census(folded) == {}


def test_custom_gradient_activation_exports(tmp_path):
    """`tf.nn.silu(x, beta)` (Keras 2's swish) is a `tf.custom_gradient`;
    loading the source registers its gradient function in this process
    under the name the frozen nodes carry, and writing the folded
    SavedModel traced it ("Found invalid capture Tensor("beta:0" ...)")."""
    stats = _stats(4, seed=4)
    kernel = tf.constant(np.random.default_rng(5).normal(
        0, 0.3, (3, 3, 3, 4)).astype("float32"))

    def serve(x):
        return tf.nn.silu(_fused(tf.nn.conv2d(x, kernel, 1, "SAME"), stats,
                                 is_training=False), beta=1.5)

    spec = tf.TensorSpec((None, 6, 6, 3), tf.float32, name="x")
    function = _save(tmp_path / "src", serve, spec)
    result = kerasbn.fold_saved_model(tmp_path / "src", tmp_path / "out")
    assert result.fold_report.folded == 1
    x = np.random.default_rng(1).normal(size=(2, 6, 6, 3)).astype("float32")
    (actual,) = tf.saved_model.load(result.artifacts["saved_model"]).signatures[
        "serving_default"](x=tf.constant(x)).values()
    assert_close_to_scale(actual.numpy(), function(tf.constant(x)).numpy(),
                          RTOL)
