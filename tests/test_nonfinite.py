"""NaN and inf never flow through silently (hostile-input hardening).

One NaN in the data makes every channel's population statistics NaN; a
non-positive `moving_variance + epsilon` makes fold write NaN kernels. Each
boundary either refuses with an error naming the cause or, where asked,
leaves the bad samples out and says how many. A model that makes NaN or
inf itself from finite data is refused by recalibrate and diagnose, naming
the first layer that does (on every backend).
"""

import warnings

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.stats import _plan
from tests.helpers import to_numpy


def _model():
    return keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(3, use_bias=False, name="dense"),
        keras.layers.BatchNormalization(name="bn"),
        keras.layers.Dense(2, name="head"),
    ])


def _data(bad_value):
    x = np.random.default_rng(0).normal(2.0, 3.0, (40, 3)).astype("float32")
    x[17, 1] = bad_value
    x[33, 0] = bad_value
    return x


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_recalibrate_refuses_nonfinite_data_naming_the_batch(bad_value):
    model = _model()
    before = [w.numpy().copy() for w in model.weights]
    with pytest.raises(ValueError, match=r"batch 1 of the data holds 1 "
                       r"non-finite value.*skip_nonfinite=True"):
        kerasbn.recalibrate(model, _data(bad_value), batch_size=16,
                            verbose=0)
    for a, b in zip(before, model.weights):
        np.testing.assert_array_equal(a, b.numpy())


def test_recalibrate_skips_nonfinite_samples_when_asked():
    x = _data(np.nan)
    model = _model()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        new = kerasbn.recalibrate(model, x, batch_size=16, verbose=0,
                                  skip_nonfinite=True)
    assert any("left out 2 sample(s)" in str(w.message) for w in caught)
    # Oracle: NumPy population moments of the BN's inputs on the clean rows.
    clean = x[np.isfinite(x).all(axis=1)]
    inputs = clean.astype(np.float64) @ model.get_layer("dense").kernel.numpy()
    bn = new.get_layer("bn")
    # float32 storage of float64 sums: 1e-5 of the statistic's magnitude.
    np.testing.assert_allclose(bn.moving_mean.numpy(), inputs.mean(axis=0),
                               rtol=0, atol=1e-5 * np.abs(inputs).max())
    np.testing.assert_allclose(bn.moving_variance.numpy(), inputs.var(axis=0),
                               rtol=1e-5)


@pytest.mark.parametrize("variance", [-5.0, np.nan, np.inf])
def test_fold_refuses_corrupt_statistics_naming_layer_and_channels(variance):
    model = _model()
    model.get_layer("bn").moving_variance.assign([1.0, variance, 2.0])
    with pytest.raises(ValueError, match=r"'bn'.*1 channel\(s\) \[1\]"):
        kerasbn.fold(model)


def test_diagnose_reports_corrupt_statistics():
    model = _model()
    model.get_layer("bn").moving_variance.assign([1.0, -5.0, 2.0])
    model.get_layer("bn").moving_mean.assign([0.0, 0.0, np.nan])
    report = kerasbn.diagnose(model, _data(0.0), verbose=0)
    assert ("corrupt_statistics", "bn") in report.codes()
    finding = report.findings_for("bn")[0]
    assert finding.code == "corrupt_statistics"
    assert "channels [1, 2]" in finding.message
    healthy = kerasbn.recalibrate(_model(), _data(0.0), verbose=0)
    assert "corrupt_statistics" not in {
        code for code, _ in kerasbn.diagnose(healthy, _data(0.0),
                                             verbose=0).codes()}


@pytest.mark.parametrize("corrupt", ["variance", "kernel"])
def test_export_refuses_a_model_that_outputs_nan(tmp_path, corrupt):
    model = _model()
    if corrupt == "variance":
        model.get_layer("bn").moving_variance.assign([1.0, -5.0, 2.0])
        pattern = r"'bn'.*channel\(s\) \[1\]"
    else:
        kernel = model.get_layer("dense").kernel.numpy()
        kernel[0, 0] = np.nan
        model.get_layer("dense").kernel.assign(kernel)
        pattern = r"itself outputs .* NaN.*dense/kernel"
    with pytest.raises(ValueError, match=pattern):
        kerasbn.export(model, tmp_path / "out", formats=["keras"])
    assert not (tmp_path / "out").exists()


