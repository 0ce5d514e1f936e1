"""Tests for kerasbn.layers.MovingAverageBatchNormalization (MABN).

Oracles: a float64 NumPy re-implementation of the authors' reference
algorithm (`ReferenceMABN` below, written from the paper's equations and
the reference's step-by-step semantics, not from the layer), central finite
differences where the custom backward pass is the true gradient, and a
single-device run for the two-replica MirroredStrategy run.

Tolerances: the layer computes in float32 and the oracle in float64. Each
quantity is compared with an absolute tolerance of `rel * max|expected|`
(`assert_close_to_scale`): the input gradient `(g - z * psi) / sqrt(v)` is a
difference of two terms of the size of `g`, so elements near zero carry
float32 rounding of the size of the terms, not of the result; a pure
relative tolerance would fail on them for no fault of the layer.
"""

import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from kerasbn.layers import MABN
from kerasbn.layers import MovingAverageBatchNormalization
from tests.helpers import assert_close_to_scale
from tests.helpers import assert_weights_close
from tests.helpers import conv_model
from tests.helpers import fit_single_and_mirrored
from tests.helpers import fit_straight_and_resumed
from tests.helpers import random_batch
from tests.helpers import randomize_normalizations
from tests.helpers import run_layer_test
from tests.helpers import to_numpy


# --------------------------------------------------------------------------
# The reference algorithm in NumPy (float64).


class ReferenceMABN:
    """MABN as the reference computes it, one training step at a time.

    Channels on `axis`; statistics over every other axis. `forward` then
    `backward` make one step; `r_history` records the r actually used.
    """

    def __init__(self, channels, axis, *, buffer_size, warmup_steps,
                 clip_start_step, r_max, momentum, epsilon, gamma, beta):
        self.axis = axis
        self.k = buffer_size
        self.w = warmup_steps
        self.clip_start = clip_start_step
        self.r_max = r_max
        self.m = momentum
        self.eps = epsilon
        self.gamma = np.asarray(gamma, np.float64)
        self.beta = np.asarray(beta, np.float64)
        self.running_var = np.ones(channels)
        self.buffer_x2 = np.zeros((buffer_size, channels))
        self.buffer_gz = np.zeros((buffer_size, channels))
        self.t = 0
        self.r_history = []

    def _per_channel(self, a, ndim):
        shape = [1] * ndim
        shape[self.axis] = -1
        return np.reshape(a, shape)

    def _axes(self, ndim):
        return tuple(i for i in range(ndim) if i != self.axis % ndim)

    def forward(self, x):
        x = np.asarray(x, np.float64)
        self.t += 1
        t, n, axes = self.t, x.ndim, self._axes(x.ndim)
        chi = np.mean(x * x, axis=axes)
        self.buffer_x2[t % self.k] = chi
        batch_phase = t <= self.k or t < self.w
        v = chi if batch_phase else self.buffer_x2.mean(axis=0)
        z = x / self._per_channel(np.sqrt(v + self.eps), n)
        r = np.sqrt(v + self.eps) / np.sqrt(self.running_var + self.eps)
        if t <= max(self.clip_start, self.w):
            r = np.ones_like(r)
        else:
            r = np.clip(r, 1.0 / self.r_max, self.r_max)
        self.r_history.append(r)
        self.running_var = self.m * self.running_var + (1 - self.m) * v
        self._saved = (z, v, r, batch_phase)
        g, b, rr = (self._per_channel(a, n) for a in (self.gamma, self.beta,
                                                        r))
        return g * rr * z + b

    def backward(self, dy):
        dy = np.asarray(dy, np.float64)
        z, v, r, batch_phase = self._saved
        n, axes = dy.ndim, self._axes(dy.ndim)
        g = dy * self._per_channel(self.gamma * r, n)
        psi_t = np.mean(g * z, axis=axes)
        self.buffer_gz[self.t % self.k] = psi_t
        psi = psi_t if batch_phase else self.buffer_gz.mean(axis=0)
        dx = (g - z * self._per_channel(psi, n)) / self._per_channel(
            np.sqrt(v + self.eps), n)
        dgamma = np.sum(dy * self._per_channel(r, n) * z, axis=axes)
        dbeta = np.sum(dy, axis=axes)
        return dx, dgamma, dbeta


