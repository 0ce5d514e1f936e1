"""Staged recalibration: one pass per generation of normalization layers.

Two oracles. NumPy: a sub-model from the recalibrated model's inputs to a
layer's input, run over all the data, np.mean/np.var in float64 (what the
layer must hold). And the layer-by-layer method (one full-model pass per
layer, with hooks), an independent algorithm tested against NumPy in
test_recalibrate.py, for models with many layers where a sub-model per
layer would be slow. Tolerances: activations are float32, and the staged
method runs the same layers in other graphs (other op fusion), so the
statistics agree to float32 rounding of the activations' scale; 1e-5 of
the scale leaves a margin of ~100 float32 ulps.
"""

import os
import re

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.stats import _collect
from kerasbn.stats import _plan
from kerasbn.stats import _staged
from tests.helpers import assert_close_to_scale
from tests.helpers import random_batch
from tests.helpers import randomize_normalizations
from tests.helpers import to_numpy

pytestmark = pytest.mark.any_backend

L = keras.layers


def _normalizations(model):
    return kerasbn.registry.normalization_layers(model)


def _statistics(model):
    return [(layer.name, to_numpy(layer.moving_mean).astype(np.float64),
             to_numpy(layer.moving_variance).astype(np.float64))
            for layer in _normalizations(model)]


def _assert_same_statistics(actual, expected, rel=1e-5):
    """Means in units of the channel's standard deviation, variances
    relative, as issue 16 states the exactness."""
    for (name, mean, var), (_, mean_ref, var_ref) in zip(
            _statistics(actual), _statistics(expected)):
        std = np.sqrt(var_ref)
        np.testing.assert_array_less(np.abs(mean - mean_ref),
                                     rel * std + 1e-12, err_msg=name)
        assert_close_to_scale(var, var_ref, rel, name)


def _layer_by_layer(model, x, monkeypatch, **kwargs):
    def refuse(*args, **kw):
        raise _plan.PlanRefused("test: the layer-by-layer method")

    with monkeypatch.context() as patch:
        patch.setattr(_plan, "read", refuse)
        return kerasbn.recalibrate(model, x, verbose=0, **kwargs)


def _oracle(model, layer, x):
    sub = keras.Model(model.inputs, layer.input)
    values = to_numpy(sub.predict(x, batch_size=64, verbose=0))
    values = values.astype(np.float64).reshape(-1, values.shape[-1])
    return values.mean(axis=0), values.var(axis=0)


def _assert_numpy_statistics(model, x):
    """Every normalization of `model` holds NumPy's moments of its inputs
    over `x` (1e-5 of scale: float32 activations, module docstring)."""
    for layer in _normalizations(model):
        mean, var = _oracle(model, layer, x)
        assert_close_to_scale(to_numpy(layer.moving_mean), mean, 1e-5,
                              layer.name)
        assert_close_to_scale(to_numpy(layer.moving_variance), var, 1e-5,
                              layer.name)


def _branchy():
    """Two parallel branches (one generation), a residual add, a concat."""
    inputs = keras.Input((8, 8, 3))
    stem = L.Conv2D(6, 3, padding="same", name="stem")(inputs)
    stem = L.BatchNormalization(name="bn_stem")(stem)
    left = L.Conv2D(4, 1, name="left")(L.ReLU()(stem))
    left = L.BatchNormalization(name="bn_left")(left)
    right = L.Conv2D(4, 3, padding="same", name="right")(L.ReLU()(stem))
    right = kerasbn.layers.BatchNormalization(zero_debias=True,
                                              name="bn_right")(right)
    merged = L.Add()([left, right])
    both = L.Concatenate()([merged, L.Conv2D(2, 1)(inputs)])
    out = L.BatchNormalization(name="bn_out")(both)
    outputs = L.Dense(3)(L.GlobalAveragePooling2D()(out))
    model = keras.Model(inputs, outputs)
    return randomize_normalizations(model, seed=2, gamma=(0.5, 2.0),
                                    shift=1.0)


def test_parallel_layers_share_a_stage_and_each_call_runs_once():
    model = _branchy()
    plan = _plan.read(model, _normalizations(model))
    stages = {step.operation.name: step.gather_stage
              for step in plan.steps if step.kind == "target"}
    assert stages == {"bn_stem": 1, "bn_left": 2, "bn_right": 2,
                      "bn_out": 3}
    assert plan.num_stages == 3
    runs = [index for stage in _staged.build_stages(plan, False)
            for index in stage.runs]
    # With the cache, no call runs twice (the head after bn_out: never).
    assert len(runs) == len(set(runs))
    names = {plan.steps[i].operation.name for i in runs}
    assert "dense" not in names and "bn_out" not in names


