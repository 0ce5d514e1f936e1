"""tf-keras' own keras.applications, saved the way their users save them.

Not a test module: `make_stock_files(directory, names)` runs `_SCRIPT`
below with the test interpreter and `TF_USE_LEGACY_KERAS=1`, so each file
is what a tf.keras 2.x user of that application has on disk: code nobody
here wrote, built from its constructor arguments (`weights=None` -- no
download --, 10 classes, `classifier_activation=None`: logits), saved by
tf-keras itself. For each application `NAME`:

- `NAME.h5`: `model.save("NAME.h5")`;
- `NAME_savedmodel/`: `model.save("NAME_savedmodel")` (with `savedmodel=True`);
- `NAME.npz`: `input_0` (a batch of pixel-range images), `output_0`,
  tf-keras' own inference output, and `exact_0`, the same network's
  output computed by tf-keras in float64 (`set_floatx("float64")`, the
  float32 weights cast): the exact answer, against which tf-keras'
  float32 output has an error of its own (1e-7 .. 4e-5 of the output's
  scale, growing with depth in these random networks), and `rounded_0`,
  the float64 network's output for the input moved by half a float32 ulp
  (relative 2**-24, random sign): the error float32 rounding alone causes
  in this network, whoever computes it.

Batch normalization statistics are random but realistic: gamma and beta
are drawn at random, then the moving statistics are set to the batch
statistics of a calibration batch (one training-mode pass with momentum
0, so each BN normalizes to about unit scale, as after training; a
variance below a tenth of its layer's mean is raised to that) and
perturbed (mean shifted by up to 0.3 standard deviations, variance scaled
by 0.6 .. 1.6). Purely random statistics make activations grow layer after
layer in deep networks (EfficientNetV2-L, 1000 layers): float32 rounding
then grows with them and two correct implementations disagree by 10..80%
of the output, which would test the conditioning of a random network, not
the loading.

`FAMILIES` lists every application tf-keras ships, with the input size
used (the smallest each accepts, or 32) and the family it belongs to;
`REPRESENTATIVES` is one per family, the smallest, for `make test`.
"""

import json
import os

from tests.keras2_files import run_tf_keras

# name: (input size, family)
FAMILIES = {
    "Xception": (71, "Xception"),
    "VGG16": (32, "VGG"), "VGG19": (32, "VGG"),
    "ResNet50": (32, "ResNet"), "ResNet101": (32, "ResNet"),
    "ResNet152": (32, "ResNet"),
    "ResNet50V2": (32, "ResNetV2"), "ResNet101V2": (32, "ResNetV2"),
    "ResNet152V2": (32, "ResNetV2"),
    "InceptionV3": (75, "Inception"),
    "InceptionResNetV2": (75, "InceptionResNet"),
    "MobileNet": (32, "MobileNet"), "MobileNetV2": (32, "MobileNet"),
    "MobileNetV3Small": (32, "MobileNetV3"),
    "MobileNetV3Large": (32, "MobileNetV3"),
    "DenseNet121": (32, "DenseNet"), "DenseNet169": (32, "DenseNet"),
    "DenseNet201": (32, "DenseNet"),
    "NASNetMobile": (32, "NASNet"), "NASNetLarge": (32, "NASNet"),
    **{f"EfficientNetB{i}": (32, "EfficientNet") for i in range(8)},
    **{f"EfficientNetV2{s}": (32, "EfficientNetV2")
       for s in ("B0", "B1", "B2", "B3", "S", "M", "L")},
    **{f"ConvNeXt{s}": (32, "ConvNeXt")
       for s in ("Tiny", "Small", "Base", "Large", "XLarge")},
    **{f"RegNet{k}{s}": (32, f"RegNet{k}") for k in "XY"
       for s in ("002", "004", "006", "008", "016", "032", "040", "064",
                 "080", "120", "160", "320")},
}

REPRESENTATIVES = ("Xception", "VGG16", "ResNet50", "ResNet50V2",
                   "InceptionV3", "InceptionResNetV2", "MobileNetV2",
                   "MobileNetV3Small", "DenseNet121", "NASNetMobile",
                   "EfficientNetB0", "EfficientNetV2B0", "ConvNeXtTiny",
                   "RegNetX002", "RegNetY002")

BATCH = 2

