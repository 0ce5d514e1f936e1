"""NaN and inf never flow through silently (hostile-input hardening).

One NaN in the data makes every channel's population statistics NaN; a
non-positive `moving_variance + epsilon` makes fold write NaN kernels. Each
boundary either refuses with an error naming the cause or, where asked,
leaves the bad samples out and says how many.
"""

import warnings

import keras
import numpy as np
import pytest

import kerasbn


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
