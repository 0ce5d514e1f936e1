"""The serving signature of a Keras model: named inputs and outputs.

One place decides the names, shapes and dtypes that every exported artifact
(SavedModel, ONNX, TFLite) exposes, and how a flat list of inputs is packed
back into the structure the Keras model was built with.
"""

import re

import keras
import numpy as np
import tensorflow as tf

from kerasbn import _batches
from kerasbn import _keras_internal

_NAME_BAD_CHARS = re.compile(r"[^A-Za-z0-9_.\-]")


def _sanitize(name, fallback):
    name = _NAME_BAD_CHARS.sub("_", str(name or ""))
    if not name or not name[0].isalpha():
        name = f"{fallback}_{name}" if name else fallback
    return name


def _unique(names):
    seen = {}
    result = []
    for name in names:
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        seen.setdefault(name, 0)
        result.append(name)
    return result


def _structure(model, attribute, flat):
    """`model.input`/`model.output`, which a Sequential may not define."""
    try:
        return getattr(model, attribute)
    except (AttributeError, ValueError):
        return flat[0] if len(flat) == 1 else list(flat)


def _producer_name(tensor):
    operation = _keras_internal.producing_operation(tensor)
    return getattr(operation, "name", None) or tensor.name


def _no_inputs_error(model):
    if isinstance(model, keras.Sequential):
        how = ("start its layer list with `keras.Input(shape)`, or call "
               "`model.build((None, *shape))`")
    else:
        how = ("a subclassed model keeps no symbolic inputs, even after "
               "`model(keras.Input(shape))`. Wrap it in a Functional model "
               "and export the wrapper: `inputs = keras.Input(shape); "
               "wrapper = keras.Model(inputs, model(inputs))`")
    return ValueError(
        f"Model {model.name!r} has no known inputs, so its serving "
        f"signature (input names, shapes, dtypes) is unknown: {how}."
    )


def _unnamed_inputs(inputs, names):
    """Notes on inputs made without `name=`: Keras calls such a tensor
    `keras_tensor_<n>` in the session that built it, but after its
    InputLayer once the model is saved and loaded, so the same model
    exported twice would serve under two names."""
    notes = []
    for tensor, name in zip(inputs, names):
        layer = getattr(_keras_internal.producing_operation(tensor), "name",
                        None)
        if layer and layer != tensor.name:
            notes.append(
                f"input {name!r} has no name of its own (keras.Input "
                f"without name=): the same model saved and loaded serves "
                f"it as {layer!r}; name the input (keras.Input(..., "
                "name=...)) to keep one name across exports")
    return notes


