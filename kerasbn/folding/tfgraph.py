"""Fold batch normalization in a frozen TensorFlow graph (no Keras code).

`fold_graph_def(graph_def, outputs)` is `kerasbn.fold` for a model that
exists only as a TensorFlow graph: a SavedModel's serving signature frozen
into constants (`kerasbn.sources.saved_model`), or a TF1 frozen GraphDef.
It finds the two forms an inference-mode batch normalization takes in
TensorFlow graphs:

- `FusedBatchNorm`, `FusedBatchNormV2`, `FusedBatchNormV3` with
  `is_training=False` (tf.keras / Keras 2 with `fused=True`, TF1
  `tf.layers`);
- the chain `tf.nn.batch_normalization` writes: `x * s + t` as
  `AddV2(Mul(x, s), t)` or `Sub(Mul(x, s), t)`, with `s` and `t` constant
  and `s` computed from an `Rsqrt` (Keras 3's TensorFlow backend, Keras 2
  with `fused=False` or `renorm=True`). A constant `Mul`/`Add` that does
  not come from an `Rsqrt` is not a normalization and is left alone.

and folds each into the linear op that produced its input: `Conv2D`
(grouped ones too: Keras runs them as XLA-compiled function calls marked
not to be inlined, which `kerasbn.sources.saved_model` inlines all the
same, so they are plain `Conv2D`s here), `Conv3D`,
`DepthwiseConv2dNative`, `Conv2DBackpropInput` / `Conv3DBackpropInputV2`
(transposed convolutions), `MatMul` and `BatchMatMul` with a constant
right-hand side (Dense), through the bias add(s) after it and through
`Reshape`/`Squeeze`/`ExpandDims`/`Identity` ops that keep the channel
(last) dimension (Keras' Dense on a rank-3+ input is MatMul, Reshape,
BiasAdd; tf-keras' Conv1D is ExpandDims, Conv2D, Squeeze, BiasAdd;
tf-keras' `virtual_batch_size` BN is, in inference, the Mul/Add chain
between a Reshape to `(N, 1, ..., C)` and one back to its input's
`Shape`). An op
that reads only a step's shape (`Shape`, `Size`, `Rank`) does not count as
another use of it: the fold keeps every shape, and such a read of a bias
add it bypasses reads the tensor before it instead. The maths are
`kerasbn.fold`'s: the inference map's float64 `(scale, shift)` from
`kerasbn._numerics.bn_scale_shift` (for the fused op) and the kernel
rewrites of `kerasbn.rules`, computed in float64 and cast once to the
graph's dtype.

The rewrite: the linear op reads a new constant kernel; the normalization
node becomes a `BiasAdd` of the folded bias under the SAME node name, so
every consumer and every graph output that read it still does; the old
bias adds are bypassed and the statistics pruned with whatever else no
output needs (control edges on constants, which a TF2 function puts on
every variable read, do not keep them).

A normalization no linear op absorbs -- its input is not a foldable linear
op's output (an Add, a Concat, an activation, a graph input, a float16 ->
float32 `Cast`: tf.keras mixed precision computes BN in float32 on a
float16 layer's output, and folded into that layer it would round in
float16, `_cast_reason`), that output (or a step between) has another
consumer or is a graph output, or it is channels first -- becomes one
precomputed multiply-add under its node
name, `x * scale + shift` with `kerasbn.fold`'s float64 `(scale, shift)`
cast once (broadcast `(C,)` channels last, `(C, 1, 1)` for NCHW), the
graph's `kerasbn.layers.ScaleShift`: reported "replaced", counted in the
report's `scale_shift_layers`, with the reason it was not folded. This is
what `kerasbn.fold` does with the ScaleShift layers it leaves (ResNet50V2's
17 pre-activation BNs, DenseNet121's 62 after a Concatenate). A
normalization is kept as it is only when it is no constant affine map
(`is_training=True`, statistics not constant, its batch-statistics outputs
read) or with `keep_unfolded=True`. Normalizations BEFORE a linear op are
not folded forward at graph level (`kerasbn.fold` tries that on the Keras
model; on ResNet50V2, DenseNet121, NASNetMobile, EfficientNetB0 and
MobileNetV3Small it finds none, so both give the same counts).

Anchor: TensorFlow's `optimize_for_inference` folds only TF1 frozen
GraphDefs with a `FusedBatchNorm` straight after a `Conv2D` or `MatMul`
with no bias in between; it does not fold V3 ops, depthwise or transposed
convolutions, biased layers, or the Mul/Add chain.
"""

