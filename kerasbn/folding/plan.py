"""Decide, per normalization call, what fold does with it.

Passes, in this order (each one sees what the previous ones removed):

1. Backward, in topological order: a normalization whose input comes from a
   registered linear layer (`registry.find_linear`) goes into that layer,
   `W' = W * s` on its output channels, `b' = b * s + t`. Preconditions: the
   layer is called once in the graph, has a linear activation, its output
   feeds nothing but this normalization (no other layer, no model output)
   and its channel axis is the axis normalized. Backward comes first because
   it is always exact; in topological order a chain `conv -> bn -> bn` folds
   both.
2. Forward, in reverse topological order (so `bn -> bn -> conv` folds both),
   if enabled: a normalization whose output feeds only registered linear
   layers (one or several, none a model output) goes into all of them,
   `W' = W * s` on their input channels and `b' += sum(W * t)`, where that is
   exact (`LinearRule.forward_obstacle`).
3. What is left is replaced by a `ScaleShift` holding its `(s, t)`, or kept
   (`keep_unfolded=True`). A normalization called with `training=True` uses
   batch statistics even at inference, so it is always kept.

Both directions ask one question of each neighbour, `Planner.obstacle`:
why this normalization cannot go into that linear layer. The outcome of
each call is a `FoldEntry` without its path, which the builder completes.

With `strip=True` the planner removes every normalization instead (the
speed limit `strip_normalization` builds; not an equivalent model).
"""

import dataclasses

import keras
import numpy as np

from kerasbn import registry
from kerasbn.folding import graph as graph_lib
from kerasbn.folding import report as report_lib

OUTPUT = graph_lib.OUTPUT

# What the two directions call the neighbour, and their reason codes.
_WORDS = {
    report_lib.BACKWARD: dict(
        nested="after_nested_model", nonlinear="after_nonlinear_layer",
        shared="shared_producer", edge="its input is the output of",
        goes="its input comes from"),
    report_lib.FORWARD: dict(
        nested="before_nested_model", nonlinear="before_nonlinear_layer",
        shared="shared_consumer", edge="its output goes into",
        goes="its output goes to"),
}


def describe(operation):
    """`Class 'name'` of a layer or operation, for messages."""
    return f"{type(operation).__name__} '{getattr(operation, 'name', None)}'"


def activation_name(layer):
    """The name of a layer's nonlinear activation, or None if linear."""
    activation = getattr(layer, "activation", None)
    if activation is None or activation is keras.activations.linear:
        return None
    return getattr(activation, "__name__", repr(activation))


def check_finite(layer, scale, shift):
    """Refuse a normalization whose inference map is NaN or infinite.

    That happens when `moving_variance + epsilon` is zero, negative or NaN,
    or a statistic or gamma/beta holds NaN/inf: folding it would write NaN
    kernels that no later check traces back to this layer.
    """
    bad = ~(np.isfinite(scale) & np.isfinite(shift))
    variance = getattr(layer, "moving_variance", None)
    detail = ""
    if variance is not None and tuple(variance.shape) == bad.shape:
        # An infinite variance gives a finite map (scale 0), but it is no
        # statistic either: refuse it too.
        denominator = np.asarray(keras.ops.convert_to_numpy(variance),
                                 np.float64) + float(layer.epsilon)
        bad |= ~(np.isfinite(denominator) & (denominator > 0))
        detail = (" (moving_variance + epsilon there: "
                  f"{denominator[bad][:4].tolist()})")
    if not bad.any():
        return
    channels = np.flatnonzero(bad)
    shown = channels[:8].tolist() + (["..."] if len(channels) > 8 else [])
    raise ValueError(
        f"kerasbn.fold: normalization layer '{layer.name}' "
        f"({type(layer).__name__}) has a NaN or infinite inference scale or "
        f"shift in {len(channels)} channel(s) {shown}{detail}: its "
        "statistics or weights are corrupt (a variance + epsilon that is not "
        "positive and finite, or NaN/inf in gamma, beta or the mean). "
        "Re-estimate the statistics with kerasbn.recalibrate(model, data), "
        "or fix the layer's weights, before folding."
    )


def inference_affine(layer):
    """A normalization's float64 `(scale, shift)` vectors, checked finite."""
    scale, shift = registry.find_normalization(layer).scale_shift(layer)
    scale = np.asarray(scale, np.float64).reshape(-1)
    shift = np.asarray(shift, np.float64).reshape(-1)
    check_finite(layer, scale, shift)
    return scale, shift


