"""`kerasbn.quantization_report` and `kerasbn.equalize` (issue 17).

Oracles: ONNX Runtime's own int8 arithmetic (`quant_utils.quantize_data`,
the function its quantizer calls) for the weight and activation round
trips; the normalizations' parameters for the channel spread and the
degenerate channels (gamma / sqrt(variance + eps), computed here); the
folded model itself, run by Keras, for the exactness of equalization.
"""

import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.quantization import _arrays
from tests import helpers

pytestmark = pytest.mark.any_backend

L = keras.layers


def _quant_utils():
    return pytest.importorskip("onnxruntime.quantization.quant_utils")


def _ort_round_trip(values, signed, low=None, high=None):
    """ONNX Runtime's quantize -> dequantize of `values` (per tensor)."""
    from onnx import TensorProto

    q = _quant_utils()
    zero, scale, codes = q.quantize_data(
        values.ravel().astype(np.float32),
        TensorProto.INT8 if signed else TensorProto.UINT8, signed,
        rmin_override=low, rmax_override=high)
    scale, zero = float(scale), int(zero)
    return ((codes.astype(np.float64) - zero) * scale).reshape(values.shape)


def test_int8_round_trips_are_onnxruntimes():
    rng = np.random.default_rng(0)
    matrix = rng.normal(size=(50, 6)) * np.geomspace(0.01, 10, 6)
    step = np.abs(matrix).max() / 127
    # Both round to nearest on the same grid; ORT's float32 scale moves
    # values by ~1e-7 relative, and a value on a half step may round the
    # other way (by one step).
    ours = _arrays.quantize_weights(matrix, per_channel=False)
    off = np.abs(ours - _ort_round_trip(matrix, signed=True)) / step
    assert np.mean(off > 0.5) < 0.01 and off.max() < 1 + 1e-5
    for c in range(6):
        column = _arrays.quantize_weights(matrix, per_channel=True)[:, c]
        np.testing.assert_allclose(column, _ort_round_trip(
            matrix[:, c], signed=True), atol=1e-6 * np.abs(
                matrix[:, c]).max())
    acts = rng.normal(1.0, 2.0, size=(400,))
    low, high = -1.5, 4.0  # A calibration range that clips some values.
    step = (high - low) / 255
    np.testing.assert_allclose(
        _arrays.quantize_activations(acts, low, high),
        _ort_round_trip(np.clip(acts, low, high), False, low, high),
        atol=step * 1e-3)


