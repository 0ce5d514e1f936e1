"""Read a Functional or Sequential model's graph as a list of calls.

Keras keeps a Functional model's graph as nodes (one per call of a layer or
operation) linked by symbolic tensors. Fold works on a flat copy: the calls
in topological order, which call produces each tensor, which calls consume
it (model outputs count as a consumer, `OUTPUT`), and how often each layer
is called. The planner edits the consumer lists as normalizations vanish;
the Keras graph itself is never modified.
"""

import collections
import dataclasses

import keras

from kerasbn import _checks
from kerasbn import _keras_internal
from kerasbn.folding import trace as trace_lib

OUTPUT = -1


@dataclasses.dataclass
class Call:
    index: int
    operation: object
    node: object
    input_ids: list
    output_ids: list
    scope: str = ""  # "layer/inner/" for calls traced inside custom layers.
    alias: dict = dataclasses.field(default_factory=dict, repr=False)

    @property
    def args(self):
        return self.node.arguments.args

    @property
    def kwargs(self):
        return self.node.arguments.kwargs

    def first_input_id(self):
        """Id of the first positional argument if it is a tensor, else None."""
        args = self.args
        if args and isinstance(args[0], keras.KerasTensor):
            return resolve(self.alias, id(args[0]))
        return None


def resolve(alias, tensor_id):
    """The id a tensor is known by in the graph (after splicing)."""
    while tensor_id in alias:
        tensor_id = alias[tensor_id]
    return tensor_id


@dataclasses.dataclass
class Graph:
    """A model's calls in topological order, custom layers traced inside.

    `alias` maps the ids of tensors that stand for others (a traced layer's
    inputs and outputs) to the ids the calls use; `renames` gives new names
    to layers from traced custom layers whose names clash; `tracer` holds
    the traced layers and the refusals.
    """

    model: object
    functional: object
    calls: list
    producer: dict
    uses: dict
    call_count: collections.Counter
    tensors: dict
    alias: dict = dataclasses.field(default_factory=dict)
    renames: dict = dataclasses.field(default_factory=dict)
    tracer: object = None

    @property
    def is_sequential(self):
        return isinstance(self.model, keras.Sequential) and not any(
            call.scope for call in self.calls)

    def resolve(self, tensor_id):
        return resolve(self.alias, tensor_id)


def graph_kind_error(model):
    name = type(model).__name__
    return TypeError(
        f"kerasbn.fold cannot read the graph of '{model.name}', a subclassed "
        f"model of class {name}: its computation lives in Python code "
        "(call), not in a layer graph. Rebuild it as a Functional model "
        "(keras.Model(inputs, outputs)) or a Sequential model, or call "
        "kerasbn.fold on the Functional sub-models it contains."
    )


is_graph_model = _keras_internal.is_graph_model


def functional_of(model):
    """The Functional graph behind `model`, or raise a clear error."""
    if isinstance(model, keras.Sequential):
        functional = _keras_internal.sequential_graph(model)
        if functional is None:
            raise ValueError(
                f"Sequential model '{model.name}' is not built, so it has no "
                "graph to fold yet. Start it with keras.Input(shape=...) or "
                "call model.build(input_shape) (or the model on data) "
                "before folding."
            )
        return functional
    if _keras_internal.is_functional(model):
        return model
    raise graph_kind_error(model)


def check_foldable(model, where):
    """`model` must be a Functional or built Sequential keras.Model."""
    _checks.check_model(model, where, built=False)
    functional_of(model)  # Raises for subclassed or unbuilt models.


def read_graph(model, tracer=None, trace=True):
    """The calls of `model`, with traceable custom layers seen inside.

    With `trace=False` a custom layer stays one call (the graph then holds
    only the user's own layers, for tools that act on them).
    """
    functional = functional_of(model)
    tracer = tracer or trace_lib.Tracer(enabled=trace)
    graph = Graph(model, functional, [], {}, collections.defaultdict(list),
                  collections.Counter(), {}, tracer=tracer)
    for x in functional.inputs:
        graph.tensors[id(x)] = x
    _read(graph, functional, "")
    for x in functional.outputs:
        graph.uses[graph.resolve(id(x))].append(OUTPUT)
    _unique_names(graph)
    return graph


def _read(graph, functional, scope):
    nodes_by_depth = _keras_internal.nodes_by_depth(functional)
    for depth in sorted(nodes_by_depth, reverse=True):
        for node in nodes_by_depth[depth]:
            if node.operation is None or node.is_input:
                continue
            input_ids = [graph.resolve(id(x)) for x in node.input_tensors]
            if any(i not in graph.tensors for i in input_ids):
                continue  # Not reachable from the model's inputs.
            traced = (graph.tracer.trace(node)
                      if graph.tracer.wants(node.operation) else None)
            if traced is not None:
                _splice(graph, node, traced, scope)
                continue
            call = Call(index=len(graph.calls), operation=node.operation,
                        node=node, input_ids=input_ids,
                        output_ids=[id(x) for x in node.outputs],
                        scope=scope, alias=graph.alias)
            graph.calls.append(call)
            graph.call_count[id(node.operation)] += 1
            for i in input_ids:
                graph.uses[i].append(call.index)
            for x in node.outputs:
                graph.tensors[id(x)] = x
                graph.producer[id(x)] = call.index


def _splice(graph, node, traced, scope):
    """Put a traced layer's calls in place of its call."""
    sub = traced.functional
    for inner, outer in zip(sub.inputs, traced.tensors):
        graph.alias[id(inner)] = graph.resolve(id(outer))
    _read(graph, sub, f"{scope}{node.operation.name}/")
    for outer, inner in zip(node.outputs, sub.outputs):
        graph.alias[id(outer)] = graph.resolve(id(inner))


def _unique_names(graph):
    """New names for traced layers whose names clash with another layer's."""
    layers = [call for call in graph.calls
              if isinstance(call.operation, keras.layers.Layer)]
    owner = {}
    for call in sorted(layers, key=lambda c: bool(c.scope)):
        owner.setdefault(call.operation.name, id(call.operation))
    taken = set(owner)
    for call in layers:
        operation = call.operation
        if owner[operation.name] == id(operation) or (
                id(operation) in graph.renames):
            continue
        base = call.scope.replace("/", "_") + operation.name
        name, k = base, 1
        while name in taken:
            name, k = f"{base}_{k}", k + 1
        taken.add(name)
        graph.renames[id(operation)] = name