class Planner:
    """Decides, per normalization call, what happens to it."""

    def __init__(self, graph, forward=True, strip=False, strip_bias=False):
        self.graph = graph
        self.forward_enabled = forward
        self.strip = strip
        self.strip_bias = strip_bias
        self.uses = {k: list(v) for k, v in graph.uses.items()}
        self.alias = {}
        self.weights = {}  # id(layer) -> float64 weights after the folds.
        self.outcomes = {}  # call index -> FoldEntry (path filled later).
        self._affine = {}  # id(normalization layer) -> (scale, shift).
        self.kinds = {}  # call index -> NormalizationKind.
        for call in graph.calls:
            kind = registry.find_normalization(call.operation)
            if kind is not None:
                self.kinds[call.index] = kind

    # -- reading ----------------------------------------------------------

    def resolve(self, tensor_id):
        while tensor_id in self.alias:
            tensor_id = self.alias[tensor_id]
        return tensor_id

    def affine(self, layer):
        """Float64 `(scale, shift)` of a normalization, computed once."""
        key = id(layer)
        if key not in self._affine:
            self._affine[key] = inference_affine(layer)
        return self._affine[key]

    def current_weights(self, layer, rule):
        key = id(layer)
        if key not in self.weights:
            self.weights[key] = rule.read(layer)
        return self.weights[key]

    def consumers_text(self, tensor_id, skip):
        names = []
        for index in self.uses.get(tensor_id, []):
            if index != skip:
                names.append("a model output" if index == OUTPUT else
                             describe(self.graph.calls[index].operation))
        return ", ".join(dict.fromkeys(names))

    def channel_axis_of(self, call):
        tensor = self.graph.tensors[call.first_input_id()]
        rank = len(tensor.shape)
        axis = self.kinds[call.index].axis(call.operation) % rank
        return axis, rank, tensor.shape[axis]

    def remove(self, call, input_id):
        output_id = call.output_ids[0]
        self.uses[input_id].remove(call.index)
        self.uses[input_id].extend(self.uses.pop(output_id, []))
        self.alias[output_id] = input_id

    def decide(self, call, action, direction=None, into=(), problems=()):
        self.outcomes[call.index] = report_lib.FoldEntry(
            layer=call.operation.name, kind=type(call.operation).__name__,
            call=0, action=action, direction=direction, into=tuple(into),
            reason="; ".join(p[1] for p in problems),
            codes=tuple(p[0] for p in problems))

    # -- checks -----------------------------------------------------------

    def precheck(self, call):
        """`(code, why)` if this call must be kept as it is, else None."""
        if call.kwargs.get("training") is True:
            return ("training_mode",
                    "it is called with training=True, so it normalizes with "
                    "batch statistics even at inference; remove "
                    "training=True from the call to fold it")
        axis = self.kinds[call.index].axis(call.operation)
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            return ("axis_not_single",
                    f"it normalizes over axis={axis!r}; fold needs one "
                    "channel axis")
        if call.first_input_id() is None or len(call.output_ids) != 1:
            return ("unusual_call",
                    "it is not called with its input tensor as first "
                    "positional argument (e.g. inputs=...), which fold does "
                    "not read")
        _, _, channels = self.channel_axis_of(call)
        scale, shift = self.affine(call.operation)
        if channels is None or scale.shape != (channels,) or (
                shift.shape != (channels,)):
            return ("shape",
                    f"its scale/shift have shape {scale.shape} but its input "
                    f"has {channels} channels on axis {axis}")
        return None

    def obstacle(self, call, other_index, direction):
        """Why normalization `call` cannot go into call `other_index`.

        `direction` is BACKWARD (the other call produced its input) or
        FORWARD (the other call consumes its output). Returns `(code, why)`
        or None when the fold is possible and exact.
        """
        words = _WORDS[direction]
        other_call = self.graph.calls[other_index]
        other = other_call.operation
        if isinstance(other, keras.Model):
            return (words["nested"],
                    f"{words['edge']} nested model '{other.name}'; fold "
                    "does not fold across model boundaries")
        rule = registry.find_linear(other)
        if rule is None:
            return (words["nonlinear"],
                    f"{words['goes']} {describe(other)}, which has no kernel "
                    "to fold into")
        count = self.graph.call_count[id(other)]
        if count > 1:
            return (words["shared"],
                    f"{describe(other)} is called {count} times and its "
                    "kernel is shared by all calls; folding into it would "
                    "change its other calls")
        problem = (self._producer_obstacle(call, other)
                   if direction == report_lib.BACKWARD
                   else self._consumer_obstacle(call, other_call))
        problem = problem or rule.obstacle(other)
        if problem is None:
            axis, rank, _ = self.channel_axis_of(call)
            channel_axis = rule.channel_axis(other, rank)
            if axis != channel_axis:
                problem = ("axis_mismatch",
                           f"it normalizes axis {axis} but {describe(other)} "
                           f"has its channels on axis {channel_axis}")
        if problem is None and direction == report_lib.FORWARD:
            problem = rule.forward_obstacle(other, self.affine(
                call.operation)[1])
        return problem

    def _producer_obstacle(self, call, producer):
        activation = activation_name(producer)
        if activation is not None:
            return ("producer_activation",
                    f"{describe(producer)} applies activation "
                    f"'{activation}' before the normalization")
        input_id = self.resolve(call.first_input_id())
        if self.uses.get(input_id) != [call.index]:
            return ("producer_output_shared",
                    f"the output of {describe(producer)} also feeds "
                    f"{self.consumers_text(input_id, call.index)}")
        return None

    def _consumer_obstacle(self, call, consumer_call):
        first = consumer_call.first_input_id()
        if (first is None
                or self.resolve(first) != call.output_ids[0]
                or len(consumer_call.input_ids) != 1):
            return ("consumer_inputs",
                    f"{describe(consumer_call.operation)} takes other "
                    "tensors as well")
        return None

    # -- the two directions -------------------------------------------------

    def backward(self, call):
        """Fold into the producer. Returns None when done, else (code, why)."""
        input_id = self.resolve(call.first_input_id())
        producer_index = self.graph.producer.get(input_id)
        if producer_index is None:
            problem = ("after_model_input",
                       "its input is a model input, with no layer before it")
        else:
            problem = self.obstacle(call, producer_index, report_lib.BACKWARD)
        if problem is not None:
            return problem[0], "backward: " + problem[1]
        producer = self.graph.calls[producer_index].operation
        rule = registry.find_linear(producer)
        scale, shift = self.affine(call.operation)
        self.weights[id(producer)] = rule.backward(
            self.current_weights(producer, rule), producer, scale, shift)
        self.remove(call, input_id)
        self.decide(call, report_lib.FOLDED, report_lib.BACKWARD,
                    [producer.name])
        return None

    def forward(self, call):
        """Fold into the consumers. Returns None when done, else (code, why)."""
        consumers = list(dict.fromkeys(self.uses.get(call.output_ids[0], [])))
        if OUTPUT in consumers:
            return "model_output", "forward: its output is a model output"
        for index in consumers:
            problem = self.obstacle(call, index, report_lib.FORWARD)
            if problem is not None:
                return problem[0], "forward: " + problem[1]
        scale, shift = self.affine(call.operation)
        into = []
        for index in consumers:
            consumer = self.graph.calls[index].operation
            rule = registry.find_linear(consumer)
            self.weights[id(consumer)] = rule.forward(
                self.current_weights(consumer, rule), consumer, scale, shift)
            into.append(consumer.name)
        self.remove(call, self.resolve(call.first_input_id()))
        self.decide(call, report_lib.FOLDED, report_lib.FORWARD, into)
        return None

    # -- drivers ------------------------------------------------------------

    def run(self, keep_unfolded):
        if self.strip:
            return self._run_strip()
        active = []
        for index in sorted(self.kinds):
            call = self.graph.calls[index]
            problem = self.precheck(call)
            if problem is not None:
                self.decide(call, report_lib.KEPT, problems=[problem])
            else:
                active.append(call)
        why = {}
        for call in active:
            problem = self.backward(call)
            if problem is not None:
                why[call.index] = [problem]
        for call in reversed(active):
            if call.index in self.outcomes:
                continue
            problem = (self.forward(call) if self.forward_enabled else
                       ("forward_disabled", "forward: disabled (forward=False)"))
            if problem is not None:
                why[call.index].append(problem)
        action = report_lib.KEPT if keep_unfolded else report_lib.REPLACED
        for call in active:
            if call.index not in self.outcomes:
                self.decide(call, action, problems=why[call.index])
        return self

    def _run_strip(self):
        """Mark every normalization call as removed; weights are kept."""
        for index in sorted(self.kinds):
            call = self.graph.calls[index]
            self.decide(call, report_lib.FOLDED)
            input_id = self.resolve(call.first_input_id())
            self.alias[call.output_ids[0]] = input_id
            producer_index = self.graph.producer.get(input_id)
            if not self.strip_bias or producer_index is None:
                continue
            producer = self.graph.calls[producer_index].operation
            rule = registry.find_linear(producer)
            if rule is None or producer.use_bias:
                continue
            # The bias a fold would give the layer, zero.
            zeros = np.zeros_like(self.affine(call.operation)[0])
            self.weights[id(producer)] = rule.backward(
                self.current_weights(producer, rule), producer, zeros + 1.0,
                zeros)
        return self


def complete(entry, path, call_number):
    """`entry` with its path from the top model and its call number."""
    return dataclasses.replace(entry, layer=path, call=call_number)
