"""The ops Keras 3 emits, each in a small model behind a foldable BN:
the cases of the export sweep (tests/test_op_coverage.py, `make op-sweep`).

`ACTIVATIONS`: every public `keras.activations` function, with its
defaults and with the arguments that change the graph. `LAYERS`: the
`keras.layers` classes a CNN/MLP deployment uses. Each case is
`name -> builder()`, the builder returning a Functional model whose first
normalization folds into the Conv/Dense before it, so the exported graph
is the folded one and the op under test is what the converters meet.
"""

import keras
from keras import layers as L

ACTIVATION_CASES = {
    "celu": {}, "elu": {}, "elu(alpha=0.5)": {"alpha": 0.5},
    "exponential": {}, "gelu": {}, "gelu(approximate=True)":
    {"approximate": True}, "gelu(approximate=False)": {"approximate": False},
    "glu": {}, "hard_shrink": {}, "hard_sigmoid": {}, "hard_silu": {},
    "hard_swish": {}, "hard_tanh": {}, "leaky_relu": {},
    "leaky_relu(negative_slope=0.3)": {"negative_slope": 0.3},
    "linear": {}, "log_sigmoid": {}, "log_softmax": {}, "mish": {},
    "relu": {}, "relu(max_value=6)": {"max_value": 6.0},
    "relu(threshold=0.5)": {"threshold": 0.5},
    "relu(negative_slope=0.1)": {"negative_slope": 0.1},
    "relu6": {}, "selu": {}, "sigmoid": {}, "silu": {}, "soft_shrink": {},
    "softmax": {}, "softplus": {}, "softsign": {}, "sparse_plus": {},
    "sparse_sigmoid": {}, "sparsemax": {}, "squareplus": {}, "swish": {},
    "tanh": {}, "tanh_shrink": {},
    "threshold(threshold=0.2, default_value=0)":
    {"threshold": 0.2, "default_value": 0.0},
}


def _activation(name, kwargs):
    function = getattr(keras.activations, name.split("(")[0])

    def builder():
        inputs = keras.Input((12,), name="features")
        h = L.Dense(16, name="dense")(inputs)
        h = L.BatchNormalization(name="bn")(h)
        if name == "glu":  # Halves the channels: Activation cannot say so.
            h = L.Lambda(function, output_shape=(8,), name="act")(h)
        elif kwargs:
            h = L.Lambda(lambda t: function(t, **kwargs), name="act")(h)
        else:
            h = L.Activation(function, name="act")(h)
        return keras.Model(inputs, L.Dense(4, name="head")(h), name="case")
    return builder


ACTIVATIONS = {name: _activation(name, kwargs)
               for name, kwargs in ACTIVATION_CASES.items()}


def _image(op, size=8, channels=8, head=True):
    """Input -> Conv2D -> BN -> op -> (GlobalAveragePooling + Dense)."""
    def builder():
        inputs = keras.Input((size, size, 3), name="image")
        h = L.Conv2D(channels, 3, padding="same", name="conv")(inputs)
        h = L.BatchNormalization(name="bn")(h)
        h = op(h)
        if head and len(h.shape) == 4:
            h = L.GlobalAveragePooling2D()(h)
        elif head and len(h.shape) == 3:
            h = L.GlobalAveragePooling1D()(h)
        return keras.Model(inputs, L.Dense(4, name="head")(h) if head else h,
                           name="case")
    return builder


def _merge(layer):
    def op(h):
        other = L.Conv2D(8, 1, name="other")(h)
        return layer([h, other])
    return op


def _tokens(op):
    """(6, 8) tokens -> Dense -> BN -> op -> pooled head."""
    def builder():
        inputs = keras.Input((6, 8), name="tokens")
        h = L.Dense(8, name="dense")(inputs)
        h = L.BatchNormalization(name="bn")(h)
        h = op(h)
        h = L.GlobalAveragePooling1D()(h) if len(h.shape) == 3 else h
        return keras.Model(inputs, L.Dense(4, name="head")(h), name="case")
    return builder


def _preprocessing(layer, size=8):
    """Preprocessing in the graph: Input -> layer -> Conv2D -> BN -> head."""
    def builder():
        inputs = keras.Input((size, size, 3), name="image")
        h = layer()(inputs)
        h = L.Conv2D(8, 3, padding="same", name="conv")(h)
        h = L.BatchNormalization(name="bn")(h)
        h = L.GlobalAveragePooling2D()(h)
        return keras.Model(inputs, L.Dense(4, name="head")(h), name="case")
    return builder


