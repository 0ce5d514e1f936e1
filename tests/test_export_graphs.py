"""The ONNX graph kerasbn writes: grouped convolutions that tf2onnx cannot
follow, the zero-pad-before-MaxPool hazard of ONNX Runtime's pad fusion,
and the census of what an unfolded normalization leaves.

Oracles: Keras' own inference output (through `export`'s verification at
ONNX Runtime's default optimization level) and a NumPy max pool.
"""

import itertools

import keras
import numpy as np
import onnx
import onnxruntime as ort
import pytest

import kerasbn
from kerasbn.exporting import _onnx_graph
from tests.helpers import randomize_normalizations

L = keras.layers


def _pool_numpy(x, kernel, strides, dilations, pads, pad_value):
    """Max pool of a (N, C, *spatial) array, windows padded with a value."""
    n = x.ndim - 2
    padding = [(0, 0), (0, 0)] + [(pads[a], pads[n + a]) for a in range(n)]
    padded = np.pad(x, padding, constant_values=pad_value)
    out_sizes = [(padded.shape[2 + a] - dilations[a] * (kernel[a] - 1) - 1)
                 // strides[a] + 1 for a in range(n)]
    out = np.empty(x.shape[:2] + tuple(out_sizes), x.dtype)
    for position in itertools.product(*(range(s) for s in out_sizes)):
        window = padded[(slice(None), slice(None)) + tuple(
            slice(position[a] * strides[a],
                  position[a] * strides[a] + dilations[a] * (kernel[a] - 1)
                  + 1, dilations[a]) for a in range(n))]
        out[(slice(None), slice(None)) + position] = window.reshape(
            x.shape[:2] + (-1,)).max(-1)
    return out


@pytest.mark.parametrize("sizes, begin, end, kernel, strides, dilations", [
    ((7, 6), (1, 1), (1, 1), (3, 3), (2, 2), (1, 1)),
    ((9, 5), (2, 0), (1, 3), (3, 2), (2, 1), (1, 1)),
    ((8, 8), (1, 2), (2, 1), (2, 3), (3, 2), (2, 1)),
    ((10,), (3,), (0,), (4,), (1,), (1,)),
])
def test_floor_makes_a_fused_pad_exact(sizes, begin, end, kernel, strides,
                                       dilations):
    # Negative values everywhere: the case where -inf and 0 padding differ.
    x = -np.random.default_rng(0).uniform(0.1, 1.0, (2, 3) + sizes)
    zero_padded = _pool_numpy(x, kernel, strides, dilations,
                              list(begin) + list(end), 0.0)
    fused = _pool_numpy(x, kernel, strides, dilations,
                        list(begin) + list(end), -np.inf)
    assert not np.array_equal(zero_padded, fused)  # The hazard is real.
    n = len(sizes)
    floor = _onnx_graph._floor(list(sizes), list(begin), list(end),
                               (list(kernel), list(strides), list(dilations),
                                [0] * 2 * n))
    np.testing.assert_array_equal(np.maximum(fused, floor), zero_padded)
    np.testing.assert_array_equal(np.maximum(zero_padded, floor),
                                  zero_padded)


def _pad_then_pool_model():
    """ResNetV2's stem: conv (no activation) -> ZeroPadding2D -> MaxPool."""
    inputs = keras.Input((12, 12, 3), name="image")
    x = L.Conv2D(4, 3, strides=2, padding="same", use_bias=False,
                 name="conv")(inputs)
    x = L.BatchNormalization(name="bn")(x)
    x = L.ZeroPadding2D(1, name="pad")(x)
    x = L.MaxPooling2D(3, strides=2, name="pool")(x)
    model = keras.Model(inputs, x, name="stem")
    randomize_normalizations(model)
    # A negative BN shift: many pooling windows hold only negative values.
    model.get_layer("bn").beta.assign(-3.0 * np.ones(4, "float32"))
    return model


def _session(path, level):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    return ort.InferenceSession(path, options,
                                providers=["CPUExecutionProvider"])


def test_zero_pad_before_max_pool_exports_right_at_ort_defaults(tmp_path):
    model = _pad_then_pool_model()
    result = kerasbn.export(model, tmp_path, formats=["onnx"])
    (note,) = result.notes["onnx"]
    assert "before MaxPool" in note and "floor" in note
    path = result.artifacts["onnx"]
    x = np.random.default_rng(1).standard_normal((3, 12, 12, 3)).astype(
        "float32")
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    assert (expected == 0).any()  # Windows where padding wins.
    for level in (ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                  ort.GraphOptimizationLevel.ORT_DISABLE_ALL):
        (got,) = _session(path, level).run(None, {"image": x})
        # Max pooling only selects values: exact up to the folded conv's
        # float32 rounding, 1e-5 of the output scale.
        np.testing.assert_allclose(got, expected, rtol=0,
                                   atol=1e-5 * np.abs(expected).max())


def test_without_the_guard_ort_defaults_get_it_wrong(tmp_path):
    # Why the guard exists: the same graph, unguarded, is wrong under the
    # default session and right with optimizations off. Should a future
    # ONNX Runtime stop fusing the pad, this test says so (and the guard
    # can go).
    model = kerasbn.fold(_pad_then_pool_model()).model
    import tensorflow as tf

    spec = [tf.TensorSpec((None, 12, 12, 3), tf.float32, name="image")]
    fn = tf.function(lambda x: model(x, training=False), input_signature=spec)
    proto, _ = _onnx_graph.convert(fn, spec, None)
    path = str(tmp_path / "unguarded.onnx")
    onnx.save(proto, path)
    x = np.random.default_rng(1).standard_normal((3, 12, 12, 3)).astype(
        "float32")
    expected = keras.ops.convert_to_numpy(model(x))
    (default,) = _session(path, ort.GraphOptimizationLevel.ORT_ENABLE_ALL
                          ).run(None, {"image": x})
    (plain,) = _session(path, ort.GraphOptimizationLevel.ORT_DISABLE_ALL
                        ).run(None, {"image": x})
    scale = np.abs(expected).max()
    assert np.abs(plain - expected).max() <= 1e-5 * scale
    if np.abs(default - expected).max() <= 1e-2 * scale:
        # Seen once in a full CI run (stop 23), not reproduced alone or
        # after the tests that ran before it: ONNX Runtime's default
        # session did not fuse the pad that time. What this test documents
        # is ONNX Runtime's behaviour, not kerasbn's; the guarded export is
        # checked by the tests above either way.
        pytest.skip("ONNX Runtime's default session got the unguarded "
                    "pad-then-pool right this run (no pad fusion)")


def test_grouped_convolutions_are_inlined_for_onnx(tmp_path):
    # Keras runs Conv2D(groups>1) as an XLA function on TensorFlow, which
    # tf2onnx leaves as a call no runtime knows.
    inputs = keras.Input((8, 8, 6), name="image")
    x = L.Conv2D(6, 3, groups=6, use_bias=False, name="depthwise")(inputs)
    x = L.BatchNormalization(name="bn1")(x)
    x = L.Conv2D(4, 1, groups=2, use_bias=False, name="grouped")(x)
    x = L.BatchNormalization(name="bn2")(x)
    model = randomize_normalizations(keras.Model(inputs, x, name="groups"))
    result = kerasbn.export(model, tmp_path, formats=["onnx"])
    assert "inlined" in result.notes["onnx"][0]
    assert "StatefulPartitionedCall" not in result.onnx_ops
    assert result.onnx_ops["Conv"] == 2
    census = _onnx_graph.normalization_census(
        onnx.load(result.artifacts["onnx"]))
    assert census == {"BatchNormalization": 0, "affine_after_linear": 0}


def test_census_counts_what_unfolded_normalizations_leave():
    # A graph written by hand: the census must see Conv -> Mul (a BN's
    # scale), and a BatchNormalization node, but not a Dense's MatMul ->
    # Add(bias) nor an Add that follows the Mul.
    h = onnx.helper
    const = [onnx.numpy_helper.from_array(np.ones(shape, np.float32), name)
             for name, shape in [("w", (4, 3, 1, 1)), ("s", (1, 4, 1, 1)),
                                 ("t", (1, 4, 1, 1)), ("m", (3, 2)),
                                 ("b", (2,)), ("g", (4,)),
                                 ("three", ()), ("w1", (1, 3, 1, 1)),
                                 ("s1", (1,))]]
    nodes = [
        h.make_node("Conv", ["x", "w"], ["c"]),
        h.make_node("Mul", ["c", "s"], ["cs"]),
        h.make_node("Add", ["cs", "t"], ["cst"]),
        h.make_node("BatchNormalization", ["cst", "g", "g", "g", "g"],
                    ["y"]),
        h.make_node("MatMul", ["v", "m"], ["vm"]),
        h.make_node("Add", ["vm", "b"], ["z"]),
        # The same number for all 4 channels (a hard swish's x + 3): the
        # model's arithmetic, not counted; one for a 1-channel
        # convolution could be its normalization: counted.
        h.make_node("Conv", ["x", "w"], ["c2"]),
        h.make_node("Add", ["c2", "three"], ["u"]),
        h.make_node("Conv", ["x", "w1"], ["c1"]),
        h.make_node("Mul", ["c1", "s1"], ["u1"]),
    ]
    graph = h.make_graph(
        nodes, "g",
        [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 2, 2]),
         h.make_tensor_value_info("v", onnx.TensorProto.FLOAT, [1, 3])],
        [h.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
         for name in ("y", "z", "u", "u1")],
        initializer=const)
    census = _onnx_graph.normalization_census(h.make_model(graph))
    assert census == {"BatchNormalization": 1, "affine_after_linear": 2}


def test_cli_prints_the_note(tmp_path):
    from tests.test_cli import run_cli

    path = tmp_path / "stem.keras"
    _pad_then_pool_model().save(path)
    done = run_cli(path, "--output", tmp_path / "out", "--format", "onnx")
    assert done.returncode == 0, done.stderr
    assert "note (onnx): zero Pad" in done.stdout
