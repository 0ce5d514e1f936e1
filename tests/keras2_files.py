"""Real Keras 2 model files, written by tf-keras in a subprocess.

Not a test module: `make_keras2_files(directory)` runs `_SCRIPT` below with
the test interpreter and `TF_USE_LEGACY_KERAS=1`, so the files are what a
tf.keras 2.x user has on disk, written by tf-keras itself (Keras 3 cannot
write them). One process writes everything (about 10 s, most of it the
SavedModel and TensorFlow's start-up); test modules cache the directory
per session.

Every batch normalization gets random statistics (positive moving
variance, renorm averages) so a weight loaded into the wrong variable shows
in the outputs. Each model `NAME` gets:

- `NAME.h5`: `model.save("NAME.h5")`, the Keras 2 HDF5 model file;
- `NAME.npz`: `input_<k>` arrays and `output_<k>`, tf-keras' outputs in
  inference mode (the oracle the loaded Keras 3 model must reproduce);
  `model.npz` also has `output_train_0`, its output in training mode.

Models (layer names are fixed, so tests can name the layers mapped):

- `model`: the renorm model (input "image", 16x16x3): conv1 -> bn1
  (renorm=True, no clipping) -> relu1 -> dw (DepthwiseConv2D, no bias) ->
  bn2 -> conv2 -> bn3 (fused=False) -> gap -> dense -> bn4. Also saved as
  `keras2_savedmodel/` (a Keras 2 SavedModel directory), as `weights.h5`
  (`save_weights`: weights only) and its oracle as `reference.npz`.
- `zoo`: three inputs (image, sequence, volume) through Conv1D/2D/3D,
  grouped Conv2D, SeparableConv2D, Conv2DTranspose, renorm with full and
  partial clipping, BN with virtual_batch_size and with axis=1 (channels
  first, between two Permutes), LayerNormalization, Dropout, pooling,
  Activation, ReLU(max_value), LeakyReLU, Reshape, Flatten, Concatenate,
  Add, Dense.
- `nested`: a Functional model holding a Sequential block (with a renorm
  BN) and a Functional head that holds another Sequential (nested models
  two deep), with two outputs, one of them a nested Sequential's.
- `sequential`: a top-level Sequential model without an Input (its first
  layer carries the input shape).
- `mobilenet`: tf-keras' own `keras.applications.MobileNetV2` (alpha
  0.35, 32x32, 10 classes), also as `mobilenet_savedmodel/` (52 BNs, as
  `FusedBatchNormV3` in the SavedModel).
- `custom`: a model with a custom layer registered as "demo>Scale" (a
  weight `factor` per channel, multiplied in).
- `mixed`: mixed_float16 layers (Conv2D, renorm BN, pooling) and a float32
  output layer.
- `users`: tf.keras code as users write it (`users_model`): TensorFlow
  functions on Keras tensors (hard-swish, squeeze-excite gate, resize,
  concat, slicing, reshape, reductions, clipping), an unnamed input, a
  nested Sequential, Keras 2's hard_sigmoid (a Dense activation and an
  Activation layer); `users_mixed` is the same code under mixed_float16.
- `ops`: `ops_<k>.h5` for the k-th function of `TF_FUNCTION_CALLS`, each
  with its `.npz` oracle and `ops_<k>.json`, the TensorFlow names tf-keras
  saved for its calls.
- `heads`: Dense -> BN, then two output heads whose names no artifact
  carries as they are: "1head_dense" (a leading digit) and "2head/dense"
  ('/', which Keras 3 refuses in a layer name).
"""

import json
import os
import subprocess
import sys

ALL = ("model", "zoo", "nested", "sequential", "custom", "mixed",
       "mobilenet", "savedmodel", "weights", "users", "users_mixed", "ops",
       "heads")

