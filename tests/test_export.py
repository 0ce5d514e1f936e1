"""Tests for kerasbn.export (kerasbn.exporting).

Every artifact is re-opened here in its own runtime (`tf.saved_model.load`,
ONNX Runtime, `keras.models.load_model`, the TFLite interpreter) and compared
with the ORIGINAL, unfolded Keras model in inference mode, independently of
the export's own verification. The ONNX node census is compared with
tf2onnx's export of the same architecture built without BN (which BN-derived
Mul/Add nodes it must not exceed) and of the unfolded model (which shows the
census can fail).
"""

import hashlib
import os
import shutil
import subprocess
import sys

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tensorflow as tf
import tf2onnx

import kerasbn
from kerasbn.exporting import ExportError
from kerasbn.exporting import FORMATS
from kerasbn.exporting import VerificationError
from kerasbn.folding import strip_normalization
from tests.helpers import assert_close_to_scale
from tests.helpers import randomize_normalizations

# Runtimes' own kernels reorder sums (oneDNN, MLAS, XNNPACK) and the fold
# rounds float64 weights to float32: ~1e-6 of the output's scale on these
# small nets, ~1e-5 on MobileNetV2. 1e-4 keeps a margin; a wrong fold or a
# dropped BN is off by O(1).
RTOL = 1e-4


def sequential_model():
    return keras.Sequential([
        keras.Input((12, 12, 3), name="pixels"),
        keras.layers.Conv2D(8, 3, use_bias=False),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
        keras.layers.DepthwiseConv2D(3, depth_multiplier=2),
        kerasbn.layers.BatchNormalization(zero_debias=True),
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(6),
        keras.layers.BatchNormalization(),
    ], name="seq")


