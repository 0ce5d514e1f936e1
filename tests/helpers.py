"""Shared test helpers: tolerances, random data, normalization weights,
the layer contract, fold oracles and two-run comparisons.

Every test module imports from here, one way: `from tests.helpers import
name`.

`run_layer_test` checks what every kerasbn layer owes its users: the weight
counts, output shape, `get_config`/`from_config`, a real training step in
`model.fit`, and round trips through a `.keras` file and a weights file.
The round trips compare against the model as it was before saving (outputs
in inference mode and every weight, trainable or not), so a state variable
that fails to save, or a config argument that is dropped, fails the test.
"""

import importlib.util
import os
import pathlib
import sys
import tempfile

import keras
import numpy as np
import tensorflow as tf

import kerasbn

# --------------------------------------------------------------------------
# Arrays and tolerances.


def to_numpy(x):
    """A tensor or Keras variable as a NumPy array (bfloat16 as float32
    on PyTorch, whose `.numpy()` has no bfloat16)."""
    if keras.backend.backend() == "torch":
        x = getattr(x, "value", x)
        if hasattr(x, "detach"):
            x = x.detach()
            if str(x.dtype) == "torch.bfloat16":
                x = x.float()
    return keras.ops.convert_to_numpy(x)


def assert_close_to_scale(actual, expected, rel, what="", floor=1e-12):
    """|actual - expected| <= rel * max(max|expected|, floor) elementwise.

    Tolerances relative to the largest magnitude of the reference, so a
    near-zero element is held to the rounding of the values around it;
    `floor` is the smallest scale used for a reference that is all near 0.
    """
    expected = np.asarray(to_numpy(expected), np.float64)
    scale = max(float(np.max(np.abs(expected))), floor)
    np.testing.assert_allclose(
        np.asarray(to_numpy(actual), np.float64), expected, rtol=0,
        atol=rel * scale,
        err_msg=what,
    )


def assert_weights_close(actual, expected, rel, what="", floor=1e-12):
    """Every weight of `actual` (a layer or model) matches `expected`'s,
    same names in the same order, each by `assert_close_to_scale`."""
    assert [w.name for w in actual.weights] == [
        w.name for w in expected.weights]
    for a, e in zip(actual.weights, expected.weights):
        assert_close_to_scale(to_numpy(a), to_numpy(e), rel,
                              f"{a.path}, {what}" if what else a.path, floor)


def assert_weights_equal(expected_layer_or_model, actual_layer_or_model):
    """The same weights, names and values bit for bit."""
    expected = expected_layer_or_model.weights
    actual = actual_layer_or_model.weights
    assert [w.name for w in expected] == [w.name for w in actual]
    for e, a in zip(expected, actual):
        np.testing.assert_array_equal(
            to_numpy(e), to_numpy(a), err_msg=f"weight {e.path} differs",
        )


def weights_snapshot(model):
    """Copies of `model.get_weights()`."""
    return [np.array(w) for w in model.get_weights()]


def random_batch(shape, seed=0, loc=0.0, scale=1.0, dtype="float32"):
    """Normal samples of `shape` with a fixed seed."""
    rng = np.random.default_rng(seed)
    return rng.normal(loc, scale, size=shape).astype(dtype)


def inputs_for(model, batch=2, seed=1):
    """Standard normal inputs for every input of `model` (one array if it
    has one input, else a list)."""
    rng = np.random.default_rng(seed)
    arrays = [
        rng.normal(size=(batch,) + tuple(x.shape[1:])).astype("float32")
        for x in model.inputs
    ]
    return arrays[0] if len(arrays) == 1 else arrays


# --------------------------------------------------------------------------
# Normalization layers.

# Weight name -> what is drawn for it: "gamma" (uniform over `gamma`),
# "shift" (normal, standard deviation `shift`), "spread" (uniform over
# `variance`), "step" (set to `steps` if given).
_NORMALIZATION_WEIGHTS = {
    "gamma": "gamma",
    "beta": "shift",
    "moving_mean": "shift",
    "renorm_mean": "shift",
    "moving_variance": "spread",
    "moving_stddev": "spread",
    "renorm_stddev": "spread",
    "debias_step": "step",
    "renorm_step": "step",
    "step": "step",
}


def _is_normalization(layer):
    return isinstance(layer, (keras.layers.BatchNormalization,
                              kerasbn.layers.MovingAverageBatchNormalization))


