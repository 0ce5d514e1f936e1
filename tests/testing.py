"""Shared test base for kerasbn layers.

`run_layer_test` checks what every kerasbn layer owes its users: the weight
counts, output shape, `get_config`/`from_config`, a real training step in
`model.fit`, and round trips through a `.keras` file and a weights file.
The round trips compare against the model as it was before saving (outputs
in inference mode and every weight, trainable or not), so a state variable
that fails to save, or a config argument that is dropped, fails the test.
"""

import os
import tempfile

import keras
import numpy as np


def to_numpy(x):
    """A tensor or Keras variable as a NumPy array."""
    return keras.ops.convert_to_numpy(x)


def assert_close_to_scale(actual, expected, rel, what=""):
    """|actual - expected| <= rel * max|expected| elementwise.

    Tolerances relative to the largest magnitude of the reference, so a
    near-zero element is held to the rounding of the values around it.
    """
    expected = np.asarray(expected, np.float64)
    scale = max(float(np.max(np.abs(expected))), 1e-12)
    np.testing.assert_allclose(
        np.asarray(actual, np.float64), expected, rtol=0, atol=rel * scale,
        err_msg=what,
    )


def random_batch(shape, seed=0, loc=0.0, scale=1.0, dtype="float32"):
    """Normal samples of `shape` with a fixed seed."""
    rng = np.random.default_rng(seed)
    return rng.normal(loc, scale, size=shape).astype(dtype)


def randomize_bn_weights(layer, seed=0):
    """Give a BN-like layer non-trivial gamma, beta and statistics.

    Trained statistics are what fold and equivalence bugs hide behind when
    left at gamma=1, beta=0, mean=0, var=1.
    """
    rng = np.random.default_rng(seed)
    values = []
    for weight in layer.weights:
        shape = tuple(weight.shape)
        name = weight.name
        if "step" in name:
            values.append(np.asarray(weight.numpy()))
        elif "variance" in name or "stddev" in name or name == "gamma":
            values.append(rng.uniform(0.5, 2.0, shape).astype(weight.dtype))
        else:
            values.append(rng.normal(0.0, 1.0, shape).astype(weight.dtype))
    layer.set_weights(values)


def assert_weights_equal(expected_layer_or_model, actual_layer_or_model):
    expected = expected_layer_or_model.weights
    actual = actual_layer_or_model.weights
    assert [w.name for w in expected] == [w.name for w in actual]
    for e, a in zip(expected, actual):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(e), keras.ops.convert_to_numpy(a),
            err_msg=f"weight {e.path} differs",
        )


def run_layer_test(
    layer_cls,
    init_kwargs,
    input_shape,
    expected_num_trainable_weights,
    expected_num_non_trainable_weights,
    expected_output_shape=None,
    run_training_check=True,
    run_save_check=True,
):
    """Exercise a layer the way a user's model would.

    Args:
        layer_cls: The layer class.
        init_kwargs: Constructor arguments.
        input_shape: Full input shape including the batch dimension.
        expected_num_trainable_weights: Count after build.
        expected_num_non_trainable_weights: Count after build.
        expected_output_shape: Defaults to `input_shape`.
        run_training_check: Fit one epoch and check that the trainable
            weights moved and the loss is finite.
        run_save_check: `.keras` and `.weights.h5` round trips.
    """
    expected_output_shape = expected_output_shape or input_shape
    x = random_batch(input_shape, seed=1, loc=0.5, scale=2.0)

    # Construction, build, weights, output shape.
    layer = layer_cls(**init_kwargs)
    y = layer(x, training=True)
    assert tuple(y.shape) == tuple(expected_output_shape)
    assert len(layer.trainable_weights) == expected_num_trainable_weights, [
        w.path for w in layer.trainable_weights
    ]
    assert len(layer.non_trainable_weights) == (
        expected_num_non_trainable_weights
    ), [w.path for w in layer.non_trainable_weights]
    assert tuple(layer.compute_output_shape(input_shape)) == tuple(
        expected_output_shape
    )

    # Config round trip: same config, and from_config builds a working layer.
    config = layer.get_config()
    clone = layer_cls.from_config(config)
    assert clone.get_config() == config
    clone(x, training=False)
    serialized = keras.saving.serialize_keras_object(layer)
    revived = keras.saving.deserialize_keras_object(serialized)
    assert type(revived) is layer_cls
    assert revived.get_config() == config

    inputs = keras.Input(input_shape[1:], batch_size=None)
    model = keras.Model(inputs, layer_cls(**init_kwargs)(inputs))

    if run_training_check:
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        before = [w.numpy().copy() for w in model.trainable_weights]
        target = random_batch(expected_output_shape, seed=2)
        history = model.fit(x, target, batch_size=max(1, input_shape[0] // 2),
                            epochs=1, verbose=0, shuffle=False)
        assert np.isfinite(history.history["loss"]).all()
        after = [w.numpy() for w in model.trainable_weights]
        for b, a in zip(before, after):
            assert not np.array_equal(b, a), "a trainable weight did not move"
    else:
        model(x, training=True)

    if run_save_check:
        expected = keras.ops.convert_to_numpy(model(x, training=False))
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.keras")
            model.save(path)
            loaded = keras.models.load_model(path)
            assert_weights_equal(model, loaded)
            np.testing.assert_array_equal(
                keras.ops.convert_to_numpy(loaded(x, training=False)), expected
            )

            weights_path = os.path.join(tmp, "model.weights.h5")
            model.save_weights(weights_path)
            fresh = keras.Model(inputs, layer_cls(**init_kwargs)(inputs))
            fresh.load_weights(weights_path)
            assert_weights_equal(model, fresh)
    return model


def fit_single_and_mirrored(build, x, target, global_batch, strategy):
    """One epoch of `build()` on one device and under `strategy`.

    Both see the same global batches in the same order (no shuffling);
    returns `(single, mirrored)`.
    """
    import tensorflow as tf

    def dataset():
        return tf.data.Dataset.from_tensor_slices((x, target)).batch(
            global_batch)

    single = build()
    single.fit(dataset(), epochs=1, verbose=0, shuffle=False)
    with strategy.scope():
        mirrored = build()
    mirrored.fit(dataset(), epochs=1, verbose=0, shuffle=False)
    return single, mirrored


def save_and_reload(model, build, how, directory):
    """`model` through a `.keras` file (`how="keras_file"`) or through a
    weights file into a fresh `build()` (`how="weights_file"`)."""
    if how == "keras_file":
        path = os.path.join(str(directory), "model.keras")
        model.save(path)
        return keras.models.load_model(path)
    path = os.path.join(str(directory), "model.weights.h5")
    model.save_weights(path)
    fresh = build()
    fresh.load_weights(path)
    return fresh