def _normalization_layer():
    layer = L.Normalization(mean=[0.4, 0.5, 0.6], variance=[0.04, 0.05, 0.06])
    return layer


LAYERS = {
    # Activation layers.
    "ReLU": _image(lambda h: L.ReLU()(h)),
    "LeakyReLU": _image(lambda h: L.LeakyReLU(0.2)(h)),
    "PReLU": _image(lambda h: L.PReLU(shared_axes=[1, 2])(h)),
    "ELU": _image(lambda h: L.ELU()(h)),
    "Softmax": _image(lambda h: L.Softmax()(h)),
    # Normalizations (the BN before them folds; these stay).
    "LayerNormalization": _image(lambda h: L.LayerNormalization()(h)),
    "GroupNormalization": _image(
        lambda h: L.GroupNormalization(groups=4)(h)),
    "UnitNormalization": _image(lambda h: L.UnitNormalization()(h)),
    "BatchNormalization after Add": _image(
        lambda h: L.BatchNormalization()(L.Add()([h, h]))),
    # Pooling.
    "MaxPooling2D": _image(lambda h: L.MaxPooling2D()(h)),
    "AveragePooling2D": _image(lambda h: L.AveragePooling2D(2)(h)),
    "AveragePooling2D(padding=same)": _image(
        lambda h: L.AveragePooling2D(3, 2, padding="same")(h)),
    "GlobalMaxPooling2D": _image(lambda h: L.GlobalMaxPooling2D()(h)),
    "GlobalAveragePooling2D(keepdims)": _image(
        lambda h: L.GlobalAveragePooling2D(keepdims=True)(h)),
    # Resizing and upsampling.
    "UpSampling2D(nearest)": _image(lambda h: L.UpSampling2D()(h)),
    "UpSampling2D(bilinear)": _image(
        lambda h: L.UpSampling2D(interpolation="bilinear")(h)),
    "Resizing(bilinear) after BN": _image(lambda h: L.Resizing(12, 12)(h)),
    "Resizing(nearest) after BN": _image(
        lambda h: L.Resizing(12, 12, interpolation="nearest")(h)),
    # Padding and cropping.
    "ZeroPadding2D": _image(lambda h: L.ZeroPadding2D(1)(h)),
    "Cropping2D": _image(lambda h: L.Cropping2D(1)(h)),
    # Reshaping.
    "Reshape": _image(lambda h: L.Reshape((64, 8))(h)),
    "Flatten": _image(lambda h: L.Flatten()(h)),
    "Permute": _image(lambda h: L.Permute((3, 1, 2))(h)),
    # Merging.
    "Add": _image(_merge(L.Add())), "Subtract": _image(_merge(L.Subtract())),
    "Multiply": _image(_merge(L.Multiply())),
    "Average": _image(_merge(L.Average())),
    "Maximum": _image(_merge(L.Maximum())),
    "Minimum": _image(_merge(L.Minimum())),
    "Concatenate": _image(_merge(L.Concatenate())),
    # Other convolutions and linear layers.
    "Conv2DTranspose": _image(
        lambda h: L.Conv2DTranspose(4, 3, strides=2, padding="same")(h)),
    "DepthwiseConv2D": _image(lambda h: L.DepthwiseConv2D(3)(h)),
    "SeparableConv2D": _image(lambda h: L.SeparableConv2D(4, 3)(h)),
    "Conv1D": _tokens(lambda h: L.Conv1D(4, 3, padding="same")(h)),
    "EinsumDense": _tokens(
        lambda h: L.EinsumDense("abc,cd->abd", output_shape=(None, 4))(h)),
    # Attention.
    "Attention": _tokens(lambda h: L.Attention()([h, h])),
    "MultiHeadAttention": _tokens(
        lambda h: L.MultiHeadAttention(num_heads=2, key_dim=4)(h, h)),
    # Preprocessing that runs in the graph.
    "Rescaling": _preprocessing(lambda: L.Rescaling(1 / 255.0, offset=-0.5)),
    "Normalization": _preprocessing(_normalization_layer),
    "Resizing(bilinear)": _preprocessing(lambda: L.Resizing(6, 6)),
    "CenterCrop": _preprocessing(lambda: L.CenterCrop(6, 6)),
}
