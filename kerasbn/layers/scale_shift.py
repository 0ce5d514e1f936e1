"""A fixed per-channel scale and shift, what an inference-mode BN computes."""

import keras
from keras import ops

from kerasbn import _checks
from kerasbn import _numerics


@keras.saving.register_keras_serializable(package="kerasbn")
class ScaleShift(keras.layers.Layer):
    """Per-channel affine map `outputs = scale * inputs + shift`.

    This is all an inference-mode normalization layer computes once its
    statistics are frozen. `kerasbn.fold` puts it where a BatchNormalization
    cannot be folded into a neighbouring linear layer (after an `Add` or a
    `Concatenate`, after a nonlinearity, before a 'same'-padded convolution):
    no statistics, no epsilon, no training branch, one multiply-add.

    Like Keras' normalization layers, float16/bfloat16 inputs are computed
    in float32 and cast back to the layer's compute dtype, and the weights
    are stored in float32 (`autocast=False`) under mixed precision.

    Args:
        axis: Integer, the channel axis of the inputs (-1 for channels_last,
            1 for channels_first).
        scale_initializer: Initializer of `scale`, ones by default.
        shift_initializer: Initializer of `shift`, zeros by default.
        **kwargs: Base layer arguments (`name`, `dtype`, `trainable`).

    Weights: `scale` and `shift`, each of shape `(channels,)`; they train
    like any weight unless the layer is frozen (`trainable=False`, which is
    what `kerasbn.fold` sets when the replaced layer was frozen).

    >>> import numpy as np
    >>> layer = ScaleShift(axis=-1)
    >>> layer.build((None, 2))
    >>> layer.set_weights([np.array([2.0, 3.0]), np.array([1.0, -1.0])])
    >>> [float(v) for v in layer(np.ones((1, 2), "float32"))[0]]
    [3.0, 2.0]
    """

    def __init__(
        self,
        axis=-1,
        scale_initializer="ones",
        shift_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        _checks.check_axis(axis)
        self.axis = axis
        self.scale_initializer = keras.initializers.get(scale_initializer)
        self.shift_initializer = keras.initializers.get(shift_initializer)
        self.supports_masking = True
        self.scale = None
        self.shift = None

    def build(self, input_shape):
        rank = len(input_shape)
        channels = _checks.channels_of(self.axis, input_shape)
        self._broadcast_shape = [1] * rank
        self._broadcast_shape[self.axis] = channels
        self.scale = self.add_weight(
            shape=(channels,),
            name="scale",
            initializer=self.scale_initializer,
            autocast=False,
        )
        self.shift = self.add_weight(
            shape=(channels,),
            name="shift",
            initializer=self.shift_initializer,
            autocast=False,
        )

    def call(self, inputs, training=None, mask=None):
        del training, mask  # Same map in training and inference; masks pass.
        # Compute in at least float32, as Keras' BatchNormalization does.
        dtype = _numerics.at_least_float32(inputs.dtype)
        inputs = ops.cast(inputs, dtype)
        scale = ops.reshape(ops.cast(self.scale, dtype), self._broadcast_shape)
        shift = ops.reshape(ops.cast(self.shift, dtype), self._broadcast_shape)
        return ops.cast(inputs * scale + shift, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        base_config = super().get_config()
        config = {
            "axis": self.axis,
            "scale_initializer": keras.initializers.serialize(
                self.scale_initializer
            ),
            "shift_initializer": keras.initializers.serialize(
                self.shift_initializer
            ),
        }
        return {**base_config, **config}
