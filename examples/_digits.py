"""Shared pieces of the examples: the digits data and the small CNN.

scikit-learn ships the UCI handwritten digits (1797 images of 8x8, 10
classes), so every example runs offline. The examples import this module
from their own folder (`python examples/NAME.py`).
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402


def load_data(seed=0):
    """`(x_train, x_test, y_train, y_test)`: images in [0, 1], (n, 8, 8, 1)."""
    digits = load_digits()
    x = (digits.images.astype("float32") / 16.0)[..., None]
    y = digits.target.astype("int32")
    return train_test_split(x, y, test_size=0.25, random_state=seed,
                            stratify=y)


def build_cnn(norm=None, conv=keras.layers.Conv2D, seed=0, optimizer=None,
              norm_after=(True, True, True), name="digits_cnn", **compile_kw):
    """Three 3x3 convolutions (32, 64, 64), GAP, Dense(10) logits.

    Args:
        norm: Zero-argument factory of a normalization layer, or None.
        conv: Convolution class (e.g. kerasbn's CenteredConv2D for MABN).
        seed: Weight initialization seed.
        optimizer: Keras optimizer (default Adam 3e-3).
        norm_after: Which of the three convolutions get `norm()` after them.
        name: Model name.
        **compile_kw: Extra `model.compile` arguments.
    """
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 1), name="image")
    h = inputs
    for i, filters in enumerate((32, 64, 64)):
        if i == 2:
            h = keras.layers.MaxPooling2D()(h)
        with_norm = norm is not None and norm_after[i]
        h = conv(filters, 3, padding="same" if i < 2 else "valid",
                 use_bias=not with_norm)(h)
        if with_norm:
            h = norm()(h)
        h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(10, name="logits")(h)
    model = keras.Model(inputs, outputs, name=name)
    model.compile(
        optimizer=optimizer or keras.optimizers.Adam(3e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
        **compile_kw,
    )
    return model


def accuracy(model, x, y):
    """Inference-mode accuracy."""
    logits = model.predict(x, verbose=0, batch_size=256)
    return float(np.mean(logits.argmax(-1) == y))


def save_figure(fig, path):
    """Write a matplotlib figure as PNG, creating the folder."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")
