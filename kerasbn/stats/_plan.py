"""Which layer calls a staged recalibration runs in which stage.

Recalibration is exact when each normalization layer's statistics are the
moments of its inputs while every normalization before it already holds
its new statistics. A layer's inputs can therefore be gathered only once
the layers it depends on are done: the layers fall into *generations*
(generation 1 depends on no other target, generation k on one of
generation k-1 at most), and one pass over the data per generation is
enough. A stage is that pass: stage s runs the calls whose inputs became
final at the end of stage s-1 and gathers the inputs of generation s.

The plan reads the model's graph (nested Functional and Sequential models
flattened into it, their layers being the model's own), gives every
tensor the stage from which its value is final, and every call the stage
in which it runs. Each call runs in exactly one stage, so with the tensors
that cross a stage boundary kept (`_staged.ActivationCache`) the whole
recalibration costs one forward pass plus that traffic.

A call the graph cannot see inside (a custom layer or subclassed model
holding normalization layers) is *opaque*: its inner targets are gathered
one per stage, in the order it calls them, by running that call alone on
its kept inputs; a subclassed model is one opaque call, which is the
one-pass-per-layer method.
"""

import dataclasses

import keras

from kerasbn import _keras_internal


class PlanRefused(Exception):
    """The graph cannot be staged; the caller falls back to one opaque
    call for the whole model."""


@dataclasses.dataclass
class Step:
    """One call of the flattened graph.

    `kind` is "plain" (runs, nothing gathered), "target" (a normalization
    layer to recalibrate: its inputs are gathered in `gather_stage`, it runs
    in `run_stage = gather_stage + 1`) or "opaque" (inner targets `inner`,
    gathered one per stage from `gather_stage` on; it runs once they are
    all done).
    """

    index: int
    operation: object
    node: object
    inputs: list
    outputs: list
    kind: str = "plain"
    inner: list = dataclasses.field(default_factory=list)
    gather_stage: int = 0
    run_stage: int = 0

    @property
    def gather_stages(self):
        if self.kind == "target":
            return [self.gather_stage]
        if self.kind == "opaque":
            return list(range(self.gather_stage,
                              self.gather_stage + len(self.inner)))
        return []


@dataclasses.dataclass
class Plan:
    """The calls of a model, staged.

    `inputs` are the ids of the model's (flattened) input tensors; `alias`
    maps the ids of a nested model's tensors to the ids the steps use;
    `stage_of` gives each tensor the stage its value is final from;
    `uses` each tensor the stages that read it. Both are indexed by stage
    once (`gathered_in` and `last_read_in` are looked up several times per
    stage: a scan per lookup was O(steps x stages), 0.05 s on DenseNet121).
    """

    model: object
    functional: object
    steps: list
    inputs: list
    alias: dict
    stage_of: dict
    uses: dict
    num_stages: int
    _gathering: dict = dataclasses.field(init=False, repr=False)
    _last_read: dict = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        self._gathering, self._last_read = {}, {}
        for step in self.steps:
            for number in step.gather_stages:
                self._gathering.setdefault(number, []).append(step)
        for tensor, used in self.uses.items():
            self._last_read.setdefault(max(used), []).append(tensor)

    def resolve(self, tensor_id):
        while tensor_id in self.alias:
            tensor_id = self.alias[tensor_id]
        return tensor_id

    def gathered_in(self, stage):
        """The steps that gather inputs in `stage`, in graph order."""
        return list(self._gathering.get(stage, ()))

    def last_read_in(self, stage):
        """Tensor ids that no stage after `stage` reads."""
        return list(self._last_read.get(stage, ()))


def _functional_of(model):
    if isinstance(model, keras.Sequential):
        return _keras_internal.sequential_graph(model)
    if _keras_internal.is_functional(model):
        return model
    return None


