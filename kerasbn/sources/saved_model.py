"""Models that exist only as TensorFlow graphs: SavedModels, frozen .pb.

A SavedModel directory (written by Keras 2's `model.save(dir)`, Keras 3's
`model.export(dir)`, `tf.saved_model.save`, or the TF Serving layout's
`<name>/<version>/`) is read through one of its signatures
(`serving_default` unless told otherwise), frozen into constants and
flattened (every function call inlined, including those marked not to be:
Keras runs a grouped convolution as an XLA-compiled call, which becomes a
plain grouped `Conv2D`), so `kerasbn.folding.tfgraph` can fold its batch
normalization without the Python code that built it (`FrozenGraph` runs
such a convolution XLA-compiled again, as the source did). A TF1 frozen
GraphDef (`.pb`) is read directly: its `Placeholder`s are the inputs and
the nodes nothing reads are the outputs.

`GraphSource` holds what the export pipeline needs: the input and output
names a server sees, their specs, a reference function to verify against
(the SavedModel's own signature, as loaded by `tf.saved_model.load`) and
the frozen GraphDef. `FrozenGraph` is the folded graph as a callable,
which the artifact writers trace like a Keras model.
"""

import hashlib
import keyword
import os
import re

import numpy as np
import tensorflow as tf

from kerasbn import _checks
from kerasbn import _keras_internal
from kerasbn.sources import is_saved_model
from kerasbn.sources import saved_model_hint

_CALL_OPS = _keras_internal.CALL_OPS
# Nodes that are never a frozen graph's outputs.
_NOT_OUTPUTS = ("Const", "NoOp", "Placeholder", "Assert", "SaveV2",
                "RestoreV2")


class SourceError(ValueError):
    """The file or directory cannot be read as a TensorFlow graph; the
    message is one line saying why and what to do."""


class FrozenGraph(tf.Module):
    """A frozen GraphDef as a function of its input tensors.

    Calling it with the flat inputs (in `GraphSource.input_names` order)
    returns the flat outputs. The convolutions the source ran XLA-compiled
    run so again (`with_xla_convolutions`). Its floating-point constants of
    `min_weight_size` elements or more (the weights) are held as
    variables, which `tf.saved_model.save` writes to `variables/` as any
    SavedModel does: as graph constants they would make `saved_model.pb`
    as large as the weights (a protocol buffer stops at 2 GB) and slow
    every first call, which re-optimizes them.
    """

    def __init__(self, graph_def, input_tensors, output_tensors, input_specs,
                 name, min_weight_size=16):
        super().__init__()
        graph_def = with_xla_convolutions(
            without_gradient_annotations(graph_def))
        self.model_name = name
        self.input_tensors = list(input_tensors)
        self.output_tensors = list(output_tensors)
        weights = _weights_as_variables(graph_def, min_weight_size)
        self.weights = list(weights.values())
        # The weights live in the variables only: as constants too, the
        # imported graph and every graph made from it (the ONNX export
        # freezes it again) would hold them once more.
        graph_def = _weights_as_placeholders(graph_def, weights)
        self.graph_def = graph_def

        def imported(*flat_inputs):
            input_map = {f"{k}:0": v.read_value() for k, v in weights.items()}
            input_map.update(zip(self.input_tensors, flat_inputs))
            return tf.compat.v1.import_graph_def(
                graph_def, name="", input_map=input_map,
                return_elements=self.output_tensors)

        specs = [tf.TensorSpec(s.shape, s.dtype) for s in input_specs]
        # In a list: a function the module does not track.
        self._call = [tf.compat.v1.wrap_function(imported, specs)]

    def __call__(self, *flat_inputs):
        return list(self._call[0](*flat_inputs))


def without_gradient_annotations(graph_def):
    """`graph_def` without `_gradient_op_type` attributes (a copy if it
    had any).

    `tf.custom_gradient` (Keras 2's swish with its `beta`, any custom layer
    with a custom gradient) marks its forward ops with the name of a
    gradient function registered in the PROCESS that traced or loaded it:
    `tf.saved_model.load` registers the source's saved gradient functions
    under new names, and freezing copies the mark onto the frozen nodes.
    `tf.saved_model.save` of a function over those nodes then looks the
    name up, traces the source's gradient function, and finds it capturing
    the source's own tensors ("Found invalid capture ... when saving custom
    gradients"). A frozen inference graph has no use for gradients: the
    marks go, the ops (IdentityN) stay.
    """
    if not any("_gradient_op_type" in n.attr for n in graph_def.node):
        return graph_def
    copy = tf.compat.v1.GraphDef()
    copy.CopyFrom(graph_def)
    for node in copy.node:
        if "_gradient_op_type" in node.attr:
            del node.attr["_gradient_op_type"]
    return copy


