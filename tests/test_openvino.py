"""OpenVINO IR artifacts, verified in OpenVINO's CPU plugin (issue 31).

Oracles: the unfolded Keras model in inference mode, and OpenVINO itself,
driven here the way a server drives it: `ov.Core().compile_model(xml,
"CPU", plugin_config)` with the `plugin_config` read from the written
`config.json`, and `compile_model(xml, "CPU")` at the plain defaults, whose
inference precision OpenVINO reports (bf16 on CPUs with AVX512-BF16/AMX,
like this one; f32 elsewhere). ONNX Runtime is the second oracle for the
int8 ONNX file.

Tolerances: float32 IR compiled with f32 precision, 1e-5 of the output
scale (the fold's float32 rounding and OpenVINO's own summation order give
~3e-7 here; a dropped or doubled BN is off by O(1)). bfloat16 is held to
`_openvino.BF16_RTOL` (8 bfloat16 unit roundoffs, reasons there).
"""

import gc
import json
import os
import warnings

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn import cli
from kerasbn.exporting import _openvino
from kerasbn.exporting import ExportError
from kerasbn.exporting import VerificationError
from kerasbn.exporting.formats import FORMATS
from tests.helpers import assert_close_to_scale
from tests.helpers import randomize_normalizations
from tests.helpers import to_numpy

ov = pytest.importorskip(
    "openvino", reason="OpenVINO is not installed: pip install "
    "'kerasbn[openvino]' (make test installs it)")

RTOL = 1e-5
TF_ONLY = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                             reason="TensorFlow runs these; the JAX and "
                             "PyTorch export path is the first test's")
BF16_CPU = "BF16" in ov.Core().get_property("CPU",
                                            "OPTIMIZATION_CAPABILITIES")
NEEDS_BF16 = pytest.mark.skipif(not BF16_CPU, reason="this CPU has no "
                                "bfloat16 (OpenVINO's defaults are f32 here)")


def small_model(name="net"):
    inputs = keras.Input((12, 12, 3), name="image")
    h = keras.layers.Conv2D(8, 3, use_bias=False)(inputs)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.DepthwiseConv2D(3)(h)
    h = kerasbn.layers.BatchNormalization()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(6, name="logits")(h)
    model = keras.Model(inputs, outputs, name=name)
    randomize_normalizations(model, seed=3)
    return model


def images(n, size=12, seed=0):
    return np.random.default_rng(seed).uniform(
        -1, 1, (n, size, size, 3)).astype("float32")


def served(directory, name, version=1):
    """`(xml path, plugin_config)` as a model server reads them."""
    with open(os.path.join(directory, "openvino", name,
                           "config.json")) as f:
        config = json.load(f)["model_config_list"][0]["config"]
    base = os.path.join(directory, "openvino", name, config["base_path"])
    return (os.path.join(base, str(version), "model.xml"),
            config["plugin_config"])


def run_ir(xml, x, config, input_name=0):
    """`(first output, inference precision the plugin reports)` of the
    model at `xml` (IR or ONNX) compiled with `config`.

    Nothing of OpenVINO outlives the call. When this helper returned the
    compiled model, the test that held it left OpenVINO's CPU plugin
    loaded, and test_recalibrate_atomic's Ctrl-C test, later in the same
    process, died with SIGSEGV instead of KeyboardInterrupt (README:
    Limits)."""
    core = ov.Core()
    compiled = core.compile_model(xml, "CPU", config)
    result = compiled.create_infer_request().infer(
        {input_name: x} if isinstance(input_name, str) else [x])
    output = np.array(result[compiled.output(0)])
    precision = compiled.get_property(
        "INFERENCE_PRECISION_HINT").get_type_name()
    del result, compiled, core
    gc.collect()
    return output, precision


