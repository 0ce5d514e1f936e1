"""tf-keras' own applications, from the files their users have, folded and
exported by `kerasbn-fold` (in-process), verified in their runtimes.

Code nobody here wrote: each family's smallest member, built by tf-keras
from its constructor arguments and saved as `.h5` by tf-keras itself
(`tests/stock_files.py`). `make sweep` (tools/sweep.py) runs every member of
every family, from `.h5` and from its SavedModel, to every format.

The oracle is the network's exact output: the same tf-keras model computed
in float64 (`exact_0`). Any float32 computation of it is off by the
rounding the network amplifies: measured as tf-keras' own float32 error
(`output_0`) and as the exact network's response to its input rounded by
half a float32 ulp (`rounded_0`), 1e-6 .. 7e-5 of the output's scale in
these random networks (a 0.1% shift of a first-layer BN mean moves
EfficientNetB0's logits by 5%: early roundings grow ~500x). A correct
artifact computes in float32 in another order (folded weights, other
kernels), so its error is of that size: the bound is
`max(1e-5, 8 x that noise)` of the output scale (1e-5 is the issue's
bar; one random walk of roundings against another: the folded Keras 3
EfficientNetB0 lands 3-4.2x tf-keras' own error from the exact output,
with no layer where the gap jumps, measured layer by layer). A wrong
weight, a mapping that changes the computation, or a BN statistic off by
1% of its deviation moves the output by far more
(`test_the_bound_catches_a_planted_error`).
"""

import importlib.util
import json
import pathlib

import numpy as np
import onnxruntime as ort
import pytest
import tensorflow as tf

from kerasbn import cli
from kerasbn.folding import tfgraph
from kerasbn.sources import keras2
from kerasbn.sources import saved_model as sources_saved_model
from tests.stock_files import FAMILIES
from tests.stock_files import REPRESENTATIVES
from tests.stock_files import make_stock_files

if importlib.util.find_spec("tf_keras") is None:
    pytest.skip("tf-keras is not installed (pip install -e '.[test]'): "
                "tf-keras writes the stock application files",
                allow_module_level=True)

FLOOR = 1e-5
FACTOR = 8.0
# ONNX as well (and the CLI's own verification) for one model of each kind
# of graph: TFOpLambda arithmetic and '/' names (MobileNetV3),
# concatenations (DenseNet), grouped convolutions and squeeze-excite
# (RegNetY); EfficientNetB0 goes to ONNX from its SavedModel in
# tests/test_graph_fold_stock.py. ConvNeXt's LayerNormalization and exact
# GELU (Erfc, rewritten for tf2onnx) go to ONNX in tests/test_op_coverage.py
# on small models and in `make sweep` on ConvNeXtTiny (tf2onnx takes ~35 s
# on its 28M weights). The others are checked here against the exact
# output only (`--no-verify`: the CLI's check would run each artifact a
# second time, against a weaker oracle): `make test` time.
WITH_ONNX = {"MobileNetV3Small", "DenseNet121", "RegNetY002"}


@pytest.fixture(scope="session")
def stock_dir(tmp_path_factory):
    return pathlib.Path(make_stock_files(
        tmp_path_factory.mktemp("stock"), REPRESENTATIVES, savedmodel=False))


def bound(oracle):
    """The largest error an artifact may have against the exact output,
    and the float32 error that sets it."""
    exact = oracle["exact_0"]
    scale = float(np.max(np.abs(exact)))
    own = float(np.max(np.abs(oracle["output_0"] - exact))) / scale
    rounding = float(np.max(np.abs(oracle["rounded_0"] - exact))) / scale
    noise = max(own, rounding)
    return max(FLOOR, FACTOR * noise) * scale, noise


def error_against_exact(actual, oracle):
    return float(np.max(np.abs(np.asarray(actual, np.float64)
                               - oracle["exact_0"])))


def run_cli(capsys, *argv):
    status = cli.main([str(a) for a in argv] + ["--latency-runs", "0"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def saved_model_output(directory, x):
    loaded = tf.saved_model.load(str(directory))
    function = loaded.signatures["serving_default"]
    (key,) = function.structured_input_signature[1]
    (actual,) = function(**{key: tf.constant(x)}).values()
    graph_def = sources_saved_model.load_saved_model(
        str(directory), "serving_default").graph_def
    left = [n.op for n in graph_def.node if n.op in tfgraph.FUSED_OPS]
    return actual.numpy(), left


def onnx_output(path, x):
    session = ort.InferenceSession(str(path),
                                   providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: x})
    return actual


def test_representatives_cover_every_family():
    families = {family for _, family in FAMILIES.values()}
    assert {FAMILIES[name][1] for name in REPRESENTATIVES} == families


@pytest.mark.slow
@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_stock_h5_folds_and_exports_verified(stock_dir, tmp_path, capsys,
                                             name):
    formats = "saved_model,onnx" if name in WITH_ONNX else "saved_model"
    out = tmp_path / "out"
    oracle = np.load(stock_dir / f"{name}.npz")
    # Verified on images, as a user verifies with --sample: these models
    # rescale pixels first, so the CLI's default N(0, 1) inputs are almost
    # constant images, on which statistics calibrated on images are far
    # off and float32 rounding grows past 1e-4 (EfficientNetB0: 1.6e-4).
    np.savez(tmp_path / "sample.npz", oracle["input_0"])
    limit, _ = bound(oracle)
    # The CLI's own check at this network's float32 noise bound (its
    # default 1e-4 is below the noise of the deeper random networks).
    scale = float(np.max(np.abs(oracle["exact_0"])))
    verify = (["--rtol", str(limit / scale)] if name in WITH_ONNX
              else ["--no-verify"])
    status, printed, err = run_cli(
        capsys, stock_dir / f"{name}.h5", "-o", out, "--format", formats,
        "--json", tmp_path / "report.json", "--sample",
        tmp_path / "sample.npz", *verify)
    assert status == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["fold"]["summary"]["kept"] == 0
    if name == "DenseNet121":  # '/' in tf-keras' names: both in the report
        assert report["source"]["renamed"]["conv1_conv"] == "conv1/conv"
    x = oracle["input_0"]
    limit, own = bound(oracle)
    (saved,) = (out / "saved_model").iterdir()
    actual, left = saved_model_output(saved / "1", x)
    assert left == [], f"normalization ops left in the SavedModel: {left}"
    error = error_against_exact(actual, oracle)
    assert error <= limit, (name, "saved_model", error, limit, own)
    if name in WITH_ONNX:
        (path,) = out.glob("*.onnx")
        error = error_against_exact(onnx_output(path, x), oracle)
        assert error <= limit, (name, "onnx", error, limit, own)


@pytest.mark.slow
def test_the_bound_catches_a_planted_error(stock_dir):
    """One BN mean off by 1% of its deviation in a loaded model, and the
    outputs leave the bound: the bound is not a free pass."""
    import keras

    oracle = np.load(stock_dir / "ResNet50.npz")
    model, _ = keras2.load_h5(stock_dir / "ResNet50.h5")
    limit, _ = bound(oracle)
    x = oracle["input_0"]
    assert error_against_exact(model(x, training=False), oracle) <= limit
    bn = next(layer for layer in model.layers[::-1]
              if isinstance(layer, keras.layers.BatchNormalization))
    std = np.sqrt(bn.moving_variance.numpy() + bn.epsilon)
    bn.moving_mean.assign(bn.moving_mean.numpy() + 0.01 * std)
    assert error_against_exact(model(x, training=False), oracle) > limit
