"""`examples/int8.py`: a smoke run whose figures are checked against the
artifacts it wrote, run again here in ONNX Runtime and the TFLite
interpreter on the digits test split (the independent oracle), and
against the issue's bounds (int8: at most one point of accuracy lost,
>= 98% top-1 agreement with the float model)."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.helpers import load_example

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                       reason="int8 formats are written on TensorFlow"),
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "int8.py"), "--quick",
         "--runs", "5", "--out-dir", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env=dict(os.environ, KERAS_BACKEND="tensorflow"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    with open(out / "int8.json") as f:
        return out, json.load(f), done.stdout


def test_every_variant_is_measured_and_the_files_agree(run):
    out, summary, stdout = run
    example = load_example("int8")
    assert list(summary["artifacts"]) == list(example.VARIANTS)
    assert os.path.getsize(out / "int8.png") > 10_000
    x_train, x_test, y_train, y_test = load_example("_digits").load_data()
    for label, row in summary["artifacts"].items():
        assert row["bytes"] == os.path.getsize(row["path"]), label
        assert row["latency_ms"] > 0 and label in stdout
        logits = example.predict(example.runner(row["path"]), x_test)
        accuracy = float(np.mean(logits.argmax(-1) == y_test))
        assert accuracy == pytest.approx(row["accuracy"], abs=1e-9), label
    floats = summary["float_accuracy"]
    assert floats > 0.9
    for label in ("int8 ONNX, per-channel", "int8 TFLite"):
        row = summary["artifacts"][label]
        assert row["accuracy"] >= floats - 0.01, label
        assert row["agreement"] >= 0.98, label
        assert row["worst_layer"]["layer"] in {
            e["layer"] for e in summary["numerics"]["entries"]}
    # The spread rows: same float function (gap ~ rounding), per-tensor
    # int8 breaks it, equalization restores it.
    assert summary["spread_float_gap"] < 1e-4
    rows = summary["artifacts"]
    fixed = rows["spread: int8 ONNX, per-tensor + equalize"]["accuracy"]
    assert fixed >= floats - 0.01
    assert rows["spread: int8 ONNX, per-tensor"]["accuracy"] < fixed - 0.1
    sizes = {k: r["bytes"] for k, r in summary["artifacts"].items()}
    assert sizes["int8 ONNX, per-channel"] < sizes["float32 ONNX"] / 2
    assert summary["numerics"]["worst"] is not None
