"""kerasbn.recalibrate against NumPy's population statistics.

The oracle for layer k builds a sub-model from the recalibrated model's
inputs to layer k's input, runs it over all the data and takes np.mean and
np.var in float64: the statistics the layer should hold, given the
(recalibrated) layers before it.
"""

import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits

import kerasbn
from kerasbn.stats import _staged
from tests.helpers import assert_close_to_scale
from tests.helpers import random_batch
from tests.helpers import to_numpy
from tests.helpers import randomize_normalizations

pytestmark = pytest.mark.any_backend

L = keras.layers


def _cnn():
    """Conv -> Keras BN -> Conv -> kerasbn BN (debiased) -> BatchRenorm."""
    inputs = keras.Input((9, 9, 3))
    h = L.Conv2D(4, 3, use_bias=False)(inputs)
    h = L.BatchNormalization(name="bn_keras")(h)
    h = L.ReLU()(h)
    h = L.Conv2D(5, 3, padding="same")(h)
    h = kerasbn.layers.BatchNormalization(zero_debias="mean",
                                          name="bn_debiased")(h)
    h = L.ReLU()(h)
    h = L.DepthwiseConv2D(3)(h)
    h = kerasbn.layers.BatchRenormalization(name="bn_renorm")(h)
    outputs = L.Dense(2)(L.GlobalAveragePooling2D()(h))
    return randomize_normalizations(keras.Model(inputs, outputs),
                                    gamma=(0.5, 2.0), shift=1.0)


def _normalizations(model):
    return [layer for layer in model.layers
            if isinstance(layer, L.BatchNormalization)]


def _numpy_statistics(model, layer, x, positions=None):
    """np.mean/np.var of `layer`'s inputs over all of `x` (float64)."""
    layer_input = layer.input
    if isinstance(layer_input, (list, tuple)):
        layer_input = layer_input[0]  # [inputs, mask] when given a mask.
    sub = keras.Model(model.inputs, layer_input)
    values = np.asarray(sub.predict(x, batch_size=64, verbose=0), np.float64)
    if positions is not None:
        values = values[positions]
    values = values.reshape(-1, values.shape[-1])
    return values.mean(axis=0), values.var(axis=0)


def _weights(model):
    return [np.array(w.numpy()) for w in model.weights]


def _statistics(model):
    return {
        layer.name: [np.array(w.numpy()) for w in layer.non_trainable_weights]
        for layer in _normalizations(model)
    }


def test_matches_numpy_at_two_batch_sizes():
    model = _cnn()
    x = random_batch((150, 9, 9, 3), seed=3, loc=1.5, scale=2.0)
    before = _weights(model)
    small = kerasbn.recalibrate(model, x, batch_size=7, verbose=0)
    large = kerasbn.recalibrate(model, x, batch_size=64, verbose=0)

    # The input model is untouched; the copies are new models.
    for b, a in zip(before, _weights(model)):
        np.testing.assert_array_equal(b, a)
    assert small is not model and large is not model

    for result in (small, large):
        for layer in _normalizations(result):
            mean, variance = _numpy_statistics(result, layer, x)
            assert_close_to_scale(layer.moving_mean.numpy(), mean, 1e-5,
                                  f"{layer.name} mean")
            assert_close_to_scale(layer.moving_variance.numpy(), variance,
                                  1e-5, f"{layer.name} variance")
    for name, values in _statistics(small).items():
        for s, g in zip(values, _statistics(large)[name]):
            assert_close_to_scale(s, g, 1e-6, name)

    renorm = large.get_layer("bn_renorm")
    stddev = np.sqrt(renorm.moving_variance.numpy().astype(np.float64)
                     + renorm.epsilon)
    assert_close_to_scale(renorm.moving_stddev.numpy(), stddev, 1e-6, "stddev")
    assert_close_to_scale(renorm.renorm_stddev.numpy(), stddev, 1e-6, "renorm")
    assert_close_to_scale(renorm.renorm_mean.numpy(),
                          renorm.moving_mean.numpy(), 1e-6, "renorm mean")
    # Counters stay: they describe training, not the statistics.
    assert int(renorm.renorm_step.numpy()) == 0
    assert int(large.get_layer("bn_debiased").debias_step.numpy()) == 0

    # Every weight that is not a statistic is untouched.
    statistic_names = {"moving_mean", "moving_variance", "moving_stddev",
                       "renorm_mean", "renorm_stddev"}
    for old, new in zip(model.weights, large.weights):
        if new.name not in statistic_names:
            np.testing.assert_array_equal(old.numpy(), new.numpy(),
                                          err_msg=new.path)


