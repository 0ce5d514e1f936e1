"""`recalibrate(..., inplace=True)` is all or nothing.

Each stage needs the statistics of the stages before it in place. A layer
graph's stages run on the model itself inside a `keras.StatelessScope`,
which holds the statistics as they are found, and the model is written
once, at the end; a model with an opaque call (a custom layer holding
normalizations) has them written into it stage by stage and written back
on error. Either way an error in a later stage (the data raise, the disk
is full, Ctrl-C, a second Ctrl-C while the old values are written back)
must leave every weight of the model bit for bit as it was. Each failure
below is injected only once the first stage's statistics are in place
(checked where it is injected: the data are read inside the scope), so a
statistic written early and not restored fails the test. Spill
directories of runs killed outright are removed by the next run.
"""

import errno
import importlib
import os
import signal

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.stats import _collect
from kerasbn.stats import _staged
from tests.helpers import random_batch
from tests.helpers import randomize_normalizations
from tests.helpers import to_numpy


@pytest.fixture(autouse=True)
def _sigint_raises():
    """SIGINT raises KeyboardInterrupt here, as in a terminal: a process
    started in the background by a non-interactive shell (`make test`
    runs the JAX suite with `&`) inherits SIGINT ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)

pytestmark = pytest.mark.any_backend

L = keras.layers


def _model():
    """Three normalizations one after another: three stages."""
    model = keras.Sequential([
        keras.Input((4,)),
        L.Dense(5, name="d1"), L.BatchNormalization(name="bn1"),
        L.Dense(5, name="d2"), L.BatchNormalization(name="bn2"),
        L.Dense(5, name="d3"), L.BatchNormalization(name="bn3"),
    ])
    return randomize_normalizations(model, seed=5)


class _Opaque(L.Layer):
    """A custom layer holding a normalization: an opaque call, so the
    model's statistics are written into it stage by stage."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(5, name="inner_d")
        self.norm = L.BatchNormalization(name="inner_bn")

    def call(self, x, training=None):
        return self.norm(self.dense(x), training=training)


def _opaque_model():
    """bn1, then an opaque call holding a normalization."""
    model = keras.Sequential([
        keras.Input((4,)),
        L.Dense(5, name="d1"), L.BatchNormalization(name="bn1"),
        _Opaque(name="block"),
    ])
    return randomize_normalizations(model, seed=5)


def _weights(model):
    return [np.array(to_numpy(w)) for w in model.weights]


def _assert_unchanged(before, model):
    after = _weights(model)
    assert len(before) == len(after)
    for old, new, weight in zip(before, after, model.weights):
        assert old.dtype == new.dtype, weight.path
        np.testing.assert_array_equal(old, new, err_msg=weight.path)


class _Data:
    """Batches of `x`, read anew on every pass; once bn1's statistics
    have changed (a later stage runs), `fail()` is called at a batch."""

    def __init__(self, model, fail):
        self.x = random_batch((96, 4), seed=2, loc=1.0, scale=2.0)
        self.bn1 = model.get_layer("bn1")
        self.old = np.array(to_numpy(self.bn1.moving_mean))
        self.fail = fail
        self.failed = False

    def __iter__(self):
        for start in range(0, len(self.x), 32):
            if start and not np.array_equal(
                    to_numpy(self.bn1.moving_mean), self.old):
                self.failed = True
                self.fail()
            yield self.x[start:start + 32]


def _raise(error):
    def fail():
        raise error
    return fail


def _sigint():
    os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize("fail, expected", [
    (_raise(RuntimeError("the data source broke")), RuntimeError),
    (_raise(KeyboardInterrupt()), KeyboardInterrupt),
    (_sigint, KeyboardInterrupt),
], ids=["error", "keyboard_interrupt", "sigint"])
def test_a_failure_in_a_later_stage_leaves_every_weight(fail, expected):
    model = _model()
    before = _weights(model)
    data = _Data(model, fail)
    with pytest.raises(expected):
        # cache="none": every stage reads the data again.
        kerasbn.recalibrate(model, data, inplace=True, cache="none",
                            verbose=0)
    assert data.failed  # In a stage after bn1's.
    _assert_unchanged(before, model)


def test_a_full_disk_while_spilling_leaves_every_weight(tmp_path,
                                                        monkeypatch):
    model = _model()
    before = _weights(model)
    bn1, old = model.get_layer("bn1"), _weights(model.get_layer("bn1"))
    saved = []
    save = np.save

    def full_disk(path, array):
        if not np.array_equal(_weights(bn1)[2], old[2]):  # stage 2 on
            raise OSError(errno.ENOSPC, "No space left on device")
        saved.append(path)
        save(path, array)

    monkeypatch.setattr(_staged.np, "save", full_disk)
    x = random_batch((96, 4), seed=2)
    with pytest.raises(OSError, match=r"cannot keep .* MiB of activations "
                       r"on disk in .*No space left on device.*cache_dir"
                       ) as caught:
        kerasbn.recalibrate(model, x, batch_size=32, inplace=True,
                            cache="disk", cache_dir=str(tmp_path), verbose=0)
    assert caught.value.errno == errno.ENOSPC
    assert saved  # Stage 1 spilled before the disk filled.
    _assert_unchanged(before, model)
    assert os.listdir(tmp_path) == []