def _read(functional, steps, alias, known, targets):
    nodes_by_depth = _keras_internal.nodes_by_depth(functional)
    for depth in sorted(nodes_by_depth, reverse=True):
        for node in nodes_by_depth[depth]:
            if node.operation is None or node.is_input:
                continue
            inputs = [_resolve(alias, id(x)) for x in node.input_tensors]
            if any(i not in known for i in inputs):
                continue  # Not reachable from the model's inputs.
            operation = node.operation
            inner = _functional_of(operation) if isinstance(
                operation, keras.Model) else None
            if inner is not None and _can_flatten(node, inner, inputs):
                for sub, outer in zip(inner.inputs, inputs):
                    alias[id(sub)] = outer
                _read(inner, steps, alias, known, targets)
                for outer, sub in zip(node.outputs, inner.outputs):
                    alias[id(outer)] = _resolve(alias, id(sub))
                continue
            step = Step(len(steps), operation, node, inputs,
                        [id(x) for x in node.outputs])
            if id(operation) in targets:
                step.kind = "target"
            else:
                step.inner = [layer for layer in
                              _keras_internal.sublayers(operation)
                              if id(layer) in targets]
                step.kind = "opaque" if step.inner else "plain"
            steps.append(step)
            known.update(step.outputs)


def _resolve(alias, tensor_id):
    while tensor_id in alias:
        tensor_id = alias[tensor_id]
    return tensor_id


def _can_flatten(node, inner, inputs):
    """A nested model called on its inputs only, with no training flag or
    mask of its own, runs as its graph does."""
    kwargs = node.arguments.kwargs
    if any(kwargs.get(name) is not None for name in ("training", "mask")):
        return False
    if len(inputs) != len(inner.inputs):
        return False
    # Its inputs must be its own Input layers' (cast and rank as they are).
    return all(tuple(sub.shape[1:]) == tuple(x.shape[1:])
               for sub, x in zip(inner.inputs, node.input_tensors))


def read(model, targets):
    """The staged plan of `model` for the layers `targets`.

    Raises `PlanRefused` if the model has no graph (subclassed) or a
    target's calls depend on each other (a layer reused along a path).
    """
    functional = _functional_of(model)
    if functional is None:
        raise PlanRefused("the model has no layer graph")
    target_ids = {id(layer) for layer in targets}
    steps, alias = [], {}
    inputs = [id(x) for x in functional.inputs]
    _read(functional, steps, alias, set(inputs), target_ids)
    called = [id(step.operation) for step in steps if step.kind == "target"]
    inside = [id(layer) for step in steps for layer in step.inner]
    if set(called) & set(inside) or len(inside) != len(set(inside)):
        raise PlanRefused("a layer is called both inside and outside a "
                          "custom layer")
    stage_of = _assign_stages(steps, inputs)
    uses = {}
    for step in steps:
        reads = set(step.gather_stages) | {step.run_stage}
        for tensor in step.inputs:
            uses.setdefault(tensor, set()).update(reads)
    num_stages = max([s for step in steps for s in step.gather_stages],
                     default=0)
    return Plan(model, functional, steps, inputs, alias, stage_of, uses,
                num_stages)


def _assign_stages(steps, inputs):
    """Stages for every tensor and step; a layer called several times is
    gathered once, in the latest stage any of its calls needs, which is
    found by repeating the assignment until it settles."""
    minimum = {}
    for _ in range(len(steps) + 1):
        stage_of = {tensor: 1 for tensor in inputs}
        raised = False
        for step in steps:
            ready = max((stage_of[t] for t in step.inputs), default=1)
            if step.kind == "target":
                key = id(step.operation)
                if ready > minimum.get(key, 0):
                    minimum[key] = ready
                    raised = True
                step.gather_stage = minimum[key]
                step.run_stage = step.gather_stage + 1
            elif step.kind == "opaque":
                step.gather_stage = ready
                step.run_stage = ready + len(step.inner)
            else:
                step.run_stage = ready
            for tensor in step.outputs:
                stage_of[tensor] = step.run_stage
        if not raised:
            return stage_of
    raise PlanRefused("a reused layer is called on its own output")
