"""A TensorFlow GraphDef's large constants set aside while TensorFlow
rewrites the graph, and put back after.

Grappler (function inlining, constant folding) and `tf.import_graph_def`
copy a graph, weights included, several times over: a MetaGraphDef, its
serialization, grappler's own parse, the rewritten graph and that graph
parsed back. On a frozen model the weights are nearly all of the graph, so
each rewrite held them four to six times: loading ConvNeXtLarge's
SavedModel (0.79 GB of weights) reached 13 GB in the function inlining
alone. `set_weights_aside` replaces each large `Const` node with a
`Placeholder` of its name, dtype and shape, which every rewrite here keeps
as it is (it is neither inlined nor folded); `put_weights_back` restores
the constants in the rewritten graph.
"""

# Constants from this size on are set aside.
ASIDE_BYTES = 2 ** 16


def constant_bytes(node):
    """Bytes of a `Const` NodeDef's value, or 0 for other nodes and
    non-numeric values (strings, resources)."""
    import tensorflow as tf

    if node.op != "Const" or "value" not in node.attr:
        return 0
    tensor = node.attr["value"].tensor
    try:
        dtype = tf.dtypes.as_dtype(tensor.dtype)
    except TypeError:
        return 0
    if not dtype.is_numpy_compatible or dtype == tf.string:
        return 0
    count = 1
    for dim in tensor.tensor_shape.dim:
        count *= max(dim.size, 0)
    return count * dtype.size


def set_weights_aside(graph_def, min_bytes=None):
    """`(light, aside)`: a copy of `graph_def` in which each `Const` node
    of `min_bytes` (default `ASIDE_BYTES`) or more is a `Placeholder` of
    its name, dtype and shape, and `{name: the original NodeDef}`
    (references into `graph_def`, not copies: they keep `graph_def`'s
    memory alive until they go). `graph_def` itself is left as it is.
    Constants inside the library's functions stay where they are."""
    import tensorflow as tf

    min_bytes = ASIDE_BYTES if min_bytes is None else min_bytes
    light, aside = tf.compat.v1.GraphDef(), {}
    light.versions.CopyFrom(graph_def.versions)
    light.library.CopyFrom(graph_def.library)
    for node in graph_def.node:
        if constant_bytes(node) < min_bytes:
            light.node.add().CopyFrom(node)
            continue
        stand_in = light.node.add(name=node.name, op="Placeholder",
                                  device=node.device)
        stand_in.attr["dtype"].CopyFrom(node.attr["dtype"])
        stand_in.attr["shape"].shape.CopyFrom(
            node.attr["value"].tensor.tensor_shape)
        if "_output_shapes" in node.attr:
            stand_in.attr["_output_shapes"].CopyFrom(
                node.attr["_output_shapes"])
        aside[node.name] = node
    return light, aside


def put_weights_back(graph_def, aside):
    """Replace, in `graph_def` (in place), each `Placeholder` named in
    `aside` by the constant it stands for, keeping the stand-in's
    `_output_shapes` if it has them. A stand-in the rewrite removed had no
    reader: its constant is not needed. Raises a `RuntimeError` if a
    stand-in was rewritten into another op, which would leave the graph
    without its weight."""
    for node in graph_def.node:
        if node.name not in aside:
            continue
        if node.op != "Placeholder":
            raise RuntimeError(
                f"kerasbn: a TensorFlow graph rewrite turned the stand-in of "
                f"constant '{node.name}' into a {node.op}; please report "
                "this")
        shapes = None
        if "_output_shapes" in node.attr:
            shapes = type(node.attr["_output_shapes"])()
            shapes.CopyFrom(node.attr["_output_shapes"])
        node.CopyFrom(aside[node.name])
        if shapes is not None:
            node.attr["_output_shapes"].CopyFrom(shapes)
    return graph_def