def test_independent_of_old_statistics_and_inplace():
    x = random_batch((40, 9, 9, 3), seed=4)
    model = _cnn()
    first = kerasbn.recalibrate(model, x, verbose=0)
    randomize_normalizations(model, seed=99, gamma=(0.5, 2.0), shift=1.0)
    for layer in _normalizations(model):
        # Give back gamma/beta so only the statistics differ.
        layer.gamma.assign(first.get_layer(layer.name).gamma)
        layer.beta.assign(first.get_layer(layer.name).beta)
    returned = kerasbn.recalibrate(model, x, inplace=True, verbose=0)
    assert returned is model
    for name, values in _statistics(first).items():
        for a, b in zip(values, _statistics(model)[name]):
            assert_close_to_scale(b, a, 1e-6, name)


def test_masked_positions_are_left_out():
    rng = np.random.default_rng(5)
    tokens = rng.integers(1, 20, size=(60, 12))
    lengths = rng.integers(1, 13, size=60)
    tokens[np.arange(12)[None, :] >= lengths[:, None]] = 0
    inputs = keras.Input((12,), dtype="int32")
    h = L.Embedding(20, 6, mask_zero=True)(inputs)
    h = L.Dense(5)(h)  # Dense keeps the mask.
    h = L.BatchNormalization(name="bn1")(h)
    h = L.Dense(4, activation="relu")(h)
    h = kerasbn.layers.BatchNormalization(name="bn2")(h)
    outputs = L.GlobalAveragePooling1D()(h)
    model = keras.Model(inputs, outputs)
    keep = tokens != 0
    results = [kerasbn.recalibrate(model, tokens, batch_size=b, verbose=0)
               for b in (5, 32)]
    for result in results:
        for name in ("bn1", "bn2"):
            layer = result.get_layer(name)
            mean, variance = _numpy_statistics(result, layer, tokens, keep)
            assert_close_to_scale(layer.moving_mean.numpy(), mean, 1e-5,
                                  name)
            assert_close_to_scale(layer.moving_variance.numpy(), variance,
                                  1e-5, name)
            # Padding positions would have pulled the statistics away.
            everything, _ = _numpy_statistics(result, layer, tokens)
            assert np.max(np.abs(everything - mean)) > 1e-3


def test_mabn_gets_the_population_second_moment():
    inputs = keras.Input((7, 3))
    h = L.Conv1D(4, 3, use_bias=False)(inputs)
    h = kerasbn.layers.MABN(name="mabn")(h)
    model = keras.Model(inputs, L.Flatten()(h))
    x = random_batch((30, 7, 3), seed=6, loc=1.0)
    step_before = int(model.get_layer("mabn").step.numpy())
    result = kerasbn.recalibrate(model, x, batch_size=8, verbose=0)
    layer = result.get_layer("mabn")
    mean, variance = _numpy_statistics(result, layer, x)
    assert_close_to_scale(layer.moving_variance.numpy(), variance + mean**2,
                          1e-5, "second moment")
    assert int(layer.step.numpy()) == step_before


class _Batches(keras.utils.PyDataset):
    def __init__(self, x, batch_size):
        super().__init__()
        self.x, self.batch_size = x, batch_size

    def __len__(self):
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, index):
        chunk = self.x[index * self.batch_size:(index + 1) * self.batch_size]
        return chunk, np.zeros(len(chunk))