@pytest.mark.any_backend
def test_ir_in_model_server_layout_runs_as_the_model_with_its_config(
        tmp_path):
    model = small_model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = kerasbn.export(model, tmp_path, formats=("openvino",))
    assert result.artifacts["openvino"] == str(tmp_path / "openvino" / "net"
                                               / "1")
    assert sorted(os.listdir(tmp_path / "openvino" / "net" / "1")) == [
        "model.bin", "model.xml"]
    xml, config = served(tmp_path, "net")
    assert config == {"INFERENCE_PRECISION_HINT": "f32"}
    # Dynamic batch, the user's input and output names, BN folded away,
    # float32 weights (OpenVINO's own default would store float16).
    ir = ov.Core().read_model(xml)
    names = (ir.input(0).get_any_name(), ir.output(0).get_any_name())
    assert names == ("image", "logits")
    assert ir.input(0).get_partial_shape()[0].is_dynamic
    ops = {op.get_type_name() for op in ir.get_ops()}
    assert not ops & {"BatchNormInference", "MVN"}, ops
    constants = {op.get_output_element_type(0).get_type_name()
                 for op in ir.get_ops() if op.get_type_name() == "Constant"}
    assert "f16" not in constants, constants
    del ir
    for n in (1, 7):
        x = images(n, seed=n)
        got, precision = run_ir(xml, x, config)
        assert precision == "f32"
        assert_close_to_scale(got, model(x, training=False), RTOL)
    # What the plain defaults do is stated, measured as a server would.
    check = result.checks[-1]
    _, precision = run_ir(xml, images(4, seed=4), {})
    assert check["defaults"]["precision"] == precision
    assert check["runtime_precision"] == "f32"
    warned = [w for w in caught if "plain defaults" in str(w.message)]
    if precision == "bf16":
        # bfloat16 rounds at 2**-8: far past rtol, and said once.
        assert check["defaults"]["rel_error"] > 1e-4
        assert len(warned) == 1 and "bf16" in str(warned[0].message)
        assert "WARNING" in str(result)
    else:
        assert not warned