import collections
import re

import numpy as np

from kerasbn import rules
from kerasbn._numerics import bn_scale_shift
from kerasbn.folding.report import BACKWARD
from kerasbn.folding.report import FOLDED
from kerasbn.folding.report import KEPT
from kerasbn.folding.report import REPLACED
from kerasbn.folding.report import FoldEntry
from kerasbn.folding.report import FoldReport

FUSED_OPS = ("FusedBatchNorm", "FusedBatchNormV2", "FusedBatchNormV3")
CHAIN_KIND = "batch_normalization (Mul/Add)"
# Ops whose output is a pure function of their inputs: a subgraph of these
# over constants is a constant.
_PURE_OPS = frozenset((
    "Const", "Identity", "Cast", "Reshape", "Squeeze", "ExpandDims", "Rsqrt",
    "Sqrt", "Add", "AddV2", "Sub", "Mul", "RealDiv", "Div", "Neg",
    "Reciprocal", "Maximum", "Minimum", "Square", "Pack", "ConcatV2", "Fill",
    "Shape", "StridedSlice", "Transpose", "Relu", "Tile", "BroadcastTo",
))
_CHANNELS_LAST = (b"NHWC", b"NDHWC", b"")
_PASS_THROUGH = ("Reshape", "Squeeze", "ExpandDims", "Identity")
_BIAS_OPS = ("BiasAdd", "Add", "AddV2")
# Ops that read only their input's shape, never its values: a fold (which
# keeps every shape) may leave them reading a bypassed node's input.
_SHAPE_OPS = ("Shape", "ShapeN", "Size", "Rank")
_CALL_PREFIX = re.compile(r"^(Func/)?((Stateful)?PartitionedCall(_\d+)?/)+")
_CALL_SCOPE = re.compile(r"/(Stateful)?PartitionedCall(_\d+)?(?=/)")


def readable(node_name):
    """A node's name without the function-call scopes freezing (and
    inlining a layer's own call, e.g. a grouped convolution's) added:
    `StatefulPartitionedCall/model/gconv/PartitionedCall/Conv2D` ->
    `model/gconv/Conv2D`."""
    return _CALL_SCOPE.sub("", _CALL_PREFIX.sub("", node_name)) or node_name


def _split(tensor):
    """`(node name, output index)` of a GraphDef input string."""
    name, _, index = tensor.lstrip("^").partition(":")
    return name, int(index or 0)