def _bn_cnn(gamma, variance, epsilon=1e-3, seed=0):
    """conv -> BN -> ReLU -> pool -> conv(relu) -> GAP -> dense, with the
    first kernel's output channels all of range 1 (so the folded ranges
    are exactly |gamma / sqrt(variance + eps)|)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3), name="image")
    h = L.Conv2D(len(gamma), 3, padding="same", use_bias=False,
                 name="c1")(inputs)
    h = L.BatchNormalization(epsilon=epsilon, name="bn1")(h)
    h = L.ReLU(name="r1")(h)
    h = L.MaxPooling2D(name="pool")(h)
    h = L.Conv2D(6, 3, padding="same", activation="relu", name="c2")(h)
    h = L.GlobalAveragePooling2D(name="gap")(h)
    model = keras.Model(inputs, L.Dense(4, name="d")(h), name="cnn")
    kernel = np.random.default_rng(seed).uniform(-1, 1, (3, 3, 3,
                                                         len(gamma)))
    kernel[0, 0, 0] = 1.0  # Every output channel's range is exactly 1.
    model.get_layer("c1").kernel.assign(kernel)
    n = len(gamma)
    model.get_layer("bn1").set_weights([
        np.asarray(gamma, "f4"), np.linspace(-0.2, 0.2, n).astype("f4"),
        np.linspace(-0.1, 0.1, n).astype("f4"),
        np.asarray(variance, "f4")])
    return model


def _images(n=64, seed=1):
    return np.random.default_rng(seed).normal(
        size=(n, 8, 8, 3)).astype("float32")


def test_report_measures_the_spread_folding_leaves():
    gamma = np.geomspace(0.05, 5.0, 8)  # 100x apart
    variance = np.linspace(0.5, 2.0, 8)
    report = kerasbn.quantization_report(_bn_cnn(gamma, variance),
                                         _images())
    entry = {e.layer: e for e in report.entries}["c1"]
    scale = np.abs(gamma / np.sqrt(variance + 1e-3))
    assert entry.normalizations == ("bn1",)
    assert entry.weight_spread == pytest.approx(scale.max() / scale.min(),
                                                rel=1e-5)
    # Per-channel int8 keeps ~7 bits for every channel; per-tensor gives
    # the small channels 100x fewer levels, > 1 bit (6 dB) worse overall.
    assert entry.sqnr_per_channel - entry.sqnr_per_tensor > 6.0
    assert any("per-tensor int8 loses" in s for s in entry.suggestions)
    assert report.samples == 64 and entry.activation_sqnr > 20.0
    assert report.folded == (entry,)
    assert {e.layer for e in report.entries} == {"c1", "c2", "d"}
    assert "c1" in str(report) and report.to_json().startswith("{")


def test_report_activation_sqnr_matches_onnxruntime_arithmetic():
    model = _bn_cnn(np.ones(8), np.ones(8))
    x = _images(40)
    report = kerasbn.quantization_report(model, x, fold=False)
    dense = {e.layer: e for e in report.entries}["d"]
    out = np.asarray(model.predict(x, verbose=0), np.float64)
    theirs = _ort_round_trip(out, False, min(out.min(), 0), max(
        out.max(), 0))
    # Each output channel against its own error, averaged in dB.
    expected = np.mean(10 * np.log10(np.sum(out ** 2, axis=0)
                                     / np.sum((theirs - out) ** 2, axis=0)))
    # Same range, same rounding; float32 vs float64 scale: 0.01 dB.
    assert dense.activation_sqnr == pytest.approx(expected, abs=0.01)
    assert dense.normalizations == ()  # fold=False: nothing folded.


def test_report_names_degenerate_channels():
    gamma = np.ones(8)
    gamma[2] = 0.0             # constant channel
    variance = np.ones(8)
    variance[5] = 1e-12        # with eps 1e-9: scale ~3e4x the median
    report = kerasbn.quantization_report(
        _bn_cnn(gamma, variance, epsilon=1e-9), per_channel=False)
    entry = report.entries[0]
    assert entry.constant_channels == (2,)
    assert entry.huge_channels == (5,)
    text = " ".join(entry.suggestions)
    assert "[2]" in text and "[5]" in text and "recalibrate" in text
    assert entry.activation_sqnr is None and report.samples == 0
    assert report.worst.layer == "c1"  # per-tensor: the huge channel.


def _per_tensor_error(model, x):
    """Relative RMS output error of `model` with every kernel rounded to
    per-tensor int8 (ONNX Runtime's arithmetic, checked above)."""
    reference = model.predict(x, verbose=0)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for layer in copy.layers:
        if isinstance(layer, (L.Conv2D, L.Dense)):
            kernel = layer.kernel.numpy()
            layer.kernel.assign(_ort_round_trip(kernel, signed=True))
    error = copy.predict(x, verbose=0) - reference
    return np.sqrt(np.mean(error ** 2) / np.mean(reference ** 2))


def test_equalize_is_exact_and_evens_the_ranges():
    gamma = np.geomspace(0.002, 2.0, 8)
    model = _bn_cnn(gamma, np.linspace(0.5, 2.0, 8))
    folded = kerasbn.fold(model).model
    before = [w.copy() for w in folded.get_weights()]
    result = kerasbn.equalize(folded)
    assert result.pairs == (("c1", "c2"), ("c2", "d"))
    for a, b in zip(before, folded.get_weights()):
        np.testing.assert_array_equal(a, b)  # The input is not modified.
    x = _images(32)
    expected = folded.predict(x, verbose=0)
    # Exact in real arithmetic; float32 rounding through three layers
    # with rescaled weights: a few ulps of the output's magnitude.
    np.testing.assert_allclose(result.model.predict(x, verbose=0),
                               expected, atol=1e-5 * np.abs(expected).max())
    eq = result.model
    r1 = np.abs(eq.get_layer("c1").kernel.numpy()).max(axis=(0, 1, 2))
    r2 = np.abs(eq.get_layer("c2").kernel.numpy()).max(axis=(0, 1, 3))
    # The fixed point: each channel's range is the same in both kernels
    # (up to the last sweep's movement).
    np.testing.assert_allclose(r1, r2, rtol=1e-3)
    assert result.spread_after["c1"] < result.spread_before["c1"] / 5
    after = kerasbn.quantization_report(eq, fold=False).entries[0]
    before = kerasbn.quantization_report(folded, fold=False).entries[0]
    assert after.sqnr_per_tensor > before.sqnr_per_tensor + 6.0


def test_equalize_undoes_a_spread_the_next_layer_compensates():
    """What equalization is for (Nagel et al.): channels whose scale the
    next layer undoes (a small channel with large weights after it, the
    same function as without the spread) lose their precision to a
    per-tensor scale; after equalization they get it back. A spread the
    next layer does not undo needs no help (its small channels hardly
    reach the output)."""
    balanced = _bn_cnn(np.ones(8), np.ones(8))
    spread = keras.models.clone_model(balanced)
    spread.set_weights(balanced.get_weights())
    scale = np.random.default_rng(0).permutation(np.geomspace(0.03, 30, 8))
    bn, conv = spread.get_layer("bn1"), spread.get_layer("c2")
    bn.gamma.assign(bn.gamma.numpy() * scale)
    bn.beta.assign(bn.beta.numpy() * scale)
    conv.kernel.assign(conv.kernel.numpy() / scale[:, None])
    x = _images(256)
    folded = kerasbn.fold(spread).model
    equalized = kerasbn.equalize(folded).model
    plain = _per_tensor_error(kerasbn.fold(balanced).model, x)
    # Measured (balanced, spread, equalized): TensorFlow 0.0047, 1.58,
    # 0.0061; JAX 0.0041, 0.58, 0.0023; PyTorch 0.0081, 0.27, 0.0045
    # (each backend draws other initial weights). 5x and 2x hold on all.
    assert _per_tensor_error(folded, x) > 5 * plain
    assert _per_tensor_error(equalized, x) < 2 * plain


def test_equalize_covers_every_kernel_layout():
    """Depthwise, separable, transposed and dense layers, joined by
    ReLU, LeakyReLU, pooling and padding: every pair is rescaled, and the
    model computes the same function (Keras runs both)."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((10, 10, 3))
    h = L.Conv2D(6, 3, activation="relu", name="conv")(inputs)
    h = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(h)
    h = L.ReLU()(h)
    h = L.ZeroPadding2D(1)(h)
    h = L.SeparableConv2D(5, 3, activation="relu", name="sep")(h)
    h = L.Conv2DTranspose(4, 3, name="up")(h)
    h = L.LeakyReLU(negative_slope=0.1)(h)
    h = L.GlobalAveragePooling2D()(h)
    model = keras.Model(inputs, L.Dense(3, name="dense")(h))
    rng = np.random.default_rng(0)
    for layer in model.layers:  # Channel ranges 100x apart.
        for weight in layer.weights:
            value = rng.normal(size=weight.shape)
            weight.assign(value * np.geomspace(0.1, 10, value.shape[-1]))
    result = kerasbn.equalize(model)
    assert result.pairs == (("conv", "dw"), ("dw", "sep"), ("sep", "up"),
                            ("up", "dense"))
    x = np.random.default_rng(1).normal(size=(4, 10, 10, 3)).astype("f4")
    expected = model.predict(x, verbose=0)
    np.testing.assert_allclose(result.model.predict(x, verbose=0), expected,
                               atol=1e-5 * np.abs(expected).max())
    # conv's output channel c and dw's input channel c end with one range.
    conv = np.abs(result.model.get_layer("conv").kernel.numpy())
    dw = np.abs(result.model.get_layer("dw").kernel.numpy())
    np.testing.assert_allclose(conv.max(axis=(0, 1, 2)),
                               dw.max(axis=(0, 1, 3)), rtol=1e-3)


def test_equalize_leaves_what_is_not_homogeneous():
    inputs = keras.Input((6,))
    a = L.Dense(5, activation="relu6", name="a")(inputs)
    b = L.Dense(5, name="b")(a)                 # after relu6: no pair
    c = L.Dense(4, name="c")(b)
    c2 = L.Dense(4, name="c2")(b)               # b feeds two layers
    bn = L.BatchNormalization(name="bn")(c)     # c -> bn -> e: no pair
    e = L.Dense(3, name="e")(bn)
    model = keras.Model(inputs, [e, c2])
    result = kerasbn.equalize(model)
    assert result.pairs == ()
    for x, y in zip(model.get_weights(), result.model.get_weights()):
        np.testing.assert_array_equal(x, y)


def test_bad_arguments_are_named():
    model = _bn_cnn(np.ones(8), np.ones(8))
    with pytest.raises(TypeError, match="keras.Model"):
        kerasbn.quantization_report("model.keras")
    bad = _images(8)
    bad[3, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="`data`.*NaN"):
        kerasbn.quantization_report(model, bad)
    with pytest.raises(ValueError, match="`data`.*shape"):
        kerasbn.quantization_report(model, np.zeros((4, 8, 8, 2), "f4"))
    with pytest.raises(ValueError, match="max_samples"):
        kerasbn.quantization_report(model, max_samples=0)
    # Finite data, but an overflowing kernel: no int8 range, said so.
    broken = keras.models.clone_model(model)
    broken.set_weights(model.get_weights())
    broken.get_layer("c2").kernel.assign(
        np.full(broken.get_layer("c2").kernel.shape, 3e38, "float32"))
    with pytest.raises(ValueError, match="layer 'c2' outputs NaN or inf"):
        kerasbn.quantization_report(broken, _images(8), fold=False)
    with pytest.raises(ValueError, match="max_sweeps"):
        kerasbn.equalize(model, max_sweeps=0)

    class Net(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(TypeError, match="subclassed"):
        kerasbn.equalize(Net())
    net = Net()
    net(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="no known inputs"):
        kerasbn.quantization_report(net, np.zeros((2, 3), "float32"),
                                    fold=False)


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="17 s on JAX; the layouts are covered above")
def test_resnet50_folds_equalizes_and_reports():
    """keras.applications code: ResNet50's bottlenecks give conv -> ReLU
    -> conv pairs once their BNs are folded."""
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32,
                                                                    3))
    helpers.randomize_normalizations(model, seed=0)
    folded = kerasbn.fold(model).model
    result = kerasbn.equalize(folded)
    assert len(result.pairs) >= 32  # two per bottleneck block (16 blocks)
    x = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype("f4")
    expected = folded.predict(x, verbose=0)
    np.testing.assert_allclose(result.model.predict(x, verbose=0),
                               expected, atol=1e-4 * np.abs(expected).max())
    report = kerasbn.quantization_report(model, x, max_samples=4)
    assert len(report.folded) == 53  # every BN folds backward
    assert report.worst is not None and report.samples == 4
