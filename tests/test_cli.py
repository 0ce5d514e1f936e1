"""`kerasbn-fold` run as a subprocess, as a user would run it.

The success case checks the artifacts against the original model with ONNX
Runtime and `tf.saved_model.load` in this process (independent of the
CLI's own verification); the error cases check the exit status, that the
reason is one line naming the problem, and that no traceback is printed.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import onnxruntime as ort
import pytest
import tensorflow as tf

import kerasbn  # noqa: F401  (registers kerasbn layers for loading)
from tests.helpers import assert_close_to_scale
from tests.helpers import randomize_normalizations

CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "kerasbn-fold")


def run_cli(*args, cwd=None, console_script=False):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    command = ([CONSOLE_SCRIPT] if console_script
               else [sys.executable, "-m", "kerasbn.cli"])
    return subprocess.run(command + [str(a) for a in args],
                          capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def assert_clean_failure(done, *fragments):
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines()
              if line.startswith("kerasbn-fold: error:")]
    assert len(errors) == 1, done.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture
def model_file(tmp_path):
    inputs = keras.Input((9, 9, 3), name="image")
    h = keras.layers.Conv2D(6, 3, use_bias=False)(inputs)
    h = kerasbn.layers.BatchNormalization(zero_debias="mean")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.SeparableConv2D(4, 3)(h)
    h = keras.layers.BatchNormalization()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(3, name="logits")(h)
    model = keras.Model(inputs, outputs, name="cli_net")
    randomize_normalizations(model, gamma=(0.5, 2.0), shift=1.0)
    path = tmp_path / "cli_net.keras"
    model.save(path)
    return path, model


def test_folds_exports_and_verifies(model_file, tmp_path):
    path, model = model_file
    out = tmp_path / "out"
    report = tmp_path / "report.json"
    done = run_cli(path, "-o", out, "--format", "saved_model,onnx,keras",
                   "--json", report, "--latency-runs", "5",
                   console_script=os.path.exists(CONSOLE_SCRIPT))
    assert done.returncode == 0, done.stderr
    for stage in ("loading", "folding", "writing saved_model",
                  "writing onnx", "verifying"):
        assert f"[kerasbn-fold] {stage}" in done.stdout
    assert "BN layers: 2 before, 2 folded" in done.stdout
    assert "parameters:" in done.stdout and "Keras latency" in done.stdout
    for fmt in ("saved_model", "onnx", "keras"):
        assert f"\n{fmt} " in done.stdout

    payload = json.loads(report.read_text())
    assert payload["passed"] is True
    assert payload["fold"]["summary"]["normalizations_after"] == 0
    assert payload["parameters"]["after"] < payload["parameters"]["before"]

    x = np.random.default_rng(0).standard_normal((3, 9, 9, 3)).astype(
        "float32")
    expected = model(x, training=False).numpy()
    session = ort.InferenceSession(str(out / "cli_net.onnx"),
                                   providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": x})[0]
    # 1e-4 of the output scale: see tests/test_export.py for the budget.
    assert_close_to_scale(got, expected, 1e-4, "onnx")
    served = tf.saved_model.load(str(out / "saved_model" / "cli_net" / "1"))
    got = served.signatures["serving_default"](image=tf.constant(x))["logits"]
    assert_close_to_scale(got.numpy(), expected, 1e-4, "saved_model")


def test_tools_wrapper_prints_help():
    tools = os.path.join(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))), "tools", "kerasbn_fold.py")
    done = subprocess.run([sys.executable, tools, "--help"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "--custom-module" in done.stdout and "--keep-bn" in done.stdout


def test_missing_file(tmp_path):
    done = run_cli(tmp_path / "nope.keras", "-o", tmp_path / "out")
    assert_clean_failure(done, "not found", "nope.keras")
    assert not (tmp_path / "out").exists()


def test_not_a_keras_model(tmp_path):
    bogus = tmp_path / "weights.keras"
    bogus.write_text("this is not a model")
    done = run_cli(bogus, "-o", tmp_path / "out")
    assert_clean_failure(done, "not a Keras model file")


def test_unknown_format(model_file, tmp_path):
    path, _ = model_file
    done = run_cli(path, "-o", tmp_path / "out", "--format", "onnx,caffe")
    assert_clean_failure(done, "unknown format", "caffe")
    assert not (tmp_path / "out").exists()


def test_unwritable_output_directory(model_file, tmp_path):
    path, _ = model_file
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    # Running as root ignores permission bits, so make the directory
    # impossible instead: a path below a regular file.
    done = run_cli(path, "-o", blocker / "out", "--format", "keras")
    assert_clean_failure(done, "Cannot create output directory")


CUSTOM_MODULE = textwrap.dedent('''
    import keras

    @keras.saving.register_keras_serializable(package="cli_test")
    class Doubler(keras.layers.Layer):
        def call(self, x):
            return 2.0 * x
''')


def test_custom_objects(tmp_path):
    module_path = tmp_path / "my_layers.py"
    module_path.write_text(CUSTOM_MODULE)
    script = textwrap.dedent(f'''
        import importlib.util, sys, keras
        spec = importlib.util.spec_from_file_location("my_layers",
                                                      {str(module_path)!r})
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        inputs = keras.Input((4,))
        h = keras.layers.Dense(3, use_bias=False)(inputs)
        h = keras.layers.BatchNormalization()(h)
        model = keras.Model(inputs, mod.Doubler()(h))
        model.save({str(tmp_path / "custom.keras")!r})
    ''')
    made = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, timeout=120,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert made.returncode == 0, made.stderr

    done = run_cli(tmp_path / "custom.keras", "-o", tmp_path / "out",
                   "--format", "keras")
    assert_clean_failure(done, "Doubler", "--custom-module")

    done = run_cli(tmp_path / "custom.keras", "-o", tmp_path / "out",
                   "--format", "keras,onnx", "--custom-module", module_path,
                   "--latency-runs", "0")
    assert done.returncode == 0, done.stderr
    assert "BN layers: 1 before, 1 folded" in done.stdout


def test_verification_failure_exit_code(model_file, tmp_path):
    path, _ = model_file
    # An impossible tolerance makes the (correct) artifacts fail the check:
    # exit 1, and nothing written.
    done = run_cli(path, "-o", tmp_path / "out", "--format", "keras",
                   "--rtol", "1e-30", "--latency-runs", "0")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "nothing was written" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux /proc")
def test_output_the_file_system_refuses_is_one_line(model_file):
    """Permission bits can say yes where the file system says no (root,
    /proc): found when the export writes, still exit 2 and one line."""
    path, _ = model_file
    done = run_cli(path, "-o", "/proc/kerasbn-cannot-write",
                   "--format", "keras", "--latency-runs", "0")
    assert_clean_failure(done, "/proc/kerasbn-cannot-write",
                         "Choose a writable location")

