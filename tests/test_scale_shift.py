"""kerasbn.layers.ScaleShift against NumPy broadcasting."""

import keras
import numpy as np
import pytest

from kerasbn.layers import ScaleShift
from tests.helpers import to_numpy

pytestmark = pytest.mark.any_backend


@pytest.mark.parametrize("axis, shape", [(-1, (2, 3, 4)), (1, (2, 4, 3, 5))])
def test_matches_numpy(axis, shape):
    rng = np.random.default_rng(0)
    layer = ScaleShift(axis=axis)
    layer.build(shape)
    scale, shift = rng.normal(size=4), rng.normal(size=4)
    layer.set_weights([scale, shift])
    x = rng.normal(size=shape).astype("float32")
    view = [1] * len(shape)
    view[axis] = 4
    expected = x * scale.reshape(view) + shift.reshape(view)
    np.testing.assert_allclose(to_numpy(layer(x)), expected, rtol=1e-6,
                               atol=1e-6)
    assert [w.name for w in layer.weights] == ["scale", "shift"]


def test_config_round_trip_and_policy():
    layer = ScaleShift(axis=1, name="s", dtype="mixed_float16", trainable=False)
    clone = ScaleShift.from_config(layer.get_config())
    assert clone.axis == 1 and clone.name == "s" and not clone.trainable
    assert clone.dtype_policy.name == "mixed_float16"
    y = clone(np.ones((2, 3), "float16"))
    assert keras.backend.standardize_dtype(y.dtype) == "float16" and clone.scale.dtype == "float32"


def test_mask_passes_through():
    inputs = keras.Input((5,), dtype="int32")
    x = keras.layers.Embedding(10, 4, mask_zero=True)(inputs)
    x = ScaleShift()(x)
    assert x._keras_mask is not None


@pytest.mark.parametrize("axis", [1.5, "last", True])
def test_bad_axis(axis):
    with pytest.raises(ValueError, match="axis"):
        ScaleShift(axis=axis)


def test_axis_out_of_range():
    with pytest.raises(ValueError, match="out of bounds"):
        ScaleShift(axis=3).build((None, 4))
