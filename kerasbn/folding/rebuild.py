"""Build the folded model from a plan, in one walk over the graph.

Like `keras.models.clone_model`: each layer is created from its config
(with `use_bias=True` where a fold adds a bias), called on the new symbolic
tensors, and its variables assigned once the new model exists. All weights
were worked on as float64 NumPy arrays by the planner and are cast once to
each variable's dtype here. Nested Functional/Sequential models are folded
inside, once each.
"""

import keras

from kerasbn import _keras_internal
from kerasbn import _models
from kerasbn import registry
from kerasbn.folding import graph as graph_lib
from kerasbn.folding import plan as plan_lib
from kerasbn.folding import report as report_lib
from kerasbn.folding import trace as trace_lib
from kerasbn.layers.scale_shift import ScaleShift


def _write_folded(source, target, weights):
    values = {name: v for name, v in weights.items() if v is not None}
    sources = {v.name: v for v in source.weights}
    for variable in target.weights:
        if variable.name in values:
            registry.assign(variable, values[variable.name])
        elif variable.name in sources:
            variable.assign(_models.value_copy(sources[variable.name]))


def _clone_layer(layer, ours=False):
    """A copy of `layer` from its config.

    `ours`: the layer belongs to fold's own traced copy of a custom layer,
    so when its config does not round-trip it may be used as it is.
    """
    if not isinstance(layer, keras.layers.Layer):
        return layer  # A stateless keras.ops operation: reuse it.
    try:
        return type(layer).from_config(layer.get_config())
    except Exception as error:  # noqa: BLE001 - re-raised with advice.
        if not layer.weights:
            return _stateless_copy(layer)
        if ours:
            return layer
        raise TypeError(
            f"kerasbn.fold could not recreate layer '{layer.name}' "
            f"({type(layer).__name__}) from its config: {error}. Give the "
            "layer a get_config/from_config pair that round-trips (and "
            "register it with keras.saving.register_keras_serializable)."
        ) from error


def _stateless_copy(layer):
    """A serializable copy of a weightless layer whose config fails, or it.

    Keras' automatic config fails for a layer made with a non-serializable
    argument, e.g. `keras.layers.Identity(dtype=a_policy_object)` inside a
    custom layer; once fold has traced the custom layer the Identity is in
    the model's own graph, and saving would fail. A layer that takes only
    the base arguments is made again from those; any other is shared as it
    is (sharing a stateless layer mutates nothing).
    """
    try:
        copy = type(layer)(name=layer.name, dtype=layer.dtype_policy.name)
        copy.get_config()
    except Exception:  # noqa: BLE001 - no such copy; share the layer.
        return layer
    return copy


class _CheapInitializers:
    """Builds new layers with zeros instead of their random initializers.

    Every weight fold creates is overwritten right after the build, so
    drawing random values first is wasted time (a third of a ResNet50
    rebuild). Used as a context manager: the layers' own initializer
    objects are put back on exit, error or not, so configs are unchanged.
    """

    def __init__(self):
        self._swapped = []
        self._zeros = keras.initializers.Zeros()

    def swap(self, layer):
        for name, value in list(vars(layer).items()):
            if isinstance(value, keras.initializers.Initializer):
                self._swapped.append((layer, name, value))
                setattr(layer, name, self._zeros)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        for layer, name, value in self._swapped:
            setattr(layer, name, value)
        self._swapped = []
        return False


class _Tensors(dict):
    """New tensors by old tensor id, reading through the graph's aliases."""

    def __init__(self, alias):
        super().__init__()
        self._alias = alias

    def __getitem__(self, key):
        return super().__getitem__(graph_lib.resolve(self._alias, key))

    def get(self, key, default=None):
        return super().get(graph_lib.resolve(self._alias, key), default)


class Folder:
    """Folds a model and every model nested in it, once each."""

    def __init__(self, forward=True, keep_unfolded=False, strip=False,
                 strip_bias=False):
        self.options = dict(forward=forward, strip=strip,
                            strip_bias=strip_bias)
        self.keep_unfolded = keep_unfolded
        self.entries = []
        self._models = {}
        self.tracer = trace_lib.Tracer()

    def fold_model(self, model, prefix=""):
        key = id(model)
        if key not in self._models:
            graph = graph_lib.read_graph(model, self.tracer)
            plan = plan_lib.Planner(graph, **self.options).run(
                self.keep_unfolded)
            self._models[key] = _Builder(self, graph, plan, prefix).build()
        return self._models[key]


