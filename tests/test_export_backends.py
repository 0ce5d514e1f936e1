"""Export from every Keras backend (`KERASBN_TEST_BACKEND`).

A model trained with `fit` in this process's backend (JAX, PyTorch or
TensorFlow) is folded and exported; on JAX and PyTorch the SavedModel,
ONNX and TFLite artifacts are written by a TensorFlow subprocess
(`kerasbn.exporting._tf_process`). The oracle is the unfolded model in
the user's own backend; each artifact is re-opened here in its own
runtime (`tf.saved_model.load`, ONNX Runtime, the TFLite interpreter,
`keras.saving.load_model` in this backend), independently of the export's
own verification.
"""

import os

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tensorflow as tf

import kerasbn
from kerasbn import cli
from kerasbn.exporting import ExportError
from tests.backend_layers import Softsign2
from tests.helpers import assert_close_to_scale
from tests.helpers import randomize_normalizations

pytestmark = pytest.mark.any_backend

# The fold rounds float64 weights to float32 and each runtime sums in its
# own order: ~3e-7 of the output scale measured on this net on every
# backend. 1e-5 keeps a margin; a dropped or doubled BN is off by O(1).
RTOL = 1e-5
OTHER_BACKEND = keras.backend.backend() != "tensorflow"


def trained_model(activation=keras.layers.ReLU):
    inputs = keras.Input((12, 12, 3), name="image")
    x = keras.layers.Conv2D(8, 3, use_bias=False)(inputs)
    x = kerasbn.layers.BatchNormalization(zero_debias=True)(x)
    x = activation()(x)
    x = keras.layers.DepthwiseConv2D(3)(x)
    x = kerasbn.layers.BatchRenormalization(warmup_steps=2, rmax_steps=4,
                                            dmax_steps=4)(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(6, 1)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, name="scores")(x)
    model = keras.Model(inputs, outputs, name="net")
    model.compile(keras.optimizers.SGD(0.05), "mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 12, 12, 3)).astype("float32")
    y = rng.normal(size=(48, 4)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    return model


def reference(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def test_trained_model_exports_every_format_verified(tmp_path):
    model = trained_model()
    x = np.random.default_rng(1).normal(size=(5, 12, 12, 3)).astype(
        "float32")
    expected = reference(model, x)
    result = kerasbn.export(model, tmp_path, sample=x,
                            formats="saved_model,onnx,tflite,keras")
    assert result.passed and result.fold_report.kept == 0
    assert result.fold_report.folded == 3

    loaded = tf.saved_model.load(result.artifacts["saved_model"])
    served = loaded.signatures["serving_default"](image=tf.constant(x))
    assert_close_to_scale(served["scores"].numpy(), expected, RTOL,
                          "saved_model")

    session = ort.InferenceSession(result.artifacts["onnx"],
                                   providers=["CPUExecutionProvider"])
    assert_close_to_scale(session.run(["scores"], {"image": x})[0],
                          expected, RTOL, "onnx")
    ops = {n.op_type for n in onnx.load(result.artifacts["onnx"]).graph.node}
    assert "BatchNormalization" not in ops

    interpreter = tf.lite.Interpreter(model_path=result.artifacts["tflite"])
    interpreter.resize_tensor_input(
        interpreter.get_input_details()[0]["index"], x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    tflite = interpreter.get_tensor(
        interpreter.get_output_details()[0]["index"])
    assert_close_to_scale(tflite, expected, RTOL, "tflite")

    reloaded = keras.saving.load_model(result.artifacts["keras"])
    assert_close_to_scale(reference(reloaded, x), expected, RTOL, "keras")
    # The user's model still runs and trains (no buffer given away).
    model.fit(x, np.zeros((5, 4), "float32"), verbose=0)


def _relative_rms(actual, expected):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    return float(np.sqrt(np.mean((actual - expected) ** 2)
                         / np.mean(expected ** 2)))


def test_int8_and_float16_from_this_backend(tmp_path):
    """The reduced formats from a model trained in this backend: on JAX
    and PyTorch the calibration batches go to the TensorFlow writer in a
    file. Re-run here in ONNX Runtime / TFLite against the model in its
    own backend: int8 within 10% relative RMS (the export's default
    bound; one uint8 step of ~12 tensors' ranges gives ~1-3%), float16
    within 1% (an 11-bit mantissa: ~1e-3 here)."""
    model = trained_model()
    rng = np.random.default_rng(2)
    calibration = rng.normal(size=(64, 12, 12, 3)).astype("float32")
    x = rng.normal(size=(32, 12, 12, 3)).astype("float32")
    formats = ["onnx_int8", "tflite_int8", "onnx_fp16", "tflite_fp16"]
    result = kerasbn.export(model, tmp_path, formats, calibration=calibration,
                            validation=x, min_agreement=0.0)
    expected = reference(model, x)
    for fmt in formats:
        path = result.artifacts[fmt]
        if fmt.startswith("onnx"):
            session = ort.InferenceSession(
                path, providers=["CPUExecutionProvider"])
            got = session.run(None, {"image": x})[0]
        else:
            got = np.concatenate([_tflite(path, x[i:i + 1])
                                  for i in range(len(x))])
        error = _relative_rms(got, expected)
        assert error < (0.1 if "int8" in fmt else 0.01), (fmt, error)
        check = result.reduced_checks()[fmt]
        # The export measured the same thing on the same inputs.
        assert check["rel_rms"] == pytest.approx(error, rel=1e-3, abs=1e-6)
    assert result.reduced_checks()["onnx_int8"]["worst_layer"] is not None


def _tflite(path, x):
    interpreter = tf.lite.Interpreter(model_path=path)
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(
        interpreter.get_output_details()[0]["index"])


def test_a_users_layer_from_a_module_is_imported_by_the_writer(tmp_path):
    model = trained_model(activation=Softsign2)
    result = kerasbn.export(model, tmp_path, formats="saved_model,onnx")
    assert result.passed and result.fold_report.folded == 3


@pytest.mark.skipif(not OTHER_BACKEND, reason="TensorFlow writes in-process")
def test_a_class_defined_in_main_is_refused_before_writing(tmp_path):
    class Local(keras.layers.Layer):
        def call(self, inputs):
            return inputs

    Local.__module__ = "__main__"
    inputs = keras.Input((4,), name="x")
    outputs = Local(name="local")(keras.layers.Dense(2)(inputs))
    model = keras.Model(inputs, outputs)
    with pytest.raises(ValueError, match=r"'local' is an instance of Local"
                       r".*move the class into a module"):
        kerasbn.export(model, tmp_path / "out", formats="onnx")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.skipif(not OTHER_BACKEND, reason="TensorFlow writes in-process")
def test_a_failing_subprocess_is_an_export_error_and_writes_nothing(
        tmp_path, monkeypatch):
    model = trained_model(activation=Softsign2)
    monkeypatch.setenv("KERASBN_TESTS_BREAK_IMPORT", "tensorflow")
    with pytest.raises(ExportError, match="broken on purpose"):
        kerasbn.export(model, tmp_path / "out", formats="saved_model,keras")
    assert not os.path.exists(tmp_path / "out")  # made, then removed


def test_cli_folds_and_exports_in_this_backend(tmp_path, capsys):
    model = trained_model()
    source = str(tmp_path / "trained.keras")
    model.save(source)
    out = tmp_path / "served"
    code = cli.main([source, "-o", str(out), "--format", "saved_model,onnx",
                     "--latency-runs", "3"])
    assert code == 0, capsys.readouterr()
    x = np.random.default_rng(2).normal(size=(3, 12, 12, 3)).astype(
        "float32")
    session = ort.InferenceSession(str(out / "net.onnx"),
                                   providers=["CPUExecutionProvider"])
    assert_close_to_scale(session.run(["scores"], {"image": x})[0],
                          reference(model, x), RTOL, "onnx from the CLI")


def _served_names(result):
    """`(inputs, outputs)` names of the SavedModel's serving signature and
    of the ONNX graph, as a client sees them."""
    loaded = tf.saved_model.load(result.artifacts["saved_model"])
    serve = loaded.signatures["serving_default"]
    saved = (sorted(serve.structured_input_signature[1]),
             sorted(serve.structured_outputs))
    graph = onnx.load(result.artifacts["onnx"]).graph
    return saved, ([i.name for i in graph.input],
                   [o.name for o in graph.output])


def test_unnamed_inputs_and_a_folded_output_keep_the_users_names(tmp_path):
    """Names Keras chose, not the user: two inputs made without `name=`
    (Keras names their tensors `keras_tensor...`; a reloaded `.keras`
    file names them after their InputLayers instead) and an output
    whose BN is folded away (the folded model's output is its Dense).
    Every backend serves under the names the user's model has; the two
    inputs have different shapes, so a swap would not run."""
    keras.Input((3,))  # Unnamed tensors are numbered: not the first one.
    image, extra = keras.Input((8, 8, 3)), keras.Input((5,))
    h = keras.layers.Conv2D(4, 3)(image)
    h = kerasbn.layers.BatchNormalization()(h)
    h = keras.layers.Concatenate()([keras.layers.Flatten()(h),
                                    keras.layers.Dense(3)(extra)])
    scores = keras.layers.Dense(2)(h)
    normalized = keras.layers.BatchNormalization()(
        keras.layers.Dense(3)(extra))
    model = keras.Model([image, extra], [scores, normalized])
    randomize_normalizations(model, seed=5)
    inputs = [t.name for t in model.inputs]
    outputs = list(model.output_names)
    assert inputs[0].startswith("keras_tensor") and len(set(inputs)) == 2
    rng = np.random.default_rng(3)
    x = [rng.normal(size=(3, 8, 8, 3)).astype("float32"),
         rng.normal(size=(3, 5)).astype("float32")]
    result = kerasbn.export(model, tmp_path, formats="saved_model,onnx",
                            sample=x)
    assert result.passed and result.fold_report.folded == 2
    saved, graph = _served_names(result)
    assert saved == (sorted(inputs), sorted(outputs))
    assert graph == (inputs, outputs)

    # Fed by those names, each artifact gives the user's model's outputs.
    expected = [keras.ops.convert_to_numpy(t)
                for t in model(x, training=False)]
    serve = tf.saved_model.load(result.artifacts["saved_model"]).signatures[
        "serving_default"]
    served = serve(**{n: tf.constant(a) for n, a in zip(inputs, x)})
    session = ort.InferenceSession(result.artifacts["onnx"],
                                   providers=["CPUExecutionProvider"])
    ran = session.run(outputs, dict(zip(inputs, x)))
    for name, want, got in zip(outputs, expected, ran):
        assert_close_to_scale(served[name].numpy(), want, RTOL, name)
        assert_close_to_scale(got, want, RTOL, name)


@pytest.mark.slow
def test_a_keras_applications_model_exports_verified(tmp_path):
    """keras.applications builds its input without `name=`. MobileNetV2
    at its smallest (alpha 0.35, 32x32) with random BN statistics and
    logits out (a softmax of random weights would hide errors); ~30 s
    on JAX, most of it building the model and the TensorFlow writer."""
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10,
        classifier_activation=None)
    randomize_normalizations(model, seed=11)
    x = np.random.default_rng(4).normal(size=(2, 32, 32, 3)).astype(
        "float32")
    result = kerasbn.export(model, tmp_path, formats="saved_model,onnx",
                            sample=x)
    assert result.passed
    assert (result.fold_report.folded, result.fold_report.kept) == (52, 0)
    name = model.inputs[0].name
    assert _served_names(result) == (([name], ["predictions"]),
                                     ([name], ["predictions"]))
    session = ort.InferenceSession(result.artifacts["onnx"],
                                   providers=["CPUExecutionProvider"])
    # The fold's float32 rounding through 52 BNs: ~5e-7 of the output
    # scale measured; 1e-5 as for the small net.
    assert_close_to_scale(session.run(None, {name: x})[0],
                          reference(model, x), RTOL, "onnx")
    assert "BatchNormalization" not in {
        n.op_type for n in onnx.load(result.artifacts["onnx"]).graph.node}
