"""See inside custom layers: trace their `call` into a graph of Keras calls.

A custom layer (a `keras.layers.Layer` subclass with its own `call`, such as
keras-hub's blocks) hides the normalization layers it calls: the model's
graph has one node for the whole layer. Fold sees inside by calling the
layer's `call` on symbolic `KerasTensor`s: every sublayer and `keras.ops`
operation it calls records a node, which gives a Functional graph of the
layer. `graph.read_graph` splices that graph into the model's in place of
the layer's call, so its convolutions and normalizations fold like any
others, across the layer's boundary too, and the folded model holds plain
Keras layers where the custom layer was.

The trace runs on a copy of the layer (recreated from its config, weights
copied, sublayers renamed to the original's names): calling the user's own
layers on symbolic tensors would add calls to them.

A layer is traced when it holds a normalization layer at any depth, is
neither a registered normalization or linear layer nor a Functional or
Sequential model (those are folded as nested models). Tracing is refused,
and the layer kept as it is (reason code `inside_layer`, with why), when
the layer cannot be recreated from its config, is called with
`training=True`, its `call` fails on symbolic tensors (backend-specific
ops, Python control flow on tensor values), uses variables directly
(they would not be weights of the new model), or when the traced graph
does not reproduce the layer's own output on a random input.
"""

import dataclasses
import inspect

import keras
import numpy as np

from kerasbn import _checks
from kerasbn import _keras_internal
from kerasbn import _models
from kerasbn import registry

# Sizes given to unknown dimensions of the random check's input.
_CHECK_BATCH = 2
_CHECK_SIZE = 16
# The traced graph runs the same operations on the same weights as the
# layer; only the order of floating-point work may differ (op fusion), so
# it must agree to float32 rounding of the output's scale.
_CHECK_RTOL = 1e-5


@dataclasses.dataclass
class Traced:
    """A custom layer call seen as a Functional graph.

    `functional`'s inputs stand for `tensors` (the call's symbolic inputs,
    flattened, in order); its outputs for the call's outputs.
    """

    functional: object
    tensors: list


class TraceRefused(Exception):
    """Why a custom layer cannot be traced (the message says it)."""


def _custom(operation):
    """A layer with sublayers that fold does not already know."""
    return (isinstance(operation, keras.layers.Layer)
            and not _keras_internal.is_graph_model(operation)
            and registry.find_normalization(operation) is None
            and registry.find_linear(operation) is None
            and bool(_keras_internal.sublayers(operation)))


def wants_trace(operation):
    """Whether fold should look inside `operation`'s call."""
    return _custom(operation) and any(
        registry.find_normalization(inner) is not None
        for inner in _keras_internal.sublayers(operation))


def round_trips(layer):
    """Whether `layer` can be made again from its config."""
    try:
        type(layer).from_config(layer.get_config())
    except Exception:  # noqa: BLE001 - any failure means no.
        return False
    return True