def randomize_normalizations(layer, seed=0, *, gamma=(0.5, 1.5), shift=0.5,
                             variance=(0.5, 2.0), steps=None, names=None):
    """Give every BN-like layer in `layer` non-trivial weights.

    With the defaults gamma=1, beta=0, mean=0, variance=1 a BN is almost
    the identity: a fold that drops it, applies it on the wrong axis, or an
    equivalence that ignores a statistic would still pass. Random values
    per channel expose them.

    `layer` is a BatchNormalization (Keras' or a kerasbn subclass) or MABN
    layer, or a layer or model holding some, nested ones included. One
    generator seeded with `seed` draws, layer by layer and weight by weight
    in `layer.weights` order: `gamma` uniform in `gamma`; `beta`,
    `moving_mean`, `renorm_mean` normal with mean 0 and standard deviation
    `shift`; `moving_variance`, `moving_stddev`, `renorm_stddev` uniform in
    `variance`. Step counters (`debias_step`, `renorm_step`, MABN's `step`)
    are kept, or set to `steps`; MABN's buffers are kept. `names` limits
    the weights drawn to those names.

    The defaults keep deep stacks of folded normalizations near unit scale
    (what the fold tests use); single-layer tests widen them with
    `gamma=(0.5, 2.0), shift=1.0`. Returns `layer`.
    """
    rng = np.random.default_rng(seed)
    for inner in layer._flatten_layers(include_self=True, recursive=True):
        if not _is_normalization(inner):
            continue
        for variable in inner.weights:
            kind = _NORMALIZATION_WEIGHTS.get(variable.name)
            if kind is None or (names is not None
                                and variable.name not in names):
                continue
            shape = tuple(variable.shape)
            if kind == "step":
                if steps is not None:
                    variable.assign(steps)
                continue
            if kind == "gamma":
                value = rng.uniform(gamma[0], gamma[1], shape)
            elif kind == "shift":
                value = rng.normal(0.0, shift, shape)
            else:
                value = rng.uniform(variance[0], variance[1], shape)
            variable.assign(value.astype(variable.dtype))
    return layer


def count_batch_norms(model):
    """BatchNormalization layers (Keras' or kerasbn's) left in `model`."""
    return sum(
        1
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, keras.layers.BatchNormalization)
    )


def count_scale_shift(model):
    """`kerasbn.layers.ScaleShift` layers in `model`."""
    return sum(
        1
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, kerasbn.layers.ScaleShift)
    )


def assert_same_outputs(original, folded, inputs, rtol=1e-5):
    """Folded and original inference outputs agree relative to their scale.

    The reference is Keras' own inference pass of the untouched model. The
    fold is computed in float64 and cast to float32 (about 3e-7 relative
    rounding per weight); the convolutions then accumulate in a different
    order with rescaled kernels, about 1e-6 of max|y|. 1e-5 of max|y|
    (at least 1e-6) leaves a margin of ten over that while a wrong axis or
    a missing shift is off by order 1e-1.
    """
    expected = keras.tree.flatten(original(inputs, training=False))
    actual = keras.tree.flatten(folded(inputs, training=False))
    assert len(expected) == len(actual)
    for k, (e, a) in enumerate(zip(expected, actual)):
        e, a = to_numpy(e), to_numpy(a)
        assert e.shape == a.shape
        assert_close_to_scale(a, e, rtol, f"output {k}", floor=1e-6)


def fold_and_check(model, **options):
    """`kerasbn.fold(model)`, checked: same outputs, input model untouched."""
    before = weights_snapshot(model)
    result = kerasbn.fold(model, **options)
    assert_same_outputs(model, result.model, inputs_for(model))
    after = weights_snapshot(model)
    assert all(np.array_equal(a, b) for a, b in zip(before, after))
    return result


def outputs_and_gradients(layer, x, mask, upstream):
    """A training-mode call of `layer` and the gradients of
    `sum(y * upstream)` with respect to `x` and its trainable weights
    (on the backend the suite runs on; the layer's state is updated)."""
    backend = keras.backend.backend()
    if backend == "jax":
        return _jax_outputs_and_gradients(layer, x, mask, upstream)
    if backend == "torch":
        import torch

        x = keras.ops.convert_to_tensor(x).detach().requires_grad_(True)
        y = layer(x, training=True, mask=mask)
        loss = (y.float() * torch.as_tensor(np.asarray(upstream))).sum()
        grads = torch.autograd.grad(
            loss, [x] + [w.value for w in layer.trainable_weights])
        return to_numpy(y.detach()), [to_numpy(g) for g in grads]
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True, mask=mask)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
    grads = tape.gradient(loss, [x] + layer.trainable_weights)
    return to_numpy(y), [to_numpy(g) for g in grads]