def test_a_second_ctrl_c_waits_until_the_old_values_are_back(monkeypatch):
    """Ctrl-C while the old values are written back: held, then raised."""
    model = _opaque_model()
    before = _weights(model)
    data = _Data(model, _raise(RuntimeError("the data source broke")))
    restore = _collect.restore_state
    sent = []

    bn1 = model.get_layer("bn1")

    def interrupted(state):
        # recalibrate's write-back (a stage restores only its opaque
        # call's inner layers, after each stage).
        written_back = any(v is bn1.moving_mean for v, _ in state)
        if data.failed and written_back and not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)
        restore(state)

    monkeypatch.setattr(_collect, "restore_state", interrupted)
    with pytest.raises(KeyboardInterrupt):
        kerasbn.recalibrate(model, data, inplace=True, cache="none",
                            verbose=0)
    assert sent
    _assert_unchanged(before, model)


@pytest.mark.parametrize("inplace", [False, True])
def test_a_layer_graph_is_written_once_at_the_end(monkeypatch, inplace):
    """The stages of a layer graph never write the caller's variables:
    a copy is made after them, holding the new statistics, or (inplace)
    each statistic is written once. Every variable write is recorded."""
    model = _model()
    before = _weights(model)
    assigned = []
    variable_type = type(model.weights[0])
    direct = variable_type._direct_assign

    def recorded(variable, value):
        assigned.append(variable)
        direct(variable, value)

    monkeypatch.setattr(variable_type, "_direct_assign", recorded)
    x = random_batch((96, 4), seed=2, loc=1.0, scale=2.0)
    result = kerasbn.recalibrate(model, x, inplace=inplace, verbose=0)
    monkeypatch.undo()
    written = [v for v in assigned
               if any(v is w for w in model.weights)]
    statistics = [layer.moving_mean for layer in model.layers[1::2]] + [
        layer.moving_variance for layer in model.layers[1::2]]
    if inplace:
        assert result is model
        assert sorted(id(v) for v in written) == sorted(
            id(v) for v in statistics)
    else:
        assert result is not model
        assert written == []
        _assert_unchanged(before, model)
    # The new statistics against NumPy's, layer after layer (float64
    # moments of float32 activations: within 1e-5 of each scale).
    h = x
    for dense, norm in zip(result.layers[0::2], result.layers[1::2]):
        h = to_numpy(dense(h))
        scale = np.sqrt(h.var(axis=0)) + 1e-12
        np.testing.assert_allclose(to_numpy(norm.moving_mean), h.mean(axis=0),
                                   atol=1e-5 * scale.max())
        np.testing.assert_allclose(to_numpy(norm.moving_variance),
                                   h.var(axis=0), rtol=1e-5)
        h = to_numpy(norm(h, training=False))


def _pid_max():
    try:
        with open("/proc/sys/kernel/pid_max") as f:
            return int(f.read())
    except OSError:
        return 2 ** 22


@pytest.mark.skipif(os.name == "nt", reason="pids are not probed there")
def test_spill_directories_of_dead_runs_are_removed(tmp_path, monkeypatch):
    # Batches as they come (not joined), so the first is spilled while
    # the data still yields the next.
    monkeypatch.setattr(importlib.import_module("kerasbn.stats.recalibrate"),
                        "_STAGE_BATCH_BYTES", 1)
    host = _staged._host()
    dead = tmp_path / f"kerasbn-recalibrate-{host}-{_pid_max() + 1}-abc"
    live = tmp_path / f"kerasbn-recalibrate-{host}-{os.getppid()}-abc"
    remote = tmp_path / f"kerasbn-recalibrate-elsewhere-{_pid_max() + 1}-a"
    other = tmp_path / "unrelated-1-abc"
    for path in (dead, live, remote, other):
        path.mkdir()
        (path / "t1-0.npy").write_bytes(b"")
    seen = set()

    class Data:  # Read in the first stage, while the cache spills.
        def __iter__(self):
            for start in range(0, 96, 32):
                seen.update(os.listdir(tmp_path))
                yield random_batch((32, 4), seed=start)

    kerasbn.recalibrate(_model(), Data(), inplace=True, cache="disk",
                        cache_dir=str(tmp_path), verbose=0)
    assert sorted(os.listdir(tmp_path)) == sorted(
        p.name for p in (live, remote, other))
    # While it ran, its own directory was named for this host and process.
    own = seen - {p.name for p in (dead, live, remote, other)}
    assert len(own) == 1
    assert own.pop().startswith(f"kerasbn-recalibrate-{host}-{os.getpid()}-")


def test_statistics_beyond_float32_are_refused_not_stored_as_inf():
    # Finite float32 data whose float64 variance exceeds float32's range
    # (found by a new user's trial): the cast would store inf and the BN
    # would output beta for every input. Refused, and nothing written.
    inputs = keras.Input((3,))
    model = randomize_normalizations(keras.Model(
        inputs, kerasbn.layers.BatchNormalization(name="bn")(inputs)))
    x = random_batch((128, 3), seed=3)
    x[100] *= 1e37  # max |x| ~ 1e38, finite; variance ~ 1e73
    assert np.isfinite(x).all()
    before = [to_numpy(w).copy() for w in model.weights]
    with pytest.raises(ValueError, match=r"layer 'bn'.*variance of its "
                       r"inputs reaches [0-9.e+]+, beyond what its float32 "
                       r"statistics"):
        kerasbn.recalibrate(model, x, inplace=True, verbose=0)
    for old, new in zip(before, model.weights):
        np.testing.assert_array_equal(old, to_numpy(new))