_SCRIPT = r'''
import json
import os
import sys
import zlib

import numpy as np
import tensorflow as tf
import tf_keras as keras

OUT, NAMES, SAVEDMODEL, BATCH = (sys.argv[1], json.loads(sys.argv[2]),
                                 sys.argv[3] == "1", int(sys.argv[4]))
tf.random.set_seed(7)


def batch_norms(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from batch_norms(layer)
        elif isinstance(layer, keras.layers.BatchNormalization):
            yield layer


def statistics(model, size, rng, spread=1.0):
    """Random gamma/beta; moving statistics from a calibration batch,
    perturbed (see tests/stock_files.py) by `spread` times the usual."""
    norms = list(batch_norms(model))
    for layer in norms:
        if layer.gamma is not None:  # scale=False in InceptionV3
            layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
        if layer.beta is not None:
            layer.beta.assign(rng.normal(0.0, 0.3, layer.beta.shape))
        layer.momentum = 0.0
    calibration = rng.uniform(0.0, 255.0, (16, size, size, 3))
    model(calibration.astype("float32"), training=True)
    for layer in norms:
        # A channel nearly constant over the calibration batch (deep
        # layers see 1x1 maps at 32 px) would get a gain of 1/sqrt(eps).
        variance = layer.moving_variance.numpy()
        layer.moving_variance.assign(np.maximum(variance,
                                                0.1 * variance.mean()))
        std = np.sqrt(layer.moving_variance.numpy() + layer.epsilon)
        layer.moving_mean.assign(layer.moving_mean.numpy() + rng.uniform(
            -0.3, 0.3, std.shape) * spread * std)
        layer.moving_variance.assign(
            layer.moving_variance.numpy()
            * rng.uniform(1.0 - 0.4 * spread, 1.0 + 0.6 * spread, std.shape))
        layer.momentum = 0.99


def draw(name, size, attempt):
    """The network of `name` with random statistics (seed: the name's
    CRC-32 + attempt), an input, tf-keras' float32 output and the exact
    (float64) one."""
    rng = np.random.default_rng(zlib.crc32(name.encode()) + attempt)
    build = getattr(keras.applications, name)
    model = build(input_shape=(size, size, 3), weights=None, classes=10,
                  classifier_activation=None)
    # Each redraw halves the perturbation of the statistics: the deep
    # EfficientNets at 32 px compound it over 50+ blocks.
    statistics(model, size, rng, spread=0.5**attempt)
    x = rng.uniform(0.0, 255.0, (BATCH, size, size, 3)).astype("float32")
    y = np.asarray(model(x, training=False))
    # The same network in float64: the exact outputs, against which
    # tf-keras' own float32 error is measured.
    keras.backend.set_floatx("float64")
    twin = build(input_shape=(size, size, 3), weights=None, classes=10,
                 classifier_activation=None)
    twin.set_weights([w.astype("float64") for w in model.get_weights()])
    exact = np.asarray(twin(x.astype("float64"), training=False))
    keras.backend.set_floatx("float32")
    return rng, model, twin, x, y, exact


for name, size in NAMES.items():
    # A draw whose own float32 rounding moves its output by more than 1%
    # of its scale (tf-keras' float32 output against the exact one, or the
    # exact output of the input scaled by half an ulp; EfficientNetB3's
    # first draw: 2.6% and 1%) is chaotic: no float32 artifact can be
    # verified on it. Such a draw is replaced by the next seed's, with
    # half the perturbation of the statistics each time.
    for attempt in range(5):
        rng, model, twin, x, y, exact = draw(name, size, attempt)
        keras.backend.set_floatx("float64")
        nudged = np.asarray(twin(x.astype("float64") * (1.0 + 2.0**-24),
                                 training=False))
        keras.backend.set_floatx("float32")
        scale = np.max(np.abs(exact))
        noise = max(np.max(np.abs(y - exact)),
                    np.max(np.abs(nudged - exact))) / scale
        if noise <= 1e-2:
            break
        keras.backend.clear_session()
    model.save(os.path.join(OUT, name + ".h5"))
    if SAVEDMODEL:
        model.save(os.path.join(OUT, name + "_savedmodel"))
    keras.backend.set_floatx("float64")
    # ... and its response to the input rounded the other way (a relative
    # 2**-24, half a float32 ulp, of random sign): how far any float32
    # implementation may land from the exact output for rounding alone.
    flip = rng.choice([-1.0, 1.0], x.shape) * 2.0**-24
    rounded = np.asarray(twin(x.astype("float64") * (1.0 + flip),
                              training=False))
    keras.backend.set_floatx("float32")
    keras.backend.clear_session()
    np.savez(os.path.join(OUT, name + ".npz"), input_0=x, output_0=y,
             exact_0=exact, rounded_0=rounded)
    print("wrote", name, flush=True)
print("done")
'''


def _written(directory, name, savedmodel):
    path = os.path.join(directory, name)
    return os.path.exists(path + ".npz") and (
        not savedmodel or os.path.isdir(path + "_savedmodel"))


def make_stock_files(directory, names=REPRESENTATIVES, savedmodel=True,
                     timeout=1800):
    """Write the applications `names` (keys of `FAMILIES`) into
    `directory` with tf-keras in one subprocess; returns `directory`.
    Files already there are kept (the sweep resumes). Raises RuntimeError
    with the subprocess' stderr if it fails."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    todo = {name: FAMILIES[name][0] for name in names
            if not _written(directory, name, savedmodel)}
    if not todo:
        return directory
    script = os.path.join(directory, "_make_stock_files.py")
    with open(script, "w") as handle:
        handle.write(_SCRIPT)
    run_tf_keras(script, [directory, json.dumps(todo),
                          "1" if savedmodel else "0", str(BATCH)],
                 "the stock application files", timeout)
    return directory
