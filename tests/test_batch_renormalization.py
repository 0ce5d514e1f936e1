"""Tests for kerasbn.layers.BatchRenormalization.

Oracles: Keras' own `BatchNormalization(renorm=True)` for a constant
schedule (outputs, gradients and every statistic), a NumPy transcription of
the paper's training-mode formulas and of TF 1.x's weighted renorm averages
(for a ramping schedule and `zero_debias`), NumPy's value of the linear
schedule, read back from the layer's outputs inside `model.fit`, and the
same model on one replica for the two-replica run.
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from kerasbn.layers import BatchRenormalization
from tests.helpers import assert_close_to_scale
from tests.helpers import assert_same_outputs
from tests.helpers import assert_weights_close
from tests.helpers import count_batch_norms
from tests.helpers import fit_single_and_mirrored
from tests.helpers import outputs_and_gradients
from tests.helpers import random_batch
from tests.helpers import randomize_normalizations
from tests.helpers import run_layer_test
from tests.helpers import to_numpy

pytestmark = pytest.mark.any_backend

STATISTICS = ("moving_mean", "moving_variance", "moving_stddev",
              "renorm_mean", "renorm_stddev")


# --------------------------------------------------------------------------
# Independent references.


def numpy_schedule(step, rmax, dmax, warmup, rmax_steps, dmax_steps):
    """The linear schedule `(rmax, rmin, dmax)` at integer `step`, NumPy."""
    def ramp(end):
        if end == warmup:
            return float(step >= warmup)
        return min(max((step - warmup) / (end - warmup), 0.0), 1.0)

    r_top = 1.0 + (rmax - 1.0) * ramp(rmax_steps)
    return r_top, 1.0 / r_top, dmax * ramp(dmax_steps)


class NumpyRenorm:
    """The paper's training step in float64 (Ioffe 2017, Algorithm 1).

    With `zero_debias`, the renorm averages are TF 1.x's: a biased average
    and its weight, both started at 0; the corrections use
    `biased + (1 - weight) * batch_value` and the stored average is
    `biased / weight`.
    """

    def __init__(self, weights, epsilon, momentum, renorm_momentum,
                 zero_debias, axes):
        names = ("gamma", "beta", "moving_mean", "moving_variance",
                 "moving_stddev", "renorm_mean", "renorm_stddev")
        self.w = {k: np.asarray(v, np.float64) for k, v in zip(names, weights)}
        self.eps, self.m, self.rm = epsilon, momentum, renorm_momentum
        self.zero_debias, self.axes = zero_debias, axes
        channels = self.w["gamma"].shape
        self.biased = {key: np.zeros(channels) for key in ("mean", "stddev")}
        self.weight = 0.0
        self.clipped = set()

    def step(self, x, upstream, rmax, rmin, dmax):
        w, axes = self.w, self.axes
        x = x.astype(np.float64)
        g = upstream.astype(np.float64)
        mu = x.mean(axes)
        sigma = np.sqrt(x.var(axes) + self.eps)
        if self.zero_debias:
            ref_mean = self.biased["mean"] + (1.0 - self.weight) * mu
            ref_stddev = self.biased["stddev"] + (1.0 - self.weight) * sigma
        else:
            ref_mean, ref_stddev = w["renorm_mean"], w["renorm_stddev"]
        s = np.maximum(ref_stddev, np.sqrt(self.eps))
        r_raw, d_raw = sigma / s, (mu - ref_mean) / s
        r, d = np.clip(r_raw, rmin, rmax), np.clip(d_raw, -dmax, dmax)
        if np.any(r != r_raw):
            self.clipped.add("r")
        if np.any(d != d_raw):
            self.clipped.add("d")
        xhat = (x - mu) / sigma
        y = xhat * (r * w["gamma"]) + (d * w["gamma"] + w["beta"])
        # Backward pass with r, d held constant (the paper's Algorithm 1).
        g_xhat = g * r * w["gamma"]
        dx = (g_xhat - g_xhat.mean(axes)
              - xhat * (g_xhat * xhat).mean(axes)) / sigma
        dgamma = (g * (xhat * r + d)).sum(axes)
        dbeta = g.sum(axes)

        if self.zero_debias:
            for key, value in (("mean", mu), ("stddev", sigma)):
                self.biased[key] = self.rm * self.biased[key] + (
                    1.0 - self.rm) * value
            self.weight = self.rm * self.weight + (1.0 - self.rm)
            w["renorm_mean"] = self.biased["mean"] / self.weight
            w["renorm_stddev"] = self.biased["stddev"] / self.weight
        else:
            w["renorm_mean"] = self.rm * w["renorm_mean"] + (1 - self.rm) * mu
            w["renorm_stddev"] = (self.rm * w["renorm_stddev"]
                                  + (1 - self.rm) * sigma)
        w["moving_mean"] = self.m * w["moving_mean"] + (1 - self.m) * mu
        w["moving_stddev"] = self.m * w["moving_stddev"] + (1 - self.m) * sigma
        w["moving_variance"] = np.maximum(
            w["moving_stddev"] ** 2 - self.eps, 0.0)
        return y, [dx, dgamma, dbeta]


# --------------------------------------------------------------------------
# Constant schedule: exactly Keras' renorm layer.

KERAS_CASES = {
    "dense_default_rmin": dict(shape=(8, 4), rmax=1.5, dmax=0.5),
    "channels_first_rmin": dict(shape=(4, 3, 5, 5), axis=1, rmax=1.5,
                                rmin=0.7, dmax=0.5),
    "mask": dict(shape=(4, 7, 3), rmax=1.3, dmax=0.2, mask=True),
    "no_center_no_scale": dict(shape=(6, 2, 4), rmax=1.2, dmax=0.3,
                               center=False, scale=False),
    "mixed_float16": dict(shape=(4, 5, 5, 3), rmax=1.5, dmax=0.5,
                          policy="mixed_float16"),
}


@pytest.mark.parametrize("case", sorted(KERAS_CASES))
def test_constant_schedule_matches_keras_renorm(case):
    case = dict(KERAS_CASES[case])
    shape, use_mask = case.pop("shape"), case.pop("mask", False)
    policy = case.pop("policy", None)
    if policy:
        keras.config.set_dtype_policy(policy)
    rmax, dmax = case.pop("rmax"), case.pop("dmax")
    rmin = case.pop("rmin", None)
    common = dict(momentum=0.8, renorm_momentum=0.7, **case)
    reference = keras.layers.BatchNormalization(
        renorm=True, renorm_clipping={
            "rmax": rmax, "rmin": 1.0 / rmax if rmin is None else rmin,
            "dmax": dmax},
        **common)
    ours = BatchRenormalization(rmax=rmax, rmin=rmin, dmax=dmax,
                                warmup_steps=0, rmax_steps=0, dmax_steps=0,
                                **common)
    dtype = reference.compute_dtype
    reference.build(shape)
    ours.build(shape)
    randomize_normalizations(reference, seed=7, gamma=(0.5, 2.0), shift=1.0)
    ours.set_weights(reference.get_weights() + [np.int64(0)])

    # The same float32 operations run in both layers, so they agree to the
    # last bits; mixed_float16 rounds the outputs to float16 (2**-11) after
    # the float32 computation, the same in both.
    out_rel = 1e-3 if dtype == "float16" else 1e-6
    for step in range(4):
        x = keras.ops.cast(random_batch(shape, seed=10 + step, loc=1.5,
                                        scale=2.0), dtype)
        mask = (np.random.default_rng(step).random(shape[:-1]) > 0.3
                if use_mask else None)
        upstream = random_batch(shape, seed=50 + step)
        y_ref, g_ref = outputs_and_gradients(reference, x, mask, upstream)
        y_our, g_our = outputs_and_gradients(ours, x, mask, upstream)
        assert y_our.dtype == y_ref.dtype
        assert_close_to_scale(y_our, y_ref, out_rel, f"output, step {step}")
        assert len(g_our) == len(g_ref)
        for i, (a, b) in enumerate(zip(g_our, g_ref)):
            assert_close_to_scale(a, b, max(out_rel, 1e-5),
                                  f"gradient {i}, step {step}")
        for name in STATISTICS:
            assert_close_to_scale(to_numpy(getattr(ours, name)),
                                  to_numpy(getattr(reference, name)), 1e-6,
                                  f"{name}, step {step}")
    assert int(to_numpy(ours.renorm_step)) == 4
    x = keras.ops.cast(random_batch(shape, seed=9), dtype)
    assert_close_to_scale(to_numpy(ours(x, training=False)),
                          to_numpy(reference(x, training=False)), out_rel)


# --------------------------------------------------------------------------
# Ramping schedule against the paper's formulas in NumPy.


@pytest.mark.parametrize("zero_debias, compiled", [
    (False, False), (True, False), (False, True)])
def test_ramping_schedule_matches_numpy_reference(zero_debias, compiled):
    # compiled: a custom training step under tf.function with XLA, where the
    # schedule must come from the step variable, not from Python.
    shape, axes, steps = (8, 3, 4), (0, 1), 7
    schedule = dict(rmax=2.0, dmax=1.0, warmup_steps=1, rmax_steps=5,
                    dmax_steps=3)
    layer = BatchRenormalization(momentum=0.8, renorm_momentum=0.6,
                                 epsilon=1e-3, zero_debias=zero_debias,
                                 **schedule)
    layer.build(shape)
    randomize_normalizations(layer, seed=3, gamma=(0.5, 2.0), shift=1.0)
    reference = NumpyRenorm(layer.get_weights()[:7], 1e-3, 0.8, 0.6,
                            zero_debias, axes)

    def step_fn(x, upstream):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * upstream)
        return y, tape.gradient(loss, [x] + layer.trainable_weights)

    if compiled:
        if keras.backend.backend() != "tensorflow":
            pytest.skip("compiled here means tf.function with XLA")
        step_fn = tf.function(step_fn, jit_compile=True)

    def train_step(x, upstream):
        if keras.backend.backend() != "tensorflow":
            return outputs_and_gradients(layer, x, None, upstream)
        y, grads = step_fn(tf.constant(x), tf.constant(upstream))
        return to_numpy(y), [to_numpy(g) for g in grads]
    for step in range(steps):
        # A different location and spread per step so r and d move.
        x = random_batch(shape, seed=20 + step, loc=step - 2.0,
                         scale=0.5 + 0.4 * step)
        upstream = random_batch(shape, seed=40 + step)
        bounds = numpy_schedule(step, 2.0, 1.0, 1, 5, 3)
        assert layer.clipping() == pytest.approx(
            dict(zip(("rmax", "rmin", "dmax"), bounds)), rel=1e-6)
        y_want, g_want = reference.step(x, upstream, bounds[0], bounds[1],
                                        bounds[2])
        y, grads = train_step(x, upstream)
        # float32 layer vs float64 reference on the same inputs: a few
        # roundings of unit 6e-8 per value, 24 samples per channel.
        assert_close_to_scale(y, y_want, 1e-5, f"output, step {step}")
        for name, a, b in zip(("x", "gamma", "beta"), grads, g_want):
            assert_close_to_scale(a, b, 2e-5, f"d/d{name}, step {step}")
        for name in STATISTICS:
            assert_close_to_scale(to_numpy(getattr(layer, name)),
                                  reference.w[name], 1e-5,
                                  f"{name}, step {step}")
    # The data was chosen so that both clips are active at some step.
    assert reference.clipped == {"r", "d"}
    assert int(to_numpy(layer.renorm_step)) == steps


def test_warmup_is_plain_batch_normalization():
    # rmax = rmin = 1, dmax = 0 during warm-up, whatever the statistics.
    x = random_batch((16, 5), seed=5, loc=3.0, scale=4.0)
    layer = BatchRenormalization(warmup_steps=3)
    layer.build(x.shape)
    randomize_normalizations(layer, seed=6, gamma=(0.5, 2.0), shift=1.0)
    gamma, beta = (to_numpy(w) for w in (layer.gamma, layer.beta))
    want = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3) * gamma + beta
    for _ in range(3):
        assert_close_to_scale(to_numpy(layer(x, training=True)), want, 1e-5)
    # The linear ramps start from the warm-up values at warmup_steps.
    assert layer.clipping() == {"rmax": 1.0, "rmin": 1.0, "dmax": 0.0}
    assert layer.clipping(step=4) == pytest.approx(dict(zip(
        ("rmax", "rmin", "dmax"),
        numpy_schedule(4, 3.0, 5.0, 3, 40000, 25000))), rel=1e-6)


# --------------------------------------------------------------------------
# The schedule inside model.fit (tf.function, XLA) and across save/reload.


@keras.saving.register_keras_serializable(package="kerasbn_tests")
class Recorder(keras.layers.Layer):
    """Identity that keeps its last training-mode input in a weight."""

    def __init__(self, batch, **kwargs):
        super().__init__(**kwargs)
        self.batch = batch

    def build(self, input_shape):
        shape = (self.batch,) + tuple(input_shape[1:])
        self.seen = self.add_weight(shape=shape, initializer="zeros",
                                    trainable=False)

    def call(self, x, training=None):
        if training:
            self.seen.assign(x)
        return x

    def get_config(self):
        return {**super().get_config(), "batch": self.batch}


@keras.saving.register_keras_serializable(package="kerasbn_tests")
def dmax_half_per_step(step):
    return keras.ops.minimum(0.5 * step, 2.0)


SCHEDULES = {
    # name -> (layer arguments, NumPy (rmax, rmin, dmax) at integer step t)
    "linear": (
        dict(rmax=3.0, dmax=2.0, warmup_steps=2, rmax_steps=6, dmax_steps=4),
        lambda t: numpy_schedule(t, 3.0, 2.0, 2, 6, 4),
    ),
    "callables": (
        dict(rmax=keras.optimizers.schedules.PolynomialDecay(
                 1.0, decay_steps=4, end_learning_rate=3.0),
             rmin=0.25, dmax=dmax_half_per_step,
             warmup_steps=2, rmax_steps=6, dmax_steps=4),
        lambda t: (1.0 + 2.0 * min(t / 4, 1.0),
                   1.0 - 0.75 * min(max((t - 2) / 4, 0.0), 1.0),
                   min(0.5 * t, 2.0)),
    ),
}


def _clip_probe_data(steps, batch, seed=0):
    """Batches whose corrections lie far outside any clip range.

    With `renorm_momentum=1` the renorm averages stay at mean 0, stddev 1,
    so channel 0 (mean 20, stddev 10) has r = rmax(t), d = dmax(t);
    channel 1 (mean 0, stddev 0.05) has r = rmin(t), d = 0; channel 2
    (mean -20, stddev 4) has r = rmax(t), d = -dmax(t). No channel pairs a
    small spread with a large mean, which float32 would blur.
    """
    z = random_batch((steps, batch, 3), seed=seed)
    z = (z - z.mean(1, keepdims=True)) / z.std(1, keepdims=True)
    x = z * np.array([10.0, 0.05, 4.0]) + np.array([20.0, 0.0, -20.0])
    return x.astype("float32").reshape(steps * batch, 3)


def _recorded_corrections(x, y):
    """Per-channel (r, d) with y = xhat * r + d, in float64."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    xhat = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3)
    return y.std(0) / xhat.std(0), y.mean(0)