def test_every_data_form_gives_the_same_statistics():
    model = _cnn()
    x = random_batch((45, 9, 9, 3), seed=7, loc=-1.0)
    y = np.zeros((45, 2), "float32")
    expected = _statistics(kerasbn.recalibrate(model, x, verbose=0))

    def generator():
        for start in range(0, 45, 10):
            yield x[start:start + 10], y[start:start + 10]

    forms = {
        "dataset": tf.data.Dataset.from_tensor_slices((x, y)).batch(16),
        "generator": generator(),
        "pydataset": _Batches(x, 11),
        "tuple of arrays": (x, y),
    }
    for what, data in forms.items():
        got = _statistics(kerasbn.recalibrate(model, data, verbose=0))
        for name, values in expected.items():
            for e, g in zip(values, got[name]):
                assert_close_to_scale(g, e, 1e-6, f"{what}: {name}")


def test_steps_limit_the_data_and_infinite_data_needs_steps():
    model = _cnn()
    x = random_batch((40, 9, 9, 3), seed=8)
    repeated = tf.data.Dataset.from_tensor_slices(x).batch(10).repeat()
    with pytest.raises(ValueError, match="infinite.*steps"):
        kerasbn.recalibrate(model, repeated, verbose=0)
    result = kerasbn.recalibrate(model, repeated, steps=2, verbose=0)
    layer = result.get_layer("bn_keras")
    mean, variance = _numpy_statistics(result, layer, x[:20])
    assert_close_to_scale(layer.moving_mean.numpy(), mean, 1e-5, "mean")
    assert_close_to_scale(layer.moving_variance.numpy(), variance, 1e-5, "var")


def test_layers_argument_and_errors():
    model = _cnn()
    x = random_batch((20, 9, 9, 3), seed=9)
    result = kerasbn.recalibrate(model, x, layers=["bn_debiased"], verbose=0)
    for name in ("bn_keras", "bn_renorm"):
        for a, b in zip(_statistics(model)[name], _statistics(result)[name]):
            np.testing.assert_array_equal(a, b)
    assert not np.array_equal(
        model.get_layer("bn_debiased").moving_mean.numpy(),
        result.get_layer("bn_debiased").moving_mean.numpy(),
    )
    with pytest.raises(ValueError, match="no layer named 'nope'"):
        kerasbn.recalibrate(model, x, layers=["nope"], verbose=0)
    with pytest.raises(ValueError, match="not a normalization layer"):
        kerasbn.recalibrate(model, x, layers=["dense"], verbose=0)
    with pytest.raises(ValueError, match="no batches"):
        kerasbn.recalibrate(model, tf.data.Dataset.from_tensor_slices(
            x).batch(4).take(0), verbose=0)
    with pytest.raises(TypeError, match="keras.Model"):
        kerasbn.recalibrate(model.layers[2], x, verbose=0)
    with pytest.raises(ValueError, match="verbose"):
        kerasbn.recalibrate(model, x, verbose=3)


def test_nested_model_and_progress_bar(capsys):
    inner = keras.Sequential([keras.Input((5,)), L.Dense(4),
                              L.BatchNormalization(name="inner_bn")],
                             name="inner")
    inputs = keras.Input((5,))
    h = L.BatchNormalization(name="outer_bn")(inputs)
    outputs = inner(h)
    model = keras.Model(inputs, outputs)
    x = random_batch((33, 5), seed=10, loc=3.0)
    result = kerasbn.recalibrate(model, x, batch_size=10, verbose=1)
    printed = capsys.readouterr().out
    # The copy is deep: the nested model's statistics in `model` stay.
    untouched = model.get_layer("inner").get_layer("inner_bn")
    np.testing.assert_array_equal(untouched.moving_mean.numpy(), 0.0)
    assert "2 normalization layer(s) in 2 stage(s)" in printed
    assert "2/2" in printed  # The progress bar's last update.
    outer = result.get_layer("outer_bn")
    assert_close_to_scale(outer.moving_mean.numpy(), x.mean(0), 1e-5, "outer")
    bn = result.get_layer("inner").get_layer("inner_bn")
    dense = result.get_layer("inner").get_layer("dense")
    normalized = result.get_layer("outer_bn")(x, training=False)
    h = to_numpy(dense(normalized)).astype(np.float64)
    # The outer BN centres the data, so this mean is ~1e-7, float32
    # rounding of activations of size ~1: held to 1e-5 of their scale.
    assert_close_to_scale(bn.moving_mean.numpy(), h.mean(0), 1e-5,
                          "inner mean", floor=float(np.abs(h).max()))
    assert_close_to_scale(bn.moving_variance.numpy(), h.var(0), 1e-5,
                          "inner var")


