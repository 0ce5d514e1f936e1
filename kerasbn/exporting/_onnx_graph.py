"""The ONNX artifact's graph: converting it, guarding it, counting it.

- `convert`: tf2onnx's `from_function` on the serving function. Two
  things it gets wrong are redone on the frozen function: Keras' TensorFlow
  backend runs grouped convolutions (`Conv2D(groups=g)`, as keras-hub's
  depthwise blocks use) as an XLA-compiled function marked not to be
  inlined, which tf2onnx leaves as a `StatefulPartitionedCall` node that no
  ONNX runtime knows (the marks are removed and the calls inlined, so the
  grouped convolution becomes an ONNX `Conv` with `group`); and tensors
  the model captured as constants (keras.applications.EfficientNet's
  `Normalization` mean and variance) become extra graph inputs.
- `guard_pad_max_pool`: ONNX Runtime's default graph rewrites fuse a zero
  `Pad` into the `MaxPool` after it, but MaxPool pads with -inf: a window
  holding only negative values and padding then gives its negative maximum
  instead of 0 (ResNetV2's stem, `ZeroPadding2D -> MaxPooling2D`). The guard
  takes the max of the pool's output with a constant floor, 0 where a
  window covers padding and -inf elsewhere, which is exact whether or not
  a runtime fuses the pad.
- `_bounded_memory`: tf2onnx's optimizer passes on a large model (below).
- `normalization_census`: BatchNormalization nodes, and Mul/Add/Sub by a
  constant straight after a Conv, ConvTranspose, Gemm or MatMul: what a
  folded export should not contain.
"""

import contextlib
import gc

import numpy as np

from kerasbn import _graph_weights
from kerasbn._processes import available_memory as _available_memory

_LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_AFFINE_OPS = ("Mul", "Add", "Sub", "Div")


def _erfc(ctx, node, name, args):
    """TensorFlow's Erfc, which tf2onnx does not convert (Keras 3's exact
    GELU, 0.5 x erfc(-x / sqrt 2), is written with it), as ONNX
    `1 - Erf(x)`: exact in float32 within one rounding of the result, an
    absolute error of ~6e-8 where erfc is small, which GELU multiplies by
    x, never by a large factor."""
    from tf2onnx import utils

    dtype = ctx.get_dtype(node.input[0])
    one = ctx.make_const(utils.make_name(f"{name}_one"), np.array(
        1.0, dtype=utils.map_onnx_to_numpy_type(dtype)))
    node.type = "Erf"
    node.domain = ""
    output = node.output[0]
    ctx.insert_new_node_on_output(
        "Sub", output, name=utils.make_name(f"{name}_one_minus"),
        inputs=[one.output[0], output])


def _expm1(ctx, node, name, args):
    """TensorFlow's Expm1 (Keras 3's CELU and ELU-family activations), which
    tf2onnx does not convert, as ONNX ops that keep its precision near 0,
    where exp(x) - 1 cancels: with u = exp(x),

        expm1(x) = u - 1                    for |x| > 0.5 (no cancellation)
                 = x                        where u rounds to 1
                 = (u - 1) * x / log(u)     otherwise (Kahan's correction:
                                            the rounding of u cancels)
    """
    from tf2onnx import utils

    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    x = node.input[0]

    def const(value, what):
        return ctx.make_const(utils.make_name(f"{name}_{what}"),
                              np.array(value, dtype=dtype)).output[0]

    def op(kind, *inputs):
        return ctx.make_node(kind, list(inputs),
                             name=utils.make_name(f"{name}_{kind}")).output[0]

    u = op("Exp", x)
    u_minus_1 = op("Sub", u, const(1.0, "one"))
    kahan = op("Mul", u_minus_1, op("Div", x, op("Log", u)))
    # "u rounds to 1" as |u - 1| < 1e-30 (the smallest nonzero |u - 1| is
    # ~6e-8): ONNX's Equal takes floats only from opset 11, Less from 7,
    # so CELU converts from opset 9 (Where) on.
    small = op("Where", op("Less", op("Abs", u_minus_1),
                           const(1e-30, "tiny")), x, kahan)
    large = op("Greater", op("Abs", x), const(0.5, "half"))
    shapes, dtypes = node.output_shapes, node.output_dtypes
    ctx.remove_node(node.name)
    ctx.make_node("Where", [large, u_minus_1, small], outputs=node.output,
                  name=name, shapes=shapes, dtypes=dtypes)