class ClipLog(keras.callbacks.Callback):
    def __init__(self, x, batch, first_step):
        super().__init__()
        self.x, self.batch, self.step = x, batch, first_step
        self.seen = {}

    def on_train_batch_end(self, batch, logs=None):
        bn = self.model.get_layer("renorm")
        recorded = to_numpy(self.model.get_layer("recorder").seen)
        start = batch * self.batch
        r, d = _recorded_corrections(self.x[start:start + self.batch],
                                     recorded)
        self.seen[self.step] = (r, d, int(to_numpy(bn.renorm_step)))
        self.step += 1


def _fit_probe(model, x, batch, first_step, jit_compile):
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse",
                  jit_compile=jit_compile)
    assert model.jit_compile is jit_compile
    log = ClipLog(x, batch, first_step)
    model.fit(x, np.zeros((len(x), 1), "float32"), batch_size=batch,
              shuffle=False, verbose=0, callbacks=[log])
    return log.seen


@pytest.mark.parametrize("schedule, jit_compile", [
    ("linear", False), ("linear", True), ("callables", False)])
def test_schedule_inside_fit_and_after_reload(tmp_path, schedule, jit_compile):
    kwargs, expected = SCHEDULES[schedule]
    batch, steps, split = 16, 8, 4
    x = _clip_probe_data(steps, batch)
    inputs = keras.Input((3,))
    h = BatchRenormalization(center=False, scale=False, renorm_momentum=1.0,
                             name="renorm", **kwargs)(inputs)
    h = Recorder(batch, name="recorder")(h)
    model = keras.Model(inputs, keras.layers.Dense(1)(h))

    seen = _fit_probe(model, x[:split * batch], batch, 0, jit_compile)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert int(to_numpy(loaded.get_layer("renorm").renorm_step)) == split
    assert loaded.get_layer("renorm").get_config() == model.get_layer(
        "renorm").get_config()
    seen.update(_fit_probe(loaded, x[split * batch:], batch, split,
                           jit_compile))

    for t in range(steps):
        rmax, rmin, dmax = expected(t)
        r, d, counter = seen[t]
        # Recovered from float32 outputs of size ~10: 1e-5 relative.
        np.testing.assert_allclose(r, [rmax, rmin, rmax], rtol=1e-5,
                                   err_msg=f"r at step {t}")
        np.testing.assert_allclose(d, [dmax, 0.0, -dmax], rtol=1e-5,
                                   atol=1e-5, err_msg=f"d at step {t}")
        assert counter == t + 1
    assert loaded.get_layer("renorm").clipping() == pytest.approx(
        dict(zip(("rmax", "rmin", "dmax"), expected(steps))), rel=1e-6)


