"""Plan the folds on a model's graph, then build the new model once.

Passes, in this order (each one sees what the previous ones removed):

1. Backward, in topological order: a normalization whose input comes from a
   registered linear layer (`registry.find_producer`) goes into that layer,
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
   exact (`ProducerRule.forward_obstacle`).
3. What is left is replaced by a `ScaleShift` holding its `(s, t)`, or kept
   (`keep_unfolded=True`). A normalization called with `training=True` uses
   batch statistics even at inference, so it is always kept.

All weights are worked on as float64 NumPy arrays and cast once to each
variable's dtype when the new model is written. The new model is built in a
single walk over the graph, like `keras.models.clone_model`: each layer is
created from its config (with `use_bias=True` where a fold adds a bias),
called on the new symbolic tensors, and its variables assigned.
"""

import keras
import numpy as np

from kerasbn.fold import graph as graph_lib
from kerasbn.fold import registry
from kerasbn.fold import report as report_lib
from kerasbn.layers.scale_shift import ScaleShift

OUTPUT = graph_lib.OUTPUT


def _describe(operation):
    name = getattr(operation, "name", None)
    return f"{type(operation).__name__} '{name}'"


def _activation_name(layer):
    activation = getattr(layer, "activation", None)
    if activation is None or activation is keras.activations.linear:
        return None
    return getattr(activation, "__name__", repr(activation))


class _Outcome:
    __slots__ = ("action", "direction", "into", "reason", "codes")

    def __init__(self, action, direction=None, into=(), reason="", codes=()):
        self.action = action
        self.direction = direction
        self.into = tuple(into)
        self.reason = reason
        self.codes = tuple(codes)