def test_matches_numpy_on_branches_in_every_cache_mode(tmp_path):
    model = _branchy()
    x = random_batch((70, 8, 8, 3), seed=5, loc=1.0, scale=2.0)
    results = {}
    for cache in ("auto", "disk", "none"):
        results[cache] = kerasbn.recalibrate(
            model, x, batch_size=16, verbose=0, cache=cache,
            cache_dir=str(tmp_path))
        assert os.listdir(tmp_path) == []  # Spilled files are removed.
    # A budget of 0 bytes spills everything to disk in "auto" mode.
    results["budget 0"] = kerasbn.recalibrate(
        model, x, batch_size=16, verbose=0, memory_budget=0)
    reference = results["auto"]
    _assert_numpy_statistics(reference, x)
    for cache, result in results.items():
        _assert_same_statistics(result, reference, rel=1e-6)


def _dense_chain():
    """DenseNet's pattern: each normalization reads the concatenation of
    every feature map so far (nested Concatenate layers), plus a concat
    along another axis and one of mixed dtypes, whose moments cannot
    come from their parts."""
    inputs = keras.Input((6, 6, 3))
    features = L.Conv2D(4, 3, padding="same", name="stem")(inputs)
    for i in range(3):
        h = L.BatchNormalization(name=f"bn{i}")(features)
        h = L.Conv2D(2, 1, name=f"conv{i}")(L.ReLU()(h))
        features = L.Concatenate(name=f"cat{i}")([features, h])
    across = L.Concatenate(axis=1, name="rows")([features, features])
    h = L.BatchNormalization(name="bn_rows")(across)
    half = L.Conv2D(3, 1, dtype="float16", name="half")(h)
    mixed = L.Concatenate(name="mixed")([L.Conv2D(3, 1)(h), half])
    outputs = L.BatchNormalization(name="bn_mixed")(mixed)
    model = keras.Model(inputs, outputs)
    return randomize_normalizations(model, seed=3, gamma=(0.5, 2.0),
                                    shift=1.0)


def test_moments_of_concatenations_come_from_their_parts(monkeypatch):
    """Each feature map's moments are computed once and reused by every
    later concatenation holding it (in later stages too); the statistics
    stay NumPy's. The tolerance is the module's (float32 activations)."""
    model = _dense_chain()
    x = random_batch((30, 6, 6, 3), seed=8, loc=0.5, scale=2.0)
    widths = []
    original = _staged._moments_of

    def counted(inputs, mask, axis):
        widths.append(int(inputs.shape[axis]))
        return original(inputs, mask, axis)

    monkeypatch.setattr(_staged, "_moments_of", counted)
    result = kerasbn.recalibrate(model, x, verbose=0)
    _assert_numpy_statistics(result, x)
    # stem (4) and conv0..conv2 (2 each) once; "rows" (10 channels, along
    # the rows) and "mixed" (float16 and float32 parts: 6) whole.
    assert sorted(widths) == sorted([4, 2, 2, 10, 6])


