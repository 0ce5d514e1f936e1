"""A TensorFlow function called on Keras tensors, as a Keras 3 layer.

tf.keras code calls TensorFlow functions on Keras tensors everywhere:
`x + 3.0`, `tf.nn.relu6(x)`, `x * tf.sigmoid(x)`, `tf.concat([a, b], -1)`,
`tf.reduce_mean(x, [1, 2], keepdims=True)`, `x[:, 1:]`. Keras 2 saved each
call as a `TFOpLambda` (or `SlicingOpLambda`) layer holding the function's
TensorFlow name and its arguments; Keras 3 has no such layer.
`TFFunction` is its Keras 3 equivalent for the functions listed in
`FUNCTIONS`: the same name and arguments, computed with `keras.ops`, so it
runs on every backend and serializes with kerasbn alone (no Python code is
loaded from the file, unlike a `Lambda`).

`kerasbn.sources.keras2.load_h5` builds these from a Keras 2 file; each
translation is tested against TensorFlow's own function in
`tests/test_keras2_ops.py`.
"""

import keras
from keras import ops

TENSOR = "__tensor__"  # {"__tensor__": k}: the layer's k-th input tensor.


# Each function takes TensorFlow's argument names (tf-keras saved the call's
# arguments by name) and computes what TensorFlow's function computes.
# TensorFlow's `name=` is accepted and ignored by `_call`.

def _binary(fn):
    return lambda x, y: fn(x, y)


def _unary(fn):
    return lambda x: fn(x)


def _features(fn):
    return lambda features: fn(features)


def _reduction(fn):
    def reduce(input_tensor, axis=None, keepdims=False):
        return fn(input_tensor, axis=_axis(axis), keepdims=bool(keepdims))
    return reduce


def _axis(axis):
    return tuple(axis) if isinstance(axis, list) else axis


def _truediv(x, y):
    return ops.true_divide(x, y)


def _leaky_relu(features, alpha=0.2):
    return ops.leaky_relu(features, negative_slope=alpha)


def _gelu(features, approximate=False):
    return ops.gelu(features, approximate=bool(approximate))


def _softmax(logits, axis=None):
    return ops.softmax(logits, axis=-1 if axis is None else axis)


def _matmul(a, b, transpose_a=False, transpose_b=False, adjoint_a=False,
            adjoint_b=False, a_is_sparse=False, b_is_sparse=False,
            output_type=None, grad_a=False, grad_b=False):
    # a_is_sparse, b_is_sparse, grad_a, grad_b: hints to TensorFlow's
    # kernels and gradients, not the result. Real inputs: adjoint is
    # transpose.
    if transpose_a or adjoint_a:
        a = ops.swapaxes(a, -1, -2)
    if transpose_b or adjoint_b:
        b = ops.swapaxes(b, -1, -2)
    return ops.matmul(a, b)


def _concat(values, axis):
    return ops.concatenate(list(values), axis=axis)


def _stack(values, axis=0):
    return ops.stack(list(values), axis=axis)


def _add_n(inputs):
    total = inputs[0]
    for value in inputs[1:]:
        total = ops.add(total, value)
    return total


def _reshape(tensor, shape):
    return ops.reshape(tensor, tuple(shape))


def _expand_dims(input, axis):  # noqa: A002 - TensorFlow's name.
    return ops.expand_dims(input, axis)


def _squeeze(input, axis=None, squeeze_dims=None):  # noqa: A002
    axis = squeeze_dims if axis is None else axis
    if axis is None:
        # Every dimension of static size 1, as tf.squeeze in a tf.keras
        # graph (the batch dimension, unknown there, is kept).
        axis = tuple(i for i, size in enumerate(input.shape) if size == 1)
    return ops.squeeze(input, axis=_axis(axis))


def _transpose(a, perm=None, conjugate=False):
    return ops.transpose(a, axes=None if perm is None else tuple(perm))


def _clip_by_value(t, clip_value_min, clip_value_max):
    return ops.clip(t, clip_value_min, clip_value_max)


def _cast(x, dtype):
    return ops.cast(x, dtype)


def _like(fn):
    def like(input, dtype=None, optimize=True):  # noqa: A002
        return fn(input, dtype=dtype)
    return like


def _tile(input, multiples):  # noqa: A002
    return ops.tile(input, tuple(multiples))


def _pad(tensor, paddings, mode="CONSTANT", constant_values=0):
    mode = str(mode).lower()
    if mode == "constant":
        return ops.pad(tensor, paddings, mode=mode,
                       constant_values=constant_values)
    return ops.pad(tensor, paddings, mode=mode)


def _resize(images, size, method="bilinear", preserve_aspect_ratio=False,
            antialias=False):
    if preserve_aspect_ratio:
        raise ValueError("tf.image.resize(preserve_aspect_ratio=True) is "
                         "not translated")
    return ops.image.resize(images, tuple(size), interpolation=str(method),
                            antialias=bool(antialias))


def _identity(input):  # noqa: A002
    return input


def _slice_key(spec):
    """tf-keras' serialized slice spec -> a Python index."""
    if isinstance(spec, list):
        return tuple(_slice_key(item) for item in spec)
    if isinstance(spec, dict):
        if spec.get("class_name") == "__ellipsis__":
            return Ellipsis
        return slice(spec.get("start"), spec.get("stop"), spec.get("step"))
    return spec


def _getitem(tensor, slice_spec):
    key = _slice_key(slice_spec)
    return tensor[key]