class _Planner:
    """Decides, per normalization call, what happens to it."""

    def __init__(self, graph, forward):
        self.graph = graph
        self.forward_enabled = forward
        self.uses = {k: list(v) for k, v in graph.uses.items()}
        self.alias = {}
        self.weights = {}  # id(layer) -> float64 weights after the folds.
        self.outcomes = {}  # call index -> _Outcome.
        self._affine = {}  # id(normalization layer) -> (scale, shift).
        self.rules = {}  # call index -> NormalizationRule.
        for call in graph.calls:
            rule = registry.find_normalization(call.operation)
            if rule is not None:
                self.rules[call.index] = rule

    # -- helpers ----------------------------------------------------------

    def resolve(self, tensor_id):
        while tensor_id in self.alias:
            tensor_id = self.alias[tensor_id]
        return tensor_id

    def affine(self, layer):
        key = id(layer)
        if key not in self._affine:
            rule = registry.find_normalization(layer)
            scale, shift = rule.scale_shift(layer)
            self._affine[key] = (
                np.asarray(scale, np.float64).reshape(-1),
                np.asarray(shift, np.float64).reshape(-1),
            )
        return self._affine[key]

    def current_weights(self, layer, rule):
        key = id(layer)
        if key not in self.weights:
            self.weights[key] = rule.read(layer)
        return self.weights[key]

    def consumers_text(self, tensor_id, skip):
        names = []
        for index in self.uses.get(tensor_id, []):
            if index == skip:
                continue
            if index == OUTPUT:
                names.append("a model output")
            else:
                names.append(_describe(self.graph.calls[index].operation))
        return ", ".join(dict.fromkeys(names))

    def channel_axis_of(self, call, rule):
        tensor = self.graph.tensors[call.first_input_id()]
        rank = len(tensor.shape)
        axis = rule.axis(call.operation)
        return axis % rank, rank, tensor.shape[axis % rank]

    def remove(self, call, input_id):
        output_id = call.output_ids[0]
        self.uses[input_id].remove(call.index)
        self.uses[input_id].extend(self.uses.pop(output_id, []))
        self.alias[output_id] = input_id

    # -- checks -----------------------------------------------------------

    def precheck(self, call, rule):
        """(code, reason) if this call must be kept as it is, else None."""
        layer = call.operation
        if call.kwargs.get("training") is True:
            return (
                "training_mode",
                "it is called with training=True, so it normalizes with "
                "batch statistics even at inference; remove training=True "
                "from the call to fold it",
            )
        axis = rule.axis(layer)
        if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
            return (
                "axis_not_single",
                f"it normalizes over axis={axis!r}; fold needs one channel "
                "axis",
            )
        if call.first_input_id() is None or len(call.output_ids) != 1:
            return (
                "unusual_call",
                "it is not called with its input tensor as first positional "
                "argument (e.g. inputs=...), which fold does not read",
            )
        _, _, channels = self.channel_axis_of(call, rule)
        scale, shift = self.affine(layer)
        if channels is None or scale.shape != (channels,) or (
            shift.shape != (channels,)
        ):
            return (
                "shape",
                f"its scale/shift have shape {scale.shape} but its input "
                f"has {channels} channels on axis {axis}",
            )
        return None

    def backward(self, call, rule):
        """Fold into the producer. Returns None when done, else (code, why)."""
        graph = self.graph
        input_id = self.resolve(call.first_input_id())
        producer_index = graph.producer.get(input_id)
        if producer_index is None:
            return (
                "after_model_input",
                "backward: its input is a model input, with no layer before "
                "it",
            )
        producer = graph.calls[producer_index].operation
        producer_rule = registry.find_producer(producer)
        if isinstance(producer, keras.Model):
            return (
                "after_nested_model",
                f"backward: its input is the output of nested model "
                f"'{producer.name}'; fold does not fold across model "
                "boundaries",
            )
        if producer_rule is None:
            return (
                "after_nonlinear_layer",
                f"backward: its input comes from {_describe(producer)}, "
                "which has no kernel to fold into",
            )
        count = graph.call_count[id(producer)]
        if count > 1:
            return (
                "shared_producer",
                f"backward: {_describe(producer)} is called {count} times "
                "and its kernel is shared by all calls; folding into it "
                "would change its other calls",
            )
        activation = _activation_name(producer)
        if activation is not None:
            return (
                "producer_activation",
                f"backward: {_describe(producer)} applies activation "
                f"'{activation}' before the normalization",
            )
        if self.uses.get(input_id) != [call.index]:
            return (
                "producer_output_shared",
                f"backward: the output of {_describe(producer)} also feeds "
                f"{self.consumers_text(input_id, call.index)}",
            )
        obstacle = producer_rule.obstacle(producer)
        if obstacle is not None:
            return obstacle[0], "backward: " + obstacle[1]
        axis, rank, _ = self.channel_axis_of(call, self.rules[call.index])
        channel_axis = producer_rule.channel_axis(producer, rank)
        if axis != channel_axis:
            return (
                "axis_mismatch",
                f"backward: it normalizes axis {axis} but "
                f"{_describe(producer)} has its channels on axis "
                f"{channel_axis}",
            )
        scale, shift = self.affine(call.operation)
        weights = self.current_weights(producer, producer_rule)
        self.weights[id(producer)] = producer_rule.backward(
            weights, producer, scale, shift
        )
        self.remove(call, input_id)
        self.outcomes[call.index] = _Outcome(
            report_lib.FOLDED, report_lib.BACKWARD, [producer.name]
        )
        return None

    def forward_obstacle(self, call, consumer_index, output_id):
        graph = self.graph
        consumer_call = graph.calls[consumer_index]
        consumer = consumer_call.operation
        consumer_rule = registry.find_producer(consumer)
        if isinstance(consumer, keras.Model):
            return (
                "before_nested_model",
                f"forward: its output goes into nested model "
                f"'{consumer.name}'; fold does not fold across model "
                "boundaries",
            )
        if consumer_rule is None:
            return (
                "before_nonlinear_layer",
                f"forward: its output goes to {_describe(consumer)}, which "
                "has no kernel to fold into",
            )
        count = graph.call_count[id(consumer)]
        if count > 1:
            return (
                "shared_consumer",
                f"forward: {_describe(consumer)} is called {count} times "
                "and its kernel is shared by all calls",
            )
        first = consumer_call.first_input_id()
        if (
            first is None
            or self.resolve(first) != output_id
            or len(consumer_call.input_ids) != 1
        ):
            return (
                "consumer_inputs",
                f"forward: {_describe(consumer)} takes other tensors as well",
            )
        obstacle = consumer_rule.obstacle(consumer)
        if obstacle is not None:
            return obstacle[0], "forward: " + obstacle[1]
        axis, rank, _ = self.channel_axis_of(call, self.rules[call.index])
        channel_axis = consumer_rule.channel_axis(consumer, rank)
        if axis != channel_axis:
            return (
                "axis_mismatch",
                f"forward: it normalizes axis {axis} but "
                f"{_describe(consumer)} reads its channels on axis "
                f"{channel_axis}",
            )
        _, shift = self.affine(call.operation)
        obstacle = consumer_rule.forward_obstacle(consumer, shift)
        if obstacle is not None:
            return obstacle[0], "forward: " + obstacle[1]
        return None

    def forward(self, call):
        """Fold into the consumers. Returns None when done, else (code, why)."""
        output_id = call.output_ids[0]
        consumers = self.uses.get(output_id, [])
        if OUTPUT in consumers:
            return (
                "model_output",
                "forward: its output is a model output",
            )
        for index in dict.fromkeys(consumers):
            obstacle = self.forward_obstacle(call, index, output_id)
            if obstacle is not None:
                return obstacle
        scale, shift = self.affine(call.operation)
        into = []
        for index in dict.fromkeys(consumers):
            consumer = self.graph.calls[index].operation
            rule = registry.find_producer(consumer)
            weights = self.current_weights(consumer, rule)
            self.weights[id(consumer)] = rule.forward(
                weights, consumer, scale, shift
            )
            into.append(consumer.name)
        self.remove(call, self.resolve(call.first_input_id()))
        self.outcomes[call.index] = _Outcome(
            report_lib.FOLDED, report_lib.FORWARD, into
        )
        return None

    # -- driver -----------------------------------------------------------

    def run(self, keep_unfolded):
        calls = [self.graph.calls[i] for i in sorted(self.rules)]
        why = {}
        active = []
        for call in calls:
            problem = self.precheck(call, self.rules[call.index])
            if problem is not None:
                self.outcomes[call.index] = _Outcome(
                    report_lib.KEPT, reason=problem[1], codes=[problem[0]]
                )
            else:
                active.append(call)
        for call in active:
            problem = self.backward(call, self.rules[call.index])
            if problem is not None:
                why[call.index] = [problem]
        for call in reversed(active):
            if call.index in self.outcomes:
                continue
            if not self.forward_enabled:
                why[call.index].append(
                    ("forward_disabled", "forward: disabled (forward=False)")
                )
                continue
            problem = self.forward(call)
            if problem is not None:
                why[call.index].append(problem)
        action = report_lib.KEPT if keep_unfolded else report_lib.REPLACED
        for call in active:
            if call.index in self.outcomes:
                continue
            problems = why[call.index]
            self.outcomes[call.index] = _Outcome(
                action,
                reason="; ".join(p[1] for p in problems),
                codes=[p[0] for p in problems],
            )
        return self