@TF_ONLY
@pytest.mark.slow
@pytest.mark.parametrize("application", ["MobileNetV2", "ResNet50"])
def test_stock_applications(tmp_path, application):
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, application)(
        weights=None, input_shape=(64, 64, 3), classifier_activation=None)
    randomize_normalizations(model, seed=1)
    x = images(2, 64, seed=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = kerasbn.export(model, tmp_path, formats=("openvino",),
                                sample=x)
    xml, config = served(tmp_path, model.name)
    got, _ = run_ir(xml, x, config, model.inputs[0].name)
    assert_close_to_scale(got, model(x, training=False), RTOL)
    defaults = result.checks[-1]["defaults"]
    if BF16_CPU:  # The issue measured ~3e-3..6e-3 at bf16.
        assert defaults["precision"] == "bf16"
        assert 1e-4 < defaults["rel_error"] < 0.1, defaults


@TF_ONLY
@NEEDS_BF16
def test_bf16_is_pinned_and_verified_at_its_stated_bound(tmp_path):
    model = small_model()
    result = kerasbn.export(model, tmp_path, formats=("openvino",),
                            openvino_precision="bf16")
    xml, config = served(tmp_path, "net")
    assert config == {"INFERENCE_PRECISION_HINT": "bf16"}
    x = images(5, seed=9)
    got, precision = run_ir(xml, x, config)
    assert precision == "bf16"
    assert_close_to_scale(got, model(x, training=False),
                          _openvino.BF16_RTOL)
    assert {c["rtol"] for c in result.checks} == {_openvino.BF16_RTOL}
    assert {c["runtime_precision"] for c in result.checks} == {"bf16"}
    # The IR itself is also held to the float tolerance at f32, so a wrong
    # artifact cannot hide inside the bfloat16 bound.
    exact, _ = run_ir(xml, x, _openvino.F32)
    assert_close_to_scale(exact, model(x, training=False), RTOL)
    assert all(c["f32"]["passed"] and c["f32"]["rel_error"] <= 1e-4
               for c in result.checks)


@TF_ONLY
@NEEDS_BF16
def test_a_config_that_does_not_pin_float32_is_caught(tmp_path,
                                                      monkeypatch):
    # Planted: a config.json without the precision hint (what a server
    # would use by default). Verification compiles with the file's
    # configuration, so it meets bf16 and refuses; nothing is written.
    fmt = FORMATS["openvino"]
    real = fmt.companions

    def unpinned(name, version, options, directory):
        files = []
        for path, data, conflict in real(name, version, options, directory):
            config = json.loads(data)
            config["model_config_list"][0]["config"]["plugin_config"] = {}
            files.append((path, json.dumps(config).encode(), conflict))
        return files

    monkeypatch.setattr(fmt, "companions", unpinned)
    with pytest.raises(VerificationError) as caught:
        kerasbn.export(small_model(), tmp_path / "out",
                       formats=("openvino",))
    assert not caught.value.result.passed
    assert not (tmp_path / "out").exists() or not os.listdir(
        tmp_path / "out")


@TF_ONLY
def test_versions_share_the_config_which_keeps_the_servers_settings(
        tmp_path):
    model = small_model()
    kerasbn.export(model, tmp_path, formats=("openvino",), verify=False)
    config = tmp_path / "openvino" / "net" / "config.json"
    # The server's own settings, added by hand, stay through a new version;
    # verification compiles with them too.
    edited = json.loads(config.read_text())
    entry = edited["model_config_list"][0]["config"]
    entry["nireq"] = 4
    entry["plugin_config"]["PERFORMANCE_HINT"] = "LATENCY"
    config.write_text(json.dumps(edited))
    before = config.read_bytes()
    result = kerasbn.export(model, tmp_path, formats=("openvino",),
                            version=2)
    assert config.read_bytes() == before
    assert {c["runtime_precision"] for c in result.checks} == {"f32"}
    assert sorted(os.listdir(tmp_path / "openvino" / "net")) == [
        "1", "2", "config.json"]
    # Another precision would change what versions 1 and 2 serve: refused,
    # saying so, unless overwrite (which keeps the other settings, warns
    # and notes it).
    with pytest.raises(ExportError, match=r"configuration: .*config.json "
                       r"pins f32 for every version of 'net' \(versions "
                       r"there: 1, 2\) and this export pins bf16\. "
                       r"overwrite=True changes it"):
        kerasbn.export(model, tmp_path, formats=("openvino",), version=3,
                       verify=False, openvino_precision="bf16")
    assert config.read_bytes() == before
    assert not (tmp_path / "openvino" / "net" / "3").exists()
    with pytest.warns(UserWarning, match="overwrite=True changed .* the "
                      "versions already there now serve under the new"):
        result = kerasbn.export(model, tmp_path, formats=("openvino",),
                                version=3, verify=False,
                                openvino_precision="bf16", overwrite=True)
    entry = json.loads(config.read_text())["model_config_list"][0]["config"]
    assert entry["plugin_config"] == {"INFERENCE_PRECISION_HINT": "bf16",
                                      "PERFORMANCE_HINT": "LATENCY"}
    assert entry["nireq"] == 4
    assert any("overwrite=True changed" in n
               for n in result.notes["openvino"])
    # A file that is not a configuration is refused, not parsed around.
    config.write_text("not json")
    with pytest.raises(ExportError, match="is not one kerasbn can update "
                       r"\(JSONDecodeError"):
        kerasbn.export(model, tmp_path, formats=("openvino",), version=4,
                       verify=False)
    # EXECUTION_MODE_HINT=ACCURACY pins float32 too (found by a new user's
    # trial): accepted as it is, and verified as such.
    entry["plugin_config"] = {"EXECUTION_MODE_HINT": "ACCURACY"}
    config.write_text(json.dumps({"model_config_list": [{"config": entry}]}))
    before = config.read_bytes()
    result = kerasbn.export(model, tmp_path, formats=("openvino",),
                            version=4)
    assert config.read_bytes() == before
    assert {c["runtime_precision"] for c in result.checks} == {"f32"}
    # A setting OpenVINO refuses is named with OpenVINO's own reason.
    entry["plugin_config"]["NUM_STREAMS"] = "bogus"
    config.write_text(json.dumps({"model_config_list": [{"config": entry}]}))
    with pytest.raises(ExportError, match=r"bogus.*plugin_config of its "
                       "config.json"):
        kerasbn.export(model, tmp_path, formats=("openvino",), version=5)


def test_bad_precision_and_missing_openvino_are_said_before_any_work(
        tmp_path, monkeypatch):
    model = small_model()
    with pytest.raises(ValueError, match=r"openvino_precision.*'fp16'"):
        kerasbn.export(model, tmp_path, formats=("openvino",),
                       openvino_precision="fp16")
    with pytest.raises(ValueError, match=r"openvino_precision='bf16'.*not "
                       r"among formats \['onnx'\]"):
        kerasbn.export(model, tmp_path, formats=("onnx",),
                       openvino_precision="bf16")
    monkeypatch.setitem(__import__("sys").modules, "openvino", None)
    with pytest.raises(ImportError, match=r"kerasbn\[openvino\]"):
        kerasbn.export(model, tmp_path, formats=("onnx", "openvino"))
    assert not os.listdir(tmp_path)


@TF_ONLY
def test_int8_onnx_also_runs_in_openvino_with_figures(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = small_model()
    x = images(64, seed=11)
    result = kerasbn.export(model, tmp_path, formats=("onnx_int8",),
                            calibration=x)
    figures = result.reduced_checks()["onnx_int8"]["openvino"]
    # Independently: the written file in each runtime, against the model.
    path = result.artifacts["onnx_int8"]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    by_ort = session.run(None, {"image": x})[0]
    by_ov, _ = run_ir(path, x, {"INFERENCE_PRECISION_HINT": "f32"})
    want = np.asarray(to_numpy(model(x, training=False)), np.float64)

    def rel_rms(a, b):
        return np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2))

    assert figures["rel_rms"] == pytest.approx(rel_rms(by_ov, want),
                                               rel=1e-3)
    assert figures["rel_rms_vs_onnxruntime"] == pytest.approx(
        rel_rms(by_ov, by_ort), rel=1e-3, abs=1e-7)
    agreement = np.mean(by_ov.argmax(1) == want.argmax(1))
    assert figures["agreement"] == pytest.approx(agreement)
    assert figures["passed"] and figures["rel_rms"] < 0.1
    plain, precision = run_ir(path, x, {})
    assert figures["defaults"]["precision"] == precision
    assert figures["defaults"]["rel_rms"] == pytest.approx(
        rel_rms(plain, want), rel=1e-3)
    assert "onnx_int8 in OpenVINO" in str(result)