# tf.keras code calling TensorFlow functions on Keras tensors (each call is
# a TFOpLambda in the file), one model per translated function: the key is
# the name tf-keras saves (`kerasbn.layers.tf_function.FUNCTIONS`), the
# expressions use inputs `x` and `y` (batch, 6, 6, 4), `tf` and `keras`; each
# expression is one output. `ops_<k>.h5` is written for the k-th key.
TF_FUNCTION_CALLS = {
    "__operators__.add": ["x + 3.0", "x + y"],
    "math.add": ["tf.add(x, y)"],
    "math.add_n": ["tf.add_n([x, y, x])"],
    "math.subtract": ["x - y", "2.0 - x"],
    "math.multiply": ["x * y", "x * 0.5"],
    "math.truediv": ["x / 6.0", "x / (tf.abs(y) + 1.0)",
                     "tf.math.divide(x, 4.0)"],
    "math.pow": ["x ** 2", "tf.pow(tf.abs(x), 1.5)"],
    "math.maximum": ["tf.maximum(x, y)", "tf.maximum(x, 0.1)"],
    "math.minimum": ["tf.minimum(x, 0.5)"],
    "math.squared_difference": ["tf.math.squared_difference(x, y)"],
    "math.negative": ["-x"],
    "math.abs": ["tf.abs(x)"],
    "math.exp": ["tf.exp(x)"],
    "math.log": ["tf.math.log(tf.abs(x) + 0.5)"],
    "math.sqrt": ["tf.sqrt(tf.abs(x))"],
    "math.rsqrt": ["tf.math.rsqrt(tf.abs(x) + 0.5)"],
    "math.square": ["tf.square(x)"],
    "math.reciprocal": ["tf.math.reciprocal(tf.abs(x) + 0.5)"],
    "math.sign": ["tf.sign(x)"],
    "math.sigmoid": ["tf.sigmoid(x)", "tf.nn.sigmoid(x)"],
    "math.tanh": ["tf.tanh(x)"],
    "math.erf": ["tf.math.erf(x)"],
    "math.softplus": ["tf.nn.softplus(x)"],
    "nn.relu": ["tf.nn.relu(x)"],
    "nn.relu6": ["tf.nn.relu6(x * 4.0)"],
    "nn.elu": ["tf.nn.elu(x)"],
    "nn.selu": ["tf.nn.selu(x)"],
    "nn.silu": ["tf.nn.swish(x)", "tf.nn.silu(x)"],
    "nn.gelu": ["tf.nn.gelu(x)", "tf.nn.gelu(x, approximate=True)"],
    "nn.leaky_relu": ["tf.nn.leaky_relu(x)", "tf.nn.leaky_relu(x, 0.1)"],
    "nn.softmax": ["tf.nn.softmax(x)", "tf.nn.softmax(x, axis=1)"],
    "linalg.matmul": ["tf.matmul(x, y, transpose_b=True)",
                      "tf.matmul(x, y, transpose_a=True)"],
    "concat": ["tf.concat([x, y], axis=-1)", "tf.concat([x, y, x], 1)"],
    "stack": ["tf.stack([x, y], axis=1)"],
    "reshape": ["tf.reshape(x, (-1, 36, 4))", "tf.reshape(x, [-1, 144])"],
    "expand_dims": ["tf.expand_dims(x, 1)", "tf.expand_dims(x, -1)"],
    "compat.v1.squeeze": ["tf.squeeze(x[:, :1], axis=1)",
                          "tf.squeeze(x[:, :1, :1])"],
    "compat.v1.transpose": ["tf.transpose(x, [0, 2, 1, 3])",
                            "tf.transpose(x[:, 0])"],
    "math.reduce_mean": ["tf.reduce_mean(x, axis=[1, 2], keepdims=True)",
                         "tf.reduce_mean(x, -1)"],
    "math.reduce_sum": ["tf.reduce_sum(x, axis=-1)"],
    "math.reduce_max": ["tf.reduce_max(x, axis=1)"],
    "math.reduce_min": ["tf.reduce_min(x, axis=[1, 2])"],
    "math.reduce_prod": ["tf.reduce_prod(x, axis=-1, keepdims=True)"],
    "clip_by_value": ["tf.clip_by_value(x, -0.5, 0.5)"],
    "cast": ["tf.cast(tf.cast(x, tf.float16), tf.float32)"],
    "ones_like": ["tf.ones_like(x) + x"],
    "zeros_like": ["tf.zeros_like(x) + x"],
    "tile": ["tf.tile(x, [1, 2, 1, 1])"],
    "compat.v1.pad": ["tf.pad(x, [[0, 0], [1, 1], [2, 0], [0, 0]])",
            "tf.pad(x, [[0, 0], [1, 1], [2, 0], [0, 0]], mode='REFLECT')",
            "tf.pad(x, [[0, 0], [1, 1], [1, 1], [0, 0]], "
            "constant_values=2.0)"],
    "image.resize": ["tf.image.resize(x, (12, 12))",
                     "tf.image.resize(x, (3, 3), method='nearest')",
                     "tf.image.resize(x, (9, 9), method='bicubic')"],
    "identity": ["tf.identity(x)"],
    "stop_gradient": ["tf.stop_gradient(x)"],
    "__operators__.getitem": ["x[:, 1:5, ::2, :3]", "x[..., 0]",
                              "x[:, -1]", "x[:, tf.newaxis, 2]"],
}