# What a handler returns when it left the op to tf2onnx's own conversion
# (not counted as a rewrite in the notes).
_TF2ONNX_OWN = object()


def _weight_fake_quant(ctx, node, name, args):
    """A fake-quantized constant kernel (kerasbn's QAT export: symmetric,
    narrow range, per channel on the last axis) as the constant it
    computes: the kernel on its integer grid, with the codes TensorFlow's
    FakeQuant rounds to (floor(x / scale + 1/2) around the nudged zero).
    `_qdq.integer_weights` then stores it as integer codes; tf2onnx itself
    converts only per-tensor 8-bit fake quantization (of activations)."""
    from tf2onnx import utils

    bits = node.get_attr_value("num_bits", 8)
    narrow = node.get_attr_value("narrow_range", False)
    inputs = node.inputs
    if node.type == "FakeQuantWithMinMaxVars" and not narrow:
        # An activation's fake quantization (a graph of the user's own):
        # tf2onnx's handler, which this custom handler takes the op from.
        from tf2onnx.onnx_opset import quantize

        quantize.FakeQuantWithMinMaxArgs.version_10(ctx, node)
        return _TF2ONNX_OWN
    if not narrow or not all(i.is_const() for i in inputs):
        raise ValueError(
            f"{node.type} '{name}': only constant kernels with a symmetric "
            "narrow range (kerasbn's QAT export) convert to ONNX here")
    kernel = np.asarray(inputs[0].get_tensor_value(as_list=False),
                        np.float32)
    low = np.asarray(inputs[1].get_tensor_value(as_list=False), np.float32)
    high = np.asarray(inputs[2].get_tensor_value(as_list=False), np.float32)
    if not np.array_equal(low, -high):
        raise ValueError(f"{node.type} '{name}': the range is not symmetric")
    levels = 2 ** (bits - 1) - 1
    scale = (high - low) / np.float32(2 * levels)
    nudged_low = -np.float32(levels) * scale
    clamped = np.clip(kernel, nudged_low, np.float32(levels) * scale)
    codes = np.floor((clamped - nudged_low) * (np.float32(1.0) / scale)
                     + np.float32(0.5)) - levels
    values = (codes * scale).astype(np.float32)
    constant = ctx.make_const(utils.make_name(f"{name}_grid"), values)
    ctx.replace_all_inputs(node.output[0], constant.output[0])
    ctx.remove_node(node.name)


# Ops TensorFlow writes for Keras 3 layers that tf2onnx leaves unconverted,
# each with its ONNX rewrite.
CUSTOM_OPS = {"Erfc": (_erfc, []), "Expm1": (_expm1, []),
              "FakeQuantWithMinMaxVarsPerChannel": (_weight_fake_quant, []),
              "FakeQuantWithMinMaxVars": (_weight_fake_quant, [])}
REWRITTEN_AS = {"Erfc": "1 - Erf (exact GELU)",
                "Expm1": "Exp/Log with Kahan's correction near 0 (CELU)",
                "FakeQuantWithMinMaxVarsPerChannel":
                    "kernels on their integer grid (QAT)",
                "FakeQuantWithMinMaxVars":
                    "kernels on their integer grid (QAT, per tensor)"}


def _recording_handlers(used):
    """`CUSTOM_OPS` whose handlers count each op they rewrite in `used`."""
    def recording(op, handler):
        def handle(ctx, node, name, args):
            if handler(ctx, node, name, args) is not _TF2ONNX_OWN:
                used[op] = used.get(op, 0) + 1
        return handle
    return {op: (recording(op, handler), args)
            for op, (handler, args) in CUSTOM_OPS.items()}


def _rewrite_notes(used):
    return [f"{count} TensorFlow {op} op(s), which tf2onnx does not "
            f"convert, rewritten as {REWRITTEN_AS[op]}"
            for op, count in sorted(used.items())]