class Block(L.Layer):
    """A custom layer with two normalizations inside: opaque to the graph."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv1 = L.Conv2D(filters, 3, padding="same")
        self.bn1 = L.BatchNormalization()
        self.conv2 = L.Conv2D(filters, 1)
        self.bn2 = kerasbn.layers.BatchNormalization(zero_debias=True)

    def call(self, x, training=None):
        h = keras.ops.relu(self.bn1(self.conv1(x), training=training))
        return x + self.bn2(self.conv2(h), training=training)

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


def test_custom_layers_and_a_shared_layer(monkeypatch):
    """Normalizations inside custom layers (gathered one per stage on the
    layer's kept inputs) and a BN called on two branches (pooled)."""
    inputs = keras.Input((6, 6, 4))
    h = Block(4, name="block_a")(inputs)
    h = Block(4, name="block_b")(h)
    shared = L.BatchNormalization(name="shared")
    a = shared(L.Conv2D(3, 1, name="conv_a")(h))
    b = shared(L.Conv2D(3, 3, padding="same", name="conv_b")(h))
    outputs = L.BatchNormalization(name="last")(L.Add()([a, b]))
    model = randomize_normalizations(keras.Model(inputs, outputs), seed=4,
                                     gamma=(0.5, 2.0), shift=1.0)
    x = random_batch((40, 6, 6, 4), seed=6, loc=-1.0, scale=1.5)
    staged = kerasbn.recalibrate(model, x, batch_size=16, verbose=0)
    plan = _plan.read(model, _normalizations(model))
    assert plan.num_stages == 6  # 2 + 2 inside the blocks, shared, last
    _assert_same_statistics(staged, _layer_by_layer(model, x, monkeypatch,
                                                    batch_size=16))
    # And the last layer against NumPy.
    last = staged.get_layer("last")
    mean, var = _oracle(staged, last, x)
    assert_close_to_scale(to_numpy(last.moving_mean), mean, 1e-5, "mean")
    assert_close_to_scale(to_numpy(last.moving_variance), var, 1e-5, "var")


def test_a_layer_fed_by_itself_falls_back_to_layer_by_layer():
    inputs = keras.Input((5,))
    bn = L.BatchNormalization(name="again")
    h = bn(L.Dense(5)(inputs))
    outputs = bn(L.Dense(5)(h))
    model = keras.Model(inputs, outputs)
    with pytest.raises(_plan.PlanRefused):
        _plan.read(model, _normalizations(model))
    x = random_batch((20, 5), seed=1, loc=2.0)
    result = kerasbn.recalibrate(model, x, verbose=0)  # Still works.
    assert np.all(np.isfinite(to_numpy(
        result.get_layer("again").moving_mean)))


def test_cache_arguments_are_checked(tmp_path):
    model = _branchy()
    x = random_batch((4, 8, 8, 3))
    with pytest.raises(ValueError, match="cache.*Received: cache='memory'"):
        kerasbn.recalibrate(model, x, cache="memory", verbose=0)
    with pytest.raises(ValueError, match="memory_budget"):
        kerasbn.recalibrate(model, x, memory_budget=-1, verbose=0)
    with pytest.raises(ValueError, match="cache_dir"):
        kerasbn.recalibrate(model, x, cache_dir=str(tmp_path / "missing"),
                            verbose=0)


def test_verbose_two_names_each_stage(capsys):
    model = _branchy()
    kerasbn.recalibrate(model, random_batch((10, 8, 8, 3)), verbose=2)
    printed = capsys.readouterr().out
    assert "4 normalization layer(s) in 3 stage(s)" in printed
    assert "Stage 2/3: ['bn_left', 'bn_right']" in printed


def test_array_data_is_cut_into_wider_batches_unless_told(capsys):
    """Default batches of array data grow to `_STAGE_BATCH_BYTES` of input
    (fewer calls per stage); a given batch_size or steps is kept. The
    result does not change (NumPy oracle above; here: the same to float64
    rounding of the batch merge, 1e-6)."""
    model = _branchy()
    x = random_batch((200, 8, 8, 3), seed=3, loc=0.5)  # 768 B per sample
    wide = kerasbn.recalibrate(model, x, verbose=2)
    printed = capsys.readouterr().out
    assert "(1 batches," in printed  # 200 < 32 MiB / 768
    # verbose=2 ends with where the time went.
    assert re.search(r"Time: copy [0-9.]+ s, trace 0.00 s, data [0-9.]+ s, "
                     r"layers [0-9.]+ s, moments [0-9.]+ s, cache [0-9.]+ s, "
                     r"write [0-9.]+ s, other [0-9.]+ s \(total [0-9.]+ s\)",
                     printed)
    narrow = kerasbn.recalibrate(model, x, batch_size=32, verbose=2)
    assert "(7 batches," in capsys.readouterr().out
    _assert_same_statistics(wide, narrow, rel=1e-6)
    # Explicit steps: batches of 32 (steps count the caller's batches).
    kerasbn.recalibrate(model, x, steps=2, verbose=2)
    assert "(2 batches," in capsys.readouterr().out
    # A small byte limit: multiples of 32 that fit, at least 32.
    batches = _collect.Batches(x, what="test")
    assert batches.widen(100 * 768) == 96 and batches.num_batches == 3
    assert batches.widen(10) == 32


def test_batched_data_is_joined_into_wider_batches(capsys):
    """Batches that come batched (a generator of 10 batches of 20, one of
    another shape) are joined up to `_STAGE_BATCH_BYTES`, consecutive
    ones of one shape only; the statistics are NumPy's, and an error
    names the batches a joined one holds."""
    model = _branchy()
    x = random_batch((200, 8, 8, 3), seed=4, loc=0.5, scale=1.5)

    def batches():
        for start in range(0, 200, 20):
            yield x[start:start + 20]

    result = kerasbn.recalibrate(model, batches(), verbose=2)
    assert "(1 batches," in capsys.readouterr().out
    _assert_numpy_statistics(result, x)
    odd = [x[:20], x[20:40, :4, :4], x[40:60], x[60:80]]
    kerasbn.recalibrate(model, iter(odd), verbose=2)
    assert "(3 batches," in capsys.readouterr().out
    data = _collect.Batches(iter(odd), what="test")
    data.widen(2 ** 20)
    assert [int(b.shape[0]) for b in data] == [20, 20, 40]
    assert data.describe(2) == "batches 2 to 3 of the data"
    assert data.describe(1) == "batch 1 of the data"


class InitHeld(L.Layer):
    """Keeps its initializer under another name than its config key."""

    def __init__(self, units=3, kernel_initializer="ones", **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self._init = keras.initializers.get(kernel_initializer)

    def build(self, shape):
        self.kernel = self.add_weight((shape[-1], self.units), self._init)

    def call(self, x):
        return keras.ops.matmul(x, self.kernel)

    def get_config(self):
        return {**super().get_config(), "units": self.units,
                "kernel_initializer":
                    keras.initializers.serialize(self._init)}


def test_the_copy_keeps_initializers_and_weights():
    """recalibrate's copy skips random initialization (weights are copied
    over) and puts every initializer back; a layer that stores its
    initializer under another name is copied the usual way."""
    from kerasbn import _models

    inputs = keras.Input((4,))
    h = L.Dense(4, kernel_initializer="he_normal",
                bias_initializer="ones")(inputs)
    h = L.BatchNormalization(gamma_initializer="zeros")(h)
    model = keras.Model(inputs, InitHeld(name="held")(h))
    for custom in (False, True):
        source = model if custom else keras.Model(inputs, h)
        copy = _models.clone_with_weights(source, "test")
        for a, b in zip(source.layers[1:], copy.layers[1:]):
            assert a.get_config() == b.get_config(), a.name
        for a, b in zip(source.weights, copy.weights):
            np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    assert keras.initializers.serialize(
        copy.get_layer("held")._init)["class_name"] == "Ones"
    dense = keras.models.clone_model(model).layers[1]  # Keras' own copy
    assert copy.layers[1].kernel_initializer.get_config() == \
        dense.kernel_initializer.get_config()


@keras.saving.register_keras_serializable(package="kerasbn_tests")
class Swapped(L.Layer):
    """Its `kernel_initializer` makes `bias`, its `bias_initializer`
    makes `kernel`: same shapes, so an initializer given the value of the
    attribute its name points at would swap them."""

    def __init__(self, kernel_initializer="ones", bias_initializer="zeros",
                 **kwargs):
        super().__init__(**kwargs)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, shape):
        self.bias = self.add_weight((shape[-1], 4), self.kernel_initializer)
        self.kernel = self.add_weight((shape[-1], 4), self.bias_initializer)

    def call(self, x):
        return keras.ops.matmul(x, self.kernel) - keras.ops.matmul(
            x, self.bias)

    def get_config(self):
        return {**super().get_config(),
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer)}