# The batch of every oracle: `zoo` has virtual_batch_size=2, which needs a
# batch that is a multiple of 2.
BATCH = 4

_SCRIPT = r'''
import os
import sys

import numpy as np
import tensorflow as tf
import tf_keras as keras

L = keras.layers
OUT = sys.argv[1]
NAMES = sys.argv[2].split(",")
RNG = np.random.default_rng(7)
BATCH = int(sys.argv[3])
tf.random.set_seed(7)


def randomize(model):
    """Random statistics (and affine) for every BN, at any depth."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            randomize(layer)
        elif isinstance(layer, L.BatchNormalization):
            values = []
            for weight in layer.weights:
                name = weight.name.split("/")[-1].split(":")[0]
                shape = weight.shape
                if name == "moving_variance":
                    value = RNG.uniform(0.2, 3.0, shape)
                elif name in ("moving_stddev", "renorm_stddev"):
                    value = RNG.uniform(0.5, 1.7, shape)
                elif name == "gamma":
                    value = RNG.uniform(0.5, 1.5, shape)
                else:  # beta, moving_mean, renorm_mean
                    value = RNG.normal(0.0, 0.5, shape)
                values.append(value.astype("float32"))
            layer.set_weights(values)
            if getattr(layer, "renorm", False):
                # tf-keras keeps moving_variance = moving_stddev**2 - eps.
                var = layer.moving_variance.numpy()
                layer.moving_stddev.assign(np.sqrt(var + layer.epsilon))


def save(model, name):
    randomize(model)
    inputs = [RNG.normal(0.0, 1.0, (BATCH,) + tuple(t.shape[1:]))
              .astype("float32") for t in model.inputs]
    outputs = model(inputs if len(inputs) > 1 else inputs[0],
                    training=False)
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    arrays = {f"input_{k}": x for k, x in enumerate(inputs)}
    arrays.update({f"output_{k}": np.asarray(y)
                   for k, y in enumerate(outputs)})
    model.save(os.path.join(OUT, name + ".h5"))
    np.savez(os.path.join(OUT, name + ".npz"), **arrays)
    return arrays


def renorm_model():
    x = keras.Input((16, 16, 3), name="image")
    y = L.Conv2D(8, 3, padding="same", name="conv1")(x)
    y = L.BatchNormalization(renorm=True, name="bn1")(y)
    y = L.ReLU(name="relu1")(y)
    y = L.DepthwiseConv2D(3, padding="same", use_bias=False, name="dw")(y)
    y = L.BatchNormalization(name="bn2")(y)
    y = L.Conv2D(8, 1, name="conv2")(y)
    y = L.BatchNormalization(fused=False, name="bn3")(y)
    y = L.GlobalAveragePooling2D(name="gap")(y)
    y = L.Dense(4, name="dense")(y)
    y = L.BatchNormalization(name="bn4")(y)
    return keras.Model(x, y, name="renorm_model")


def zoo_model():
    image = keras.Input((12, 12, 4), name="image")
    y = L.Conv2D(8, 3, padding="same", groups=2, name="grouped")(image)
    y = L.SeparableConv2D(6, 3, padding="same", name="sep")(y)
    y = L.BatchNormalization(
        renorm=True, renorm_momentum=0.9, name="bn_clip",
        renorm_clipping={"rmax": 3.0, "rmin": 0.25, "dmax": 2.0})(y)
    y = L.Conv2DTranspose(6, 3, strides=2, padding="same", name="up")(y)
    y = L.BatchNormalization(renorm=True, renorm_clipping={"rmax": 2.0},
                             name="bn_rmax")(y)
    y = L.MaxPooling2D(name="max_pool")(y)
    y = L.AveragePooling2D(name="avg_pool")(y)
    y = L.Activation("relu", name="act")(y)
    y = L.BatchNormalization(virtual_batch_size=2, name="bn_ghost")(y)
    y = L.Permute((3, 1, 2), name="to_nchw")(y)
    y = L.BatchNormalization(axis=1, name="bn_nchw")(y)
    y = L.Permute((2, 3, 1), name="to_nhwc")(y)
    y = L.ReLU(max_value=6.0, name="relu6")(y)
    a = L.GlobalAveragePooling2D(name="gap")(y)

    sequence = keras.Input((10, 4), name="sequence")
    s = L.Conv1D(5, 3, name="conv1d")(sequence)
    s = L.LayerNormalization(name="ln")(s)
    s = L.Dropout(0.5, name="drop")(s)
    s = L.LeakyReLU(0.2, name="leaky")(s)
    s = L.BatchNormalization(name="bn_seq")(s)
    b = L.Flatten(name="flat")(s)

    volume = keras.Input((5, 5, 5, 2), name="volume")
    v = L.Conv3D(3, 3, name="conv3d")(volume)
    v = L.BatchNormalization(name="bn_3d")(v)
    v = L.Reshape((27, 3), name="reshape")(v)
    c = L.GlobalMaxPooling1D(name="gmp")(v)

    joined = L.Concatenate(name="concat")([a, b, c])
    h = L.Dense(7, activation="tanh", name="hidden")(joined)
    h = L.BatchNormalization(name="bn_dense")(h)
    skip = L.Dense(7, name="skip")(joined)
    out = L.Add(name="add")([h, skip])
    out = L.Dense(3, name="logits")(out)
    return keras.Model([image, sequence, volume], out, name="zoo")


def nested_model():
    block = keras.Sequential([
        L.Conv2D(6, 3, padding="same", name="block_conv"),
        L.BatchNormalization(renorm=True, name="block_bn"),
        L.ReLU(name="block_relu"),
    ], name="block")
    tail = keras.Sequential([
        L.DepthwiseConv2D(3, padding="same", name="tail_dw"),
        L.BatchNormalization(name="tail_bn"),
    ], name="tail")
    head_in = keras.Input((8, 8, 6), name="head_in")
    h = tail(head_in)
    h = L.GlobalAveragePooling2D(name="head_gap")(h)
    h = L.Dense(5, name="head_dense")(h)
    head = keras.Model(head_in, h, name="head")
    # A Sequential as a model output (Keras 3 counts its nodes differently
    # there), with partial renorm clipping.
    proj = keras.Sequential([
        L.Dense(3, name="proj_dense"),
        L.BatchNormalization(renorm=True, renorm_clipping={"dmax": 1.5},
                             name="proj_bn"),
    ], name="proj")
    x = keras.Input((8, 8, 3), name="pixels")
    y = block(x)
    y = head(y)
    return keras.Model(x, [L.BatchNormalization(name="outer_bn")(y),
                           proj(y)], name="nested")


def sequential_model():
    return keras.Sequential([
        L.Dense(6, input_shape=(5,), name="first"),
        L.BatchNormalization(name="seq_bn"),
        L.Dropout(0.3, name="seq_drop"),
        L.Dense(2, name="last"),
    ], name="plain_sequential")


@keras.utils.register_keras_serializable(package="demo")
class Scale(L.Layer):
    """Multiplies by a learned per-channel factor."""

    def build(self, input_shape):
        self.factor = self.add_weight(
            name="factor", shape=(input_shape[-1],),
            initializer=keras.initializers.RandomUniform(0.5, 2.0))

    def call(self, inputs):
        return inputs * self.factor


def custom_model():
    x = keras.Input((6,), name="features")
    y = L.Dense(4, name="dense")(x)
    y = Scale(name="scale")(y)
    y = L.BatchNormalization(name="bn")(y)
    return keras.Model(x, y, name="custom")


def mixed_model():
    """mixed_float16 layers (a Keras 2 Policy in the config), float32 out."""
    x = keras.Input((8, 8, 3), name="image")
    y = L.Conv2D(4, 3, dtype="mixed_float16", name="conv")(x)
    y = L.BatchNormalization(renorm=True, dtype="mixed_float16",
                             name="bn")(y)
    y = L.GlobalAveragePooling2D(dtype="mixed_float16", name="gap")(y)
    y = L.Activation("linear", dtype="float32", name="out")(y)
    return keras.Model(x, y, name="mixed")


def heads_model():
    """Output names an artifact must change: a leading digit, a '/'."""
    x = keras.Input((5,), name="features")
    y = L.BatchNormalization(name="trunk_bn")(L.Dense(4, name="trunk")(x))
    return keras.Model(x, [L.Dense(3, name="1head_dense")(y),
                           L.Dense(2, name="2head/dense")(y)], name="heads")


def mobilenet_model():
    """keras.applications code nobody here wrote (tf-keras' own)."""
    return keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10)


def users_model():
    """tf.keras code written the way users write it: TensorFlow functions on
    Keras tensors for hard-swish, squeeze-excite, a resized side branch,
    slicing and a concat, BN after each convolution, a nested Sequential."""
    x = keras.Input((16, 16, 3))
    y = L.Conv2D(8, 3, strides=2, padding="same", use_bias=False)(x / 255.0)
    y = L.BatchNormalization()(y)
    y = y * tf.nn.relu6(y + 3.0) / 6.0
    gate = tf.reduce_mean(y, axis=[1, 2], keepdims=True)
    gate = tf.sigmoid(L.Conv2D(8, 1)(gate))
    y = y * gate
    side = tf.image.resize(L.Conv2D(4, 1)(x), (8, 8))
    side = L.BatchNormalization()(side)
    y = tf.concat([y, tf.nn.relu(side)], axis=-1)
    y = keras.Sequential([L.DepthwiseConv2D(3, padding="same"),
                          L.BatchNormalization(), L.ReLU()],
                         name="block")(y)
    y = y[:, 1:-1, 1:-1, :]
    y = tf.reshape(y, (-1, 36, 12))
    y = tf.reduce_max(y, axis=1) + tf.reduce_mean(y, axis=1)
    # Keras 2's hard_sigmoid (0.2 x + 0.5, clipped), not Keras 3's.
    y = L.Dense(6, activation="hard_sigmoid")(y)
    y = L.Activation("hard_sigmoid")(L.Dense(5)(y) * 4.0)
    return keras.Model(x, tf.clip_by_value(y, -50.0, 50.0), name="users")


def users_mixed_model():
    """`users_model` under the mixed_float16 policy (float16 compute, the
    TensorFlow functions on float16 tensors), float32 logits."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        inner = users_model()
    finally:
        keras.mixed_precision.set_global_policy("float32")
    out = L.Activation("linear", dtype="float32")(inner.output)
    return keras.Model(inner.input, out, name="users_mixed")


def write_tf_function_calls():
    """One model per TF_FUNCTION_CALLS key: `ops_<k>.h5` and `.npz`, and
    `ops_<k>.json`, the functions tf-keras saved in it."""
    import json

    with open(os.path.join(OUT, "tf_function_calls.json")) as handle:
        table = json.load(handle)
    for k, (function, expressions) in enumerate(table.items()):
        x = keras.Input((6, 6, 4), name="x")
        y = keras.Input((6, 6, 4), name="y")
        outputs = [eval(e, {"tf": tf, "x": x, "y": y}) for e in expressions]
        model = keras.Model([x, y], outputs, name=f"ops_{k}")
        save(model, f"ops_{k}")
        saved = sorted({layer.get_config().get("function") for layer in
                        model.layers if "OpLambda" in type(layer).__name__})
        with open(os.path.join(OUT, f"ops_{k}.json"), "w") as handle:
            json.dump(saved, handle)


BUILDERS = {"users": users_model, "users_mixed": users_mixed_model,
            "mobilenet": mobilenet_model, "model": renorm_model,
            "zoo": zoo_model, "nested": nested_model,
            "sequential": sequential_model, "custom": custom_model,
            "mixed": mixed_model, "heads": heads_model}
if "ops" in NAMES:
    write_tf_function_calls()
for name in NAMES:
    if name not in BUILDERS:
        continue
    model = BUILDERS[name]()
    arrays = save(model, name)
    if name == "mobilenet":
        model.save(os.path.join(OUT, "mobilenet_savedmodel"))
    if name == "model":
        # The same model (same statistics) as a SavedModel and as weights,
        # before the training-mode call below updates its statistics.
        if "savedmodel" in NAMES:
            model.save(os.path.join(OUT, "keras2_savedmodel"))
        if "weights" in NAMES:
            model.save_weights(os.path.join(OUT, "weights.h5"))
        # Training mode too (it updates the statistics): the batch
        # statistics corrected by r and d from the renorm averages.
        train = model(arrays["input_0"], training=True)
        arrays["output_train_0"] = np.asarray(train)
        np.savez(os.path.join(OUT, "model.npz"), **arrays)
        np.savez(os.path.join(OUT, "reference.npz"), **arrays)
print("done")
'''