# --------------------------------------------------------------------------
# Step by step against the reference: every phase and the wrap-around.

CASES = {
    # K=4, W=6, clip from t=11: batch stats t<=5, buffer averages t>=6,
    # r=1 until t=10 and clipped to [1/1.5, 1.5] after; 32 steps wrap the
    # buffers 8 times.
    "channels_last": dict(shape=(2, 3, 3, 4), axis=-1, buffer_size=4,
                          warmup_steps=6, clip_start_step=10, r_max=1.5,
                          momentum=0.9),
    # W < K: the buffer average takes over at t = K + 1 = 4.
    "channels_first": dict(shape=(3, 2, 5), axis=1, buffer_size=3,
                           warmup_steps=0, clip_start_step=5, r_max=1.3,
                           momentum=0.8),
}
STEPS = 32


def _step_data(shape, steps, seed):
    rng = np.random.default_rng(seed)
    xs, dys = [], []
    for t in range(steps):
        # Blocks of 7 steps alternate large and small inputs, so r leaves
        # [1/r_max, r_max] on both sides after each switch and comes back
        # inside once the running variance catches up.
        scale = (3.0 if (t // 7) % 2 else 0.4) * np.exp(rng.uniform(-0.2,
                                                                    0.2))
        xs.append((rng.normal(0.3, scale, size=shape)).astype("float32"))
        dys.append(rng.normal(size=shape).astype("float32"))
    return xs, dys


def _make_pair(case, dtype="float32"):
    case = dict(case)
    shape = case.pop("shape")
    layer = MovingAverageBatchNormalization(dtype=dtype, **case)
    layer.build(shape)
    # Random gamma and beta; the statistics stay at their initial values,
    # where the reference starts.
    randomize_normalizations(layer, seed=3, gamma=(0.5, 2.0), shift=1.0,
                             names=("gamma", "beta"))
    channels = shape[case["axis"]]
    reference = ReferenceMABN(
        channels, case["axis"], buffer_size=case["buffer_size"],
        warmup_steps=case["warmup_steps"],
        clip_start_step=case["clip_start_step"], r_max=case["r_max"],
        momentum=case["momentum"], epsilon=layer.epsilon,
        gamma=to_numpy(layer.gamma), beta=to_numpy(layer.beta),
    )
    return shape, layer, reference


BACKEND = keras.backend.backend()