def test_the_copy_is_made_from_the_values_where_keras_convention_holds(
        monkeypatch):
    """The copy's variables are made from the originals' values, and not
    assigned again, only where the initializer Keras used for a weight is
    the one given that weight's value: a renorm BN's extra weights (made
    from cloned initializers) and a layer whose initializer names point at
    the other weight are assigned. Every weight ends equal to the
    original's (or to the value given instead), bit for bit, and stays
    its own."""
    from kerasbn import _models

    inputs = keras.Input((4,))
    h = L.Dense(4, name="dense")(inputs)
    h = L.BatchNormalization(renorm=True, name="renorm")(h)
    h = L.BatchNormalization(name="bn")(h)
    model = keras.Model(inputs, Swapped(name="swapped")(h))
    rng = np.random.default_rng(0)
    for weight in model.weights:
        weight.assign(rng.normal(size=weight.shape).astype(weight.dtype))
    given = np.arange(4, dtype="float32") + 10.0
    bn = model.get_layer("bn")
    assigned = []
    variable_type = type(model.weights[0])
    assign = variable_type.assign

    def recorded(variable, value):
        assigned.append(variable)
        return assign(variable, value)

    monkeypatch.setattr(variable_type, "assign", recorded)
    copy = _models.clone_with_weights(model, "test",
                                      values={id(bn.moving_mean): given})
    monkeypatch.undo()
    renorm = model.get_layer("renorm")
    extra = [renorm.moving_stddev, renorm.renorm_mean, renorm.renorm_stddev]
    extra += model.get_layer("swapped").weights
    expected = sorted(i for i, w in enumerate(model.weights)
                      if any(w is e for e in extra))
    at = {id(w): i for i, w in enumerate(copy.weights)}
    assert sorted(at[id(v)] for v in assigned) == expected
    for source, target in zip(model.weights, copy.weights):
        want = given if source is bn.moving_mean else to_numpy(source)
        np.testing.assert_array_equal(to_numpy(target), want,
                                      err_msg=source.path)
        assert target is not source
    assert not np.array_equal(to_numpy(bn.moving_mean), given)
    model.get_layer("dense").kernel.assign(
        np.zeros((4, 4), dtype="float32"))
    assert np.any(to_numpy(copy.get_layer("dense").kernel) != 0)


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="big models on TensorFlow only; the JAX and "
                    "PyTorch runs cover the same code on small models")