class _Graph:
    """A GraphDef's nodes, consumers, static shapes and constant values."""

    def __init__(self, graph_def, outputs):
        import tensorflow as tf

        self.graph_def = graph_def
        self.nodes = {n.name: n for n in graph_def.node}
        self.outputs = [_split(t) for t in outputs]
        self.consumers = collections.defaultdict(list)
        for node in graph_def.node:
            for index, tensor in enumerate(node.input):
                if not tensor.startswith("^"):
                    self.consumers[_split(tensor)].append((node.name, index))
        self.tf_graph = tf.Graph()
        with self.tf_graph.as_default():
            tf.graph_util.import_graph_def(graph_def, name="")
        self._constant = {}

    def node_of(self, tensor):
        return self.nodes[_split(tensor)[0]]

    def uses(self, name, index=0):
        """How many times output `index` of `name` is read (outputs too)."""
        return (len(self.consumers[(name, index)])
                + self.outputs.count((name, index)))

    def value_uses(self, name, index=0):
        """`uses`, less the reads of ops that take only its shape."""
        return self.uses(name, index) - len(self.shape_reads(name, index))

    def shape_reads(self, name, index=0):
        """`[(consumer, input index)]` of the shape-only ops reading output
        `index` of `name` (`Shape` of a virtual-batch normalization's input,
        which it reshapes back to)."""
        return [(consumer, k) for consumer, k in self.consumers[(name, index)]
                if self.nodes[consumer].op in _SHAPE_OPS]

    def other_outputs_used(self, name, index=0):
        return any(self.uses(name, i) for i in range(8) if i != index)

    def origin(self, tensor):
        """The node `tensor` comes from, looking through Identity ops."""
        node = self.node_of(tensor)
        while node.op == "Identity":
            node = self.node_of(node.input[0])
        return node

    def shape(self, tensor):
        name, index = _split(tensor)
        return self.tf_graph.get_operation_by_name(name).outputs[index].shape

    def is_constant(self, tensor):
        """Whether `tensor` depends on constants only (no input, variable,
        random or stateful op on any path)."""
        name = _split(tensor)[0]
        if name not in self._constant:
            self._constant[name] = False  # Breaks cycles (none expected).
            node = self.nodes[name]
            self._constant[name] = node.op in _PURE_OPS and all(
                self.is_constant(t) for t in node.input
                if not t.startswith("^"))
        return self._constant[name]

    def has_ancestor(self, tensor, op):
        seen, stack = set(), [_split(tensor)[0]]
        while stack:
            node = self.nodes[stack.pop()]
            if node.op == op:
                return True
            for t in node.input:
                parent = _split(t)[0]
                if parent not in seen:
                    seen.add(parent)
                    stack.append(parent)
        return False

    def values(self, tensors):
        """`{tensor: array}` of constant tensors, in one graph run."""
        import tensorflow as tf

        names = sorted({"%s:%d" % _split(t) for t in tensors})
        if not names:
            return {}
        with tf.compat.v1.Session(graph=self.tf_graph) as session:
            arrays = session.run(names)
        found = dict(zip(names, arrays))
        return {t: np.asarray(found["%s:%d" % _split(t)]) for t in tensors}


# -- Finding normalizations and the linear op before each. -------------------


_LINEAR = {
    # op: (kernel input index, kernel layout in kerasbn.rules' terms)
    "Conv2D": (1, "dense"),
    "Conv3D": (1, "dense"),
    "DepthwiseConv2dNative": (1, "depthwise"),
    "Conv2DBackpropInput": (1, "transpose"),
    "Conv3DBackpropInputV2": (1, "transpose"),
    "MatMul": (1, "dense"),
    "BatchMatMul": (1, "dense"),
    "BatchMatMulV2": (1, "dense"),
    "BatchMatMulV3": (1, "dense"),
}
_BACKWARD = {"dense": rules.backward_dense,
             "depthwise": rules.backward_depthwise,
             "transpose": rules.backward_transpose}


class Kept(Exception):
    """This normalization stays: `code` and `reason` say why."""

    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code


class _Match:
    """One normalization node and what folding it needs.

    Attributes:
        node: The normalization's output node (FusedBatchNorm*, or the
            Add/Sub ending the Mul/Add chain).
        kind: Its op, or `CHAIN_KIND`.
        data: The tensor it normalizes.
        statistics: `{role: tensor}` of the constant inputs it reads.
        epsilon: The fused op's epsilon (None for the chain).
        shift_sign: -1 when the chain ends in `Sub(x * s, t)`.
        steps: `[(node, bias tensor or None)]` from its input down to the
            linear op: bias adds and channel-keeping reshapes.
        shape_reads: `{bias add: [(consumer, input index)]}`, the ops that
            read only the shape of a bias add the fold bypasses.
        linear: The linear op's node name, `layout` its kernel layout and
            `kernel` its kernel tensor.
    """

    def __init__(self, node, kind, data, statistics, epsilon=None,
                 shift_sign=1.0):
        self.node, self.kind, self.data = node, kind, data
        self.statistics, self.epsilon = statistics, epsilon
        self.shift_sign = shift_sign
        self.steps = []
        self.shape_reads = {}
        self.linear = self.layout = self.kernel = None


def _channels_last(node):
    attr = node.attr.get("data_format")
    return attr is None or attr.s in _CHANNELS_LAST


