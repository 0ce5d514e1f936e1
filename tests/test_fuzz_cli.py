"""Fuzz `kerasbn-fold` with corrupted model files and hostile statistics.

Every case must end in one of two ways: a verified artifact (exit 0), or a
one-line error (exit 2) with nothing written; never a traceback, a hang, or
a half-written output directory. Exit 1 ("the artifacts do not reproduce
the model") is never the answer to a bad file. The CLI runs in-process
(`main(argv)`), so a case costs a load, a fold and one verified export
(`.keras` for Keras files, a SavedModel for graphs), not a TensorFlow
start-up.

The sources: a Keras 3 `.keras` file written here; the Keras 2 `.h5` file
and SavedModel directory tf-keras writes (the session's `keras2_dir`),
truncated or bit-flipped in `model.h5`, `saved_model.pb`,
`variables/variables.data-*` and `variables/variables.index`; a TF1 frozen
`.pb`. A truncated file is always refused (each format records its own
length or ends with a footer); a flipped bit may land in bytes nothing
checks (an HDF5 weight, a SavedModel's debug strings) and give a model
that exports.
"""

import collections
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


def _run(path, capsys, fmt="keras"):
    out = tempfile.mkdtemp()
    shutil.rmtree(out)
    code = cli.main([path, "-o", out, "--format", fmt,
                     "--latency-runs", "0"])
    captured = capsys.readouterr()
    return code, captured.err, out


def _check_outcome(kind, code, err, out, written=("fuzz.keras",)):
    """Exit 0 with `written` in `out`, or exit 2 with one line (naming
    nothing in particular: each test checks what its line names)."""
    CASES.append((kind, code))
    assert "Traceback" not in err, err
    if code == 0:
        assert sorted(os.listdir(out)) == sorted(written), os.listdir(out)
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


# Few examples per source: a case is a load and a small export (0.1-0.5 s
# warm), and the cases that matter are the kinds, each drawn several times.
_FILE_SETTINGS = settings(_SETTINGS, max_examples=12)


def _damage(data, kind, position):
    """`data` truncated at, or with one byte inverted at, `position`
    (modulo its length)."""
    if kind == "truncate":
        return data[: position % max(len(data), 1)]
    flipped = bytearray(data)
    flipped[position % len(flipped)] ^= 0xFF
    return bytes(flipped)


def _damaged_copy(source, directory, relpath, kind, position):
    """A copy of file or directory `source` in `directory` whose file
    `relpath` (inside it; "" for the file itself) is damaged."""
    target = os.path.join(directory, os.path.basename(source))
    if os.path.isdir(source):
        shutil.copytree(source, target)
    else:
        shutil.copy(source, target)
    victim = os.path.join(target, relpath) if relpath else target
    with open(victim, "rb") as f:
        data = f.read()
    with open(victim, "wb") as f:
        f.write(_damage(data, kind, position))
    return target


def _one_line(err):
    return [line for line in err.splitlines() if line.strip()][0]


@pytest.mark.slow
@_FILE_SETTINGS
@given(kind=st.sampled_from(["truncate", "flip"]),
       position=st.integers(0, 10**6))
def test_corrupted_keras2_h5_files_end_cleanly(keras2_dir, capsys, kind,
                                               position):
    directory = tempfile.mkdtemp()
    try:
        path = _damaged_copy(str(keras2_dir / "model.h5"), directory, "",
                             kind, position)
        code, err, out = _run(path, capsys)
        _check_outcome(f"h5 {kind}", code, err, out,
                       written=["renorm_model.keras"])
        if kind == "truncate":
            # HDF5 records the file's length: never read as a model.
            assert code == 2 and "model.h5" in _one_line(err), err
    finally:
        shutil.rmtree(directory, ignore_errors=True)


_SAVED_MODEL_FILES = ["saved_model.pb",
                      os.path.join("variables",
                                   "variables.data-00000-of-00001"),
                      os.path.join("variables", "variables.index")]


@pytest.mark.slow
@_FILE_SETTINGS
@given(relpath=st.sampled_from(_SAVED_MODEL_FILES),
       kind=st.sampled_from(["truncate", "flip"]),
       position=st.integers(0, 10**6))
def test_corrupted_saved_models_end_cleanly(keras2_dir, capsys, relpath,
                                            kind, position):
    directory = tempfile.mkdtemp()
    try:
        path = _damaged_copy(str(keras2_dir / "keras2_savedmodel"),
                             directory, relpath, kind, position)
        code, err, out = _run(path, capsys, fmt="saved_model")
        _check_outcome(f"saved_model {kind}", code, err, out,
                       written=["saved_model"])
        if kind == "truncate":
            # A protocol buffer cut inside its one MetaGraph does not
            # parse, the variables' index ends with a footer and records
            # each tensor's offset and checksum in the data file.
            assert code == 2, err
        if code == 2 and kind == "truncate":
            assert os.path.basename(relpath) in _one_line(err), err
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _frozen_graph_bytes():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    graph = tf.Graph()
    with graph.as_default():
        x = tf.compat.v1.placeholder(tf.float32, (None, 6, 6, 2), name="x")
        y = tf.nn.conv2d(x, rng.normal(size=(3, 3, 2, 3)).astype("float32"),
                         1, "VALID")
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(
            y, np.ones(3, "float32"), np.zeros(3, "float32"),
            mean=rng.normal(size=3).astype("float32"),
            variance=rng.uniform(0.5, 2, size=3).astype("float32"),
            is_training=False)
        tf.nn.relu(y, name="out")
    return graph.as_graph_def().SerializeToString()


@pytest.fixture(scope="module")
def frozen_graph_bytes():
    return _frozen_graph_bytes()


@pytest.mark.slow
@_FILE_SETTINGS
@given(kind=st.sampled_from(["truncate", "flip"]),
       position=st.integers(0, 10**6))
def test_corrupted_frozen_graphs_end_cleanly(frozen_graph_bytes, capsys,
                                             kind, position):
    directory = tempfile.mkdtemp()
    try:
        path = os.path.join(directory, "frozen.pb")
        with open(path, "wb") as f:
            f.write(_damage(frozen_graph_bytes, kind, position))
        code, err, out = _run(path, capsys, fmt="saved_model")
        # A protocol buffer has no checksum: a cut between two nodes or a
        # flip in a weight still reads, as a smaller or other graph.
        _check_outcome(f"pb {kind}", code, err, out, written=["saved_model"])
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
    by_kind = collections.Counter(CASES)
    print(f"fuzz: {len(CASES)} cases, exit codes {codes}; "
          + ", ".join(f"{kind} -> {code}: {n}"
                      for (kind, code), n in sorted(by_kind.items())))
    assert set(codes) <= {0, 2}
