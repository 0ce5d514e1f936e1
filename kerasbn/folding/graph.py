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

OUTPUT = -1


@dataclasses.dataclass
class Call:
    index: int
    operation: object
    node: object
    input_ids: list
    output_ids: list

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
            return id(args[0])
        return None


@dataclasses.dataclass
class Graph:
    model: object
    functional: object
    calls: list
    producer: dict
    uses: dict
    call_count: collections.Counter
    tensors: dict

    @property
    def is_sequential(self):
        return isinstance(self.model, keras.Sequential)


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


def read_graph(model):
    functional = functional_of(model)
    calls = []
    producer = {}
    uses = collections.defaultdict(list)
    call_count = collections.Counter()
    tensors = {}
    for x in functional.inputs:
        tensors[id(x)] = x
    nodes_by_depth = _keras_internal.nodes_by_depth(functional)
    for depth in sorted(nodes_by_depth, reverse=True):
        for node in nodes_by_depth[depth]:
            if node.operation is None or node.is_input:
                continue
            input_ids = [id(x) for x in node.input_tensors]
            if any(i not in tensors for i in input_ids):
                continue  # Not reachable from the model's inputs.
            call = Call(
                index=len(calls),
                operation=node.operation,
                node=node,
                input_ids=input_ids,
                output_ids=[id(x) for x in node.outputs],
            )
            calls.append(call)
            call_count[id(node.operation)] += 1
            for i in input_ids:
                uses[i].append(call.index)
            for x in node.outputs:
                tensors[id(x)] = x
                producer[id(x)] = call.index
    for x in functional.outputs:
        uses[id(x)].append(OUTPUT)
    return Graph(model, functional, calls, producer, uses, call_count,
                 tensors)