def _match_fused(graph, node):
    match = _Match(node.name, node.op, node.input[0], dict(zip(
        ("gamma", "beta", "mean", "variance"), node.input[1:5])),
        epsilon=node.attr["epsilon"].f)
    if node.attr["is_training"].b:
        raise Kept("training_mode", "is_training=True: it normalizes with "
                   "batch statistics, not constants")
    if graph.other_outputs_used(node.name):
        raise Kept("unusual_call", "its batch-statistics outputs are read")
    if not all(graph.is_constant(t) for t in match.statistics.values()):
        raise Kept("shape", "its statistics are not constants")
    return match


def _chain_parts(graph, node):
    """`(data, scale tensor, shift tensor, sign)` or None."""
    first, second = node.input[:2]
    if node.op == "Sub":  # x * s - t; t - x * s is no normalization.
        candidates = [(first, second, -1.0)]
    else:
        candidates = [(first, second, 1.0), (second, first, 1.0)]
    for product, shift, sign in candidates:
        mul = graph.node_of(product)
        if (mul.op != "Mul" or graph.is_constant(product)
                or not graph.is_constant(shift)):
            continue
        for data, scale in (mul.input[:2], reversed(mul.input[:2])):
            if (graph.is_constant(scale) and not graph.is_constant(data)
                    and graph.has_ancestor(scale, "Rsqrt")):
                return data, scale, shift, sign
    return None


def _match_chain(graph, node):
    """A `_Match` for `x * s + t` (s from an Rsqrt), or None."""
    parts = _chain_parts(graph, node)
    if parts is None:
        return None
    data, scale, shift, sign = parts
    return _Match(node.name, CHAIN_KIND, data,
                  {"scale": scale, "shift": shift}, shift_sign=sign)


def _find_linear(graph, match):
    """Walk from the normalization's input down to its linear op."""
    node = graph.nodes[match.node]
    if match.kind != CHAIN_KIND and not _channels_last(node):
        raise Kept("axis_mismatch", "data_format "
                   f"{node.attr['data_format'].s.decode()}: only channels-"
                   "last normalizations are folded into their linear op")
    tensor = match.data
    for _ in range(8):
        name, index = _split(tensor)
        node = graph.nodes[name]
        what = f"{node.op} '{readable(name)}'"
        if graph.origin(tensor).op == "Placeholder":
            raise Kept("after_model_input", "it normalizes a graph input")
        bias = None if node.op in _LINEAR else _bias_of(graph, node)
        if node.op not in _LINEAR and bias is None and not (
                node.op in _PASS_THROUGH and _keeps_channels(graph, node)):
            # Checked before sharing, as kerasbn.fold does: an Add or a
            # Concat that is also read elsewhere is still no linear op.
            raise Kept("after_nonlinear_layer",
                       _cast_reason(graph, node, what) or
                       f"its input comes from {what}, not a linear op")
        # A read of the shape alone (a virtual-batch normalization's Shape
        # of its input) is no use of the values the fold changes.
        if index != 0 or graph.value_uses(name) != 1 or (
                graph.other_outputs_used(name)):
            raise Kept("producer_output_shared",
                       f"the output of {what} is also read elsewhere")
        if node.op in _LINEAR:
            return _check_linear(graph, match, node)
        if bias is not None:
            match.steps.append((name, bias))
            match.shape_reads[name] = graph.shape_reads(name)
            tensor = node.input[0] if node.input[1] == bias else node.input[1]
        else:
            match.steps.append((name, None))
            tensor = node.input[0]
    raise Kept("producer_unsupported", "no linear op within 8 steps")


def _bias_of(graph, node):
    """The constant added by a bias-add node, or None."""
    if node.op not in _BIAS_OPS or not _channels_last(node):
        return None
    first, second = node.input[:2]
    if graph.is_constant(second) and not graph.is_constant(first):
        return second
    if node.op != "BiasAdd" and graph.is_constant(first) and (
            not graph.is_constant(second)):
        return first
    return None