# The ops Keras runs XLA-compiled (grouped convolutions; Keras 3's NCDHW
# Conv3D), each (input, filter) -> output of one type T.
_XLA_OPS = ("Conv2D", "Conv3D", "DepthwiseConv2dNative")


def with_xla_convolutions(graph_def):
    """`graph_def` with each convolution that ran inside an XLA-compiled
    call of the source (marked by `_keras_internal.inline_function_calls`)
    in an XLA-compiled call of its own again, as Keras runs it (a copy if
    any node is marked).

    The reader inlines those calls so a normalization after a grouped
    convolution can be folded into it; run as a plain op, the folded
    `Conv2D` + `BiasAdd` is what TensorFlow's graph optimizer fuses, and
    its CPU kernel without oneDNN (`TF_ENABLE_ONEDNN_OPTS=0`, builds
    without it) refuses a grouped fused convolution ("Fused conv
    implementation does not support grouped convolutions"), where the
    source ran. The call node keeps the convolution's name (its consumers
    still read it); the other marked nodes (Identity, a Conv1D's
    reshapes) run as plain ops. ONNX conversion inlines such calls again
    (`kerasbn.exporting._onnx_graph`).
    """
    mark = _keras_internal.XLA_MARK
    if not any(mark in n.attr for n in graph_def.node):
        return graph_def
    copy = tf.compat.v1.GraphDef()
    copy.CopyFrom(graph_def)
    functions = {}
    for node in copy.node:
        if mark not in node.attr:
            continue
        del node.attr[mark]
        if node.op in _XLA_OPS:
            function = _xla_function(node)
            functions[function.signature.name] = function
            _xla_call(node, function.signature.name)
    present = {f.signature.name for f in copy.library.function}
    copy.library.function.extend(
        f for k, f in sorted(functions.items()) if k not in present)
    return copy


def _xla_function(node):
    """An XLA-compiled FunctionDef of `node`'s op on its two inputs, named
    after its content: TensorFlow's function names are global to the
    process, and one name must always mean one definition."""
    from tensorflow.core.framework import function_pb2

    dtype = node.attr["T"].type
    function = function_pb2.FunctionDef()
    for arg in ("input", "filter"):
        function.signature.input_arg.add(name=arg, type=dtype)
    function.signature.output_arg.add(name="output", type=dtype)
    body = function.node_def.add(name="op", op=node.op,
                                 input=["input", "filter"])
    for key, value in node.attr.items():
        if not key.startswith("_"):
            body.attr[key].CopyFrom(value)
    function.ret["output"] = "op:output:0"
    for attribute in _keras_internal.NO_INLINE:
        function.attr[attribute].b = True
    digest = hashlib.sha1(function.SerializeToString(deterministic=True))
    function.signature.name = (f"kerasbn_xla_{node.op.lower()}_"
                               f"{digest.hexdigest()[:16]}")
    return function


def _xla_call(node, name):
    """Make `node` an XLA-compiled call of the function `name` on its
    inputs."""
    dtype = node.attr["T"].type
    call = tf.compat.v1.NodeDef(name=node.name, op="PartitionedCall",
                                input=node.input)
    call.attr["Tin"].list.type.extend([dtype, dtype])
    call.attr["Tout"].list.type.append(dtype)
    call.attr["f"].func.name = name
    call.attr["_XlaMustCompile"].b = True
    if "_output_shapes" in node.attr:
        call.attr["_output_shapes"].CopyFrom(node.attr["_output_shapes"])
    node.CopyFrom(call)


def _weight_names(graph_def, min_size):
    names = []
    for node in graph_def.node:
        if node.op != "Const":
            continue
        tensor = node.attr["value"].tensor
        dims = [d.size for d in tensor.tensor_shape.dim]
        if tf.as_dtype(tensor.dtype).is_floating and int(np.prod(dims)) >= (
                min_size):
            names.append(node.name)
    return names