def _jax_outputs_and_gradients(layer, x, mask, upstream):
    import jax
    import jax.numpy as jnp

    if not layer.built:
        layer.build(np.shape(x))
    trainable = [v.value for v in layer.trainable_variables]
    fixed = [v.value for v in layer.non_trainable_variables]

    def loss(x, values):
        y, new_fixed = layer.stateless_call(values, fixed, x, training=True,
                                            mask=mask)
        total = jnp.sum(y.astype("float32") * jnp.asarray(upstream))
        return total, (y, new_fixed)

    (_, (y, new_fixed)), (dx, grads) = jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True)(jnp.asarray(x), trainable)
    for variable, value in zip(layer.non_trainable_variables, new_fixed):
        variable.assign(value)
    return to_numpy(y), [to_numpy(dx)] + [to_numpy(g) for g in grads]


# --------------------------------------------------------------------------
# The layer contract.


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
        expected = to_numpy(model(x, training=False))
        with tempfile.TemporaryDirectory() as tmp:
            loaded = save_and_reload(model, None, "keras_file", tmp)
            assert_weights_equal(model, loaded)
            np.testing.assert_array_equal(
                to_numpy(loaded(x, training=False)), expected
            )
            fresh = save_and_reload(
                model, lambda: keras.Model(
                    inputs, layer_cls(**init_kwargs)(inputs)),
                "weights_file", tmp)
            assert_weights_equal(model, fresh)
    return model


# --------------------------------------------------------------------------
# Two runs of one model: two replicas against one, resumed against straight.


def conv_model(normalization, *, conv=keras.layers.Conv2D, seed=7, units=2,
               learning_rate=0.1, relu=False):
    """The small network of the distribution and resume tests, compiled.

    Input (6, 6, 2) -> `conv(4, 3, use_bias=False)` -> `normalization()`
    [-> ReLU] -> global average pooling -> Dense(units); SGD and MSE. The
    seed is set first, so every call gives the same initial weights;
    `model.layers[2]` is the normalization.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 2))
    h = conv(4, 3, use_bias=False)(inputs)
    h = normalization()(h)
    if relu:
        h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, keras.layers.Dense(units)(h))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate), loss="mse")
    return model


def fit_single_and_mirrored(normalization, strategy, *, steps, global_batch,
                            loc=1.0, **model_options):
    """One epoch of `conv_model(normalization, **model_options)` on one
    device and under `strategy`.

    Both see the same `steps` global batches of `global_batch` samples in
    the same order (no shuffling): inputs normal around `loc` with
    standard deviation 2 (seed 15), standard normal targets (seed 16).
    Returns `(single, mirrored)`.
    """
    units = model_options.get("units", 2)
    x = random_batch((steps * global_batch, 6, 6, 2), seed=15, loc=loc,
                     scale=2.0)
    target = random_batch((steps * global_batch, units), seed=16)

    def dataset():
        return tf.data.Dataset.from_tensor_slices((x, target)).batch(
            global_batch)

    single = conv_model(normalization, **model_options)
    single.fit(dataset(), epochs=1, verbose=0, shuffle=False)
    with strategy.scope():
        mirrored = conv_model(normalization, **model_options)
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


def fit_straight_and_resumed(build, x, target, batch_size, split, how,
                             directory, check_reloaded=None):
    """One epoch of `build()` in one go, and the same epoch interrupted.

    The interrupted run fits the first `split` batches, goes through
    `save_and_reload(..., how, directory)`, is passed to
    `check_reloaded(model)` if given, and fits the remaining batches. No
    shuffling. Returns `(straight, resumed)`.
    """

    def fit(model, part):
        model.fit(x[part], target[part], batch_size=batch_size,
                  shuffle=False, verbose=0)

    straight = build()
    fit(straight, slice(None))
    first = build()
    fit(first, slice(None, split * batch_size))
    resumed = save_and_reload(first, build, how, directory)
    if check_reloaded is not None:
        check_reloaded(resumed)
    fit(resumed, slice(split * batch_size, None))
    return straight, resumed


EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    """`examples/<name>.py` as a module (examples/ is not a package; an
    example imports `_digits` from its own folder while it loads)."""
    sys.path.insert(0, str(EXAMPLES))
    try:
        spec = importlib.util.spec_from_file_location(
            f"_kerasbn_example_{name}", EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(EXAMPLES))
    return module