def _cast_reason(graph, node, what):
    """Why a normalization reading a float16/bfloat16 -> float32 `Cast` of
    a linear op's (or its bias add's) output is not folded (None for any
    other node).

    tf.keras' mixed precision computes BatchNormalization in float32 on
    the float16 output of the layer before (Dense: MatMul, BiasAdd, Cast).
    Folded into that layer, the normalization's float32 arithmetic would
    round in float16: the output moves by about one float16 step (a tf-keras
    Dense 5 -> 4 + BN: 5.5e-4 of the output's scale), which no float32
    check of the source passes (the default rtol is 1e-4) and there is no
    float32 twin of a graph to check against. The multiply-add computes it
    in float32, as the source does.
    """
    if node.op != "Cast":
        return None
    import tensorflow as tf

    source, target = (tf.as_dtype(node.attr[k].type) for k in ("SrcT",
                                                               "DstT"))
    if source not in (tf.float16, tf.bfloat16) or not target.is_floating or (
            target.size <= source.size):
        return None
    before = graph.node_of(node.input[0])
    if before.op not in _LINEAR and _bias_of(graph, before) is None:
        return None  # Not a layer it could fold into anyway.
    return (f"its input comes from {what}, {source.name} -> {target.name} "
            f"(mixed precision): folded into the {source.name} layer "
            f"before, its {target.name} arithmetic would round in "
            f"{source.name}, moving the output by about one {source.name} "
            f"step, more than a {target.name} check of the source allows")


def _keeps_channels(graph, node):
    if node.op == "Identity":
        return True
    before, after = graph.shape(node.input[0]), graph.shape(node.name)
    return (before.rank and after.rank and before[-1] is not None
            and before[-1] == after[-1])


def _check_linear(graph, match, node):
    index, layout = _LINEAR[node.op]
    what = f"{node.op} '{readable(node.name)}'"
    if not _channels_last(node):
        raise Kept("axis_mismatch", f"{what} is channels first")
    kernel = node.input[index]
    if not graph.is_constant(kernel) or graph.is_constant(node.input[0]):
        raise Kept("producer_unsupported",
                   f"{what} does not multiply by a constant kernel")
    transposed = node.attr.get("transpose_b") or node.attr.get("adj_y")
    if transposed is not None and transposed.b:
        layout = "transpose"
    if node.op.startswith("BatchMatMul") and graph.shape(kernel).rank != 2:
        raise Kept("producer_unsupported", f"{what} has a batched kernel")
    match.linear, match.layout, match.kernel = node.name, layout, kernel
    return match


# -- The folded values. ------------------------------------------------------


def _per_channel(array, channels, what):
    """`array` as a `(channels,)` float64 vector if it only varies along
    the last axis (or is a scalar); else `Kept`."""
    array = np.asarray(array, np.float64)
    if array.ndim and any(d != 1 for d in array.shape[:-1]):
        raise Kept("axis_mismatch", f"its {what} of shape {array.shape} "
                   "varies along more than the channel axis")
    flat = array.reshape(-1)
    if flat.size == 1:
        return np.full((channels,), flat[0])
    if flat.size != channels:
        raise Kept("axis_mismatch", f"its {what} has {flat.size} values "
                   f"for {channels} channels")
    return flat


def _out_channels(kernel, layout):
    if layout == "depthwise":
        return kernel.shape[-2] * kernel.shape[-1]
    return kernel.shape[-2] if layout == "transpose" else kernel.shape[-1]


def _affine(match, values, channels):
    """The normalization's float64 `(scale, shift)`, checked finite."""
    stats = {role: values[t] for role, t in match.statistics.items()}
    if match.kind == CHAIN_KIND:
        scale = _per_channel(stats["scale"], channels, "scale")
        shift = match.shift_sign * _per_channel(stats["shift"], channels,
                                                "shift")
    else:
        scale, shift = bn_scale_shift(
            *(_per_channel(stats[r], channels, r)
              for r in ("gamma", "beta", "mean", "variance")),
            match.epsilon)
    _check_finite(match, scale, shift)
    return scale, shift


def _check_finite(match, scale, shift):
    bad = np.flatnonzero(~(np.isfinite(scale) & np.isfinite(shift)))
    if bad.size:
        raise ValueError(
            f"kerasbn: normalization node '{readable(match.node)}' has a NaN "
            f"or infinite inference scale or shift in {bad.size} channel(s) "
            f"{bad[:8].tolist()}: its statistics are corrupt (variance + "
            "epsilon not positive, or NaN/inf in gamma, beta or the mean). "
            "Fix the model's statistics before folding."
        )