def test_diagnose_refuses_nonfinite_data_instead_of_reporting_ok():
    with pytest.raises(ValueError, match=r"kerasbn.diagnose: batch 0 .*"
                       r"non-finite"):
        kerasbn.diagnose(_model(), _data(np.nan), verbose=0)


# -- NaN and inf the model makes itself, from finite data. -------------------
#
# The oracle is NumPy in float32: where `x @ kernel` overflows, batch by
# batch. The model puts a Dense with weights 3e38 after a first BN; on the
# data, 10 rows of 200 are far out (5 at +50, 5 at -50), the others near 0.
# After the BN, those rows are ~4.5 standard deviations out and every
# product overflows, while a near-zero row's outputs stay below 1e36, also
# through the next Dense: no rounding decides which values overflow.

_HUGE = 3e38


def _overflowing_model():
    return keras.Sequential([
        keras.Input((3,)),
        keras.layers.BatchNormalization(name="bn0"),
        keras.layers.Dense(
            4, name="big",
            kernel_initializer=keras.initializers.Constant(_HUGE)),
        keras.layers.Dense(4, name="mix"),
        keras.layers.BatchNormalization(name="bn1"),
        keras.layers.Dense(1, name="head"),
    ])


def _outlier_data():
    x = np.random.default_rng(3).normal(0.0, 0.01, (200, 3))
    x[70:75] = 50.0
    x[150:155] = -50.0
    return x.astype("float32")