def _weights_as_variables(graph_def, min_size):
    """`{const node name: tf.Variable}` of the graph's weights."""
    nodes = {n.name: n for n in graph_def.node}
    return {k: tf.Variable(tf.make_ndarray(nodes[k].attr["value"].tensor),
                           trainable=False, name="weight")
            for k in _weight_names(graph_def, min_size)}


def _weights_as_placeholders(graph_def, names):
    """A copy of `graph_def` whose constants `names` are Placeholders of
    their dtype and shape (the function feeds them the variables)."""
    out = tf.compat.v1.GraphDef()
    out.versions.CopyFrom(graph_def.versions)
    out.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        new = out.node.add()
        if node.name not in names:
            new.CopyFrom(node)
            continue
        tensor = node.attr["value"].tensor
        new.name, new.op, new.device = node.name, "Placeholder", node.device
        new.attr["dtype"].type = tensor.dtype
        new.attr["shape"].shape.CopyFrom(tensor.tensor_shape)
    return out


class GraphSource:
    """A model read from a SavedModel signature or a frozen GraphDef.

    Attributes:
        path: Where it was read from.
        signature_key: The signature folded (and written back).
        input_names, output_names: The names a server sees (the
            signature's keys), in flat order.
        input_specs: `tf.TensorSpec`s named after the inputs.
        graph_def: The frozen, flattened GraphDef.
        input_tensors, output_tensors: Their tensors in `graph_def`.
        reference: Callable, flat inputs -> flat outputs, of the source as
            loaded (the verification reference).
        output_shapes: The outputs' static shapes as the source declares
            them (the folded function keeps them), or None.
        notes: What a user should know about the reading.
    """

    def __init__(self, path, signature_key, input_specs, output_names,
                 graph_def, input_tensors, output_tensors, reference,
                 notes=(), output_shapes=None):
        self.path = path
        self.output_shapes = output_shapes
        self.signature_key = signature_key
        self.input_specs = list(input_specs)
        self.input_names = [s.name for s in self.input_specs]
        self.output_names = list(output_names)
        self.graph_def = graph_def
        self.input_tensors = list(input_tensors)
        self.output_tensors = list(output_tensors)
        self.reference = reference
        self.notes = list(notes)

    @property
    def name(self):
        base = os.path.basename(os.path.normpath(self.path))
        if base.isdigit():  # TF Serving's <name>/<version>/
            base = os.path.basename(os.path.dirname(os.path.normpath(
                self.path)))
        return os.path.splitext(base)[0] or "model"


def load_saved_model(path, signature_key="serving_default"):
    """`GraphSource` of one signature of the SavedModel at `path`."""
    if not is_saved_model(path):
        raise SourceError(saved_model_hint(path))
    try:
        loaded = tf.saved_model.load(path)
    except Exception as error:
        raise SourceError(f"cannot load the SavedModel {path}: "
                          f"{type(error).__name__}: "
                          f"{_checks.first_line(error, 300)}")
    signatures = dict(loaded.signatures)
    if signature_key not in signatures:
        raise SourceError(
            f"the SavedModel {path} has no signature {signature_key!r}; its "
            f"signatures are {sorted(signatures) or 'none'}: pass one with "
            "--signature (API: signature=)")
    function = signatures[signature_key]
    specs = tf.nest.flatten(function.structured_input_signature)
    output_names = sorted(function.structured_outputs)
    graph_def, inputs, outputs = _frozen(function, len(specs))
    keys = _input_keys(function, specs)
    input_specs, notes = _identifiers(
        [tf.TensorSpec(s.shape, s.dtype, name=k) for s, k in zip(specs, keys)])

    def reference(*flat):
        result = function(**{k: tf.constant(a) for k, a in zip(keys, flat)})
        return [result[n].numpy() for n in output_names]

    shapes = [function.structured_outputs[n].shape for n in output_names]
    return GraphSource(path, signature_key, input_specs, output_names,
                       graph_def, inputs, outputs, reference,
                       notes + _call_notes(graph_def), shapes)