def _folded_weights(match, values):
    """`(kernel, bias)` of the linear op with the normalization folded in,
    cast to the kernel's dtype."""
    kernel = values[match.kernel]
    channels = _out_channels(kernel, match.layout)
    scale, shift = _affine(match, values, channels)
    bias = np.zeros((channels,))
    for _, tensor in match.steps:
        if tensor is not None:
            bias = bias + _per_channel(values[tensor], channels, "bias")
    new_kernel, new_bias = _BACKWARD[match.layout](kernel, bias, scale, shift)
    return new_kernel.astype(kernel.dtype), new_bias.astype(kernel.dtype)


def _multiply_add(match, values, node):
    """The float64 `(scale, shift)` arrays of `y = x * scale + shift` for a
    normalization no linear op absorbs, shaped to broadcast against its
    data as the normalization does: `(C,)` channels last, `(C, 1, 1)` /
    `(C, 1, 1, 1)` for a channels-first (NCHW / NCDHW) fused op, and the
    chain's own constants' shapes (it already is `x * s + t`)."""
    if match.kind == CHAIN_KIND:
        scale = np.asarray(values[match.statistics["scale"]], np.float64)
        shift = match.shift_sign * np.asarray(
            values[match.statistics["shift"]], np.float64)
    else:
        stats = [np.asarray(values[match.statistics[r]], np.float64)
                 for r in ("gamma", "beta", "mean", "variance")]
        channels = stats[0].size
        if any(a.size != channels for a in stats):
            raise Kept("shape", "its statistics differ in size "
                       f"{[a.size for a in stats]}")
        scale, shift = bn_scale_shift(*(a.reshape(-1) for a in stats),
                                      match.epsilon)
        if not _channels_last(node):
            layout = node.attr["data_format"].s.decode()
            trailing = (1,) * (len(layout) - 2)  # NCHW: (C, 1, 1)
            scale = scale.reshape((channels,) + trailing)
            shift = shift.reshape((channels,) + trailing)
    both = np.broadcast_shapes(scale.shape, shift.shape)
    _check_finite(match, np.broadcast_to(scale, both).reshape(-1),
                  np.broadcast_to(shift, both).reshape(-1))
    return scale, shift


# -- Rewriting the graph. ----------------------------------------------------


def _const(name, array):
    import tensorflow as tf

    node = tf.compat.v1.NodeDef(name=name, op="Const")
    node.attr["dtype"].type = tf.as_dtype(array.dtype).as_datatype_enum
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(array))
    return node


def _unique_name(nodes, base):
    name, k = base, 0
    while name in nodes:
        k += 1
        name = f"{base}_{k}"
    nodes[name] = None
    return name


def _rewrite(nodes, match, kernel, bias):
    """Fold `match` into `nodes` ({name: NodeDef}, edited in place)."""
    import tensorflow as tf

    kernel_name = _unique_name(nodes, f"{match.linear}/kerasbn_folded_kernel")
    bias_name = _unique_name(nodes, f"{match.node}/kerasbn_folded_bias")
    nodes[kernel_name] = _const(kernel_name, kernel)
    nodes[bias_name] = _const(bias_name, bias)
    linear = nodes[match.linear]
    linear.input[_LINEAR[linear.op][0]] = kernel_name
    current = match.linear
    for step, tensor in reversed(match.steps):
        if tensor is None:  # A reshape: it now reads the unbiased output.
            nodes[step].input[0] = current
            current = step
        else:  # A bypassed bias add: its shape is the one before it.
            for consumer, k in match.shape_reads[step]:
                nodes[consumer].input[k] = current
    old = nodes[match.node]
    new = tf.compat.v1.NodeDef(name=match.node, op="BiasAdd")
    new.input.extend([current, bias_name])
    new.input.extend(t for t in old.input if t.startswith("^"))
    new.attr["T"].type = tf.as_dtype(bias.dtype).as_datatype_enum
    new.attr["data_format"].s = b"NHWC"
    shapes = old.attr["_output_shapes"].list.shape if (
        "_output_shapes" in old.attr) else ()
    if shapes:  # Output 0 only: a fused op also lists its statistics'.
        new.attr["_output_shapes"].list.shape.add().CopyFrom(shapes[0])
    nodes[match.node] = new