def test_accuracy_recovers_on_shifted_digits():
    """A real dataset: brightness/contrast shift, then recalibration."""
    digits = load_digits()
    x = (digits.images / 16.0).astype("float32")[..., None]
    y = digits.target
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], y[order]
    x_train, y_train, x_test, y_test = x[:1300], y[:1300], x[1300:], y[1300:]

    # 'valid' convolutions are affine in their input, so a BN after them can
    # undo an affine input shift once its statistics are re-estimated.
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        L.Conv2D(16, 3, use_bias=False),
        L.BatchNormalization(momentum=0.9),
        L.ReLU(),
        L.Conv2D(32, 3, use_bias=False),
        L.BatchNormalization(momentum=0.9),
        L.ReLU(),
        L.Flatten(),
        L.Dense(10),
    ])
    model.compile(keras.optimizers.Adam(3e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(x_train, y_train, batch_size=32, epochs=5, verbose=0)

    def accuracy(m, images):
        logits = m.predict(images, batch_size=256, verbose=0)
        return float(np.mean(np.argmax(logits, axis=-1) == y_test))

    def shift(images):
        return 0.5 * images + 1.0  # Less contrast, brighter.

    clean = accuracy(model, x_test)
    shifted = accuracy(model, shift(x_test))
    recalibrated = kerasbn.recalibrate(model, shift(x_train), verbose=0)
    recovered = accuracy(recalibrated, shift(x_test))
    assert clean > 0.93, clean
    assert shifted < 0.4, shifted
    assert recovered > clean - 0.02, (clean, shifted, recovered)


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = L.Dense(3)
        self.bn = L.BatchNormalization()

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)


def test_subclassed_model_in_place():
    model = Subclassed()
    x = random_batch((25, 4), seed=11, loc=2.0)
    model(x)
    with pytest.raises(TypeError, match="inplace=True"):
        kerasbn.recalibrate(model, x, verbose=0)
    kerasbn.recalibrate(model, x, inplace=True, verbose=0)
    h = to_numpy(model.dense(x)).astype(np.float64)
    assert_close_to_scale(model.bn.moving_mean.numpy(), h.mean(0), 1e-5,
                          "mean")
    assert_close_to_scale(model.bn.moving_variance.numpy(), h.var(0), 1e-5,
                          "var")


def test_a_list_of_arrays_feeds_a_multi_input_model():
    """As `predict` reads it: one array per input (a list or a tuple), not
    (x, y); arrays of different lengths are refused, not cut to the
    first one's samples (a new user's trial found both)."""
    a, b = keras.Input((5,)), keras.Input((4,))
    model = keras.Model([a, b], L.BatchNormalization(name="bn")(
        L.Concatenate()([a, b])))
    xa = random_batch((9, 5), seed=1)
    xb = random_batch((9, 4), seed=2, loc=3.0)
    both = np.concatenate([xa, xb], axis=1).astype(np.float64)
    for data in ([xa, xb], (xa, xb)):
        bn = kerasbn.recalibrate(model, data, verbose=0).get_layer("bn")
        assert_close_to_scale(to_numpy(bn.moving_mean), both.mean(0), 1e-6,
                              "mean")
        assert_close_to_scale(to_numpy(bn.moving_variance), both.var(0),
                              1e-6, "variance")
    batched = tf.data.Dataset.from_tensor_slices((xa, xb)).batch(4)
    bn = kerasbn.recalibrate(model, batched, verbose=0).get_layer("bn")
    assert_close_to_scale(to_numpy(bn.moving_mean), both.mean(0), 1e-6,
                          "batched mean")
    with pytest.raises(ValueError, match=r"different numbers of samples "
                       r"\(\[9, 5\]\).*the model's inputs"):
        kerasbn.recalibrate(model, [xa, xb[:5]], verbose=0)
    with pytest.raises(ValueError, match=r"batches give 1 input array\(s\); "
                       r"model '.*' takes 2"):
        kerasbn.recalibrate(model, [xa, xb, xa], verbose=0)
    single = keras.Sequential([keras.Input((3,)), L.BatchNormalization()])
    x = random_batch((37, 3), seed=3)
    with pytest.raises(ValueError, match=r"\(\[10, 27\]\).*\(x, y"):
        kerasbn.recalibrate(single, [x[:10], x[10:]], verbose=0)


def test_a_layer_reading_its_own_output_gets_its_fixed_point():
    """A BN called again on a path through its own output: its statistics
    S must be the pooled moments of both calls' inputs computed with S
    (what the model sees at inference). NumPy computes both calls from
    the stored S; two different old statistics give the same S."""
    x = random_batch((200, 4), seed=1, loc=1.0, scale=2.0)
    results = []
    for seed in (0, 1):
        inputs = keras.Input((4,))
        bn = L.BatchNormalization(name="twice")
        dense = L.Dense(4, kernel_initializer=keras.initializers.RandomNormal(
            seed=1), name="dense")
        model = keras.Model(inputs, bn(dense(L.ReLU()(bn(inputs)))))
        rng = np.random.default_rng(seed)
        bn.moving_mean.assign(rng.normal(size=4) * 3)
        bn.moving_variance.assign(rng.uniform(0.1, 5.0, size=4))
        layer = kerasbn.recalibrate(model, x, verbose=0).get_layer("twice")
        mean = to_numpy(layer.moving_mean).astype(np.float64)
        var = to_numpy(layer.moving_variance).astype(np.float64)
        kernel, bias = (to_numpy(w).astype(np.float64)
                        for w in model.get_layer("dense").weights)
        first = x.astype(np.float64)
        normalized = (first - mean) / np.sqrt(var + layer.epsilon)
        second = np.maximum(normalized, 0.0) @ kernel + bias
        pooled = np.concatenate([first, second])
        # 1e-5 of scale: float32 activations, and the passes stop once a
        # statistic moves by less than 1e-6 of its scale.
        assert_close_to_scale(mean, pooled.mean(0), 1e-5, "mean")
        assert_close_to_scale(var, pooled.var(0), 1e-5, "variance")
        results.append((mean, var))
    for got, other in zip(*results):
        assert_close_to_scale(got, other, 1e-5, "independent of old")


def test_unbatched_data_and_a_model_without_normalizations(capsys):
    """Single samples get a hint to batch them (Keras' own error prints
    the data); a model with nothing to recalibrate warns; a subclassed
    model says it goes layer by layer, and why, and where the time went."""
    model = keras.Sequential([keras.Input((3,)), L.BatchNormalization()])
    x = random_batch((20, 3), seed=2)
    with pytest.raises(ValueError, match=r"shape \(3,\), one axis short.*"
                       r"\.batch\(32\)"):
        kerasbn.recalibrate(model, (row for row in x), verbose=0)
    plain = keras.Sequential([keras.Input((3,)), L.Dense(2)])
    with pytest.warns(UserWarning, match="no normalization layer"):
        assert kerasbn.recalibrate(plain, x, verbose=0) is not plain
    net = Subclassed()
    net(random_batch((2, 4)))
    clocks = []

    class Kept(_staged.Clock):
        def __init__(self):
            super().__init__()
            clocks.append(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_staged, "Clock", Kept)
        kerasbn.recalibrate(net, random_batch((25, 4), seed=3),
                            inplace=True, verbose=2)
    printed = capsys.readouterr().out
    assert "layer by layer, one pass over the data each (the model has " \
           "no layer graph)" in printed
    assert re.search(r"Time: copy [0-9.]+ s, .* layers [0-9.]+ s", printed)
    assert clocks[0].seconds["layers"] > 0  # The passes were timed.


def test_a_strongly_self_amplifying_layer_still_settles():
    """A new user's case where plain repetition oscillates: the BN's
    second input is 3x its own normalized output (its gain, 3 / std, is
    ~20), so every pass overshoots. The stored statistics must still be
    consistent: NumPy's pooled moments of both calls' inputs, computed
    with them, within 1e-5 (means in standard deviations, variances
    relative; the passes stop at 1e-6 of scale, float32 storage)."""
    x = random_batch((64, 2), seed=2, loc=0.5, scale=0.01)
    inputs = keras.Input((2,))
    dense = L.Dense(2, name="dense")
    bn = L.BatchNormalization(name="twice")
    model = keras.Model(inputs, bn(dense(bn(inputs))))
    dense.kernel.assign(3 * np.eye(2, dtype="float32"))
    dense.bias.assign(np.array([1.0, -1.0], "float32"))
    layer = kerasbn.recalibrate(model, x, verbose=0).get_layer("twice")
    mean = to_numpy(layer.moving_mean).astype(np.float64)
    var = to_numpy(layer.moving_variance).astype(np.float64)
    first = x.astype(np.float64)
    second = 3 * (first - mean) / np.sqrt(var + layer.epsilon) + [1.0, -1.0]
    pooled = np.concatenate([first, second])
    np.testing.assert_array_less(np.abs(mean - pooled.mean(0)),
                                 1e-5 * np.sqrt(var))
    np.testing.assert_allclose(var, pooled.var(0), rtol=1e-5)


# -- The per-batch moments on TensorFlow (`_collect._column_moments`). ------
# Float32 partial sums of 32 positions, shifted near the mean, then float64:
# each partial sum is off by at most 31 * 2**-24 = 1.8e-6 of the sum of the
# magnitudes it adds, so a mean is within 1.8e-6 of the mean |x - shift|
# (about 1.6 standard deviations for a shift one sample away: 3e-6 of the
# standard deviation) and a sum of squares within 1.8e-6 relative, whatever
# the data; NumPy's float64 moments of the same float32 values are the
# oracle (they measure 1e-9 to 1e-7 away).
_MOMENT_CASES = {
    "normal": lambda rng: rng.normal(0.0, 1.0, (5003, 9)),
    "mean far from zero": lambda rng: rng.normal(1e4, 1.0, (70001, 5)),
    "post-relu": lambda rng: np.maximum(rng.normal(0.0, 1.0, (4097, 16)), 0),
    "float16": lambda rng: rng.normal(3.0, 2.0, (3000, 4)).astype("float16"),
    "one position": lambda rng: rng.normal(0.0, 1.0, (1, 4)),
    # Squares of deviations past float32's range: computed again in float64.
    "beyond float32 squares": lambda rng: rng.normal(0.0, 1e20, (100, 3)),
    # Squares below float32's smallest normal, which TensorFlow flushes to
    # zero on CPU (24% of this variance lost, found by a new user's trial):
    # computed again in float64 too.
    "tiny spread": lambda rng: rng.normal(0.0, 1e-19, (300, 3)),
    "tinier spread": lambda rng: rng.normal(5e-20, 1e-20, (300, 3)),
    "one constant channel": lambda rng: np.concatenate(
        [rng.normal(0.0, 1.0, (500, 2)), np.full((500, 1), 0.25)], axis=1),
}


@pytest.mark.parametrize("case", sorted(_MOMENT_CASES))
def test_float32_moments_are_within_their_rounding_bound(case):
    from kerasbn.stats import _collect

    x = _MOMENT_CASES[case](np.random.default_rng(3))
    if x.dtype != np.float16:
        x = x.astype("float32")
    count, mean, m2 = (v.numpy() for v in _collect._column_moments(
        tf.constant(x)))
    exact = np.asarray(x, np.float64)
    exact_mean = exact.mean(axis=0)
    exact_m2 = ((exact - exact_mean) ** 2).sum(axis=0)
    std = np.sqrt(exact_m2 / len(x))
    assert count == len(x)
    assert np.all(np.abs(mean - exact_mean) <= 3e-6 * std + 1e-12 * np.abs(
        exact_mean))
    np.testing.assert_allclose(m2, exact_m2, rtol=2e-6, atol=0)


def test_float32_moments_of_nothing_and_of_nan():
    from kerasbn.stats import _collect

    count, mean, m2 = (v.numpy() for v in _collect._column_moments(
        tf.zeros((0, 3))))
    assert count == 0 and not mean.any() and not m2.any()
    x = np.ones((64, 3), np.float32)
    x[40, 1] = np.nan
    _, mean, m2 = (v.numpy() for v in _collect._column_moments(
        tf.constant(x)))
    assert np.isnan(mean[1]) and np.isnan(m2[1])
    assert mean[0] == 1 and m2[0] == 0