def _first_overflow(z, batch_size=32):
    """NumPy: (batch, count) of the first batch where `z @ kernel` (the
    'big' layer, float32) is not finite."""
    kernel = np.full((3, 4), _HUGE, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        out = z.astype(np.float32) @ kernel
    bad = ~np.isfinite(out)
    for batch in range(0, len(z), batch_size):
        count = int(bad[batch:batch + batch_size].sum())
        if count:
            return batch // batch_size, count
    return None


def _weights(model):
    return [np.array(to_numpy(w)) for w in model.weights]


@pytest.mark.any_backend
@pytest.mark.parametrize("method", ["staged", "layer_by_layer"])
def test_recalibrate_names_the_layer_that_makes_inf(method, monkeypatch):
    model = _overflowing_model()
    before = _weights(model)
    x = _outlier_data()
    # What 'big' receives: x normalized by bn0's recalibrated statistics.
    x64 = x.astype(np.float64)
    z = (x64 - x64.mean(axis=0)) / np.sqrt(x64.var(axis=0) + 1e-3)
    batch, count = _first_overflow(z)
    assert batch == 2  # rows 70-74; the data are laid out for it
    if method == "layer_by_layer":
        monkeypatch.setattr(_plan, "read", _refuse_plan)
    with pytest.raises(ValueError) as caught:
        kerasbn.recalibrate(model, x, batch_size=32, inplace=True, verbose=0)
    message = str(caught.value)
    assert (f"on batch {batch} of the data (samples {32 * batch} to "
            f"{32 * batch + 31}), layer 'big' (Dense) outputs {count} "
            f"non-finite value(s) of {32 * 4}") in message
    assert "reach normalization layer 'bn1'" in message
    assert "The data are finite (checked)" in message
    assert f"largest |weight| {_HUGE:.3g}" in message
    # bn0 was recalibrated before bn1 was measured: it is set back.
    for old, new in zip(before, _weights(model)):
        np.testing.assert_array_equal(old, new)


def _refuse_plan(*args, **kwargs):
    raise _plan.PlanRefused("test: the layer-by-layer method")


@pytest.mark.any_backend
def test_diagnose_says_the_model_makes_them():
    model = _overflowing_model()
    # NaN statistics, as a recalibration before this check wrote them.
    model.get_layer("bn1").moving_mean.assign(np.full(4, np.nan))
    x = _outlier_data()
    # bn0 holds mean 0, variance 1: 'big' receives x / sqrt(1 + eps).
    batch, count = _first_overflow(x.astype(np.float64) / np.sqrt(1.001))
    with pytest.raises(ValueError) as caught:
        kerasbn.diagnose(model, x, verbose=0)
    message = str(caught.value)
    assert message.startswith("kerasbn.diagnose: the model itself makes NaN")
    assert (f"on batch {batch} of the data (samples {32 * batch} to "
            f"{32 * batch + 31}), layer 'big' (Dense) outputs {count} "
            "non-finite value(s)") in message
    assert ("The corrupt statistics of 'bn1' are what such inputs give"
            in message)


@pytest.mark.any_backend
def test_diagnose_advice_on_corrupt_statistics_says_what_recalibrate_fixes():
    model = _overflowing_model()
    model.get_layer("big").kernel.assign(np.ones((3, 4), "float32"))
    model.get_layer("bn0").moving_variance.assign([1.0, np.nan, 1.0])
    model.get_layer("bn1").moving_variance.assign([1.0, -2.0, 1.0, 1.0])
    report = kerasbn.diagnose(model, _outlier_data(), verbose=0)
    first = report.findings_for("bn0")[0]
    second = report.findings_for("bn1")[0]
    assert (first.code, second.code) == ("corrupt_statistics",) * 2
    assert "its inputs on them are finite" in first.suggestion
    assert "only because 'bn0' before it" in second.suggestion
    # bn1 receives bn0's NaN: no gap is measured there.
    layer = [r for r in report.layers if r.name == "bn1"][0]
    assert layer.mean_gap is None and layer.variance_ratio is None
    fixed = kerasbn.recalibrate(model, _outlier_data(), verbose=0)
    assert "corrupt_statistics" not in {
        code for code, _ in kerasbn.diagnose(fixed, _outlier_data(),
                                             verbose=0).codes()}


class _Block(keras.layers.Layer):
    """A custom layer: its inner Dense overflows."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(
            2, name="inner",
            kernel_initializer=keras.initializers.Constant(_HUGE))

    def call(self, x):
        return keras.ops.relu(self.inner(x))


@pytest.mark.any_backend
def test_the_layer_inside_a_custom_layer_is_named():
    inputs = keras.Input((3,))
    outputs = keras.layers.BatchNormalization(name="bn")(
        _Block(name="block")(inputs))
    model = keras.Model(inputs, outputs)
    x = np.full((8, 3), 1.0, "float32")  # 3 * 3e38 overflows everywhere
    with pytest.raises(ValueError, match=r"on batch 0 .*, layer 'inner' "
                       r"\(Dense\) inside 'block' outputs 16 non-finite"):
        kerasbn.recalibrate(model, x, verbose=0)


@pytest.mark.any_backend
def test_data_beyond_the_input_dtype_are_named_as_such():
    x = np.zeros((40, 3))
    x[35, 1] = 1e39  # finite in float64, inf in the float32 input
    with pytest.raises(ValueError, match=r"batch 1 of the data \(samples 32 "
                       r"to 39\) holds values beyond float32's range .* 1 "
                       r"inf in model input"):
        kerasbn.recalibrate(_model(), x, batch_size=32, verbose=0)


def test_diagnose_says_when_only_the_outputs_overflow():
    # A layer after the last BN overflows (found by a new user's trial):
    # diagnose said "output gap nan", leaked a NumPy warning and advised
    # recalibrating. Now a finding of its own, and JSON without NaN.
    import json

    model = _model()
    head = model.get_layer("head")
    head.kernel.assign(np.full(head.kernel.shape, 3e38, "float32"))
    x = _data(0.0)
    assert not np.isfinite(np.asarray(model(x))).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        report = kerasbn.diagnose(model, x, verbose=0)
    codes = [code for code, _ in report.codes()]
    assert codes[0] == "nonfinite_outputs"  # first: it explains the rest
    assert "train_inference_gap" not in codes
    assert json.loads(report.to_json())["output_gap"] is None


@pytest.mark.any_backend
def test_a_float16_layer_that_overflows_is_said_to_compute_in_float16():
    """Values that fit float32 overflow a mixed-precision layer: the error
    says the layer computes in float16 and what its largest value is
    (NumPy: 3 x 300 x 100 = 90000 > 65504)."""
    inputs = keras.Input((3,))
    h = keras.layers.Dense(4, kernel_initializer=keras.initializers.Constant(
        100.0), dtype="mixed_float16", name="half")(inputs)
    outputs = keras.layers.BatchNormalization(name="bn")(h)
    model = keras.Model(inputs, outputs)
    x = np.full((8, 3), 300.0, "float32")
    with np.errstate(over="ignore"):
        assert not np.isfinite(np.float16(x[0] @ np.full((3, 4), 100.0))
                               ).any()
    with pytest.raises(ValueError, match=r"layer 'half'.*computes in "
                       r"float16 \(mixed precision\), whose largest value "
                       r"is 65504"):
        kerasbn.recalibrate(model, x, verbose=0)
