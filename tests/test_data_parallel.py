"""Synchronized statistics on JAX: `keras.distribution.DataParallel`.

Run with `KERASBN_TEST_BACKEND=jax` (conftest gives JAX two host CPU
devices). Under DataParallel the batch is sharded over the devices and the
train step is one SPMD program, so a mean over the batch axis is the mean
of the GLOBAL batch: training on two devices must give the weights and
moving statistics of one device on the same global batches. The oracle is
the same model trained without a distribution.
"""

import keras
import numpy as np
import pytest

import kerasbn
from tests.helpers import assert_close_to_scale
from tests.helpers import assert_weights_close

pytestmark = [
    pytest.mark.any_backend,
    pytest.mark.skipif(keras.backend.backend() != "jax",
                       reason="keras.distribution runs on JAX"),
]

NORMALIZATIONS = {
    "keras_bn": lambda: keras.layers.BatchNormalization(momentum=0.8),
    "zero_debias": lambda: kerasbn.layers.BatchNormalization(
        momentum=0.8, zero_debias=True),
    "renorm": lambda: kerasbn.layers.BatchRenormalization(
        momentum=0.8, warmup_steps=1, rmax_steps=3, dmax_steps=3),
    "mabn": lambda: kerasbn.layers.MABN(
        buffer_size=2, warmup_steps=2, clip_start_step=3, momentum=0.8),
}


def _train(name, distribution):
    import jax  # noqa: F401  (the backend)

    keras.distribution.set_distribution(distribution)
    try:
        conv = (kerasbn.layers.CenteredConv2D if name == "mabn"
                else keras.layers.Conv2D)
        keras.utils.set_random_seed(3)
        inputs = keras.Input((6, 6, 2))
        h = conv(4, 3, use_bias=False)(inputs)
        h = keras.layers.ReLU()(NORMALIZATIONS[name]()(h))
        h = keras.layers.GlobalAveragePooling2D()(h)
        model = keras.Model(inputs, keras.layers.Dense(3)(h))
        rng = np.random.default_rng(0)
        for weight in model.trainable_weights:  # same start on both
            weight.assign(rng.normal(0, 0.5, weight.shape).astype(
                weight.dtype))
        model.compile(keras.optimizers.SGD(0.05), "mse")
        x = rng.normal(0.5, 2.0, size=(48, 6, 6, 2)).astype("float32")
        y = rng.normal(size=(48, 3)).astype("float32")
        model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        return model
    finally:
        keras.distribution.set_distribution(None)


@pytest.mark.parametrize("name", sorted(NORMALIZATIONS))
def test_two_devices_match_one_device_on_the_global_batch(name):
    import jax

    devices = jax.devices()
    assert len(devices) == 2, "conftest sets two host devices for JAX"
    single = _train(name, None)
    data_parallel = _train(
        name, keras.distribution.DataParallel(devices=devices))
    # The weights really live on both devices (replicated).
    assert len(data_parallel.weights[0].value.sharding.device_set) == 2
    # The same sums over the global batch, reduced in another order
    # across the two shards: float32 rounding, ~1e-7 of each weight's
    # scale per step over 6 steps. A per-device statistic (half batches)
    # is off by ~1e-1.
    assert_weights_close(data_parallel, single, 1e-5)


def test_recalibrate_under_data_parallel_is_one_device():
    """One process holds all the data: under DataParallel (weights
    replicated on both devices) recalibrate gives one device's result."""
    x = np.random.default_rng(4).normal(1.0, 2.0, size=(30, 6, 6, 2))
    results = []
    for distribution in (None, keras.distribution.DataParallel()):
        keras.distribution.set_distribution(distribution)
        try:
            keras.utils.set_random_seed(5)
            inputs = keras.Input((6, 6, 2))
            h = keras.layers.Conv2D(4, 3)(inputs)
            h = keras.layers.BatchNormalization(name="bn1")(h)
            h = keras.layers.Conv2D(3, 1)(keras.layers.ReLU()(h))
            h = kerasbn.layers.BatchNormalization(zero_debias=True,
                                                  name="bn2")(h)
            model = keras.Model(inputs, h)
            new = kerasbn.recalibrate(model, x.astype("float32"),
                                      batch_size=8, verbose=0)
            results.append([np.asarray(w) for name in ("bn1", "bn2")
                            for w in (new.get_layer(name).moving_mean,
                                      new.get_layer(name).moving_variance)])
        finally:
            keras.distribution.set_distribution(None)
    for single, parallel in zip(*results):
        assert_close_to_scale(parallel, single, 1e-6, "statistics")