def _replace(nodes, match, scale, shift):
    """Rewrite `match` in `nodes` as one multiply-add, `x * scale + shift`
    (the graph's `kerasbn.layers.ScaleShift`): the normalization's node
    name becomes the `AddV2`, so its consumers and the graph outputs still
    read it. Float16/bfloat16 data is computed in float32 and cast back, as
    the fused op (and ScaleShift) do."""
    import tensorflow as tf

    old = nodes[match.node]
    dtype = tf.as_dtype(old.attr["T"].type)
    compute = tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype
    base = match.node
    shapes = old.attr["_output_shapes"].list.shape if (
        "_output_shapes" in old.attr) else ()

    def add_node(name, op, inputs, **types):
        node = tf.compat.v1.NodeDef(name=name, op=op)
        node.input.extend(inputs)
        for key, value in types.items():
            node.attr[key].type = value.as_datatype_enum
        if shapes and match.kind != CHAIN_KIND:  # x's shape throughout.
            node.attr["_output_shapes"].list.shape.add().CopyFrom(shapes[0])
        nodes[name] = node
        return name

    data = match.data
    if compute != dtype:
        data = add_node(_unique_name(nodes, f"{base}/kerasbn_cast"), "Cast",
                        [data], SrcT=dtype, DstT=compute)
    constants = []
    for role, array in (("scale", scale), ("shift", shift)):
        name = _unique_name(nodes, f"{base}/kerasbn_{role}")
        nodes[name] = _const(name, array.astype(compute.as_numpy_dtype))
        constants.append(name)
    product = add_node(_unique_name(nodes, f"{base}/kerasbn_mul"), "Mul",
                       [data, constants[0]], T=compute)
    controls = [t for t in old.input if t.startswith("^")]
    if compute == dtype:
        add_node(base, "AddV2", [product, constants[1]] + controls, T=compute)
    else:
        total = add_node(_unique_name(nodes, f"{base}/kerasbn_add"), "AddV2",
                         [product, constants[1]], T=compute)
        add_node(base, "Cast", [total] + controls, SrcT=compute, DstT=dtype)


def _candidates(graph):
    """`(node, _Match or None, outcome)` for each normalization node in
    graph order: the outcome is the `_Match` (foldable into its linear op)
    or `Kept`; the `_Match` is None when the node cannot even be rewritten
    as a multiply-add (training mode, statistics not constant, ...)."""
    found = []
    for node in graph.graph_def.node:
        if node.op in FUSED_OPS:
            try:
                match = _match_fused(graph, node)
            except Kept as kept:
                found.append((node, None, kept))
                continue
        elif node.op in ("Add", "AddV2", "Sub"):
            match = _match_chain(graph, node)
            if match is None:
                continue
        else:
            continue
        try:
            found.append((node, match, _find_linear(graph, match)))
        except Kept as kept:
            found.append((node, match, kept))
    return found


def _entry(node, outcome, action):
    kind = node.op if node.op in FUSED_OPS else CHAIN_KIND
    if isinstance(outcome, Kept):
        return FoldEntry(readable(node.name), kind, 0, action,
                         reason=f"backward: {outcome}", codes=(outcome.code,))
    return FoldEntry(readable(node.name), kind, 0, FOLDED, BACKWARD,
                     into=(readable(outcome.linear),))