def convert(function, input_specs, opset):
    """`(ModelProto, notes)` for a `tf.function` with a fixed signature.

    Whether the frozen route is needed is read off the TensorFlow graph
    first, so a model converts once; should tf2onnx's plain route still
    leave a call or an extra graph input, the frozen route is taken then.
    """
    import tf2onnx

    from kerasbn import _keras_internal

    concrete = function.get_concrete_function(*input_specs)
    calls, captured = _uninlinable_calls(concrete), _captured(concrete)
    weights = _weight_bytes(concrete)
    large = weights >= _LARGE_MODEL_BYTES
    if large:
        _warn_if_short_of_memory(weights)
    if not calls and not captured:
        used = {}
        with _bounded_memory(large), _weights_outside_grappler(), (
                _scalar_adds_transposable()):
            proto, _ = tf2onnx.convert.from_function(
                function, input_signature=input_specs, opset=opset,
                custom_op_handlers=_recording_handlers(used))
        names = [spec.name for spec in input_specs]
        calls = [n.name for n in proto.graph.node
                 if n.op_type in _keras_internal.CALL_OPS]
        captured = [i.name for i in proto.graph.input if i.name not in names]
        if not calls and not captured:
            return proto, _rewrite_notes(used)
    used = {}
    with _bounded_memory(large), _scalar_adds_transposable():
        proto = _convert_frozen(concrete, len(input_specs), opset, used)
    left = [n.name for n in proto.graph.node
            if n.op_type in _keras_internal.CALL_OPS]
    if left:
        raise ValueError(
            f"tf2onnx left {len(left)} TensorFlow function call(s) in the "
            f"ONNX graph even with calls inlined (first: {left[0]}); no ONNX "
            "runtime can run them")
    notes = _rewrite_notes(used)
    if calls:
        notes.append(
            f"{len(calls)} TensorFlow function call(s) that tf2onnx cannot "
            "convert (Keras runs grouped convolutions as XLA functions) "
            "were inlined before conversion")
    if captured:
        notes.append(
            f"{len(captured)} constant(s) the model holds as tensors (e.g. "
            "a Normalization layer's mean and variance), which tf2onnx "
            "would have made graph inputs, were frozen into the graph")
    return proto, notes


# Weights from which a conversion bounds tf2onnx's memory (below that,
# tf2onnx's garbage is a few GB at most).
_LARGE_MODEL_BYTES = 64 * 2 ** 20


def _weight_bytes(concrete):
    """Bytes of the variables and captured tensors `concrete` reads."""
    total = 0
    for value in list(concrete.graph.variables) + _captured(concrete):
        if value.shape.is_fully_defined() and value.dtype.is_numpy_compatible:
            total += value.shape.num_elements() * value.dtype.size
    return total


# Peak memory of an export with ONNX per byte of weights, beyond ~1 GB of
# TensorFlow's own, measured on the sweep's largest rows with the
# measures below (the weights kept out of grappler, each optimizer pass's
# copy sharing them, the garbage collected per pass): 14-15 (RegNetY160
# from .h5, 0.32 GB of weights: 5.4 GB; ConvNeXtLarge from its
# SavedModel, 0.79 GB: 12.4 GB; ConvNeXtXLarge from its SavedModel,
# 1.4 GB: 20.9 GB). It was 20-31 before them.
MEMORY_PER_WEIGHT_BYTE = 16
_BASE_MEMORY = 2 ** 30


def _warn_if_short_of_memory(weights):
    """Warn, before converting, when the conversion is likely to need more
    memory than is available (the system then stops the process without a
    word: SIGKILL)."""
    import warnings

    need = _BASE_MEMORY + MEMORY_PER_WEIGHT_BYTE * weights
    available = _available_memory()
    if available is None or need <= available:
        return
    warnings.warn(
        f"the ONNX conversion of this model ({weights / 2 ** 30:.2f} GiB of "
        f"weights) needs about {need / 2 ** 30:.0f} GiB of memory (the "
        f"export holds the weights ~{MEMORY_PER_WEIGHT_BYTE} times over at "
        "its peak), and "
        f"{available / 2 ** 30:.0f} GiB are available: the system may stop "
        "the process. Write the other formats without ONNX, or convert on "
        "a machine with more memory.", stacklevel=3)