# The TensorFlow names tf-keras writes (`TFOpLambda.function`: the
# canonical name of the function called, so `tf.sigmoid` and
# `tf.nn.sigmoid` are both "math.sigmoid", `tf.transpose` is
# "compat.v1.transpose"), each with its translation.
FUNCTIONS = {
    "__operators__.add": _binary(ops.add),
    "math.add": _binary(ops.add),
    "math.add_n": _add_n,
    "math.subtract": _binary(ops.subtract),
    "math.multiply": _binary(ops.multiply),
    "math.truediv": _truediv,
    "math.pow": _binary(ops.power),
    "math.maximum": _binary(ops.maximum),
    "math.minimum": _binary(ops.minimum),
    "math.squared_difference": _binary(
        lambda x, y: ops.square(ops.subtract(x, y))),
    "math.negative": _unary(ops.negative),
    "math.abs": _unary(ops.absolute),
    "math.exp": _unary(ops.exp),
    "math.log": _unary(ops.log),
    "math.sqrt": _unary(ops.sqrt),
    "math.rsqrt": _unary(ops.rsqrt),
    "math.square": _unary(ops.square),
    "math.reciprocal": _unary(ops.reciprocal),
    "math.sign": _unary(ops.sign),
    "math.sigmoid": _unary(ops.sigmoid),
    "math.tanh": _unary(ops.tanh),
    "math.erf": _unary(ops.erf),
    "math.softplus": _features(ops.softplus),
    "nn.relu": _features(ops.relu),
    "nn.relu6": _features(ops.relu6),
    "nn.elu": _features(ops.elu),
    "nn.selu": _features(ops.selu),
    "nn.silu": _features(ops.silu),
    "nn.gelu": _gelu,
    "nn.leaky_relu": _leaky_relu,
    "nn.softmax": _softmax,
    "linalg.matmul": _matmul,
    "concat": _concat,
    "stack": _stack,
    "reshape": _reshape,
    "expand_dims": _expand_dims,
    "compat.v1.squeeze": _squeeze,
    "compat.v1.transpose": _transpose,
    "math.reduce_mean": _reduction(ops.mean),
    "math.reduce_sum": _reduction(ops.sum),
    "math.reduce_max": _reduction(ops.max),
    "math.reduce_min": _reduction(ops.min),
    "math.reduce_prod": _reduction(ops.prod),
    "clip_by_value": _clip_by_value,
    "cast": _cast,
    "ones_like": _like(ops.ones_like),
    "zeros_like": _like(ops.zeros_like),
    "tile": _tile,
    "compat.v1.pad": _pad,
    "image.resize": _resize,
    "identity": _identity,
    "stop_gradient": _unary(ops.stop_gradient),
    "__operators__.getitem": _getitem,
    # Not TensorFlow's: Keras 2's hard_sigmoid activation, which Keras 3's
    # function of the same name is not (`kerasbn.sources.keras2`).
    "keras2.hard_sigmoid": _unary(
        lambda x: ops.clip(ops.add(ops.multiply(x, 0.2), 0.5), 0.0, 1.0)),
}


def _fill(structure, tensors):
    """`structure` with every `{"__tensor__": k}` replaced by tensor k."""
    if isinstance(structure, dict):
        if set(structure) == {TENSOR}:
            return tensors[structure[TENSOR]]
        return {k: _fill(v, tensors) for k, v in structure.items()}
    if isinstance(structure, list):
        return [_fill(v, tensors) for v in structure]
    return structure


@keras.saving.register_keras_serializable(package="kerasbn")
class TFFunction(keras.layers.Layer):
    """One TensorFlow function call of a tf.keras model, with `keras.ops`.

    Args:
        function: The function's TensorFlow name as tf-keras saved it
            (`"math.multiply"`, `"nn.relu6"`, `"concat"`, ...): a key of
            `FUNCTIONS`.
        arguments: `{argument name: value}` in TensorFlow's argument
            names; a value `{"__tensor__": k}` (at any depth, e.g. in
            `concat`'s `values` list) is the layer's k-th input tensor,
            anything else a constant as tf-keras saved it.
        **kwargs: Base layer arguments (`name`, `dtype`).

    On the TensorFlow backend each translation computes what TensorFlow's
    function computes (tests: within 1e-6 of the output's scale). On JAX
    and PyTorch the same holds except where Keras' backends themselves
    differ from TensorFlow: `tf.image.resize(method="bicubic")` (JAX's
    cubic kernel handles the borders otherwise, ~2e-3 of the scale).

    >>> import numpy as np
    >>> layer = TFFunction("math.multiply",
    ...                    {"x": {"__tensor__": 0}, "y": 2.0})
    >>> [float(v) for v in layer(np.array([[1.0, 3.0]], "float32"))[0]]
    [2.0, 6.0]
    """

    def __init__(self, function, arguments, **kwargs):
        # Like tf-keras' TFOpLambda: the inputs keep their dtype (a mixed
        # precision policy does not cast them), as TensorFlow's function did.
        kwargs["autocast"] = False
        super().__init__(**kwargs)
        if function not in FUNCTIONS:
            raise ValueError(
                f"TFFunction: function={function!r} has no keras.ops "
                f"translation; translated functions: {sorted(FUNCTIONS)}")
        if not isinstance(arguments, dict):
            raise ValueError(
                f"TFFunction: arguments must be a dict of argument name to "
                f"value; received {arguments!r}")
        self.function = function
        self.arguments = arguments
        self.supports_masking = False

    def call(self, inputs):
        tensors = inputs if isinstance(inputs, (list, tuple)) else [inputs]
        arguments = {k: v for k, v in _fill(self.arguments, tensors).items()
                     if k != "name"}
        return FUNCTIONS[self.function](**arguments)

    def get_config(self):
        config = super().get_config()
        return {**config, "function": self.function,
                "arguments": self.arguments}