@TF_ONLY
def test_cli_and_a_savedmodel_source(tmp_path, capsys):
    model = small_model()
    model.save(tmp_path / "net.keras")
    # An option for a format not asked for is refused with the arguments.
    assert cli.main([str(tmp_path / "net.keras"), "-o", str(tmp_path / "x"),
                     "--format", "onnx", "--openvino-precision",
                     "bf16"]) == 2
    assert "applies to the openvino format" in capsys.readouterr().err
    assert cli.main([str(tmp_path / "net.keras"), "-o", str(tmp_path / "a"),
                     "--format", "openvino", "--latency-runs", "0"]) == 0
    printed = capsys.readouterr()
    assert "at OpenVINO's plain defaults" in printed.out
    assert "serve with" in printed.out and "config.json" in printed.out
    warned = [line for line in printed.err.splitlines()
              if "warning: OpenVINO at its plain defaults" in line]
    if BF16_CPU:
        assert "WARNING" in printed.out
        assert len(warned) == 1 and "config.json" in warned[0]
    # A SavedModel (no Keras code) folds at graph level into the same IR.
    model.export(str(tmp_path / "sm"), verbose=False)
    assert cli.main([str(tmp_path / "sm"), "-o", str(tmp_path / "b"),
                     "--format", "openvino", "--latency-runs", "0",
                     "--openvino-precision", "f32"]) == 0
    xml, config = served(tmp_path / "b", "sm")
    x = images(3, seed=2)
    got, _ = run_ir(xml, x, config)
    assert_close_to_scale(got, model(x, training=False), RTOL)


def test_mixed_precision_policy_is_refused_with_the_openvino_way(tmp_path):
    # OpenVINO picks the compute precision when it compiles: a float16 IR
    # would not stay float16. The float32 twin plus openvino_precision is
    # the way, and the refusal says so before anything is written.
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = small_model()
    finally:
        keras.config.set_dtype_policy(previous)
    with pytest.raises(ValueError, match=r"openvino \(OpenVINO sets the "
                       r"compute precision.*openvino_precision"):
        kerasbn.export(model, tmp_path, formats=("openvino",),
                       precision="policy")
    assert not os.listdir(tmp_path)