@contextlib.contextmanager
def _bounded_memory(enabled):
    """While converting, collect the garbage before each tf2onnx optimizer
    pass.

    tf2onnx's optimizer loop deep-copies the whole ONNX graph, constants
    included, before each of its ~15 passes per round (to roll back a pass
    that fails), and drops the copy it no longer needs. Those copies hold
    reference cycles (nodes and their graph), which Python frees only when
    its cyclic collector runs, and that counts objects, not bytes: a few
    hundred large constant arrays never set it off. Converting RegNetY160
    (320 MB of weights) grew by ~1 GB per pass, past 17 GB where it was
    stopped (23 GB ran out on larger models); collected before each
    pass, the whole export peaked at 8.4-8.8 GB, and with the copies
    sharing the weights (`_sharing_weights_between_copies`) at 5.4 GB.
    Without `enabled`, or with a tf2onnx that keeps its passes elsewhere,
    nothing changes.

    (Running the passes without that copy, tf2onnx's
    `catch_errors=False`, is worse: each pass's `update_proto` adds every
    node's attributes, weights included, to its NodeProto's protobuf
    arena, which frees nothing until the message goes; the copy is what
    lets the old arena go. RegNetY160 then grew by 0.3 GB per pass, to
    15.4 GB instead of 7.9.)
    """
    try:
        from tf2onnx import optimizer
    except ImportError:
        optimizer = None
    passes = getattr(optimizer, "_optimizers", None)
    if not enabled or not isinstance(passes, dict):
        yield
        return

    def collecting(factory):
        def make():
            gc.collect()
            return factory()
        return make

    optimizer._optimizers = type(passes)(
        (name, collecting(factory)) for name, factory in passes.items())
    # The objects that exist now (the process's: a test session holds
    # millions) are set aside, so that each collection scans only those
    # the conversion makes (~20 ms on ResNet50, not ~0.3 s).
    gc.freeze()
    try:
        with _sharing_weights_between_copies():
            yield
    finally:
        optimizer._optimizers = passes
        gc.collect()
        gc.unfreeze()


@contextlib.contextmanager
def _scalar_adds_transposable():
    """While converting, let tf2onnx's transpose optimizer take an `Add` of
    a scalar constant after a convolution without bias.

    Its `Add` handler tries to make the constant the convolution's bias
    and takes `max()` of the constant's shape, which a scalar does not
    have: the whole transpose pass then fails and is rolled back, with a
    traceback in the log and every layout Transpose left in the graph
    (tf-keras' MobileNetV3Small, whose hard swish is `x + 3.0`: 106 of
    its 320 ONNX nodes). Here such a constant is given as a constant of
    shape (1,) of its own (the same broadcast against the convolution's
    4-D output), which the handler takes as any other.
    """
    try:
        from tf2onnx.optimizer import transpose_optimizer
    except ImportError:
        transpose_optimizer = None
    optimizer_class = getattr(transpose_optimizer, "TransposeOptimizer", None)
    original = getattr(optimizer_class, "_add_handler", None)
    if original is None:
        yield
        return

    def add_handler(self, trans, node):
        constant = node.inputs[1] if len(node.inputs) > 1 else None
        if constant is not None and constant.is_const():
            value = constant.get_tensor_value(as_list=False)
            if np.ndim(value) == 0:
                from tf2onnx import utils

                vector = self._g.make_const(
                    utils.make_name(f"{constant.name}_vector"),
                    np.reshape(value, (1,)))
                self._g.replace_input(node, node.input[1],
                                      vector.output[0], 1)
        return original(self, trans, node)

    optimizer_class._add_handler = add_handler
    try:
        yield
    finally:
        optimizer_class._add_handler = original


# Tensor attributes from this size on are shared by a node and its copy.
_SHARED_TENSOR_BYTES = 2 ** 16


@contextlib.contextmanager
def _sharing_weights_between_copies():
    """While converting, make the copy of the graph that each tf2onnx
    optimizer pass starts with (to roll a failed pass back) share the
    nodes' large tensor attributes (the weights) with the graph it copies.

    A node's generic deep copy copied its weights twice (its NodeProto
    with its attributes, and its table of the same attributes), and the
    pass's `update_proto` then adds them to the copy's NodeProto a third
    time, while the graph copied still holds its own: ~6 copies of the
    weights alive in each pass. Here the copy's NodeProto is made without
    its attributes (each pass rebuilds them from the table at its end,
    and nothing reads them before) and the table's large tensor
    attributes are shared, not copied: tf2onnx replaces a constant's
    value (`set_tensor_value` makes a new attribute), it does not write
    into it, so what the rollback keeps is unchanged. Smaller attributes
    are copied as before.
    """
    from tf2onnx import graph as tf2onnx_graph

    node_class = getattr(tf2onnx_graph, "Node", None)
    if node_class is None or "__deepcopy__" in vars(node_class):
        yield
        return

    def deepcopy(node, memo):
        import copy

        new = node_class.__new__(node_class)
        memo[id(node)] = new
        for key, value in vars(node).items():
            if key == "_op":
                value = _without_attributes(value)
            elif key == "_attr":
                value = {name: attribute if _large_tensor(attribute)
                         else copy.deepcopy(attribute, memo)
                         for name, attribute in value.items()}
            else:
                value = copy.deepcopy(value, memo)
            vars(new)[key] = value
        return new

    node_class.__deepcopy__ = deepcopy
    try:
        yield
    finally:
        del node_class.__deepcopy__


