"""Copying models and layers with their weights: the one way kerasbn does it.

`recalibrate` (a copy to work on), `fold` (each recreated layer) and
`convert_to_mabn` (each converted layer) all copy weights through
`copy_weights`, which checks that the copy has the same variables.
"""

import contextlib

import keras
import numpy as np

from kerasbn import _keras_internal


def copy_weights(source, target, where):
    """Assign every weight of `source` to `target` (same count and shapes).

    Raises a `TypeError` naming the layer when the two do not match, which
    happens when `target` was recreated from a `get_config` that does not
    describe `source` fully.
    """
    source_weights, target_weights = source.weights, target.weights
    if len(source_weights) != len(target_weights) or any(
            tuple(s.shape) != tuple(t.shape)
            for s, t in zip(source_weights, target_weights)):
        raise TypeError(
            f"{where}: recreating '{source.name}' ({type(source).__name__}) "
            "from its config gave different weights "
            f"({[tuple(w.shape) for w in target_weights]} instead of "
            f"{[tuple(w.shape) for w in source_weights]}). Is it built? Its "
            "get_config must describe it fully (and its class be registered "
            "with keras.saving.register_keras_serializable)."
        )
    on_tensorflow = keras.backend.backend() == "tensorflow"
    for s, t in zip(source_weights, target_weights):
        # TensorFlow's assign copies into the target's own buffer.
        t.assign(s.value if on_tensorflow else value_copy(s))
    _finalize_state(target)


def _finalize_state(layer):
    """Let layers that derive state from their variables derive it again.

    An adapted `keras.layers.Normalization` computes its `mean` and
    `variance` tensors from its `adapt_mean`/`adapt_variance` variables in
    `finalize_state()`, which Keras calls after `adapt` or loading: weights
    assigned otherwise would leave the copy normalizing with the values of
    when it was built (zeros and ones).
    """
    for inner in [layer] + _keras_internal.sublayers(layer):
        finalize = getattr(inner, "finalize_state", None)
        if callable(finalize) and inner.built and inner.weights:
            finalize()


def value_copy(variable):
    """A NumPy copy of `variable`'s value.

    Assigning `other.value` itself would share the backend's buffer on
    JAX, and Keras' JAX `predict`/`fit` donate their state buffers: the
    first call on one model would delete the other model's weights
    ("Array has been deleted").
    """
    return np.array(keras.ops.convert_to_numpy(variable))


def clone_with_weights(model, where, clone_function=None):
    """`keras.models.clone_model(model)` holding the same weight values."""
    try:
        clone = None
        if clone_function is None and _keras_internal.is_plain_graph_model(model):
            clone = _clone_uninitialized(model)
        if clone is None:
            clone = keras.models.clone_model(
                model, clone_function=clone_function)
    except Exception as error:  # noqa: BLE001 - re-raised with advice.
        raise TypeError(
            f"{where} could not copy model '{model.name}' "
            f"({type(model).__name__}) with keras.models.clone_model: "
            f"{error}. Pass inplace=True to update the model itself, or give "
            "its layers get_config/from_config methods that round-trip."
        ) from error
    copy_weights(model, clone, where)
    return clone


def _clone_uninitialized(model):
    """`clone_model(model)` whose layers skip their initializers.

    Each layer is made from its config with every `*_initializer` set to
    zeros, so building it does not draw random values (a third of the
    time to copy ResNet50) that `copy_weights` overwrites anyway; then the
    layer's initializer attributes are set back to the config's values.
    Returns None (copy the usual way) if a layer's config then differs
    from its original's: its initializers are not stored under their
    config names, and the zeros would show in the copy's config.
    """
    restore = []

    def clone(layer):
        config = layer.get_config()
        keys = [key for key, value in config.items()
                if key.endswith("_initializer") and value is not None]
        if not keys:
            return layer.__class__.from_config(config)
        quick = dict(config, **{key: "zeros" for key in keys})
        new = layer.__class__.from_config(quick)
        restore.append((new, config, keys))
        return new

    copy = keras.models.clone_model(model, clone_function=clone)
    for new, config, keys in restore:
        for key in keys:
            setattr(new, key, keras.initializers.get(config[key]))
        if new.get_config() != config:
            return None
    return copy


# -- Mixed precision. --------------------------------------------------------

REDUCED_COMPUTE = ("float16", "bfloat16")


def mixed_policy(model):
    """The name of the first reduced-precision compute policy among
    `model`'s layers (e.g. "mixed_float16"), or None."""
    for layer in [model] + _keras_internal.sublayers(model):
        policy = getattr(layer, "dtype_policy", None)
        if getattr(policy, "compute_dtype", None) in REDUCED_COMPUTE:
            return policy.name
    return None


def float32_twin(model, where):
    """A copy of `model` with its weights whose every layer computes in
    float32: the model a mixed-precision model means, without the
    rounding of its float16/bfloat16 compute (its variables are float32
    already, so nothing is rounded on the way).

    Equal to the same architecture built under the "float32" policy and
    given the same weights (tested bit for bit).
    """
    twin = clone_with_weights(model, where)
    for layer in [twin] + _keras_internal.sublayers(twin):
        policy = getattr(layer, "dtype_policy", None)
        if getattr(policy, "compute_dtype", None) in REDUCED_COMPUTE:
            layer.dtype_policy = "float32"
    return twin


@contextlib.contextmanager
def full_float32():
    """Float32 matrix products and convolutions run in float32 inside.

    On Ampere and newer GPUs every backend runs them in TensorFloat-32 by
    default (JAX: its default matmul precision; TensorFlow: TF32
    execution; PyTorch: cuDNN's allow_tf32), a 10-bit mantissa: measured
    on an H200 with JAX, MobileNetV2 and ResNet50 at 64 px move by 3.7e-4
    and 4.6e-4 of their output scale, and the folded model differs from
    the unfolded one by 5e-4 instead of 7e-7. References an artifact is
    verified against are what the float32 model means, so they are
    computed in full float32; the previous settings come back on exit.
    A no-op on CPUs.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        with jax.default_matmul_precision("float32"):
            yield
    elif backend == "tensorflow":
        import tensorflow as tf

        enabled = tf.config.experimental.tensor_float_32_execution_enabled()
        tf.config.experimental.enable_tensor_float_32_execution(False)
        try:
            yield
        finally:
            tf.config.experimental.enable_tensor_float_32_execution(enabled)
    elif backend == "torch":
        import torch

        flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
        before = [flag.allow_tf32 for flag in flags]
        for flag in flags:
            flag.allow_tf32 = False
        try:
            yield
        finally:
            for flag, value in zip(flags, before):
                flag.allow_tf32 = value
    else:
        yield