def make_keras2_files(directory, names=ALL, timeout=300):
    """Write the Keras 2 files `names` (see the module docstring) into
    `directory` with tf-keras, in one subprocess; returns `directory`.

    "savedmodel" and "weights" come with "model" (they are the same model);
    asking for either alone writes "model" too. Raises RuntimeError with
    the subprocess' stderr if it fails.
    """
    names = list(names)
    if {"savedmodel", "weights"} & set(names) and "model" not in names:
        names.append("model")
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    script = os.path.join(directory, "_make_keras2_files.py")
    with open(script, "w") as handle:
        handle.write(_SCRIPT)
    with open(os.path.join(directory, "tf_function_calls.json"), "w") as f:
        json.dump(TF_FUNCTION_CALLS, f)
    run_tf_keras(script, [directory, ",".join(names), str(BATCH)],
                 "the Keras 2 test files", timeout)
    return directory


def run_tf_keras(script, args, what, timeout):
    """Run `script` (a path) with `args` under tf-keras
    (`TF_USE_LEGACY_KERAS=1`) in a subprocess of the test interpreter; it
    must print "done". Raises RuntimeError naming `what` with its stderr."""
    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", TF_CPP_MIN_LOG_LEVEL="2",
               CUDA_VISIBLE_DEVICES="")
    env.pop("KERAS_BACKEND", None)
    done = subprocess.run([sys.executable, str(script)] + list(args),
                          capture_output=True, text=True, timeout=timeout,
                          env=env)
    if done.returncode != 0 or "done" not in done.stdout:
        raise RuntimeError(
            f"tf-keras could not write {what} (exit {done.returncode}):\n"
            f"{done.stderr[-4000:]}")
