"""Fuzz `kerasbn-fold` with corrupted model files and hostile statistics.

Every case must end in one of two ways: a verified artifact (exit 0), or a
one-line error (exit 2) with nothing written; never a traceback, a hang, or
a half-written output directory. The CLI runs in-process (`main(argv)`), so
a case costs a load, a fold and one verified `.keras` export, not a
TensorFlow start-up.
"""

import io
import os
import shutil
import tempfile
import zipfile

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

from kerasbn import cli

CASES = []  # (kind, exit code) of every case run, for the summary test.

_SETTINGS = settings(max_examples=30, deadline=None, derandomize=True,
                     suppress_health_check=[HealthCheck.function_scoped_fixture,
                                            HealthCheck.too_slow])


def _model(statistics=None):
    model = keras.Sequential([
        keras.Input((6, 6, 2), name="image"),
        keras.layers.Conv2D(3, 3, use_bias=False, name="conv"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.ReLU(name="relu"),
    ], name="fuzz")
    if statistics is not None:
        model.get_layer("bn").moving_variance.assign(statistics)
    return model


@pytest.fixture(scope="module")
def model_bytes():
    directory = tempfile.mkdtemp()
    path = os.path.join(directory, "model.keras")
    _model().save(path)
    with open(path, "rb") as f:
        data = f.read()
    shutil.rmtree(directory)
    return data


def _rewrite_zip(data, change):
    """The .keras zip with `change(name, bytes) -> bytes or None` applied."""
    source = zipfile.ZipFile(io.BytesIO(data))
    target = io.BytesIO()
    with zipfile.ZipFile(target, "w") as out:
        for item in source.infolist():
            content = change(item.filename, source.read(item.filename))
            if content is not None:
                out.writestr(item, content)
    return target.getvalue()


def _wrong_shape_weights(name, content):
    if not name.endswith(".h5"):
        return content
    directory = tempfile.mkdtemp()
    other = keras.Sequential([keras.Input((6, 6, 2)),
                              keras.layers.Conv2D(5, 2, use_bias=False),
                              keras.layers.BatchNormalization()])
    other.save(os.path.join(directory, "other.keras"))
    with zipfile.ZipFile(os.path.join(directory, "other.keras")) as z:
        weights = z.read(name)
    shutil.rmtree(directory)
    return weights


def _corrupt(data, kind, position, payload):
    if kind == "truncate":
        return data[: position % max(len(data), 1)]
    if kind == "flip":
        flipped = bytearray(data)
        for k, byte in enumerate(payload or b"\xff"):
            flipped[(position + 97 * k) % len(flipped)] ^= byte or 1
        return bytes(flipped)
    if kind == "garbage_config":
        return _rewrite_zip(data, lambda n, c: payload if n == "config.json"
                            else c)
    if kind == "missing_config":
        return _rewrite_zip(data, lambda n, c: None if n == "config.json"
                            else c)
    if kind == "wrong_weights":
        return _rewrite_zip(data, _wrong_shape_weights)
    raise AssertionError(kind)


def _run(path, capsys):
    out = tempfile.mkdtemp()
    shutil.rmtree(out)
    code = cli.main([path, "-o", out, "--format", "keras",
                     "--latency-runs", "0"])
    captured = capsys.readouterr()
    return code, captured.err, out


def _check_outcome(kind, code, err, out):
    CASES.append((kind, code))
    assert "Traceback" not in err, err
    if code == 0:
        assert os.listdir(out) == ["fuzz.keras"], os.listdir(out)
        return
    assert code == 2, (code, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("kerasbn-fold: error:"), err
    assert not os.path.exists(out) or not os.listdir(out), os.listdir(out)


@pytest.mark.slow
@_SETTINGS
@given(kind=st.sampled_from(["truncate", "flip", "garbage_config",
                             "missing_config", "wrong_weights"]),
       position=st.integers(0, 10**6),
       payload=st.binary(min_size=0, max_size=24))
def test_corrupted_model_files_end_cleanly(model_bytes, capsys, kind,
                                           position, payload):
    directory = tempfile.mkdtemp()
    try:
        path = os.path.join(directory, "model.keras")
        with open(path, "wb") as f:
            f.write(_corrupt(model_bytes, kind, position, payload))
        code, err, out = _run(path, capsys)
        _check_outcome(kind, code, err, out)
        if kind in ("missing_config", "wrong_weights", "garbage_config"):
            assert code == 2
    finally:
        shutil.rmtree(directory, ignore_errors=True)


_VALUES = st.sampled_from([0.0, 1e-12, 1.0, 1e30, -1.0, -1e-3, np.nan,
                           np.inf, -np.inf])


@pytest.mark.slow
@_SETTINGS
@given(variances=st.lists(_VALUES, min_size=3, max_size=3))
def test_hostile_statistics_end_cleanly(capsys, variances):
    directory = tempfile.mkdtemp()
    try:
        path = os.path.join(directory, "model.keras")
        _model(np.asarray(variances, "float32")).save(path)
        code, err, out = _run(path, capsys)
        _check_outcome("statistics", code, err, out)
        denominator = np.asarray(variances, np.float64) + 1e-3
        healthy = np.all(np.isfinite(denominator) & (denominator > 0))
        assert code == (0 if healthy else 2), (variances, err)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow
def test_fuzz_summary():
    """Report how many cases ran (visible with -rA or in the JSON log)."""
    if not CASES:
        pytest.skip("the fuzz tests did not run in this session")
    codes = sorted({code for _, code in CASES})
    print(f"fuzz: {len(CASES)} cases, exit codes {codes}")
    assert set(codes) <= {0, 2}
