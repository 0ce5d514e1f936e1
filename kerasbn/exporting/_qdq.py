"""A QAT model's ONNX graph with integer weights and biases (QDQ format).

tf2onnx writes the QAT deployment graph with Quantize/DequantizeLinear pairs
for the activations (from the fake-quant ops with the learned ranges) but
folds each kernel's own quantization into a float initializer: the kernel's
values are on their integer grid, stored as floats. ONNX Runtime's QDQ
rewrites then have no integer kernel to fuse with, and run the
convolution on its own terms. `integer_weights` stores each such kernel
as its integer codes and a `DequantizeLinear` (int8, or int4 from opset 21,
one scale per output channel), and each bias as int32 codes with the scale
`input scale x weight scale`, which is the form ONNX Runtime's
`quantize_static` writes and its integer kernels (`QLinearConv`) run.

The codes are recovered from the float kernel, not assumed: per output
channel, `scale = max |w| / levels` and `codes = round(w / scale)` (or one
scale for the kernel, written as a scalar); a kernel whose values are not
within a rounding of `codes * scale` was not quantized by the QAT model (a
layer `prepare_qat` left float) and stays a float initializer.
"""

import numpy as np

_SHAPE_ONLY = ("Reshape", "Squeeze", "Unsqueeze", "Flatten", "Transpose",
               "Identity")


def _producers(graph):
    return {output: node for node in graph.node for output in node.output}


def _input_scale(name, producers, initializers):
    """The scalar scale of the DequantizeLinear that `name` comes from,
    through shape-only ops, or None."""
    node = producers.get(name)
    while node is not None and node.op_type in _SHAPE_ONLY:
        node = producers.get(node.input[0])
    if node is None or node.op_type != "DequantizeLinear":
        return None
    scale = initializers.get(node.input[1])
    if scale is None or np.asarray(scale).size != 1:
        return None
    return np.float32(np.asarray(scale).reshape(()))


def _grid(flat, bound, levels):
    """`(codes, scale, worst gap relative to the range)` of rows `flat`
    read on the grids `bound / levels` (one per row)."""
    scale = (np.maximum(bound, np.float32(1e-30))
             / np.float32(levels)).astype(np.float32)
    codes = np.round(flat / scale[:, None])
    gap = np.max(np.abs(codes * scale[:, None] - flat), axis=1) / np.maximum(
        bound, np.float32(1e-30))
    return codes, scale, float(np.max(gap))


def _codes(weight, levels):
    """`(codes, scales, per_channel)` of a kernel on a symmetric grid, per
    output channel or per tensor (one scale), or None when it is on
    neither: a kernel the QAT model did not quantize (a layer
    `prepare_qat` left float), which stays a float initializer."""
    flat = weight.reshape(weight.shape[0], -1)
    codes, scale, gap = _grid(flat, np.max(np.abs(flat), axis=1), levels)
    per_channel = True
    if gap > 1e-5:
        whole = np.full(flat.shape[0], np.max(np.abs(flat)), np.float32)
        codes, scale, gap = _grid(flat, whole, levels)
        per_channel = False
    if gap > 1e-5 or np.any(np.abs(codes) > levels):
        return None
    if not per_channel or np.all(scale == scale[0]):
        return codes.reshape(weight.shape), scale[:1].reshape(()), False
    return codes.reshape(weight.shape), scale, True


def integer_weights(proto, bits):
    """Rewrite `proto` in place; returns `(kernels rewritten, convolution
    kernels left float)`."""
    from onnx import TensorProto
    from onnx import helper
    from onnx import numpy_helper

    graph = proto.graph
    initializers = {i.name: numpy_helper.to_array(i)
                    for i in graph.initializer}
    producers = _producers(graph)
    levels = 2 ** (bits - 1) - 1  # INT4 needs opset 21: check_qat asks.
    users = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    added_nodes, added, rewritten, left = [], [], 0, 0
    for node in graph.node:
        if node.op_type != "Conv" or node.input[1] not in initializers:
            continue
        if users.get(node.input[1], 0) != 1:
            continue  # A shared kernel: left as it is.
        weight = np.asarray(initializers[node.input[1]], np.float32)
        found = _codes(weight, levels)
        if found is None:
            left += 1
            continue
        codes, scale, per_channel = found
        prefix = f"{node.name or node.output[0]}_qdq"
        kind = TensorProto.INT8 if bits > 4 else TensorProto.INT4
        added += [
            helper.make_tensor(f"{prefix}_w", kind, codes.shape,
                               codes.astype(np.int8).reshape(-1).tolist()),
            numpy_helper.from_array(scale, f"{prefix}_w_scale"),
        ]
        axis = {"axis": 0} if per_channel else {}
        added_nodes.append(helper.make_node(
            "DequantizeLinear", [f"{prefix}_w", f"{prefix}_w_scale"],
            [f"{prefix}_w_dq"], name=f"{prefix}_w_dq", **axis))
        node.input[1] = f"{prefix}_w_dq"
        input_scale = _input_scale(node.input[0], producers, initializers)
        if (len(node.input) > 2 and node.input[2] in initializers
                and input_scale is not None
                and users.get(node.input[2], 0) == 1):
            bias = np.asarray(initializers[node.input[2]], np.float32)
            bias_scale = (input_scale * np.broadcast_to(
                scale, bias.shape)).astype(np.float32)
            bias_codes = np.round(bias / bias_scale).astype(np.int64)
            if np.all(np.abs(bias_codes) < 2 ** 31):
                added += [
                    numpy_helper.from_array(bias_codes.astype(np.int32),
                                            f"{prefix}_b"),
                    numpy_helper.from_array(bias_scale, f"{prefix}_b_scale"),
                ]
                added_nodes.append(helper.make_node(
                    "DequantizeLinear", [f"{prefix}_b", f"{prefix}_b_scale"],
                    [f"{prefix}_b_dq"], axis=0, name=f"{prefix}_b_dq"))
                node.input[2] = f"{prefix}_b_dq"
        rewritten += 1
    used = {name for node in graph.node for name in node.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep + added)
    nodes = added_nodes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return rewritten, left
