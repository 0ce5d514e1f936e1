"""kerasbn.diagnose flags each planted problem and is quiet on a healthy model."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

import kerasbn
from tests.helpers import random_batch

pytestmark = pytest.mark.any_backend

L = keras.layers


def _data(n=512, seed=0):
    x = random_batch((n, 6), seed=seed, loc=1.0, scale=2.0)
    y = np.tanh(x[:, :2].sum(axis=1, keepdims=True) / 3.0).astype("float32")
    return x, y


def _healthy(momentum=0.9):
    return keras.Sequential([
        keras.Input((6,)),
        L.Dense(16, use_bias=False),
        L.BatchNormalization(momentum=momentum, name="bn1"),
        L.ReLU(),
        L.Dense(8, use_bias=False),
        kerasbn.layers.BatchNormalization(momentum=momentum,
                                          zero_debias="mean", name="bn2"),
        L.ReLU(),
        L.Dense(1, name="head"),
    ], name="healthy")


def _train(model, x, y, epochs=3, batch_size=32):
    model.compile(keras.optimizers.Adam(1e-2), "mse")
    model.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0)
    return model


@pytest.fixture
def trained():
    x, y = _data()
    return _train(_healthy(), x, y), x


def _codes(report):
    return sorted(report.codes())


def _state(model):
    return [np.array(w.numpy()) for w in model.weights]


def test_quiet_on_a_healthy_model(trained):
    model, x = trained
    report = kerasbn.diagnose(model, x, verbose=0)
    assert report.ok, str(report)
    assert "No problem found." in str(report)
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["bn1"].steps_source == "optimizer"
    assert by_name["bn1"].steps == 48
    assert by_name["bn2"].steps_source == "layer"
    assert by_name["bn2"].steps == 48
    assert by_name["bn1"].positions == 512
    assert by_name["bn1"].mean_gap < 0.5
    assert report.output_gap < 0.3


def test_stale_statistics_after_a_change_of_data(trained):
    model, x = trained
    shifted = 3.0 * x + 2.0
    report = kerasbn.diagnose(model, shifted, verbose=0)
    assert ("stale_statistics", "bn1") in report.codes()
    assert ("train_inference_gap", None) in report.codes()
    # Recalibration on the new data is the fix the report suggests.
    assert "kerasbn.recalibrate" in report.findings_for("bn1")[0].suggestion
    fixed = kerasbn.recalibrate(model, shifted, verbose=0)
    again = kerasbn.diagnose(fixed, shifted, verbose=0)
    assert "stale_statistics" not in {code for code, _ in again.codes()}


def test_normalization_before_output_and_redundant_bias():
    x, y = _data()
    inputs = keras.Input((6,))
    h = L.Dense(8, name="biased")(inputs)               # bias, then BN
    h = L.BatchNormalization(momentum=0.9, name="bn_after_bias")(h)
    a = L.Dense(8, activation="relu", name="relu_dense")(h)
    a = L.BatchNormalization(momentum=0.9, name="bn_after_relu")(a)
    b = L.Dense(8, name="shared")(h)                     # feeds BN and Add
    nb = L.BatchNormalization(momentum=0.9, name="bn_shared")(b)
    h = L.Add()([a, nb, b])
    h = L.Dense(1, use_bias=False, name="last")(h)
    outputs = L.BatchNormalization(momentum=0.9, name="bn_output")(h)
    model = _train(keras.Model(inputs, outputs), x, y)
    report = kerasbn.diagnose(model, x, verbose=0)
    codes = report.codes()
    assert ("redundant_bias", "bn_after_bias") in codes
    assert ("normalization_before_output", "bn_output") in codes
    # A bias before a ReLU, or one that also feeds another layer, stays.
    assert ("redundant_bias", "bn_after_relu") not in codes
    assert ("redundant_bias", "bn_shared") not in codes
    finding = report.findings_for("bn_after_bias")[0]
    assert "'biased'" in finding.message and "use_bias=False" in (
        finding.suggestion)


def test_nested_output_normalization_is_found():
    inner = keras.Sequential([keras.Input((6,)), L.Dense(3, use_bias=False),
                              L.BatchNormalization(name="inner_bn")],
                             name="inner")
    inputs = keras.Input((6,))
    model = keras.Model(inputs, inner(inputs))
    report = kerasbn.diagnose(model, _data(64)[0], verbose=0)
    assert ("normalization_before_output", "inner_bn") in report.codes()


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="synchronized=True is TensorFlow-only in Keras")
def test_small_batch_per_replica(two_replica_strategy):
    x, y = _data(128)
    model = _healthy()
    model.add(kerasbn.layers.BatchRenormalization(name="renorm"))
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    report = kerasbn.diagnose(model, dataset, verbose=0)
    small = [layer for code, layer in report.codes() if code == "small_batch"]
    assert small == ["bn1", "bn2"]  # Batch renormalization is the remedy.
    assert report.batch_size == 4
    assert "BatchRenormalization" in report.findings_for("bn1")[-1].suggestion
    assert "MABN" in report.findings_for("bn1")[-1].suggestion
    # The training batch size can be given; 32 is fine.
    report = kerasbn.diagnose(model, dataset, batch_size=32, verbose=0)
    assert "small_batch" not in {code for code, _ in report.codes()}

    # Two replicas: a global batch of 12 is 6 per replica.
    strategy = two_replica_strategy
    with strategy.scope():
        distributed = _healthy()
        synced = keras.Sequential([
            keras.Input((6,)),
            L.BatchNormalization(synchronized=True, name="synced")])
    report = kerasbn.diagnose(distributed, x, batch_size=12, verbose=0)
    assert report.replicas == 2
    assert ("small_batch", "bn1") in report.codes()
    assert "6 sample(s) per replica" in report.findings_for("bn1")[-1].message
    report = kerasbn.diagnose(synced, x, batch_size=12, verbose=0)
    assert ("small_batch", "synced") not in report.codes()


def test_unconverged_moving_averages():
    x, y = _data(160)
    model = _healthy(momentum=0.99)
    _train(model, x, y, epochs=1)  # 5 steps: 0.99**5 = 95% initial value.
    report = kerasbn.diagnose(model, x, verbose=0)
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["bn1"].steps == 5
    assert by_name["bn1"].initial_weight == pytest.approx(0.99**5)
    assert ("unconverged_statistics", "bn1") in report.codes()
    # bn2 debiases its mean only; its variance is still a plain average.
    assert ("unconverged_statistics", "bn2") in report.codes()
    assert "optimizer" in report.findings_for("bn1")[0].message \
        or "optimizer" in " ".join(f.message for f in
                                   report.findings_for("bn1"))

    # Recalibrated statistics are exact whatever the step count says.
    kerasbn.recalibrate(model, x, inplace=True, verbose=0)
    report = kerasbn.diagnose(model, x, verbose=0)
    assert report.layers[0].initial_weight == pytest.approx(0.99**5)
    assert "unconverged_statistics" not in {c for c, _ in report.codes()}
    # ... and the table says so instead of a stale "Init weight" number.
    assert report.layers[0].exact
    assert " exact " in str(report).splitlines()[3]

    # Fully debiased averages are never biased towards their start.
    debiased = keras.Sequential([
        keras.Input((6,)),
        kerasbn.layers.BatchNormalization(momentum=0.99, zero_debias=True,
                                          name="debiased")])
    debiased.compile("sgd", "mse")
    debiased.fit(x, x, batch_size=32, epochs=1, verbose=0)
    report = kerasbn.diagnose(debiased, x, verbose=0)
    assert report.layers[0].initial_weight == 0.0
    assert "unconverged_statistics" not in {c for c, _ in report.codes()}

    # An untrained Keras BN has no step count: unknown, not flagged.
    report = kerasbn.diagnose(_healthy(), x, verbose=0)
    assert report.layers[0].steps is None
    assert report.layers[0].initial_weight is None


def test_diagnose_never_changes_the_model():
    x, y = _data(96)
    inputs = keras.Input((6,))
    h = L.Dense(6, use_bias=False)(inputs)
    h = L.BatchNormalization(name="bn")(h, training=True)  # always training
    h = kerasbn.layers.MABN(name="mabn")(h)
    h = kerasbn.layers.BatchRenormalization(name="renorm")(h)
    model = keras.Model(inputs, L.Dense(1)(h))
    model.compile("sgd", "mse")
    model.fit(x, y, batch_size=32, epochs=1, verbose=0)
    before = _state(model)
    report = kerasbn.diagnose(model, x, verbose=0)
    assert report.output_gap is not None
    for b, a in zip(before, _state(model)):
        np.testing.assert_array_equal(b, a)
    for layer in model.layers:
        assert "call" not in layer.__dict__, layer.name
    assert {layer.name for layer in report.layers} == {"bn", "mabn",
                                                        "renorm"}


def test_report_as_table_dict_and_json(trained):
    model, x = trained
    report = kerasbn.diagnose(model, 3.0 * x, verbose=0)
    text = str(report)
    assert "Layer" in text and "Mean gap" in text and "bn1" in text
    assert "[stale_statistics] bn1" in text
    data = json.loads(report.to_json())
    assert data == report.to_dict()
    assert data["model"] == "healthy"
    assert {f["code"] for f in data["findings"]} >= {"stale_statistics"}
    for finding in data["findings"]:
        assert set(finding) == {"code", "layer", "message", "suggestion"}
    assert [layer["name"] for layer in data["layers"]] == ["bn1", "bn2"]


def test_argument_errors():
    model = _healthy()
    with pytest.raises(ValueError, match="mean_gap"):
        kerasbn.diagnose(model, np.zeros((4, 6)), mean_gap=-1, verbose=0)
    with pytest.raises(TypeError, match="keras.Model"):
        kerasbn.diagnose(model.layers[0], np.zeros((4, 6)), verbose=0)