def test_unsaveable_callable_trains_but_get_config_says_why():
    layer = BatchRenormalization(dmax=lambda step: 0.1 * step)
    layer(random_batch((4, 3), seed=1), training=True)
    assert layer.clipping()["dmax"] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="Argument `dmax`.*callable"):
        layer.get_config()


# --------------------------------------------------------------------------
# Inference, folding, distribution, serialization.


def test_trainable_false_is_inference_and_does_not_advance():
    x = random_batch((8, 3), seed=8, loc=4.0)
    layer = BatchRenormalization(warmup_steps=0)
    layer.build(x.shape)
    randomize_normalizations(layer, seed=9, gamma=(0.5, 2.0), shift=1.0)
    before = [to_numpy(w).copy() for w in layer.weights]
    layer.trainable = False
    y = to_numpy(layer(x, training=True))
    gamma, beta, mean, variance = (to_numpy(w) for w in layer.weights[:4])
    want = (x - mean) / np.sqrt(variance + 1e-3) * gamma + beta
    assert_close_to_scale(y, want, 1e-6)
    for b, w in zip(before, layer.weights):
        np.testing.assert_array_equal(b, to_numpy(w))


def test_folds_after_training():
    keras.utils.set_random_seed(3)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(4, 3, use_bias=False)(inputs)
    h = BatchRenormalization(warmup_steps=1, rmax_steps=3, dmax_steps=2,
                             momentum=0.5)(h)
    h = keras.layers.ReLU()(h)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    x = random_batch((32, 8, 8, 3), seed=2, loc=1.0, scale=2.0)
    model.fit(x, random_batch((32, 2), seed=3), batch_size=8, verbose=0)
    folded, report = kerasbn.fold(model)
    assert count_batch_norms(model) == 1
    assert count_batch_norms(folded) == 0
    assert report.folded_backward == 1
    assert_same_outputs(model, folded, x)