def functional_model():
    inputs = keras.Input((10, 10, 4), name="image")
    a = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    a = keras.layers.BatchNormalization()(a)
    a = keras.layers.ReLU()(a)
    b = keras.layers.Conv2D(8, 1)(inputs)
    b = keras.layers.BatchNormalization()(b)
    h = keras.layers.Add()([a, b])
    h = keras.layers.Conv2DTranspose(5, 3, strides=2)(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(3, name="scores")(h)
    return keras.Model(inputs, outputs, name="func")


def nested_model():
    inner_in = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(6, 3, use_bias=False)(inner_in)
    h = keras.layers.BatchNormalization()(h)
    inner = keras.Model(inner_in, keras.layers.ReLU()(h), name="backbone")
    inputs = keras.Input((8, 8, 3), name="image")
    h = inner(inputs)
    h = keras.layers.Conv2D(4, 1)(h)
    h = keras.layers.BatchNormalization()(h)
    outputs = keras.layers.Flatten(name="features")(h)
    return keras.Model(inputs, outputs, name="nested")


def multi_io_model():
    image = keras.Input((8, 8, 2), name="image")
    meta = keras.Input((5,), name="meta")
    h = keras.layers.Conv2D(4, 3)(image)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.GlobalMaxPooling2D()(h)
    m = keras.layers.Dense(4)(meta)
    m = keras.layers.BatchNormalization()(m)
    joined = keras.layers.Concatenate()([h, m])
    class_out = keras.layers.Dense(3, name="class_logits")(joined)
    box_out = keras.layers.Dense(4, name="box")(keras.layers.ReLU()(joined))
    return keras.Model([image, meta], [class_out, box_out], name="multi")


def _inputs(model, batch, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((batch,) + tuple(t.shape[1:])).astype(
        "float32") for t in model.inputs]


def _reference(model, arrays):
    structured = arrays if len(arrays) > 1 else arrays[0]
    return [np.asarray(o) for o in keras.tree.flatten(
        model(structured, training=False))]


def _input_names(model):
    return [t.name for t in model.inputs]


def _output_names(model):
    # Functional models name outputs after their layers; for a Sequential,
    # the export names the single output after its last layer.
    return list(getattr(model, "output_names", None) or [model.layers[-1].name])


def _assert_close(actual, expected, what):
    assert len(actual) == len(expected), what
    for a, e in zip(actual, expected):
        assert a.shape == e.shape, what
        assert_close_to_scale(a, e, RTOL, what, floor=0.0)


def _run_saved_model(path, input_names, output_names, arrays):
    fn = tf.saved_model.load(path).signatures["serving_default"]
    outputs = fn(**{n: tf.constant(a) for n, a in zip(input_names, arrays)})
    return [outputs[n].numpy() for n in output_names]


def _run_onnx(path, input_names, output_names, arrays):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(output_names, dict(zip(input_names, arrays)))


MODELS = {
    "sequential": sequential_model,
    "functional": functional_model,
    "nested": nested_model,
    "multi_io": multi_io_model,
}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_round_trip_in_every_runtime(kind, tmp_path):
    model = randomize_normalizations(
        MODELS[kind](), gamma=(0.5, 2.0), shift=1.0)
    weights_before = [w.numpy().copy() for w in model.weights]
    out = tmp_path / "export"
    result = kerasbn.export(model, out,
                            formats=["saved_model", "onnx", "keras"])

    # The user's model is untouched.
    for before, w in zip(weights_before, model.weights):
        np.testing.assert_array_equal(before, w.numpy())

    # Layouts.
    sm_dir = out / "saved_model" / model.name / "1"
    assert (sm_dir / "saved_model.pb").is_file()
    assert (sm_dir / "variables").is_dir()
    assert (out / f"{model.name}.onnx").is_file()
    assert (out / f"{model.name}.keras").is_file()
    assert sorted(os.listdir(out)) == sorted(
        ["saved_model", f"{model.name}.onnx", f"{model.name}.keras"]
    ), "staging leftovers or extra files"
    assert result.artifacts["saved_model"] == str(sm_dir)

    input_names = _input_names(model)
    output_names = _output_names(model)

    # Signatures and names.
    loaded = tf.saved_model.load(str(sm_dir))
    sig = loaded.signatures["serving_default"]
    specs = sig.structured_input_signature[1]
    assert sorted(specs) == sorted(input_names)
    assert all(specs[n].shape[0] is None for n in input_names)
    assert sorted(sig.structured_outputs) == sorted(output_names)
    proto = onnx.load(str(out / f"{model.name}.onnx"))
    assert [i.name for i in proto.graph.input] == input_names
    assert [o.name for o in proto.graph.output] == output_names
    for i in proto.graph.input:
        batch_dim = i.type.tensor_type.shape.dim[0]
        assert batch_dim.dim_param and not batch_dim.dim_value

    # Outputs, at two batch sizes, each runtime against the original model.
    for batch in (1, 5):
        arrays = _inputs(model, batch, seed=batch)
        expected = _reference(model, arrays)
        _assert_close(_run_saved_model(str(sm_dir), input_names,
                                       output_names, arrays),
                      expected, f"saved_model batch {batch}")
        _assert_close(_run_onnx(str(out / f"{model.name}.onnx"), input_names,
                                output_names, arrays),
                      expected, f"onnx batch {batch}")
        reloaded = keras.models.load_model(out / f"{model.name}.keras")
        structured = arrays if len(arrays) > 1 else arrays[0]
        _assert_close([np.asarray(o) for o in keras.tree.flatten(
            reloaded(structured, training=False))], expected,
            f"keras batch {batch}")

    # The report the export gives agrees with what we measured.
    assert result.passed
    assert {c["batch"] for c in result.checks} == {1, 4}
    assert {c["format"] for c in result.checks} == {"saved_model", "onnx",
                                                    "keras"}


def test_tflite_round_trip(tmp_path):
    model = randomize_normalizations(
        multi_io_model(), gamma=(0.5, 2.0), shift=1.0)
    result = kerasbn.export(model, tmp_path, formats=["tflite"])
    path = result.artifacts["tflite"]
    assert path == str(tmp_path / "multi.tflite")
    interpreter = tf.lite.Interpreter(model_path=path)
    inputs = {d["name"]: d for d in interpreter.get_input_details()}
    arrays = _inputs(model, 3, seed=9)
    for name, array in zip(_input_names(model), arrays):
        interpreter.resize_tensor_input(inputs[name]["index"], array.shape)
    interpreter.allocate_tensors()
    for name, array in zip(_input_names(model), arrays):
        interpreter.set_tensor(inputs[name]["index"], array)
    interpreter.invoke()
    outputs = [interpreter.get_tensor(d["index"])
               for d in interpreter.get_output_details()]
    _assert_close(outputs, _reference(model, arrays), "tflite")


def _tf2onnx_ops(model):
    specs = [tf.TensorSpec((None,) + tuple(t.shape[1:]), t.dtype, name=t.name)
             for t in model.inputs]
    fn = tf.function(lambda *xs: model(list(xs) if len(xs) > 1 else xs[0],
                                       training=False))
    proto, _ = tf2onnx.convert.from_function(fn, input_signature=specs,
                                             opset=17)
    ops = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return ops


@pytest.mark.slow
def test_mobilenet_v2_export_has_no_bn_leftovers(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, alpha=0.35,
                                           input_shape=(32, 32, 3),
                                           classes=10,
                                           classifier_activation=None)
    randomize_normalizations(model, gamma=(0.5, 2.0), shift=1.0)
    result = kerasbn.export(model, tmp_path, formats=["saved_model", "onnx"])
    assert result.fold_report.normalizations_after == 0

    onnx_path = result.artifacts["onnx"]
    ops = result.onnx_ops
    no_bn_ops = _tf2onnx_ops(strip_normalization(model))
    unfolded_ops = _tf2onnx_ops(model)
    # The census can fail: tf2onnx leaves per-channel Muls for BN after
    # DepthwiseConv2D (17 in MobileNetV2).
    assert unfolded_ops.get("Mul", 0) >= 17
    assert ops.get("BatchNormalization", 0) == 0
    # Every Mul/Add left is one the BN-free architecture has too.
    assert ops.get("Mul", 0) == no_bn_ops.get("Mul", 0) == 0
    assert ops.get("Add", 0) == no_bn_ops.get("Add", 0)
    assert ops["Conv"] == no_bn_ops["Conv"]

    names = _input_names(model)
    out_names = _output_names(model)
    for batch in (1, 3):
        arrays = _inputs(model, batch, seed=batch)
        expected = _reference(model, arrays)
        # A model whose outputs are all alike would hide a bad fold.
        assert np.std(expected[0]) > 1e-3
        _assert_close(_run_onnx(onnx_path, names, out_names, arrays),
                      expected, f"onnx batch {batch}")
        _assert_close(_run_saved_model(result.artifacts["saved_model"],
                                       names, out_names, arrays),
                      expected, f"saved_model batch {batch}")


def test_saved_model_cli_shows_the_signature(tmp_path):
    model = randomize_normalizations(
        functional_model(), gamma=(0.5, 2.0), shift=1.0)
    result = kerasbn.export(model, tmp_path, formats=["saved_model"],
                            verify=False)
    cli = shutil.which("saved_model_cli",
                       path=os.path.dirname(sys.executable))
    if cli is None:
        pytest.skip("saved_model_cli is not installed next to this Python")
    shown = subprocess.run([cli, "show", "--all", "--dir",
                            result.artifacts["saved_model"]],
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "signature_def['serving_default']" in shown.stdout
    assert "inputs['image']" in shown.stdout
    assert "outputs['scores']" in shown.stdout
    assert "(-1, 10, 10, 4)" in shown.stdout


def test_sample_is_used_for_verification(tmp_path):
    model = randomize_normalizations(
        multi_io_model(), gamma=(0.5, 2.0), shift=1.0)
    sample = {"image": _inputs(model, 6)[0], "meta": _inputs(model, 6)[1]}
    result = kerasbn.export(model, tmp_path, formats=["keras"],
                            sample=sample)
    assert sorted(c["batch"] for c in result.checks) == [1, 6]
    with pytest.raises(ValueError, match="missing inputs"):
        kerasbn.export(model, tmp_path / "b", formats=["keras"],
                       sample={"image": sample["image"]})
    with pytest.raises(ValueError, match=r"shape \(6, 9\)"):
        kerasbn.export(model, tmp_path / "c", formats=["keras"],
                       sample=[sample["image"], np.zeros((6, 9), "float32")])


# --------------------------------------------------------------------------
# Atomic writes.


def _digest(path):
    h = hashlib.sha256()
    for root, _, files in sorted(os.walk(path)):
        for f in sorted(files):
            with open(os.path.join(root, f), "rb") as fh:
                h.update(f.encode() + fh.read())
    return h.hexdigest()


def test_existing_artifacts_are_not_touched_without_overwrite(tmp_path):
    model = randomize_normalizations(
        sequential_model(), gamma=(0.5, 2.0), shift=1.0)
    kerasbn.export(model, tmp_path, formats=["keras", "onnx"])
    before = _digest(tmp_path)
    with pytest.raises(ExportError, match="overwrite=True"):
        kerasbn.export(model, tmp_path, formats=["keras", "onnx"])
    assert _digest(tmp_path) == before

    other = randomize_normalizations(
        sequential_model(), seed=50, gamma=(0.5, 2.0), shift=1.0)
    kerasbn.export(other, tmp_path, formats=["keras"], overwrite=True)
    reloaded = keras.models.load_model(tmp_path / "seq.keras")
    arrays = _inputs(other, 2)
    _assert_close([np.asarray(reloaded(arrays[0]))], _reference(other, arrays),
                  "overwritten keras file holds the new model")


def test_failed_verification_writes_nothing(tmp_path, monkeypatch):
    model = randomize_normalizations(
        functional_model(), gamma=(0.5, 2.0), shift=1.0)
    out = tmp_path / "new_dir"
    original_run = FORMATS["onnx"].run

    def off_by_a_bit(path, signature, arrays):
        return [o + 1e-2 for o in original_run(path, signature, arrays)]

    monkeypatch.setattr(FORMATS["onnx"], "run", off_by_a_bit)
    with pytest.raises(VerificationError, match="nothing was written") as info:
        kerasbn.export(model, out, formats=["saved_model", "onnx"])
    assert not out.exists(), "created directory left behind"
    failed = [c for c in info.value.result.checks if not c["passed"]]
    assert {c["format"] for c in failed} == {"onnx"}
    # The message gives no path as if it had been written.
    paths = [line for line in str(info.value).splitlines()
             if line.startswith(("onnx:", "saved_model:"))]
    assert len(paths) == 2 and all(
        "not written (would have been" in line for line in paths), paths


def test_failed_writer_leaves_existing_files_alone(tmp_path, monkeypatch):
    model = randomize_normalizations(
        functional_model(), gamma=(0.5, 2.0), shift=1.0)
    (tmp_path / "keep.txt").write_text("user data")

    def broken(path, model, signature, options):
        with open(path, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(FORMATS["onnx"], "write", broken)
    with pytest.raises(ExportError, match="onnx artifact failed.*disk full"):
        kerasbn.export(model, tmp_path, formats=["saved_model", "onnx"])
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"]


def test_nan_outputs_fail_verification(tmp_path, monkeypatch):
    model = randomize_normalizations(
        sequential_model(), gamma=(0.5, 2.0), shift=1.0)

    def nan_run(path, signature, arrays):
        return [np.full((arrays[0].shape[0], 6), np.nan, "float32")]

    monkeypatch.setattr(FORMATS["keras"], "run", nan_run)
    with pytest.raises(VerificationError):
        kerasbn.export(model, tmp_path, formats=["keras"])


# --------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(formats=["pdf"]), ValueError, "Unknown export format.*pdf"),
        (dict(formats="saved_model,zip"), ValueError, "zip"),
        (dict(version=0), ValueError, "version.*0"),
        (dict(name="../evil"), ValueError, "not a safe file name"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, error, message):
    with pytest.raises(error, match=message):
        kerasbn.export(sequential_model(), tmp_path, **kwargs)
    assert os.listdir(tmp_path) == []


def test_not_a_model():
    with pytest.raises(TypeError, match="keras.Model.*ndarray"):
        kerasbn.export(np.zeros(3), "/tmp/never")


def test_output_path_is_a_file(tmp_path):
    target = tmp_path / "file"
    target.write_text("x")
    with pytest.raises(ExportError, match="not a directory"):
        kerasbn.export(sequential_model(), target, formats=["keras"])


def test_names_the_artifacts_change_are_noted(tmp_path):
    # A name a SavedModel signature or ONNX cannot carry (a leading digit,
    # a space) is changed in the artifacts, and the result says how.
    inputs = keras.Input((3,), name="1 in")
    model = keras.Model(inputs, keras.layers.Dense(2, name="1head")(inputs))
    result = kerasbn.export(model, tmp_path, formats=("keras",))
    said = " ".join(result.notes["signature"])
    assert "input '1 in' is named 'input_0_1_in'" in said
    assert "output '1head' is named 'output_0_1head'" in said


def test_an_unnamed_input_is_noted_with_the_name_a_reload_gives(tmp_path):
    # keras.Input without name=: this session calls the tensor
    # 'keras_tensor...', a saved and loaded copy calls it after its
    # InputLayer (found by a new user's trial: two exports of one model
    # served under two names). The note names both; a reload confirms it.
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inputs))
    result = kerasbn.export(model, tmp_path, formats=("keras",))
    reloaded = keras.saving.load_model(result.artifacts["keras"])
    said = " ".join(result.notes["signature"])
    assert f"input {inputs.name!r} has no name of its own" in said
    assert f"serves it as {reloaded.inputs[0].name!r}" in said
    named = keras.Input((3,), name="x")
    result = kerasbn.export(keras.Model(named, keras.layers.Dense(2)(named)),
                            tmp_path / "named", formats=("keras",))
    assert "signature" not in result.notes