class _Builder:
    """Writes one (possibly nested) model of a fold."""

    def __init__(self, folder, graph, plan, prefix):
        self.folder = folder
        self.graph = graph
        self.plan = plan
        self.prefix = prefix
        self.new_ops = {}
        self.pending = []  # (writer, source, target, data) after the build.
        self.initializers = _CheapInitializers()

    # -- one operation ------------------------------------------------------

    def new_operation(self, call):
        """The new model's operation for `call` (each source made once)."""
        operation = call.operation
        outcome = self.plan.outcomes.get(call.index)
        key = (outcome.action if outcome else "clone", id(operation))
        if key not in self.new_ops:
            if outcome is not None and outcome.action == report_lib.REPLACED:
                new = self._scale_shift(call)
            elif graph_lib.is_graph_model(operation):
                new = self.folder.fold_model(
                    operation, self.prefix + operation.name + "/")
            elif id(operation) in self.plan.weights:
                new = registry.find_linear(operation).new_layer(operation)
                self.pending.append((_write_folded, operation, new,
                                     self.plan.weights[id(operation)]))
            else:
                new = self._clone(operation)
            if (new is not operation and isinstance(new, keras.layers.Layer)
                    and not isinstance(new, keras.Model) and not new.built):
                self.initializers.swap(new)
            rename = self.graph.renames.get(id(operation))
            if rename and (new is not operation
                           or self.folder.tracer.owns(operation)):
                new.name = rename
            self.new_ops[key] = new
        return self.new_ops[key]

    def _scale_shift(self, call):
        operation = call.operation
        new = ScaleShift(
            axis=int(self.plan.kinds[call.index].axis(operation)),
            name=operation.name, dtype=operation.dtype_policy,
            trainable=operation.trainable)
        scale, shift = self.plan.affine(operation)

        def write(source, target, data):
            registry.assign(target.scale, data[0])
            registry.assign(target.shift, data[1])

        self.pending.append((write, operation, new, (scale, shift)))
        return new

    def _clone(self, operation):
        self._report_hidden(operation)
        new = _clone_layer(operation, self.folder.tracer.owns(operation))
        if new is not operation and isinstance(operation, keras.layers.Layer):
            self.pending.append(
                (lambda s, t, d: _models.copy_weights(s, t, "kerasbn.fold"),
                 operation, new, None))
        return new

    def _report_hidden(self, operation):
        """Entries for normalizations inside a layer fold cannot read."""
        why = self.graph.tracer.refused.get(id(operation))
        for inner in _keras_internal.sublayers(operation):
            if registry.find_normalization(inner) is None:
                continue
            self.folder.entries.append(report_lib.FoldEntry(
                layer=f"{self.prefix}{operation.name}/{inner.name}",
                kind=type(inner).__name__, call=0, action=report_lib.KEPT,
                reason=(f"it is inside {plan_lib.describe(operation)}, whose "
                        "call fold could not trace: "
                        f"{why or 'it was not traced'}"),
                codes=("inside_layer",)))

    def record(self, call):
        """Add the report entry of a normalization call."""
        if call.index in self.plan.kinds:
            number = _keras_internal.call_number(call.operation, call.node)
            self.folder.entries.append(plan_lib.complete(
                self.plan.outcomes[call.index],
                self.prefix + call.scope + call.operation.name, number))

    def removed(self, call):
        outcome = self.plan.outcomes.get(call.index)
        return outcome is not None and outcome.action == report_lib.FOLDED

    # -- the model ----------------------------------------------------------

    def build(self):
        _, new_inputs = new_input_layers(self.graph.functional)
        with self.initializers:
            if self.graph.is_sequential:
                new_model = self._sequential(new_inputs)
            else:
                new_model = self._functional(new_inputs)
        if not self.graph.model.trainable:
            # Only when False: setting it would overwrite every layer's flag.
            new_model.trainable = False
        for write, source, target, data in self.pending:
            write(source, target, data)
        return new_model

    def _sequential(self, new_inputs):
        layers = list(new_inputs)
        for call in self.graph.calls:
            self.record(call)
            if not self.removed(call):
                layers.append(self.new_operation(call))
        return keras.Sequential(layers, name=self.graph.model.name)

    def _functional(self, new_inputs):
        functional = self.graph.functional
        tensors = _Tensors(self.graph.alias)
        for x, layer in zip(functional.inputs, new_inputs):
            tensors[id(x)] = layer.output
        for call in self.graph.calls:
            self.record(call)
            if self.removed(call):
                tensors[call.output_ids[0]] = tensors[call.first_input_id()]
                continue
            args, kwargs = call.node.arguments.fill_in(tensors)
            outputs = self.new_operation(call)(*args, **kwargs)
            for x, y in zip(call.node.outputs, keras.tree.flatten(outputs)):
                tensors[id(x)] = y
        return functional_model(
            functional, new_inputs,
            [tensors[id(x)] for x in functional.outputs],
            self.graph.model.name)


def new_input_layers(functional):
    """`(input layers, copies of them)` of a Functional model."""
    input_layers = [_keras_internal.producing_operation(x)
                    for x in functional.inputs]
    return input_layers, [type(layer).from_config(layer.get_config())
                          for layer in input_layers]


def functional_model(functional, new_inputs, outputs, name):
    """A Functional model on `new_inputs` (from `new_input_layers`) with
    `outputs` (listed as `functional.outputs` are), structured as
    `functional`'s inputs and outputs are."""
    return keras.Model(
        inputs=keras.tree.pack_sequence_as(
            _keras_internal.input_structure(functional),
            [layer.output for layer in new_inputs]),
        outputs=keras.tree.pack_sequence_as(
            _keras_internal.output_structure(functional), outputs),
        name=name)


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
    >>> kerasbn.folding.count_normalizations(model)
    2
    >>> kerasbn.folding.count_normalizations(kerasbn.fold(model).model)
    0
    """
    return len(registry.normalization_layers(model, statistics=False))


def count_scale_shift(model):
    return sum(1 for layer in _keras_internal.sublayers(model)
               if isinstance(layer, ScaleShift))