@pytest.mark.parametrize("zero_debias", [False, True])
def test_mirrored_two_replicas_match_one(zero_debias, two_replica_strategy):
    single, mirrored = fit_single_and_mirrored(
        lambda: BatchRenormalization(
            momentum=0.9, renorm_momentum=0.5, synchronized=True,
            zero_debias=zero_debias, rmax=1.5, dmax=0.5, warmup_steps=1,
            rmax_steps=3, dmax_steps=2),
        two_replica_strategy, steps=4, global_batch=16)

    assert int(to_numpy(mirrored.layers[2].renorm_step)) == 4
    # The synchronized moments are E[x^2] - E[x]^2 over cross-replica sums,
    # one device uses two passes: float32 rounding of the O(1) activations,
    # about 1e-7 absolute after four steps (measured 5e-7 at most). 1e-5 of
    # each weight's magnitude, at least 1e-6 for the near-zero betas and
    # biases; unsynchronized statistics of 8 instead of 16 samples are off
    # by 1e-2 or more.
    assert_weights_close(mirrored, single, 1e-5, floor=0.1)


@pytest.mark.parametrize(
    "kwargs, shape, n_trainable",
    [
        (dict(warmup_steps=0, rmax_steps=2, dmax_steps=1), (4, 5), 2),
        (dict(axis=1, center=False, zero_debias=True, rmin=0.5,
              rmax=keras.optimizers.schedules.PolynomialDecay(
                  1.0, 10, 2.0)), (4, 3, 6, 6), 1),
        (dict(dmax=dmax_half_per_step, gamma_regularizer="l2"), (6, 4), 2),
    ],
)
def test_layer_contract(kwargs, shape, n_trainable):
    # Five statistics of Keras' renorm layer plus renorm_step.
    run_layer_test(BatchRenormalization, kwargs, shape, n_trainable, 6)