def _grad_step(layer):
    """`(x, dy) -> [y, dx, dgamma, dbeta]` of one training call, with
    the layer's state updated as a training step updates it."""
    if BACKEND == "jax":
        return _jax_grad_step(layer)
    if BACKEND == "torch":
        return _torch_grad_step(layer)

    def step(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        grads = tape.gradient(y, [x, layer.gamma, layer.beta],
                              output_gradients=dy)
        return [y] + grads
    return step


def _jax_grad_step(layer):
    """On JAX the new buffer_gz is the "gradient" of `buffer_gz`, which an
    optimizer writes into it: an SGD step at learning rate 0 (gamma - 0 *
    grad == gamma exactly) applies it, through Keras' own mechanism."""
    import jax

    optimizer = keras.optimizers.SGD(0.0)

    def step(x, dy):
        trainable = layer.trainable_variables
        fixed = [v.value for v in layer.non_trainable_variables]

        def forward(x, values):
            return layer.stateless_call(values, fixed, x, training=True)

        y, pullback, new_fixed = jax.vjp(
            forward, x, [v.value for v in trainable], has_aux=True)
        dx, grads = pullback(dy)
        for variable, value in zip(layer.non_trainable_variables,
                                   new_fixed):
            variable.assign(value)
        optimizer.apply(grads, trainable)
        by_name = {v.name: g for v, g in zip(trainable, grads)}
        return [y, dx, by_name["gamma"], by_name["beta"]]
    return step


def _torch_grad_step(layer):
    import torch

    def step(x, dy):
        x = torch.as_tensor(np.asarray(x)).requires_grad_(True)
        y = layer(x, training=True)
        grads = torch.autograd.grad(
            y, [x, layer.gamma.value, layer.beta.value],
            grad_outputs=torch.as_tensor(np.asarray(dy)))
        return [y.detach()] + list(grads)
    return step


def _modes():
    return ["eager", "graph", "xla"] if BACKEND == "tensorflow" else [
        "eager"]


@pytest.mark.any_backend
@pytest.mark.parametrize("mode", _modes())
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_algorithm_step_by_step(case, mode):
    shape, layer, reference = _make_pair(CASES[case])
    step = _grad_step(layer)
    if mode != "eager":
        step = tf.function(step, jit_compile=(mode == "xla"))
    xs, dys = _step_data(shape, STEPS, seed=11)
    for t, (x, dy) in enumerate(zip(xs, dys), start=1):
        y, dx, dgamma, dbeta = (to_numpy(a) for a in step(
            keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(dy)))
        want_y = reference.forward(x)
        want_dx, want_dgamma, want_dbeta = reference.backward(dy)
        for name, got, want in [
            ("y", y, want_y), ("dx", dx, want_dx),
            ("dgamma", dgamma, want_dgamma), ("dbeta", dbeta, want_dbeta),
            ("moving_variance", layer.moving_variance,
             reference.running_var),
            ("buffer_x2", layer.buffer_x2, reference.buffer_x2),
            ("buffer_gz", layer.buffer_gz, reference.buffer_gz),
        ]:
            assert_close_to_scale(to_numpy(got), want, 1e-5,
                                  f"{name} at step {t}")
        assert int(to_numpy(layer.step)) == t

    # Every phase was exercised: r = 1 early, r clipped on both sides and
    # unclipped later.
    r = np.array(reference.r_history)
    settings = CASES[case]
    last_r1 = max(settings["clip_start_step"], settings["warmup_steps"])
    assert np.all(r[:last_r1] == 1.0)
    late = r[last_r1:]
    r_max = settings["r_max"]
    assert np.any(np.isclose(late, r_max)) and np.any(
        np.isclose(late, 1 / r_max))
    assert np.any((late > 1 / r_max + 1e-3) & (late < r_max - 1e-3))


# --------------------------------------------------------------------------
# Finite differences: exact gradient while batch statistics are used.


@pytest.mark.any_backend
@pytest.mark.skipif(BACKEND == "jax", reason="needs float64 (JAX runs "
                    "float32 unless jax_enable_x64 is set)")
def test_backward_is_the_true_gradient_while_batch_statistics_are_used():
    case = dict(shape=(3, 2, 2), axis=-1, buffer_size=4, warmup_steps=0,
                clip_start_step=100, r_max=5.0, momentum=0.9)
    shape, layer, _ = _make_pair(case, dtype="float64")
    rng = np.random.default_rng(5)
    state_weights = [layer.moving_variance, layer.step, layer.buffer_x2,
                     layer.buffer_gz]

    def state():
        return [to_numpy(w).copy() for w in state_weights]

    def restore(values):
        for w, value in zip(state_weights, values):
            w.assign(value)

    def loss(x, dy):
        y = to_numpy(layer(keras.ops.convert_to_tensor(x, "float64"),
                           training=True))
        return float(np.sum(y * dy))

    h = 1e-6
    for t in range(1, 7):
        x = rng.normal(0.5, 1.5, size=shape)
        dy = rng.normal(size=shape)
        before = state()
        dx, dgamma, dbeta = (to_numpy(g) for g in _grad_step(layer)(
            keras.ops.convert_to_tensor(x, "float64"),
            keras.ops.convert_to_tensor(dy, "float64"))[1:])
        after = state()
        numeric = np.zeros_like(x)
        for i in np.ndindex(*shape):
            e = np.zeros_like(x)
            e[i] = h
            restore(before)
            plus = loss(x + e, dy)
            restore(before)
            minus = loss(x - e, dy)
            numeric[i] = (plus - minus) / (2 * h)
        restore(after)
        if t <= case["buffer_size"]:
            # Central differences in float64: error ~ h**2 + 1e-16 / h.
            assert_close_to_scale(dx, numeric, 1e-7, f"dx at step {t}")
        else:
            # From t = K + 1 the buffers' averages replace the batch
            # statistics: by design no longer the derivative.
            assert not np.allclose(dx, numeric, atol=1e-3)
        # gamma, beta: r = 1 here, so dL/dgamma = sum(dy * z) exactly.
        gamma_fd, beta_fd = [], []
        for weight, out in ((layer.gamma, gamma_fd), (layer.beta, beta_fd)):
            base = to_numpy(weight).copy()
            for c in range(base.size):
                values = []
                for sign in (1, -1):
                    bumped = base.copy()
                    bumped[c] += sign * h
                    weight.assign(bumped)
                    restore(before)
                    values.append(loss(x, dy))
                out.append((values[0] - values[1]) / (2 * h))
            weight.assign(base)
        restore(after)
        assert_close_to_scale(dgamma, gamma_fd, 1e-7, f"dgamma at {t}")
        assert_close_to_scale(dbeta, beta_fd, 1e-7, f"dbeta at {t}")


# --------------------------------------------------------------------------
# Inside model.fit (graph mode, XLA): a complete oracle with SGD.


@pytest.mark.any_backend
@pytest.mark.parametrize("jit_compile", [False, True])
def test_fit_matches_reference_with_sgd(jit_compile):
    if BACKEND == "torch" and jit_compile:
        pytest.skip("Keras' torch backend does not compile train steps")
    kwargs = dict(buffer_size=3, warmup_steps=4, clip_start_step=6,
                  r_max=1.5, momentum=0.8)
    batch, steps, lr = 4, 12, 0.1
    shape = (batch, 5, 3)
    xs, _ = _step_data(shape, steps, seed=21)
    targets = [random_batch(shape, seed=100 + i) for i in range(steps)]
    inputs = keras.Input(shape[1:])
    layer = MABN(**kwargs)
    model = keras.Model(inputs, layer(inputs))
    model.compile(optimizer=keras.optimizers.SGD(lr), loss="mse",
                  jit_compile=jit_compile)
    model.fit(np.concatenate(xs), np.concatenate(targets), batch_size=batch,
              shuffle=False, epochs=1, verbose=0)

    reference = ReferenceMABN(3, -1, epsilon=1e-5, gamma=np.ones(3),
                              beta=np.zeros(3), **kwargs)
    for x, target in zip(xs, targets):
        y = reference.forward(x)
        dy = 2.0 * (y - target) / y.size  # mse: mean over every element
        _, dgamma, dbeta = reference.backward(dy)
        reference.gamma = reference.gamma - lr * dgamma
        reference.beta = reference.beta - lr * dbeta
    assert int(to_numpy(layer.step)) == steps
    for name, want in [("gamma", reference.gamma), ("beta", reference.beta),
                       ("moving_variance", reference.running_var),
                       ("buffer_x2", reference.buffer_x2),
                       ("buffer_gz", reference.buffer_gz)]:
        assert_close_to_scale(to_numpy(getattr(layer, name)), want, 1e-5,
                              name)


# --------------------------------------------------------------------------
# Inference, trainable=False, dtypes.


@pytest.mark.any_backend
def test_inference_is_the_running_variance_scale_and_shift():
    layer = MABN(buffer_size=2, warmup_steps=0)
    x = random_batch((6, 4), seed=1, loc=1.0, scale=2.0)
    for _ in range(3):
        layer(x, training=True)
    gamma, beta, var = (to_numpy(w).astype(np.float64) for w in
                        (layer.gamma, layer.beta, layer.moving_variance))
    gamma = gamma + np.arange(4)
    layer.gamma.assign(gamma)
    state = [to_numpy(w).copy() for w in layer.weights]
    want = gamma * x / np.sqrt(var + 1e-5) + beta
    assert_close_to_scale(to_numpy(layer(x)), want, 1e-6)
    assert_close_to_scale(to_numpy(layer(x, training=False)), want, 1e-6)
    scale, shift = layer.inference_scale_shift()
    assert_close_to_scale(scale * x + shift, want, 1e-6)
    # Frozen: training=True still runs inference and updates nothing.
    layer.trainable = False
    assert_close_to_scale(to_numpy(layer(x, training=True)), want, 1e-6)
    for w, before in zip(layer.weights, state):
        np.testing.assert_array_equal(to_numpy(w), before)


@pytest.mark.any_backend
def test_center_and_scale_off():
    layer = MABN(center=False, scale=False)
    x = random_batch((5, 3), seed=2, loc=1.0)
    y = to_numpy(layer(x, training=True))
    chi = np.mean(x.astype(np.float64) ** 2, axis=0)
    assert_close_to_scale(y, x / np.sqrt(chi + 1e-5), 1e-6)
    # On JAX buffer_gz is trainable (written through its "gradient").
    assert [w.name for w in layer.trainable_weights] == (
        ["buffer_gz"] if BACKEND == "jax" else [])


@pytest.mark.any_backend
def test_mixed_float16_normalizes_in_float32():
    keras.config.set_dtype_policy("mixed_float16")
    layer = MABN()
    x = random_batch((4, 3, 3, 2), seed=3, loc=0.5, scale=3.0)
    y = layer(x.astype("float16"), training=True)
    assert keras.backend.standardize_dtype(y.dtype) == "float16"
    assert layer.moving_variance.dtype == "float32"
    chi = np.mean(x.astype(np.float64) ** 2, axis=(0, 1, 2))
    assert_close_to_scale(to_numpy(y), x / np.sqrt(chi + 1e-5), 2e-3)


# --------------------------------------------------------------------------
# Layer contract, saving, resuming.


@pytest.mark.parametrize(
    "kwargs, shape, n_trainable",
    [
        (dict(buffer_size=2, warmup_steps=2), (4, 5, 3), 2),
        (dict(axis=1, buffer_size=3, gamma_regularizer="l2",
              beta_constraint="non_neg"), (4, 3, 2, 2), 2),
        (dict(center=False), (4, 3), 1),
    ],
)
@pytest.mark.any_backend
def test_layer_contract(kwargs, shape, n_trainable):
    # On JAX buffer_gz is trainable (written through its "gradient").
    moved = int(BACKEND == "jax")
    run_layer_test(MovingAverageBatchNormalization, kwargs, shape,
                   n_trainable + moved, 4 - moved)


@pytest.mark.any_backend
def test_alias_and_defaults():
    assert MABN is MovingAverageBatchNormalization
    config = MABN().get_config()
    assert {k: config[k] for k in ("axis", "momentum", "epsilon",
                                   "buffer_size", "warmup_steps",
                                   "clip_start_step", "r_max", "center",
                                   "scale")} == dict(
        axis=-1, momentum=0.98, epsilon=1e-5, buffer_size=16,
        warmup_steps=100, clip_start_step=1000, r_max=5.0, center=True,
        scale=True)


@pytest.mark.any_backend
@pytest.mark.parametrize("how", ["keras_file", "weights_file"])
def test_training_resumes_exactly(tmp_path, how):
    batch = 4
    x = random_batch((9 * batch, 6, 6, 2), seed=13, loc=0.5, scale=2.0)
    target = random_batch((9 * batch, 3), seed=14)

    def build():
        return conv_model(
            lambda: MABN(buffer_size=3, warmup_steps=2, clip_start_step=4,
                         momentum=0.9),
            conv=kerasbn.layers.CenteredConv2D, seed=42, units=3,
            learning_rate=0.05, relu=True)

    def check_reloaded(model):
        mabn = model.layers[2]
        assert int(to_numpy(mabn.step)) == 5
        assert np.any(to_numpy(mabn.buffer_gz) != 0)

    straight, resumed = fit_straight_and_resumed(
        build, x, target, batch, 5, how, tmp_path, check_reloaded)
    # Plain SGD has no state: any gap would come from the layer's state.
    assert_weights_close(resumed, straight, 1e-6)


# --------------------------------------------------------------------------
# tf.distribute: cross-replica statistics.


def test_mirrored_two_replicas_match_one_device(two_replica_strategy):
    single, mirrored = fit_single_and_mirrored(
        lambda: MABN(buffer_size=2, warmup_steps=3, clip_start_step=4,
                     r_max=1.2, momentum=0.8),
        two_replica_strategy, steps=6, global_batch=8, loc=0.5,
        conv=kerasbn.layers.CenteredConv2D)

    mabn = mirrored.layers[2]
    assert int(to_numpy(mabn.step)) == 6
    assert np.any(to_numpy(mabn.buffer_gz) != 0)
    # Cross-replica sums are added in another order than one device's.
    assert_weights_close(mirrored, single, 1e-5)


# --------------------------------------------------------------------------
# Bad arguments, backends.


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(axis="channels"), "axis='channels'"),
        (dict(axis=[1, 2]), "axis=[1, 2]"),
        (dict(momentum=1.5), "momentum=1.5"),
        (dict(epsilon=0.0), "epsilon=0.0"),
        (dict(buffer_size=0), "buffer_size=0"),
        (dict(buffer_size=2.0), "buffer_size=2.0"),
        (dict(warmup_steps=-1), "warmup_steps=-1"),
        (dict(clip_start_step=True), "clip_start_step=True"),
        (dict(r_max=0.5), "r_max=0.5"),
    ],
)
@pytest.mark.any_backend
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        MABN(**kwargs)


