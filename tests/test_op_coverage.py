"""Every op Keras 3 emits, through SavedModel, ONNX and TFLite (issue 33).

Each case of `tests/op_cases.py` (every public keras.activations function,
with the arguments that change the graph, and the keras.layers classes a
CNN/MLP deployment uses) is a small model with a foldable BN before the op.
It is exported to the three formats at the default opset; the oracle is
the Keras model itself, run here, against each artifact run here in its
own runtime (ONNX Runtime, the TFLite interpreter, `tf.saved_model.load`),
independently of the export's own check.

Tolerance: 1e-5 of the output's scale. These are float32 networks of two
or three layers; a correct artifact differs from Keras by a few float32
roundings amplified by at most a softmax or a normalization (measured
<= 7.5e-7, `make op-sweep`), while a wrong conversion (a missing op, a
rewrite off in its formula) is off by far more.

`make op-sweep` runs the same cases at the lowest and highest opsets too
(tools/op_sweep.py); the README has its table.
"""

import numpy as np
import onnxruntime as ort
import pytest
import tensorflow as tf

import kerasbn
from kerasbn import cli
from tests.helpers import randomize_normalizations
from tests.op_cases import ACTIVATIONS
from tests.op_cases import LAYERS

RTOL = 1e-5
FORMATS = ("saved_model", "onnx", "tflite")


def run_artifacts(result, x):
    """`{format: output}` of each artifact, run here in its runtime."""
    outputs = {}
    serve = tf.saved_model.load(
        result.artifacts["saved_model"]).signatures["serving_default"]
    (outputs["saved_model"],) = [
        t.numpy() for t in serve(tf.constant(x)).values()]
    session = ort.InferenceSession(result.artifacts["onnx"])
    (outputs["onnx"],) = session.run(None,
                                     {session.get_inputs()[0].name: x})
    interpreter = tf.lite.Interpreter(result.artifacts["tflite"])
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x)
    interpreter.invoke()
    outputs["tflite"] = interpreter.get_tensor(
        interpreter.get_output_details()[0]["index"])
    return outputs


def check_case(builder, tmp_path):
    model = randomize_normalizations(builder(), seed=5)
    shape = (3,) + tuple(model.inputs[0].shape[1:])
    x = np.random.default_rng(0).uniform(-2.0, 2.0, shape).astype("float32")
    result = kerasbn.export(model, tmp_path, formats=FORMATS, sample=x)
    assert result.fold_report.folded >= 1  # the BN before the op folded
    want = np.asarray(model(x, training=False), np.float64)
    # Keras 3.15's sparsemax is wrong whenever more than one entry is in
    # its support (it sums the cumulative sums) and returns all zeros on
    # these inputs: an all-zero reference is compared absolutely.
    scale = np.max(np.abs(want)) or 1.0
    for fmt, got in run_artifacts(result, x).items():
        error = np.max(np.abs(got - want)) / scale
        assert error <= RTOL, (fmt, error)
    return result


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_exports(name, tmp_path):
    result = check_case(ACTIVATIONS[name], tmp_path)
    if name.startswith(("gelu", "celu")) and "approximate=True" not in name:
        # Exact GELU (Erfc) and CELU (Expm1) pass through kerasbn's ONNX
        # rewrites, and the result says so.
        op = "Expm1" if name.startswith("celu") else "Erfc"
        assert any(op in note for note in result.notes.get("onnx", [])), \
            result.notes


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_exports(name, tmp_path):
    check_case(LAYERS[name], tmp_path)


@pytest.mark.slow
def test_tabular_model_of_the_issue(tmp_path, capsys):
    # Issue 33's model, trained and saved as a user would, then the CLI.
    import keras
    from keras import layers as L

    rng = np.random.default_rng(33)
    x = rng.normal(3.0, 2.0, (256, 10)).astype("float32")
    y = (x[:, :3].sum(axis=1, keepdims=True) > 9).astype("float32")
    normalization = L.Normalization()
    normalization.adapt(x)
    inputs = keras.Input((10,), name="features")
    h = normalization(inputs)
    h = L.Dense(32)(h)
    h = L.BatchNormalization()(h)
    h = L.ReLU()(h)
    h = L.Dropout(0.2)(h)
    h = L.Dense(16)(h)
    h = L.BatchNormalization()(h)
    h = L.Activation("gelu")(h)
    model = keras.Model(inputs, L.Dense(1)(h))
    model.compile("adam", keras.losses.BinaryCrossentropy(from_logits=True))
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    path = tmp_path / "tab.keras"
    model.save(path)
    status = cli.main([str(path), "-o", str(tmp_path / "out"), "--format",
                       "onnx,saved_model,tflite", "--latency-runs", "0"])
    captured = capsys.readouterr()
    assert status == 0, captured.out + captured.err
    assert "rewritten as 1 - Erf" in captured.out


def test_an_opset_without_the_op_is_refused_naming_it(tmp_path):
    # Exact GELU needs ONNX Erf, which opset 9 introduced: at opset 8 the
    # export stops before writing, naming the op and the opset that has it.
    model = randomize_normalizations(ACTIVATIONS["gelu"](), seed=5)
    with pytest.raises(kerasbn.exporting.ExportError,
                       match="opset 8 has no Erf; it exists from opset 9"):
        kerasbn.export(model, tmp_path / "out", formats=("onnx",), opset=8)
    assert not (tmp_path / "out").exists() or not list(
        (tmp_path / "out").iterdir())


def test_celu_converts_from_opset_9(tmp_path):
    # The Expm1 rewrite compares with Less (floats from opset 7), not
    # Equal (floats from opset 11): CELU converts wherever Where exists
    # (found by a new user's trial at opsets 9 and 10). Tiny inputs too,
    # where exp(x) - 1 cancels.
    model = randomize_normalizations(ACTIVATIONS["celu"](), seed=5)
    x = np.concatenate([
        np.random.default_rng(0).uniform(-2.0, 2.0, (3, 12)),
        np.full((1, 12), -1e-7)]).astype("float32")
    result = kerasbn.export(model, tmp_path, formats=("onnx",), opset=9,
                            sample=x)
    session = ort.InferenceSession(result.artifacts["onnx"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x})
    want = np.asarray(model(x, training=False), np.float64)
    assert np.max(np.abs(got - want)) <= RTOL * np.max(np.abs(want))