def fold_graph_def(graph_def, outputs, name="graph", keep_unfolded=False):
    """Fold every foldable batch normalization of a frozen GraphDef.

    A normalization no linear op before it can absorb (after an Add, a
    Concat, an activation or a graph input; channels first) becomes one
    precomputed multiply-add, `x * scale + shift` (the graph's
    `kerasbn.layers.ScaleShift`, reported "replaced"), unless
    `keep_unfolded`. Only a normalization that is no inference-mode affine
    map of constants (`is_training=True`, statistics computed from the
    input, its batch-statistics outputs read) stays as it is ("kept").

    Args:
        graph_def: A `tf.compat.v1.GraphDef` with constants for weights
            (frozen) and its function calls inlined, as
            `kerasbn.sources.saved_model` reads a SavedModel (every call,
            a grouped convolution's XLA function too). A normalization
            inside a call is not seen; one reading a call's output is no
            linear op's and becomes a multiply-add. Not modified.
        outputs: The graph's output tensor names ("node:0"): they and
            every node name are kept.
        name: The model's name, for the report.
        keep_unfolded: Leave the normalizations that cannot be folded as
            they are instead of rewriting them as a multiply-add.

    Returns:
        `(graph_def, FoldReport)`: the folded GraphDef (pruned to what
        `outputs` need) and one `FoldEntry` per normalization node, folded
        (`into` the linear node), replaced (by a multiply-add) or kept,
        with its reason and code. The report's `scale_shift_layers` counts
        the multiply-adds.

    Raises:
        ValueError: a normalization with NaN or infinite statistics.
    """
    graph = _Graph(graph_def, outputs)
    found = _candidates(graph)
    matches = [m for _, m, _ in found if m is not None]
    foldable = [m for _, _, m in found if isinstance(m, _Match)]
    wanted = [m.kernel for m in foldable]
    wanted += [t for m in matches for t in m.statistics.values()]
    wanted += [t for m in foldable for _, t in m.steps if t is not None]
    values = graph.values(wanted)
    nodes = collections.OrderedDict((n.name, n) for n in
                                    _copy(graph_def).node)
    outcomes = []
    for node, match, outcome in found:
        action = KEPT
        if isinstance(outcome, _Match):
            try:
                _rewrite(nodes, match, *_folded_weights(match, values))
            except Kept as kept:
                outcome = kept
        if isinstance(outcome, Kept) and match is not None and (
                not keep_unfolded):
            try:
                _replace(nodes, match, *_multiply_add(match, values, node))
                action = REPLACED
            except Kept as kept:
                outcome = kept
        outcomes.append(_entry(node, outcome, action))
    _drop_constant_controls(nodes, graph)
    folded = _copy(graph_def, _needed(nodes, outputs))
    kept = sum(e.action == KEPT for e in outcomes)
    replaced = sum(e.action == REPLACED for e in outcomes)
    return folded, FoldReport(name, tuple(outcomes), len(outcomes), kept,
                              replaced, forward=False)


def _drop_constant_controls(nodes, graph):
    """Remove control inputs on the source graph's constant subgraphs.

    A TF2 function's auto control dependencies make its outputs wait for
    every variable read (`Identity(..., ^NoOp)`, the NoOp reading each
    `ReadVariableOp`); frozen, those reads are constants, and the edges
    would keep every replaced kernel and statistic in the folded graph
    (and the SavedModel written from it: weights twice over). Waiting on
    a constant does nothing, so the edges go.
    """
    for node in nodes.values():
        controls = [t for t in node.input if t.startswith("^")]
        dropped = [t for t in controls if t[1:] in graph.nodes
                   and graph.is_constant(t[1:])]
        if dropped:
            kept = [t for t in node.input if t not in dropped]
            del node.input[:]
            node.input.extend(kept)


def _needed(nodes, outputs):
    """The nodes `outputs` read, directly or not (control inputs too), in
    their original order."""
    keep, stack = set(), [_split(t)[0] for t in outputs]
    while stack:
        name = stack.pop()
        if name not in keep:
            keep.add(name)
            stack.extend(_split(t)[0] for t in nodes[name].input)
    return [node for name, node in nodes.items() if name in keep]


def _copy(graph_def, nodes=None):
    import tensorflow as tf

    copy = tf.compat.v1.GraphDef()
    copy.CopyFrom(graph_def)
    if nodes is not None:
        del copy.node[:]
        copy.node.extend(nodes)
    return copy


def census(graph_def):
    """`{op: count}` of the normalization ops left in a GraphDef: fused
    batch norms and Rsqrt-based Mul/Add chains (what folding removes)."""
    graph = _Graph(graph_def, [])
    counts = collections.Counter()
    for node in graph_def.node:
        if node.op in FUSED_OPS:
            counts[node.op] += 1
        elif node.op in ("Add", "AddV2", "Sub") and _chain_parts(graph, node):
            counts[CHAIN_KIND] += 1
    return dict(counts)
