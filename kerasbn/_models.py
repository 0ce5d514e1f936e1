"""Copying models and layers with their weights: the one way kerasbn does it.

`recalibrate` (a copy to work on), `fold` (each recreated layer) and
`convert_to_mabn` (each converted layer) all copy weights through
`copy_weights`, which checks that the copy has the same variables.
"""

import contextlib
import gc

import keras
import numpy as np

from kerasbn import _keras_internal


def copy_weights(source, target, where, values=None, ready=()):
    """Assign every weight of `source` to `target` (same count and shapes).

    `values` (or None): `{id(source weight): value}` to assign instead of
    those weights' own values (`recalibrate`: the new statistics).
    `ready`: ids of `target` weights that already hold their value (made
    from it), left as they are.

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
    values = values or {}
    for s, t in zip(source_weights, target_weights):
        if id(t) not in ready:
            t.assign(_value_of(s, values))
    _finalize_state(target)


def _value_of(variable, values):
    """What a copy of `variable` starts from: `values[id(variable)]` if
    given, else its value; a buffer of its own (see `value_copy`) except
    on TensorFlow, whose variables copy what they are given."""
    value = values.get(id(variable))
    if keras.backend.backend() == "tensorflow":
        return variable.value if value is None else value
    return value_copy(variable if value is None else value)


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


def clone_with_weights(model, where, clone_function=None, values=None):
    """`keras.models.clone_model(model)` holding the same weight values
    (`values`: as in `copy_weights`)."""
    try:
        clone, ready = None, ()
        with _collection_paused():
            if (clone_function is None
                    and _keras_internal.is_plain_graph_model(model)):
                clone, ready = _clone_from_values(model, values or {})
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
    copy_weights(model, clone, where, values, ready)
    return clone


@contextlib.contextmanager
def _collection_paused():
    """Python's cyclic garbage collector off while the block runs.

    Copying a model makes tens of thousands of objects (DenseNet121: 428
    layers), which sets off collections of the whole heap, TensorFlow's
    and Keras' modules included: measured, they made copying DenseNet121
    take 0.72 to 1.1 s instead of 0.70 s. Nothing the copy makes is
    garbage, so pausing loses nothing; collections resume after.
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class _Given(keras.initializers.Initializer):
    """The initial value of a copy of `source` (`values` as in
    `copy_weights`); zeros when asked for another shape or dtype."""

    def __init__(self, source, values):
        self.source = source
        self.values = values

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        """Keras clones an initializer to use it for another weight
        (`clone_initializer`: BatchNormalization's renorm variables):
        that weight starts from zeros, and is assigned its value."""
        return keras.initializers.Zeros()

    def __call__(self, shape, dtype=None):
        dtype = dtype or self.source.dtype
        if not _alike(shape, dtype, self.source):
            return keras.ops.zeros(shape, dtype)
        return _value_of(self.source, self.values)


def _alike(shape, dtype, variable):
    return (tuple(shape) == tuple(variable.shape)
            and keras.backend.standardize_dtype(dtype)
            == keras.backend.standardize_dtype(variable.dtype))


def _clone_from_values(model, values):
    """`clone_model(model)` whose variables are made from their values:
    `(copy, ids of the copy's weights made so)`, or `(None, ())` to copy
    the usual way.

    Each layer is made from its config, and each `*_initializer` whose
    name, less the suffix, is an attribute of the original holding a
    variable (`kernel_initializer` and `kernel`, Keras' convention) is set
    on the new layer to one that gives that variable's value, before the
    new layer is built. Other initializers are zeros, since `copy_weights`
    overwrites those weights anyway: neither way draws random values (a
    third of the time to copy ResNet50), and a weight made from its value
    is not assigned again (another fifth). A weight counts as made from
    its value only where the initializer that made it (recorded as Keras
    called it) is the one given the original weight at its place in
    `weights`. The initializer attributes are then set back to the
    config's; if a layer's config then differs from its original's (its
    initializers are not stored under their config names), `(None, ())`.
    """
    restore = []

    def clone(layer):
        config = layer.get_config()
        keys = [key for key, value in config.items()
                if key.endswith("_initializer") and value is not None]
        if not keys:
            return layer.__class__.from_config(config)
        new = layer.__class__.from_config(
            dict(config, **{key: "zeros" for key in keys}))
        for key in keys:
            source = getattr(layer, key[:-len("_initializer")], None)
            if isinstance(source, keras.Variable):
                setattr(new, key, _Given(source, values))
        restore.append((new, config, keys))
        return new

    try:
        recording = _keras_internal.variable_initializers()
    except _keras_internal.KerasLayoutError:  # check_layout() says so.
        return None, ()
    with recording as made:
        copy = keras.models.clone_model(model, clone_function=clone)
    for new, config, keys in restore:
        for key in keys:
            setattr(new, key, keras.initializers.get(config[key]))
        if new.get_config() != config:
            return None, ()
    # A `_Given` gives its variable's value exactly when asked for its
    # shape and dtype, which are the new variable's.
    ready = set()
    for source, target in zip(model.weights, copy.weights):
        _, initializer = made.get(id(target), (None, None))
        if (isinstance(initializer, _Given) and initializer.source is source
                and _alike(target.shape, target.dtype, source)):
            ready.add(id(target))
    return copy, ready


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