def _without_attributes(node_proto):
    """A copy of an ONNX NodeProto without its `attribute` field."""
    copy = type(node_proto)()
    for field, value in node_proto.ListFields():
        if field.name == "attribute":
            continue
        if hasattr(value, "CopyFrom"):  # A message.
            getattr(copy, field.name).CopyFrom(value)
        elif hasattr(value, "extend"):  # A repeated field.
            getattr(copy, field.name).extend(value)
        else:
            setattr(copy, field.name, value)
    return copy


def _large_tensor(attribute):
    from onnx import AttributeProto

    if attribute.type != AttributeProto.TENSOR:
        return False
    tensor = attribute.t
    return (len(tensor.raw_data) >= _SHARED_TENSOR_BYTES
            or len(tensor.float_data) * 4 >= _SHARED_TENSOR_BYTES)


@contextlib.contextmanager
def _weights_outside_grappler(aside=None):
    """While converting, keep the model's large constants out of tf2onnx's
    grappler pass (`tf_loader.tf_optimize`).

    tf2onnx hands the frozen graph to grappler for constant folding and
    function inlining. Grappler copies the graph, weights included, about
    four times over (a MetaGraphDef, its serialization, its own parse, the
    optimized graph and that graph parsed back): RegNetY160's 0.32 GB of
    weights took the export from 3.9 to 7.7 GB there. Each constant of
    `_graph_weights.ASIDE_BYTES` or more goes in as a Placeholder of its
    dtype and shape and is put back in grappler's output. Nothing is
    lost: grappler folds only ops whose inputs are all constant (a Cast
    or a Transpose of a kernel), and tf2onnx folds those itself after,
    with TensorFlow (`compute_const_folding_using_tf`: every single-output
    op whose inputs are all constant); an op that reads a weight and an
    activation is folded by neither.

    `aside`: constants the caller already set aside
    (`_graph_weights.set_weights_aside`) before handing tf2onnx the light
    graph; they are put back as well, and the dict emptied then (its
    NodeDefs keep their whole GraphDef alive).
    """
    from tf2onnx import tf_loader

    original = tf_loader.tf_optimize
    before = {} if aside is None else aside

    def optimize(input_names, output_names, graph_def):
        light, more = _graph_weights.set_weights_aside(graph_def)
        del graph_def
        optimized = original(input_names, output_names, light)
        before.update(more)
        _graph_weights.put_weights_back(optimized, before)
        before.clear()
        return optimized

    tf_loader.tf_optimize = optimize
    try:
        yield
    finally:
        tf_loader.tf_optimize = original


def _uninlinable_calls(concrete):
    """Names of the call nodes that TensorFlow will not inline, in the
    function's graph or in a function it calls (a graph source's folded
    `FrozenGraph` holds its grouped convolutions' XLA calls one level
    down)."""
    from kerasbn import _keras_internal

    graph_def = concrete.graph.as_graph_def()
    blocked = {f.signature.name for f in graph_def.library.function
               if any(f.attr[a].b for a in _keras_internal.NO_INLINE
                      if a in f.attr)}
    nodes = list(graph_def.node) + [n for f in graph_def.library.function
                                    for n in f.node_def]
    return [n.name for n in nodes
            if n.op in _keras_internal.CALL_OPS
            and n.attr["f"].func.name in blocked]


def _captured(concrete):
    """The non-variable tensors the function captured (as constants)."""
    import tensorflow as tf

    return [t for t in concrete.captured_inputs if t.dtype != tf.resource]