class Tracer:
    """Traces custom layer calls, one copy per layer, refusals remembered."""

    def __init__(self, enabled=True):
        self.enabled = enabled
        self._copies = {}  # id(layer) -> traceable copy of it.
        self._owned = set()  # ids of the copies' sublayers.
        self.refused = {}  # id(layer) -> why it was not traced.

    def owns(self, operation):
        """Whether `operation` is part of one of the tracer's own copies.

        The folded model may use those as they are: nothing else holds them.
        """
        return id(operation) in self._owned

    def wants(self, operation):
        """Whether to trace `operation`: it hides a normalization, or it is
        part of a traced copy and its config does not round-trip (traced,
        the folded model holds its sublayers instead, which do)."""
        return self.enabled and (wants_trace(operation) or (
            self.owns(operation) and _custom(operation)
            and not round_trips(operation)))

    def trace(self, node):
        """`Traced` for a call of a custom layer, or None if refused."""
        layer = node.operation
        if id(layer) in self.refused:
            return None
        try:
            return self._trace(layer, node)
        except TraceRefused as refusal:
            self.refused[id(layer)] = str(refusal)
            return None

    def _trace(self, layer, node):
        if node.arguments.kwargs.get("training") is True:
            raise TraceRefused("it is called with training=True")
        tensors = list(node.arguments.keras_tensors)
        copy = self._copy(layer, node, tensors)
        inputs = [keras.Input(batch_shape=x.shape, dtype=x.dtype)
                  for x in tensors]
        args, kwargs = node.arguments.fill_in(
            {id(x): y for x, y in zip(tensors, inputs)})
        if _accepts_training(copy) and "training" not in kwargs:
            kwargs["training"] = False
        try:
            outputs = copy.call(*args, **kwargs)
            flat = keras.tree.flatten(outputs)
            if len(flat) != len(node.outputs) or not all(
                    isinstance(y, keras.KerasTensor) for y in flat):
                raise TraceRefused(
                    f"its call returned {len(flat)} value(s) where the model "
                    f"has {len(node.outputs)} symbolic output(s)")
            functional = keras.Model(inputs, flat)
        except TraceRefused:
            raise
        except Exception as error:  # noqa: BLE001 - reported, layer kept.
            raise TraceRefused(
                "its call cannot run on symbolic Keras tensors "
                f"({_error_text(error)})") from None
        _refuse_captured_variables(functional)
        _check_same_outputs(layer, node, tensors, functional)
        return Traced(functional, tensors)

    def _copy(self, layer, node, tensors):
        """A built copy of `layer` with its weights and sublayer names."""
        key = id(layer)
        if key in self._copies:
            return self._copies[key]
        if self.owns(layer):
            return layer  # Already fold's own: trace it as it is.
        try:
            copy = type(layer).from_config(layer.get_config())
            args, kwargs = node.arguments.fill_in(
                {id(x): keras.Input(batch_shape=x.shape, dtype=x.dtype)
                 for x in tensors})
            copy(*args, **kwargs)  # Builds it (records a call on the copy).
            _models.copy_weights(layer, copy, "kerasbn.fold")
        except Exception as error:  # noqa: BLE001 - reported, layer kept.
            raise TraceRefused(
                "a copy of it could not be made from its config "
                f"({_error_text(error)})") from None
        _rename_like(layer, copy)
        self._copies[key] = copy
        self._owned.update(id(inner) for inner in
                           _keras_internal.sublayers(copy))
        return copy


def _accepts_training(layer):
    try:
        return "training" in inspect.signature(layer.call).parameters
    except (TypeError, ValueError):
        return False


def _rename_like(layer, copy):
    """Give the copy's sublayers the original's names (configs may not)."""
    originals = _keras_internal.sublayers(layer)
    copies = _keras_internal.sublayers(copy)
    if len(originals) != len(copies) or any(
            type(a) is not type(b) for a, b in zip(originals, copies)):
        return
    for original, inner in zip(originals, copies):
        inner.name = original.name


def _refuse_captured_variables(functional):
    for depth in _keras_internal.nodes_by_depth(functional).values():
        for node in depth:
            flat = keras.tree.flatten((node.arguments.args,
                                       node.arguments.kwargs))
            if any(isinstance(v, keras.Variable) for v in flat):
                raise TraceRefused(
                    "its call uses a variable directly (in "
                    f"'{getattr(node.operation, 'name', '?')}'), which would "
                    "not be a weight of the folded model")


def _check_same_outputs(layer, node, tensors, functional):
    """The traced graph must give the layer's own output on random data."""
    rng = np.random.default_rng(0)
    values = []
    for x in tensors:
        shape = [(_CHECK_BATCH if k == 0 else _CHECK_SIZE) if d is None else d
                 for k, d in enumerate(x.shape)]
        values.append(rng.standard_normal(shape).astype(x.dtype)
                      if "float" in str(x.dtype) else np.zeros(shape, x.dtype))
    try:
        args, kwargs = node.arguments.fill_in(
            {id(x): v for x, v in zip(tensors, values)})
        if _accepts_training(layer):
            kwargs.setdefault("training", False)
        want = [keras.ops.convert_to_numpy(v)
                for v in keras.tree.flatten(layer(*args, **kwargs))]
        got = [keras.ops.convert_to_numpy(v)
               for v in keras.tree.flatten(functional(values, training=False))]
    except Exception as error:  # noqa: BLE001 - reported, layer kept.
        raise TraceRefused(
            "the traced graph could not be checked against the layer on a "
            f"random input ({_error_text(error)})"
        ) from None
    for a, b in zip(want, got):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = np.max(np.abs(a64[np.isfinite(a64)]), initial=0.0)
        if a64.shape != b64.shape or not np.allclose(
                b64, a64, rtol=0.0, atol=_CHECK_RTOL * max(scale, 1e-30),
                equal_nan=True):
            raise TraceRefused(
                "the traced graph does not reproduce the layer's output on a "
                "random input (its call must behave differently when traced)")


def _error_text(error):
    """`Type: first line` of an error, for a refusal's reason."""
    return f"{type(error).__name__}: {_checks.first_line(error, 200)}"