class ServingSignature:
    """Input and output names, shapes and dtypes of a built Keras model.

    Attributes:
        input_names: One name per flat model input.
        input_specs: `tf.TensorSpec`s with a dynamic batch dimension.
        output_names: One name per flat model output.
        signature_key: The SavedModel signature the artifacts expose.
    """

    signature_key = "serving_default"

    def __init__(self, model):
        inputs = getattr(model, "inputs", None)
        if not inputs:
            raise _no_inputs_error(model)
        self._input_struct = _structure(model, "input", inputs)
        self.input_names = _unique(
            [_sanitize(t.name, f"input_{i}") for i, t in enumerate(inputs)]
        )
        # The model's own names, which a user's sample may key inputs by.
        self.model_input_names = [str(t.name) for t in inputs]
        self.input_specs = [
            tf.TensorSpec((None,) + tuple(t.shape[1:]), t.dtype, name=name)
            for t, name in zip(inputs, self.input_names)
        ]
        outputs = keras.tree.flatten(_structure(model, "output",
                                                model.outputs))
        names = getattr(model, "output_names", None) or []
        if len(names) != len(outputs):
            # A Sequential has no output_names: name each output after the
            # layer that produces it, as a Functional model does.
            names = [_producer_name(t) for t in outputs]
        self.output_names = _unique(
            [_sanitize(n, f"output_{i}") for i, n in enumerate(names)]
        )
        # What the artifacts call differently from the model, and why.
        self.name_changes = [
            f"{kind} {str(old)!r} is named {new!r} in the artifacts (a "
            "SavedModel signature and ONNX need names that start with a "
            "letter and hold only letters, digits, '_', '.', '-', and "
            "distinct ones)"
            for kind, before, after in (
                ("input", [t.name for t in inputs], self.input_names),
                ("output", names, self.output_names))
            for old, new in zip(before, after) if str(old) != new]
        self.name_changes += _unnamed_inputs(inputs, self.input_names)

    def described(self):
        """`{input_names, input_shapes, input_dtypes, output_names}`, plain
        JSON: what another process needs to serve under these names."""
        return {
            "input_names": list(self.input_names),
            "input_shapes": [None if s.shape.rank is None else
                             s.shape.as_list() for s in self.input_specs],
            "input_dtypes": [s.dtype.name for s in self.input_specs],
            "output_names": list(self.output_names),
        }

    def renamed(self, described):
        """This signature under the names of `described()` of another.

        The names a model serves under are its user's: a `.keras` round
        trip renames an input made without `name=` (`keras.Input` names
        its tensor `keras_tensor_<n>`, the reloaded one after its
        InputLayer) and the output a folded BN leaves to its producer, so
        a process that reloads the model serves under the names the
        user's process read from the original. The count, shapes and
        dtypes must be the same; `ValueError` says what differs.
        """
        mine = self.described()
        for key in ("input_shapes", "input_dtypes"):
            if mine[key] != described[key]:
                raise ValueError(
                    f"the reloaded model's {key.replace('_', ' ')} "
                    f"{mine[key]} differ from the original's "
                    f"{described[key]}")
        if len(mine["output_names"]) != len(described["output_names"]):
            raise ValueError(
                f"the reloaded model has {len(mine['output_names'])} "
                f"output(s), the original "
                f"{len(described['output_names'])}")
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.input_names = list(described["input_names"])
        copy.input_specs = [
            tf.TensorSpec(s.shape, s.dtype, name=name)
            for s, name in zip(self.input_specs, copy.input_names)]
        copy.output_names = list(described["output_names"])
        return copy

    def pack(self, flat_inputs):
        """Flat inputs -> the structure the model's `call` expects."""
        return keras.tree.pack_sequence_as(self._input_struct,
                                           list(flat_inputs))

    def serving_function(self, model, named_outputs=True):
        """A `tf.function` of the model in inference mode.

        It returns `{output_name: tensor}`, or with `named_outputs=False` a
        tuple in `output_names` order (for runtimes that lose the names).
        """
        names = self.output_names

        def serve(*flat_inputs):
            outputs = model(self.pack(flat_inputs), training=False)
            flat = keras.tree.flatten(outputs)
            return dict(zip(names, flat)) if named_outputs else tuple(flat)

        return tf.function(serve, input_signature=self.input_specs,
                           autograph=False)

    def feeds(self, flat_arrays):
        """`{input_name: array}` for runtimes that take named inputs."""
        return dict(zip(self.input_names, flat_arrays))

    def generate_inputs(self, batch_size, seed=0, free_dim=32):
        """Random flat inputs of the model's shapes.

        Floating inputs are standard normal; integer inputs are drawn from
        `[0, 10)`; booleans are random. Unknown non-batch dimensions get
        `free_dim`; pass a real `sample` to `export` to control them.
        """
        rng = np.random.default_rng(seed)
        arrays = []
        for spec in self.input_specs:
            shape = (batch_size,) + tuple(
                free_dim if d is None else d for d in spec.shape[1:]
            )
            dtype = spec.dtype
            if dtype.is_floating:
                value = rng.standard_normal(shape)
            elif dtype.is_bool:
                value = rng.random(shape) > 0.5
            elif dtype.is_integer:
                value = rng.integers(0, 10, shape)
            else:
                raise ValueError(
                    f"Cannot generate sample inputs of dtype {dtype.name} for "
                    f"input {spec.name!r}. Pass `sample=` to export."
                )
            arrays.append(np.asarray(value, dtype=dtype.as_numpy_dtype))
        return arrays

    def inputs(self):
        """The flat inputs as `kerasbn._batches.Inputs`."""
        return _batches.Inputs(
            names=list(self.input_names),
            shapes=[tuple(s.shape) for s in self.input_specs],
            dtypes=[s.dtype.as_numpy_dtype for s in self.input_specs],
            aliases=getattr(self, "model_input_names", None))

    def flatten_sample(self, sample, what="sample"):
        """User sample (array, list, tuple or dict) -> flat list of arrays.

        `what` names the argument in error messages."""
        return _batches.flatten(self.inputs(), sample, what)


class GraphSignature(ServingSignature):
    """The signature of a `kerasbn.sources.saved_model.GraphSource`.

    The names, specs and signature key are the source's own (a server
    keeps talking to the folded model as it did to the original); the
    "model" the writers trace is a callable of the flat inputs returning
    the flat outputs (`FrozenGraph`).
    """

    def __init__(self, source):
        self.input_names = list(source.input_names)
        self.input_specs = list(source.input_specs)
        self.output_names = list(source.output_names)
        self.signature_key = source.signature_key
        self._output_shapes = source.output_shapes

    def pack(self, flat_inputs):
        return list(flat_inputs)

    def serving_function(self, model, named_outputs=True):
        names = self.output_names

        def serve(*flat_inputs):
            flat = model(*flat_inputs)
            for tensor, shape in zip(flat, self._output_shapes or ()):
                tensor.set_shape(shape)  # What the source declares.
            return dict(zip(names, flat)) if named_outputs else tuple(flat)

        return tf.function(serve, input_signature=self.input_specs,
                           autograph=False)

    def unknown_dimensions(self):
        """`{input: shape}` of inputs whose non-batch dims are unknown."""
        return {s.name: s.shape for s in self.input_specs
                if s.shape.rank is None
                or any(d is None for d in s.shape[1:])}