def _convert_frozen(concrete, n_inputs, opset, used):
    """Convert with variables and captured tensors frozen, calls inlined."""
    import tf2onnx

    from kerasbn import _keras_internal

    # The signature's own inputs come first; captured tensors after them.
    input_names = [t.name for t in concrete.inputs[:n_inputs]]
    output_names = [t.name for t in concrete.outputs]
    renames = tf2onnx.convert.tensor_names_from_structed(
        concrete, input_names, output_names)
    graph_def = _keras_internal.frozen_graph_def(concrete)
    _keras_internal.strip_no_inline(graph_def)
    # tf2onnx imports and re-freezes the graph before grappler: both on the
    # graph without its weights, which come back after grappler (and the
    # frozen GraphDef is freed then: `aside` holds the last references).
    light, aside = _graph_weights.set_weights_aside(graph_def)
    del graph_def
    with _weights_outside_grappler(aside):
        proto, _ = tf2onnx.convert.from_graph_def(
            light, name=concrete.name, input_names=input_names,
            output_names=output_names, opset=opset,
            tensors_to_rename=renames,
            custom_op_handlers=_recording_handlers(used))
    return proto


# -- Pad -> MaxPool. ---------------------------------------------------------


def _constants(proto):
    from onnx import numpy_helper

    values = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute:
            attribute = node.attribute[0]
            if attribute.name == "value":
                values[node.output[0]] = numpy_helper.to_array(attribute.t)
    return values


def _attribute(node, name, default):
    import onnx

    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _zero_spatial_pads(node, constants, rank):
    """`(begin, end)` spatial pads of a zero constant Pad, else None."""
    if _attribute(node, "mode", b"constant") not in (b"constant", "constant"):
        return None
    if len(node.input) < 2 or node.input[1] not in constants:
        return None
    if len(node.input) > 2 and node.input[2]:
        value = constants.get(node.input[2])
        if value is None or np.any(np.asarray(value) != 0):
            return None
    if len(node.input) > 3 and node.input[3]:
        return None  # Pads on chosen axes only: not what tf2onnx writes.
    pads = np.asarray(constants[node.input[1]]).reshape(-1).tolist()
    if len(pads) != 2 * rank or any(pads[:2]) or any(pads[rank:rank + 2]):
        return None
    return pads[2:rank], pads[rank + 2:]


def _floor(sizes, begin, end, pool):
    """0 where a pooling window covers padding, -inf elsewhere."""
    kernel, strides, dilations, pool_pads = pool
    n = len(sizes)
    floor = np.full([1, 1] + list(_out_sizes(sizes, begin, end, pool)),
                    -np.inf, np.float32)
    for axis in range(n):
        padded = sizes[axis] + begin[axis] + end[axis]
        out = floor.shape[2 + axis]
        touches = np.zeros(out, bool)
        for o in range(out):
            start = o * strides[axis] - pool_pads[axis]
            taps = start + dilations[axis] * np.arange(kernel[axis])
            inside = taps[(taps >= 0) & (taps < padded)]
            touches[o] = np.any((inside < begin[axis])
                                | (inside >= begin[axis] + sizes[axis]))
        index = [0, 0] + [slice(None)] * n
        index[2 + axis] = touches
        floor[tuple(index)] = 0.0
    return floor


def _out_sizes(sizes, begin, end, pool):
    kernel, strides, dilations, pool_pads = pool
    n = len(sizes)
    return [(sizes[a] + begin[a] + end[a] + pool_pads[a] + pool_pads[n + a]
             - dilations[a] * (kernel[a] - 1) - 1) // strides[a] + 1
            for a in range(n)]


