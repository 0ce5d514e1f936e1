"""A user's own layer class, in an importable module (for the export
tests on JAX/PyTorch: the TensorFlow subprocess that writes the artifacts
imports it from here)."""

import os

import keras


@keras.saving.register_keras_serializable(package="kerasbn_tests")
class Softsign2(keras.layers.Layer):
    """`x / (1 + |x|)`, times 2: a weightless custom activation."""

    def call(self, inputs):
        return 2.0 * inputs / (1.0 + keras.ops.abs(inputs))


if os.environ.get("KERASBN_TESTS_BREAK_IMPORT") == keras.backend.backend():
    raise ImportError("backend_layers: this import was broken on purpose "
                      "by the test (KERASBN_TESTS_BREAK_IMPORT)")