@pytest.mark.any_backend
def test_axis_out_of_range_names_axis_and_shape():
    with pytest.raises(ValueError, match=r"Axis 3 is out of bounds.*rank 3"):
        MABN(axis=3)(np.zeros((2, 4, 5), "float32"))


@pytest.mark.any_backend
def test_a_backend_that_cannot_train_is_refused_at_the_training_call(
        monkeypatch):
    from kerasbn.layers import mabn as mabn_module

    layer = MABN()
    x = random_batch((4, 3), seed=1)
    monkeypatch.setattr(mabn_module.backend, "backend", lambda: "numpy")
    with pytest.raises(RuntimeError, match="TensorFlow, JAX and PyTorch.*"
                       "'numpy'"):
        layer(x, training=True)
    layer(x, training=False)  # inference is plain ops: any backend


@pytest.mark.any_backend
@pytest.mark.skipif(BACKEND == "tensorflow", reason="a file from another "
                    "backend")
def test_a_file_written_on_tensorflow_resumes_here(tmp_path):
    """The state of a `.keras` file written by the TensorFlow layer loads
    by name into this backend (on JAX buffer_gz is trainable, which would
    reorder Keras' default variable list), and training continues the
    same: the oracle is TensorFlow continuing from the same file."""
    script = tmp_path / "write.py"
    script.write_text(TENSORFLOW_WRITER)
    env = dict(os.environ, KERAS_BACKEND="tensorflow",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    subprocess.run([sys.executable, str(script), str(tmp_path)], env=env,
                   check=True, capture_output=True)
    saved = np.load(tmp_path / "state.npz")
    model = keras.saving.load_model(tmp_path / "model.keras")
    mabn = model.layers[2]
    for name in ("moving_variance", "step", "buffer_x2", "buffer_gz"):
        np.testing.assert_array_equal(to_numpy(getattr(mabn, name)),
                                      saved[f"before_{name}"], name)
    model.compile(keras.optimizers.SGD(0.05), "mse")
    model.fit(saved["x"], saved["y"], batch_size=4, shuffle=False,
              verbose=0)
    for name in ("gamma", "moving_variance", "buffer_x2", "buffer_gz"):
        # float32 sums in another order: ~1e-7 of the scale per step.
        assert_close_to_scale(to_numpy(getattr(mabn, name)),
                              saved[f"after_{name}"], 1e-5, name)


TENSORFLOW_WRITER = """
import sys, keras, numpy as np, kerasbn
out = sys.argv[1]
rng = np.random.default_rng(0)
x = rng.normal(0.5, 2.0, size=(16, 6, 6, 2)).astype("float32")
y = rng.normal(size=(16, 3)).astype("float32")
inputs = keras.Input((6, 6, 2))
h = kerasbn.layers.CenteredConv2D(4, 3, use_bias=False)(inputs)
mabn = kerasbn.layers.MABN(buffer_size=3, warmup_steps=2, clip_start_step=4)
h = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU()(mabn(h)))
model = keras.Model(inputs, keras.layers.Dense(3)(h))
model.compile(keras.optimizers.SGD(0.05), "mse")
model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
model.save(out + "/model.keras")
names = ("gamma", "moving_variance", "step", "buffer_x2", "buffer_gz")
state = {f"before_{n}": keras.ops.convert_to_numpy(getattr(mabn, n))
         for n in names}
model.fit(x, y, batch_size=4, shuffle=False, verbose=0)
state.update({f"after_{n}": keras.ops.convert_to_numpy(getattr(mabn, n))
              for n in names})
np.savez(out + "/state.npz", x=x, y=y, **state)
"""