@pytest.mark.parametrize("name", ["ResNet50", "DenseNet121"])
def test_keras_applications_match_the_layer_by_layer_method(name,
                                                            monkeypatch):
    """Models nobody here wrote, built from their constructors (no
    download), random BN statistics, small inputs."""
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(32, 32, 3), classes=4)
    randomize_normalizations(model, seed=0)
    x = random_batch((24, 32, 32, 3), seed=7, loc=0.5, scale=2.0)
    staged = kerasbn.recalibrate(model, x, batch_size=8, verbose=0)
    plan = _plan.read(model, _normalizations(model))
    # ResNet50: 53 layers in 49 stages; DenseNet121 is one chain (121).
    assert plan.num_stages <= len(_normalizations(model))
    # Both methods compute in float32, in different graphs (other op
    # fusion): their rounding differs by ~1e-7 per layer and grows through
    # ~50 layers of random statistics to ~1e-5 in the deepest variances
    # (measured 1.3e-5 with 24 positions per channel at 1x1); 5e-5 bounds
    # it. The 64x64, 512-image figure of the benchmark is within 1e-5.
    # The layer-by-layer reference in one batch (its moments do not depend
    # on the batching; a third of its time on DenseNet121).
    _assert_same_statistics(
        staged, _layer_by_layer(model, x, monkeypatch, batch_size=24),
        rel=5e-5)


def test_inside_a_mirrored_strategy_scope(two_replica_strategy):
    """One worker with two replicas holds all its data: recalibrating in
    the strategy's scope gives what it gives outside (nothing to merge)."""
    with two_replica_strategy.scope():
        model = _branchy()
    plain = _branchy()
    plain.set_weights(model.get_weights())
    x = random_batch((30, 8, 8, 3), seed=8, loc=1.0)
    with two_replica_strategy.scope():
        inside = kerasbn.recalibrate(model, x, batch_size=8, verbose=0)
    outside = kerasbn.recalibrate(plain, x, batch_size=8, verbose=0)
    _assert_same_statistics(inside, outside, rel=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "torch",
                    reason="only PyTorch records gradients eagerly")
@pytest.mark.parametrize("tool", ["recalibrate", "diagnose"])
def test_no_autograd_graph_is_recorded_on_torch(tool):
    """Like Keras' `predict`, the layers run without autograd recording
    (it took ResNet50's recalibration on 128 images from 3.35x to 2.96x
    a predict, most of it in the moments of tensors that required
    grad)."""
    import torch

    seen = []

    class Probe(L.Layer):
        def call(self, x):
            seen.append((torch.is_grad_enabled(), x.requires_grad))
            return x

    model = keras.Sequential([keras.Input((4,)), L.Dense(4),
                              Probe(), L.BatchNormalization()])
    getattr(kerasbn, tool)(model, random_batch((32, 4), seed=1), verbose=0)
    assert seen and not any(enabled or grad for enabled, grad in seen)
