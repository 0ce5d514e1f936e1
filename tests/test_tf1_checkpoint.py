"""kerasbn.load_tf1_batch_norm against TF's own zero-debiased moving average.

The test writes a real TF1-format checkpoint: `tf.compat.v1` graph-mode
variables under a `batch_norm`-style scope, updated by TF's
`assign_moving_average(..., zero_debias=True)` (which creates the
`moving_mean/biased` and `moving_mean/local_step` shadow variables) and saved
by `tf.compat.v1.train.Saver`. After loading, TF's op and kerasbn's layer
continue training on the same batches and must agree.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.training import moving_averages

import kerasbn
from tests.helpers import assert_close_to_scale

L = keras.layers

DECAY = 0.999
EPSILON = 1e-3
CHANNELS = 3
SAVED_STEPS = 3
MORE_STEPS = 4


def _batch(step, rows=4):
    """A batch whose per-channel mean and (biased) variance are known."""
    rng = np.random.default_rng(100 + step)
    mean = rng.normal(2.0, 1.5, CHANNELS)
    spread = rng.uniform(0.5, 2.0, CHANNELS)
    signs = np.array([1.0, -1.0] * (rows // 2))[:, None]
    x = (mean + signs * spread).astype(np.float32)
    x64 = x.astype(np.float64)
    return x, x64.mean(axis=0), x64.var(axis=0)


def _write_checkpoint(directory, scopes, *, zero_debias=True, scale=True,
                      channels=CHANNELS):
    """Train `scopes` TF1 batch norms for SAVED_STEPS, save, then go on.

    Returns the checkpoint prefix and, per scope, TF's moving mean and
    moving variance after each of the MORE_STEPS later updates.
    """
    graph = tf.Graph()
    history = {scope: [] for scope in scopes}
    with graph.as_default():
        mean_in = tf.compat.v1.placeholder(tf.float64, (channels,))
        var_in = tf.compat.v1.placeholder(tf.float64, (channels,))
        updates, variables = [], {}
        for number, scope in enumerate(scopes):
            rng = np.random.default_rng(number)
            with tf.compat.v1.variable_scope(scope):
                tf.compat.v1.get_variable(
                    "beta", initializer=rng.normal(size=channels))
                if scale:
                    tf.compat.v1.get_variable(
                        "gamma", initializer=rng.uniform(0.5, 2, channels))
                mean = tf.compat.v1.get_variable(
                    "moving_mean", initializer=np.zeros(channels),
                    trainable=False)
                var = tf.compat.v1.get_variable(
                    "moving_variance", initializer=np.ones(channels),
                    trainable=False)
            # Outside the scope, as TF1's batch_norm did: the shadows are
            # named after the variable, '<scope>/moving_mean/biased'.
            updates.append(moving_averages.assign_moving_average(
                mean, mean_in, DECAY, zero_debias=zero_debias))
            updates.append(moving_averages.assign_moving_average(
                var, var_in, DECAY, zero_debias=False))
            variables[scope] = (mean, var)
        saver = tf.compat.v1.train.Saver()
        prefix = os.path.join(directory, "model.ckpt")
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            for step in range(SAVED_STEPS):
                _, m, v = _batch(step)
                sess.run(updates, {mean_in: m, var_in: v})
            prefix = saver.save(sess, prefix, global_step=SAVED_STEPS)
            for step in range(SAVED_STEPS, SAVED_STEPS + MORE_STEPS):
                _, m, v = _batch(step)
                sess.run(updates, {mean_in: m, var_in: v})
                for scope, (mean, var) in variables.items():
                    history[scope].append(sess.run([mean, var]))
    return prefix, history


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("tf1"))
    return _write_checkpoint(directory, ["conv1/BatchNorm"])


def _layer(channels=CHANNELS, **kwargs):
    options = dict(momentum=DECAY, epsilon=EPSILON, zero_debias="mean")
    options.update(kwargs)
    layer = kerasbn.layers.BatchNormalization(**options)
    layer.build((None, channels))
    return layer


def test_the_checkpoint_is_tf1_batch_norm_format(checkpoint):
    prefix, _ = checkpoint
    names = {name for name, _ in tf.train.list_variables(prefix)}
    assert names == {
        "conv1/BatchNorm/beta", "conv1/BatchNorm/gamma",
        "conv1/BatchNorm/moving_mean", "conv1/BatchNorm/moving_variance",
        "conv1/BatchNorm/moving_mean/biased",
        "conv1/BatchNorm/moving_mean/local_step",
    }


def test_training_resumes_with_tf_numbers(checkpoint):
    prefix, history = checkpoint
    reader = tf.train.load_checkpoint(prefix)
    layer = _layer()
    used = kerasbn.load_tf1_batch_norm(layer, prefix)
    assert used == {layer.name: "conv1/BatchNorm"}
    assert int(layer.debias_step.numpy()) == SAVED_STEPS
    for name in ("beta", "gamma", "moving_variance"):
        assert_close_to_scale(getattr(layer, name).numpy(),
                              reader.get_tensor(f"conv1/BatchNorm/{name}"),
                              1e-6, name)
    assert_close_to_scale(layer.moving_mean.numpy(),
                          reader.get_tensor("conv1/BatchNorm/moving_mean"),
                          1e-6, "debiased mean")

    for k, step in enumerate(range(SAVED_STEPS, SAVED_STEPS + MORE_STEPS)):
        x, _, _ = _batch(step)
        layer(x, training=True)
        tf_mean, tf_variance = history["conv1/BatchNorm"][k]
        assert_close_to_scale(layer.moving_mean.numpy(), tf_mean, 1e-6,
                              f"moving_mean after step {step + 1}")
        assert_close_to_scale(layer.moving_variance.numpy(), tf_variance, 1e-6,
                              f"moving_variance after step {step + 1}")
    assert int(layer.debias_step.numpy()) == SAVED_STEPS + MORE_STEPS


def test_model_with_default_and_explicit_mapping(tmp_path):
    prefix, history = _write_checkpoint(
        str(tmp_path), ["net/bn_a", "net/bn_b"], scale=False)
    inputs = keras.Input((CHANNELS,))
    h = kerasbn.layers.BatchNormalization(
        momentum=DECAY, epsilon=EPSILON, zero_debias="mean", scale=False,
        name="bn_a")(inputs)
    h = kerasbn.layers.BatchNormalization(
        momentum=DECAY, epsilon=EPSILON, zero_debias="mean", scale=False,
        name="bn_b")(h)
    model = keras.Model(inputs, h)
    used = kerasbn.load_tf1_batch_norm(model, str(tmp_path))  # directory
    assert used == {"bn_a": "net/bn_a", "bn_b": "net/bn_b"}

    # An explicit mapping can cross the names; it loads only what it lists.
    fresh = _layer(scale=False, name="other")
    used = kerasbn.load_tf1_batch_norm(
        fresh, prefix, mapping={"other": "net/bn_b/"})
    assert used == {"other": "net/bn_b"}
    x, _, _ = _batch(SAVED_STEPS)
    fresh(x, training=True)
    assert_close_to_scale(fresh.moving_mean.numpy(), history["net/bn_b"][0][0],
                          1e-6, "mapped layer")


def test_errors_list_every_problem(checkpoint, tmp_path):
    prefix, _ = checkpoint
    # Wrong channel count: every variable is listed with both shapes.
    with pytest.raises(ValueError) as error:
        kerasbn.load_tf1_batch_norm(_layer(channels=5), prefix)
    message = str(error.value)
    for name in ("beta", "gamma", "moving_mean", "moving_variance",
                 "moving_mean/biased"):
        assert f"'conv1/BatchNorm/{name}': shape (3,)" in message, message
    assert "needs (5,)" in message

    # A variable the layer needs is missing (TF1's default scale=False).
    no_gamma, _ = _write_checkpoint(str(tmp_path / "a"), ["bn"], scale=False)
    layer = _layer()
    before = [w.numpy().copy() for w in layer.weights]
    with pytest.raises(ValueError, match=r"'bn/gamma': missing"):
        kerasbn.load_tf1_batch_norm(layer, no_gamma)
    for b, w in zip(before, layer.weights):  # nothing was assigned
        np.testing.assert_array_equal(b, w.numpy())

    # Zero-debiased statistics need a layer that keeps the debias state.
    with pytest.raises(ValueError, match="zero_debias='mean'"):
        keras_layer = L.BatchNormalization(momentum=DECAY)
        keras_layer.build((None, CHANNELS))
        kerasbn.load_tf1_batch_norm(keras_layer, prefix)
    # ... and with another decay the stored mean does not fit.
    with pytest.raises(ValueError, match="momentum"):
        kerasbn.load_tf1_batch_norm(_layer(momentum=0.9), prefix)

    # Unmatched layers and scopes are both listed.
    inputs = keras.Input((CHANNELS,))
    model = keras.Model(inputs, _layer_call("x1", inputs))
    with pytest.raises(ValueError) as error:
        kerasbn.load_tf1_batch_norm(model, prefix)
    message = str(error.value)
    assert "layer 'x1': no checkpoint scope" in message
    assert "'conv1/BatchNorm': no layer matched it" in message
    with pytest.raises(ValueError, match="no BatchNormalization layer"):
        kerasbn.load_tf1_batch_norm(model, prefix, mapping={"nope": "bn"})
    with pytest.raises(ValueError, match="'missing/moving_mean'"):
        kerasbn.load_tf1_batch_norm(model, prefix,
                                    mapping={"x1": "missing"})


def _layer_call(name, inputs):
    return kerasbn.layers.BatchNormalization(
        momentum=DECAY, epsilon=EPSILON, zero_debias="mean", name=name)(inputs)


def test_plain_checkpoint_into_keras_layer(tmp_path):
    prefix, history = _write_checkpoint(str(tmp_path), ["bn"],
                                        zero_debias=False)
    layer = L.BatchNormalization(momentum=DECAY, epsilon=EPSILON, name="bn")
    layer.build((None, CHANNELS))
    kerasbn.load_tf1_batch_norm(layer, prefix)
    x, _, _ = _batch(SAVED_STEPS)
    layer(x, training=True)
    assert_close_to_scale(layer.moving_mean.numpy(), history["bn"][0][0], 1e-6,
                          "plain moving mean")
    with pytest.raises(ValueError, match="zero_debias=False"):
        kerasbn.load_tf1_batch_norm(_layer(name="bn"), prefix)