def guard_pad_max_pool(proto):
    """Make every zero `Pad -> MaxPool` exact under pad fusion; notes."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(proto)
    shapes = {}
    for info in (list(inferred.graph.value_info) + list(inferred.graph.input)
                 + list(inferred.graph.output)):
        dims = info.type.tensor_type.shape.dim
        shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None
                             for d in dims]
    constants = _constants(proto)
    producers = {o: n for n in proto.graph.node for o in n.output}
    consumers = {}
    for node in proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    notes, new_nodes = [], {}
    for node in proto.graph.node:
        if node.op_type != "Pad":
            continue
        problem = _guard_one(node, proto, shapes, constants, producers,
                             consumers, new_nodes)
        if problem:
            notes.append(problem)
    if new_nodes:
        ordered = []
        for node in proto.graph.node:
            ordered.append(node)
            ordered.extend(new_nodes.get(id(node), []))
        del proto.graph.node[:]
        proto.graph.node.extend(ordered)
    return notes


def _guard_one(pad, proto, shapes, constants, producers, consumers,
               new_nodes):
    import onnx

    shape = shapes.get(pad.input[0])
    if not shape:
        return None
    pads = _zero_spatial_pads(pad, constants, len(shape))
    pools = [n for n in consumers.get(pad.output[0], [])
             if n.op_type == "MaxPool"]
    if pads is None or not pools:
        return None
    source = producers.get(pad.input[0])
    if source is not None and source.op_type == "Relu":
        return None  # Non-negative input: a -inf pad gives the same max.
    sizes = shape[2:]
    if any(s is None for s in sizes):
        return (f"zero Pad '{pad.name}' before MaxPool with unknown spatial "
                "size: left as it is (ONNX Runtime may pad it with -inf)")
    for pool in pools:
        n = len(sizes)
        settings = (list(_attribute(pool, "kernel_shape", [])),
                    list(_attribute(pool, "strides", [1] * n)),
                    list(_attribute(pool, "dilations", [1] * n)),
                    list(_attribute(pool, "pads", [0] * 2 * n)))
        if (_attribute(pool, "ceil_mode", 0) or len(pool.output) > 1
                or _attribute(pool, "auto_pad", b"NOTSET")
                not in (b"NOTSET", "NOTSET")):
            return (f"MaxPool '{pool.name}' after zero Pad '{pad.name}' uses "
                    "ceil_mode, indices or auto_pad: left as it is")
        floor = _floor(sizes, *pads, settings)
        floor_name = f"{pool.name}__kerasbn_pad_floor"
        proto.graph.initializer.append(
            onnx.numpy_helper.from_array(floor, floor_name))
        # The pool now writes `raw`; the Max writes the pool's old output,
        # so every consumer (graph outputs included) reads the floored one.
        pooled = pool.output[0]
        raw = f"{pooled}__kerasbn_unfloored"
        pool.output[0] = raw
        new_nodes.setdefault(id(pool), []).append(onnx.helper.make_node(
            "Max", [raw, floor_name], [pooled],
            name=f"{pool.name}__kerasbn_pad_floor_max"))
    return (f"zero Pad '{pad.name}' before MaxPool: ONNX Runtime's pad "
            "fusion would pad with -inf; added an exact floor "
            "(max with 0 on windows that cover padding)")


# -- Census. -----------------------------------------------------------------


def normalization_census(proto):
    """`{"BatchNormalization": n, "affine_after_linear": m}` of a graph.

    `affine_after_linear` counts Mul/Add/Sub/Div nodes whose other input is
    a constant and whose data input comes straight from a Conv,
    ConvTranspose, Gemm or MatMul: the traces an unfolded normalization
    leaves. A MatMul's Add of a constant is not counted: that is how
    tf2onnx writes a Dense layer's bias. Nor is a one-element constant
    after a linear op with more than one output channel: the same number
    for every channel is the model's own arithmetic (tf-keras' hard swish,
    `x + 3.0`, right after its convolution), not a per-channel
    normalization.
    """
    constants = _constants(proto)
    producers = {o: n for n in proto.graph.node for o in n.output}
    batch_norm = sum(n.op_type == "BatchNormalization"
                     for n in proto.graph.node)
    affine = 0
    for node in proto.graph.node:
        if node.op_type not in _AFFINE_OPS or len(node.input) != 2:
            continue
        data = [name for name in node.input if name not in constants]
        if len(data) != 1:
            continue
        source = producers.get(data[0])
        if source is not None and source.op_type in _LINEAR_OPS:
            # A MatMul -> Add(bias) is how tf2onnx writes Dense: not BN.
            if node.op_type == "Add" and source.op_type == "MatMul":
                continue
            (constant,) = [name for name in node.input if name in constants]
            if np.size(constants[constant]) == 1 and (
                    _out_channels(source, constants) or 1) > 1:
                continue
            affine += 1
    return {"BatchNormalization": batch_norm, "affine_after_linear": affine}


def _out_channels(node, constants):
    """Output channels of a Conv/ConvTranspose/Gemm/MatMul with a constant
    weight, or None."""
    weight = constants.get(node.input[1]) if len(node.input) > 1 else None
    if weight is None or np.ndim(weight) < 2:
        return None
    if node.op_type == "Conv":
        return weight.shape[0]
    if node.op_type == "ConvTranspose":
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        return weight.shape[1] * max(group, 1)
    transposed = any(a.name == "transB" and a.i for a in node.attribute)
    return weight.shape[0] if transposed else weight.shape[-1]