def _frozen(function, n_inputs):
    """`(graph_def, input names, output names)` of `function` frozen, its
    calls inlined, with `_output_shapes`.

    The graph is rewritten (pruned to what the outputs need, calls
    inlined, read back for its shapes) with its weights set aside
    (`_graph_weights`), as they come back only at the end: each rewrite
    copies a graph several times over, and built the usual way (the frozen
    function, read back, inlined) loading ConvNeXtLarge's SavedModel
    (0.79 GB of weights) took 13 GB.
    """
    from kerasbn import _graph_weights

    inputs = [t.name for t in function.inputs[:n_inputs]]
    outputs = [t.name for t in function.outputs]
    graph_def = _keras_internal.frozen_graph_def(function)
    light, aside = _graph_weights.set_weights_aside(graph_def)
    del graph_def
    # The frozen function TensorFlow builds holds only what its outputs
    # need; so does this graph.
    light = tf.compat.v1.graph_util.extract_sub_graph(
        light, sorted({name.split(":")[0] for name in outputs}))
    # Freezing leaves the calls TensorFlow may not inline (a grouped
    # convolution's XLA function): the normalization after one would read
    # a call, no linear op, and become a multiply-add instead of folding.
    inlined = _keras_internal.inline_function_calls(light, inputs + outputs)
    if inlined is light:
        inlined = _keras_internal.with_output_shapes(light)
    del light
    graph_def = _graph_weights.put_weights_back(
        without_gradient_annotations(inlined), aside)
    return graph_def, inputs, outputs


def _input_keys(function, specs):
    """The signature's input keys in flat (sorted-key) order."""
    keyword = function.structured_input_signature[1]
    return sorted(keyword) if keyword else [s.name for s in specs]


def _call_notes(graph_def):
    calls = [n.name for n in graph_def.node if n.op in _CALL_OPS]
    if not calls:
        return []
    return [f"{len(calls)} function call(s) stayed after freezing and "
            f"inlining (first: {calls[0]}); normalizations inside them are "
            "not folded"]


def load_frozen_graph(path):
    """`GraphSource` of a TF1 frozen GraphDef file (`.pb`)."""
    graph_def = tf.compat.v1.GraphDef()
    try:
        with open(path, "rb") as f:
            graph_def.ParseFromString(f.read())
    except Exception as error:
        raise SourceError(f"{path} is not a TensorFlow GraphDef (.pb): "
                          f"{type(error).__name__}: "
                          f"{_checks.first_line(error, 300)}")
    if any(n.op in ("VariableV2", "VarHandleOp") for n in graph_def.node):
        raise SourceError(
            f"{path} holds variables, so it is not frozen: freeze it "
            "(tf.compat.v1.graph_util.convert_variables_to_constants) or "
            "pass the SavedModel directory")
    placeholders = [n for n in graph_def.node if n.op == "Placeholder"]
    if not placeholders:
        raise SourceError(f"{path} has no Placeholder input")
    graph_def = without_gradient_annotations(graph_def)
    read = {i.lstrip("^").split(":")[0] for n in graph_def.node
            for i in n.input}
    outputs = [n.name for n in graph_def.node
               if n.name not in read and n.op not in _NOT_OUTPUTS]
    specs, notes = _identifiers([_placeholder_spec(n) for n in placeholders])
    inputs = [f"{n.name}:0" for n in placeholders]
    tensors = [f"{n}:0" for n in outputs]
    reference = FrozenGraph(graph_def, inputs, tensors, specs, "reference")
    return GraphSource(path, "serving_default", specs,
                       [re.sub(r"\W", "_", n) for n in outputs], graph_def,
                       inputs, tensors,
                       lambda *flat: [np.asarray(t) for t in reference(*flat)],
                       notes)


def _identifiers(specs):
    """`(specs, notes)`: input names made valid Python identifiers, which
    `tf.function` (and so every SavedModel writer) needs; a note per
    rename."""
    renamed, notes, taken = [], [], set()
    for spec in specs:
        name = re.sub(r"\W", "_", spec.name or "input")
        if not name or name[0].isdigit() or keyword.iskeyword(name):
            name = f"{name}_" if keyword.iskeyword(name) else f"input_{name}"
        while name in taken:
            name += "_"
        taken.add(name)
        if name != spec.name:
            notes.append(f"input {spec.name!r} is served as {name!r} (a "
                         "SavedModel input name must be a Python identifier)")
        renamed.append(tf.TensorSpec(spec.shape, spec.dtype, name=name))
    return renamed, notes


def _placeholder_spec(node):
    shape = tf.TensorShape(node.attr["shape"].shape) if "shape" in (
        node.attr) else tf.TensorShape(None)
    return tf.TensorSpec(shape, tf.as_dtype(node.attr["dtype"].type),
                         name=node.name)