def test_is_a_keras_batch_normalization_with_renorm():
    layer = BatchRenormalization()
    assert isinstance(layer, keras.layers.BatchNormalization)
    assert layer.renorm
    config = layer.get_config()
    assert "renorm" not in config and "renorm_clipping" not in config
    assert {k: config[k] for k in ("rmax", "rmin", "dmax", "warmup_steps",
                                   "rmax_steps", "dmax_steps")} == dict(
        rmax=3.0, rmin=None, dmax=5.0, warmup_steps=5000, rmax_steps=40000,
        dmax_steps=25000)
    # Before any training: the paper's warm-up values.
    assert layer.clipping() == {"rmax": 1.0, "rmin": 1.0, "dmax": 0.0}
    assert layer.clipping(step=40000) == pytest.approx(
        {"rmax": 3.0, "rmin": 1 / 3, "dmax": 5.0})


# --------------------------------------------------------------------------
# Bad arguments.


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(rmax=0.5), "rmax=0.5"),
        (dict(rmax=float("inf")), "rmax=inf"),
        (dict(rmax="3"), "rmax='3'"),
        (dict(rmin=1.5), "rmin=1.5"),
        (dict(dmax=-1), "dmax=-1.0"),
        (dict(warmup_steps=-1), "warmup_steps=-1"),
        (dict(rmax_steps=2.5), "rmax_steps=2.5"),
        (dict(rmax_steps=100), "rmax_steps=100, warmup_steps=5000"),
        (dict(warmup_steps=20, rmax_steps=30, dmax_steps=10),
         "dmax_steps=10, warmup_steps=20"),
        (dict(renorm_momentum=1.5), "renorm_momentum=1.5"),
        (dict(renorm_momentum=1.0, zero_debias=True), "renorm_momentum=1.0"),
        (dict(zero_debias="yes"), "zero_debias='yes'"),
        (dict(momentum=-0.1), "momentum=-0.1"),
        (dict(renorm=False), "renorm=False"),
        (dict(renorm_clipping={"rmax": 2.0}), "renorm_clipping"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        BatchRenormalization(**kwargs)
