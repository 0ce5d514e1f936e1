"""tf.keras' TensorFlow function calls (TFOpLambda) in Keras 3.

Each function `kerasbn.layers.TFFunction` translates is called, the way
tf.keras users call it, in a model written and saved by tf-keras itself
(`tests/keras2_files.py`, `TF_FUNCTION_CALLS`), and the loaded Keras 3
model must reproduce TensorFlow's own outputs on random inputs: the oracle
is TensorFlow's function as tf-keras ran it, not our translation.

Tolerance: 1e-6 of each output's largest magnitude. One function, one or
two float32 operations: TensorFlow and keras.ops call the same kernels on
the TensorFlow backend (exact), and differ by a rounding or two where
keras.ops composes (gelu, selu, bicubic resize) or another backend runs it.
"""

import importlib.util
import json

import keras
import numpy as np
import pytest

from kerasbn.layers import TFFunction
from kerasbn.layers.tf_function import FUNCTIONS
from kerasbn.sources import keras2
from kerasbn.sources.keras2 import Keras2Error
from tests.helpers import assert_close_to_scale
from tests.keras2_files import TF_FUNCTION_CALLS

if importlib.util.find_spec("tf_keras") is None:
    pytest.skip("tf-keras is not installed (pip install -e '.[test]')",
                allow_module_level=True)

REL = 1e-6
FUNCTION_INDEX = {name: k for k, name in enumerate(TF_FUNCTION_CALLS)}


def test_the_table_covers_every_translation():
    # keras2.hard_sigmoid is tested through the `users` model (an
    # Activation layer and a Dense layer's activation).
    assert set(TF_FUNCTION_CALLS) == set(FUNCTIONS) - {"keras2.hard_sigmoid"}


def _load(directory, name):
    model, notes = keras2.load_h5(directory / f"{name}.h5")
    arrays = np.load(directory / f"{name}.npz")
    inputs = [arrays[k] for k in sorted(arrays) if k.startswith("input_")]
    expected = [arrays[k] for k in sorted(arrays) if k.startswith("output_")]
    return model, notes, inputs, expected


@pytest.mark.any_backend
@pytest.mark.parametrize("function", sorted(TF_FUNCTION_CALLS))
def test_translation_reproduces_tensorflow(keras2_dir, function):
    name = f"ops_{FUNCTION_INDEX[function]}"
    saved = json.loads((keras2_dir / f"{name}.json").read_text())
    # The name tf-keras writes is the table's key (so the key is reachable).
    assert function in saved
    model, notes, inputs, expected = _load(keras2_dir, name)
    outputs = model(inputs, training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    assert len(outputs) == len(expected)
    for k, (actual, wanted) in enumerate(zip(outputs, expected)):
        if "bicubic" in TF_FUNCTION_CALLS[function][k] and (
                keras.backend.backend() != "tensorflow"):
            # Keras' own backends disagree here: JAX's cubic kernel treats
            # the borders otherwise than TensorFlow's (2e-3 of the scale
            # measured); the TFFunction docstring says so.
            continue
        actual = keras.ops.convert_to_numpy(actual)
        assert actual.shape == wanted.shape, (function, k)
        assert_close_to_scale(actual, wanted, REL,
                              f"{function}: {TF_FUNCTION_CALLS[function][k]}")
    assert any("TFFunction" in note for note in notes)


def test_translated_model_saves_and_reloads_without_custom_code(
        keras2_dir, tmp_path):
    model, _, inputs, expected = _load(keras2_dir, "users")
    path = tmp_path / "users.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert any(isinstance(layer, TFFunction) for layer in reloaded.layers)
    assert_close_to_scale(keras.ops.convert_to_numpy(
        reloaded(inputs[0], training=False)), expected[0], 1e-5, "users")


@pytest.mark.any_backend
@pytest.mark.parametrize("name, rel", [
    ("users", 1e-5),
    # float16 compute on both sides, rounded at other points (tf-keras'
    # BN computes in float32 and casts once): 4 float16 ulps of the scale.
    ("users_mixed", 4 * 2.0**-10)])
def test_users_tf_keras_code_reproduces_tf_keras(keras2_dir, name, rel):
    model, notes, inputs, expected = _load(keras2_dir, name)
    actual = keras.ops.convert_to_numpy(model(inputs[0], training=False))
    assert_close_to_scale(actual, expected[0], rel, name)
    assert sum("hard_sigmoid" in note for note in notes) == 2


def _edited_copy(source, target, edit):
    import h5py
    import shutil

    shutil.copy(source, target)
    with h5py.File(target, "r+") as h5:
        config = json.loads(h5.attrs["model_config"])
        edit(config)
        h5.attrs["model_config"] = json.dumps(config)
    return target


def test_untranslated_function_is_refused_in_one_line(keras2_dir, tmp_path):
    def edit(config):
        for layer in config["config"]["layers"]:
            if layer["class_name"] == "TFOpLambda":
                layer["config"]["function"] = "signal.rfft"
                return

    path = _edited_copy(keras2_dir / "users.h5", tmp_path / "edited.h5",
                        edit)
    with pytest.raises(Keras2Error) as error:
        keras2.load_h5(path)
    message = str(error.value)
    assert "tf.signal.rfft" in message and "layer 'tf." in message
    assert "SavedModel" in message and "\n" not in message


@pytest.mark.parametrize("function, arguments, problem", [
    ("signal.rfft", {"input": {"__tensor__": 0}}, "function='signal.rfft'"),
    ("math.add", [1, 2], "arguments must be a dict"),
])
def test_tf_function_layer_checks_its_arguments(function, arguments,
                                                problem):
    with pytest.raises(ValueError, match=problem.replace("(", r"\(")):
        TFFunction(function, arguments)


@pytest.mark.slow
def test_users_tf_keras_code_folds_and_exports(keras2_dir, tmp_path,
                                               capsys):
    """The `users` model (TFOpLambda hard-swish, squeeze-excite, resize,
    concat, slicing; an unnamed input; a nested Sequential) through
    kerasbn-fold: every BN folded, SavedModel and ONNX within 1e-5 of
    tf-keras' output scale (a shallow network: float32 reordering is
    ~1e-7 per layer)."""
    import onnxruntime as ort
    import tensorflow as tf

    from kerasbn import cli

    out = tmp_path / "out"
    status = cli.main([str(keras2_dir / "users.h5"), "-o", str(out),
                       "--format", "saved_model,onnx", "--latency-runs", "0",
                       "--json", str(tmp_path / "report.json")])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    report = json.loads((tmp_path / "report.json").read_text())
    # Two BNs follow a convolution and fold; the side branch's follows a
    # resize and precedes a ReLU, so it becomes one ScaleShift.
    summary = report["fold"]["summary"]
    assert (summary["folded"], summary["replaced"], summary["kept"]) == (
        2, 1, 0)
    arrays = np.load(keras2_dir / "users.npz")
    x, expected = arrays["input_0"], arrays["output_0"]
    loaded = tf.saved_model.load(str(out / "saved_model" / "users" / "1"))
    function = loaded.signatures["serving_default"]
    (key,) = function.structured_input_signature[1]
    (actual,) = function(**{key: tf.constant(x)}).values()
    assert_close_to_scale(actual.numpy(), expected, 1e-5, "saved_model")
    session = ort.InferenceSession(str(out / "users.onnx"),
                                   providers=["CPUExecutionProvider"])
    (actual,) = session.run(None, {session.get_inputs()[0].name: x})
    assert_close_to_scale(actual, expected, 1e-5, "onnx")