def _assign(variable, value):
    variable.assign(np.asarray(value).astype(variable.dtype))


def _copy_weights(source, target):
    source_weights = source.weights
    target_weights = target.weights
    if len(source_weights) != len(target_weights) or any(
        tuple(s.shape) != tuple(t.shape)
        for s, t in zip(source_weights, target_weights)
    ):
        raise RuntimeError(
            f"Recreating layer '{source.name}' ({type(source).__name__}) "
            "from its config gave different weights "
            f"({[tuple(w.shape) for w in target_weights]} instead of "
            f"{[tuple(w.shape) for w in source_weights]}); its get_config "
            "does not describe it fully. Fix its get_config, or fold a model "
            "without this layer."
        )
    for s, t in zip(source_weights, target_weights):
        t.assign(s.value)


def _write_folded(source, target, weights):
    values = {name: v for name, v in weights.items() if v is not None}
    sources = {v.name: v for v in source.weights}
    for variable in target.weights:
        if variable.name in values:
            _assign(variable, values[variable.name])
        elif variable.name in sources:
            variable.assign(sources[variable.name].value)


def _clone_layer(layer):
    if not isinstance(layer, keras.layers.Layer):
        return layer  # A stateless keras.ops operation: reuse it.
    try:
        return type(layer).from_config(layer.get_config())
    except Exception as error:  # noqa: BLE001 - re-raised with advice.
        if not layer.weights:
            return layer  # Stateless; sharing it cannot mutate anything.
        raise TypeError(
            f"kerasbn.fold could not recreate layer '{layer.name}' "
            f"({type(layer).__name__}) from its config: {error}. Give the "
            "layer a get_config/from_config pair that round-trips (and "
            "register it with keras.saving.register_keras_serializable)."
        ) from error


class _CheapInitializers:
    """Builds new layers with zeros instead of their random initializers.

    Every weight fold creates is overwritten right after the build, so
    drawing random values first is wasted time (a third of a ResNet50
    rebuild). The layer's own initializer objects are put back after the
    build, so its config is unchanged.
    """

    def __init__(self):
        self._swapped = []
        self._zeros = keras.initializers.Zeros()

    def swap(self, layer):
        for name, value in list(vars(layer).items()):
            if isinstance(value, keras.initializers.Initializer):
                self._swapped.append((layer, name, value))
                setattr(layer, name, self._zeros)

    def restore(self):
        for layer, name, value in self._swapped:
            setattr(layer, name, value)
        self._swapped = []


def _hidden_normalizations(layer):
    if not isinstance(layer, keras.layers.Layer):
        return []
    return [
        inner
        for inner in layer._flatten_layers(include_self=False)
        if registry.is_normalization(inner)
    ]


class Folder:
    """Folds a model and every model nested in it, once each."""

    def __init__(self, forward=True, keep_unfolded=False, planner=None):
        self.planner = planner or _Planner
        self.forward = forward
        self.keep_unfolded = keep_unfolded
        self.entries = []
        self.scale_shift_layers = 0
        self._models = {}

    def fold_model(self, model, prefix=""):
        key = id(model)
        if key not in self._models:
            graph = graph_lib.read_graph(model)
            plan = self.planner(graph, self.forward).run(self.keep_unfolded)
            self._models[key] = self._rebuild(graph, plan, prefix)
        return self._models[key]

    def _record(self, plan, call, prefix, call_number):
        outcome = plan.outcomes[call.index]
        self.entries.append(
            report_lib.FoldEntry(
                layer=prefix + call.operation.name,
                kind=type(call.operation).__name__,
                call=call_number,
                action=outcome.action,
                direction=outcome.direction,
                into=outcome.into,
                reason=outcome.reason,
                codes=outcome.codes,
            )
        )

    def _rebuild(self, graph, plan, prefix):
        new_ops = {}
        pending = []  # (kind, source, target, data) to write after build.
        initializers = _CheapInitializers()

        def new_operation(call):
            operation = call.operation
            outcome = plan.outcomes.get(call.index)
            if outcome is not None:
                key = (outcome.action, id(operation))
            else:
                key = ("clone", id(operation))
            if key in new_ops:
                return new_ops[key]
            if outcome is not None and outcome.action == report_lib.REPLACED:
                scale, shift = plan.affine(operation)
                new = ScaleShift(
                    axis=int(plan.rules[call.index].axis(operation)),
                    name=operation.name,
                    dtype=operation.dtype_policy,
                    trainable=operation.trainable,
                )
                self.scale_shift_layers += 1
                pending.append(("scale_shift", operation, new, (scale, shift)))
            elif graph_lib.is_graph_model(operation):
                new = self.fold_model(
                    operation, prefix + operation.name + "/"
                )
            elif id(operation) in plan.weights:
                rule = registry.find_producer(operation)
                new = rule.new_layer(operation)
                pending.append(
                    ("folded", operation, new, plan.weights[id(operation)])
                )
            else:
                for inner in _hidden_normalizations(operation):
                    self.entries.append(
                        report_lib.FoldEntry(
                            layer=f"{prefix}{operation.name}/{inner.name}",
                            kind=type(inner).__name__,
                            call=0,
                            action=report_lib.KEPT,
                            reason=(
                                f"it is inside {_describe(operation)}, a "
                                "layer or subclassed model whose graph fold "
                                "cannot read"
                            ),
                            codes=("inside_layer",),
                        )
                    )
                new = _clone_layer(operation)
                if new is not operation and isinstance(
                    operation, keras.layers.Layer
                ):
                    pending.append(("copy", operation, new, None))
            if (
                new is not operation
                and isinstance(new, keras.layers.Layer)
                and not isinstance(new, keras.Model)
                and not new.built
            ):
                initializers.swap(new)
            new_ops[key] = new
            return new

        def visit(call):
            if call.index in plan.rules:
                # Number the calls in the order the user made them.
                nodes = getattr(call.operation, "_inbound_nodes", [])
                number = next(
                    (k for k, n in enumerate(nodes) if n is call.node), 0
                )
                self._record(plan, call, prefix, number)

        functional = graph.functional
        input_layers = [x._keras_history.operation for x in functional.inputs]
        new_input_layers = [
            type(layer).from_config(layer.get_config())
            for layer in input_layers
        ]
        if graph.is_sequential:
            layers = list(new_input_layers)
            for call in graph.calls:
                visit(call)
                outcome = plan.outcomes.get(call.index)
                if outcome is not None and outcome.action == report_lib.FOLDED:
                    continue
                layers.append(new_operation(call))
            new_model = keras.Sequential(layers, name=graph.model.name)
        else:
            tensors = {}
            for x, layer in zip(functional.inputs, new_input_layers):
                tensors[id(x)] = layer.output
            for call in graph.calls:
                visit(call)
                outcome = plan.outcomes.get(call.index)
                if outcome is not None and outcome.action == report_lib.FOLDED:
                    tensors[call.output_ids[0]] = tensors[call.first_input_id()]
                    continue
                args, kwargs = call.node.arguments.fill_in(tensors)
                outputs = new_operation(call)(*args, **kwargs)
                for x, y in zip(call.node.outputs, keras.tree.flatten(outputs)):
                    tensors[id(x)] = y
            new_inputs = [layer.output for layer in new_input_layers]
            new_outputs = [tensors[id(x)] for x in functional.outputs]
            new_model = keras.Model(
                inputs=keras.tree.pack_sequence_as(
                    functional._inputs_struct, new_inputs
                ),
                outputs=keras.tree.pack_sequence_as(
                    functional._outputs_struct, new_outputs
                ),
                name=graph.model.name,
            )
        initializers.restore()
        if not graph.model.trainable:
            # Only when False: setting it would overwrite every layer's flag.
            new_model.trainable = False
        for kind, source, target, data in pending:
            if kind == "copy":
                _copy_weights(source, target)
            elif kind == "folded":
                _write_folded(source, target, data)
            else:
                _assign(target.scale, data[0])
                _assign(target.shift, data[1])
        return new_model


def count_normalizations(model):
    """Normalization layers in `model` and every layer nested in it.

    >>> import keras, kerasbn
    >>> inner = keras.Sequential([
    ...     keras.Input((3,)),
    ...     keras.layers.Dense(3, use_bias=False),
    ...     keras.layers.BatchNormalization(),
    ... ])
    >>> model = keras.Sequential([
    ...     keras.Input((3,)), inner, keras.layers.BatchNormalization(),
    ... ])
    >>> kerasbn.fold.count_normalizations(model)
    2
    >>> kerasbn.fold.count_normalizations(kerasbn.fold(model).model)
    0
    """
    return sum(
        1
        for layer in model._flatten_layers(include_self=False)
        if registry.is_normalization(layer)
    )


def count_scale_shift(model):
    return sum(
        1
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, ScaleShift)
    )

