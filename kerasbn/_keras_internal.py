"""Every use of Keras' and TensorFlow's private structures, in one place.

Keras 3 has no public API to walk a Functional model's graph node by node,
to list a layer's nested sublayers, or to compute BatchNormalization's
(masked, possibly synchronized) batch moments; TensorFlow has no public way
to freeze a function's variables into constants (what TFLite needs for
Keras 3's resource variables). kerasbn needs all four, so it reads them
here and nowhere else: a Keras release that moves one of them breaks this
module only, and each accessor raises `KerasLayoutError` naming the piece
that moved where it is read (`check_layout()` probes them all at once; the
test suite runs it).

Checked against: Keras 3.15 (TensorFlow 2.21). `pyproject.toml` asks for
keras>=3.14, whose layout is the same for everything read here.
"""

import contextlib
import functools

import keras

CHECKED_KERAS = ("3.14", "3.15")

try:  # Keras' Functional class: public as keras.Model, but not by name.
    from keras.src.models.functional import Functional
except ImportError as error:  # pragma: no cover - depends on Keras.
    raise ImportError(
        "kerasbn could not import keras.src.models.functional.Functional "
        f"from Keras {keras.__version__}; kerasbn was checked against Keras "
        f"{', '.join(CHECKED_KERAS)}. Install one of those versions, or a "
        "kerasbn release that supports this Keras."
    ) from error


class KerasLayoutError(RuntimeError):
    """A private Keras structure kerasbn reads is not where it was."""


def _missing(what, obj, attribute):
    return KerasLayoutError(
        f"kerasbn reads {what} ({type(obj).__name__}.{attribute}), which "
        f"Keras {keras.__version__} does not have. kerasbn was checked "
        f"against Keras {', '.join(CHECKED_KERAS)}: install one of those "
        "(pip install 'keras>=3.14,<3.16') or a kerasbn release that "
        "supports this Keras."
    )


def _get(obj, attribute, what):
    try:
        return getattr(obj, attribute)
    except AttributeError:
        raise _missing(what, obj, attribute) from None


# -- Models and graphs. ------------------------------------------------------


def is_functional(model):
    """Whether `model` is a Functional model (graph of layer calls)."""
    return isinstance(model, Functional)


def is_graph_model(layer):
    """Functional or Sequential: a model whose layer graph can be read."""
    return isinstance(layer, (keras.Sequential, Functional))


def is_plain_graph_model(model):
    """Exactly Functional or Sequential (not a subclass with its own
    constructor or config, which clone_model copies another way)."""
    return type(model) in (keras.Sequential, Functional)


def sequential_graph(model):
    """The Functional graph a built Sequential model keeps, or None."""
    return _get(model, "_functional", "a Sequential model's graph")


def nodes_by_depth(functional):
    """`{depth: [Node]}` of a Functional model (depth 0 = outputs)."""
    return _get(functional, "_nodes_by_depth", "a model's graph nodes")


def input_structure(functional):
    return _get(functional, "_inputs_struct", "a model's input structure")


def output_structure(functional):
    return _get(functional, "_outputs_struct", "a model's output structure")


def producing_operation(tensor):
    """The layer or operation that produced a symbolic `KerasTensor`."""
    return _get(tensor, "_keras_history", "a tensor's producer").operation


def call_number(operation, node):
    """Index of `node` among `operation`'s calls (0 if it is not found)."""
    nodes = _get(operation, "_inbound_nodes", "a layer's calls")
    return next((k for k, n in enumerate(nodes) if n is node), 0)


def standardize_inputs(functional, inputs):
    """`inputs` as the flat list a Functional model's graph starts from
    (its structure flattened, cast to each Input's dtype, rank adjusted),
    as `Functional.call` prepares them."""
    return _get(functional, "_standardize_inputs",
                "a model's input preparation")(inputs)


def call_context_args(operation):
    """Names of the call-context arguments (`training`, ...) `operation`'s
    call takes, which a Functional model passes on to it."""
    return getattr(operation, "_call_context_args", ())


def keras_mask(tensor):
    """The mask Keras attached to a computed tensor, or None."""
    from keras.src.backend.common.masking import get_keras_mask

    return get_keras_mask(tensor)


def set_keras_mask(tensor, mask):
    from keras.src.backend.common.masking import set_keras_mask as setter

    setter(tensor, mask)


def sublayers(layer, recursive=True):
    """Every layer nested in `layer` (not `layer` itself), each once.

    Nested models and layers inside custom layers included, in the order of
    the layer tree.
    """
    if not isinstance(layer, keras.layers.Layer):
        return []
    flatten = _get(layer, "_flatten_layers", "a layer's nested layers")
    found, seen = [], set()
    for inner in flatten(include_self=False, recursive=recursive):
        if id(inner) not in seen:
            seen.add(id(inner))
            found.append(inner)
    return found


# -- Layers. -----------------------------------------------------------------


def variable_initializers():
    """A context manager giving `{id(variable): (variable, initializer)}`
    of the Keras variables created from an initializer while it is
    entered (Keras has no public hook there: its backend `Variable`'s
    `_initialize_with_initializer` is wrapped meanwhile)."""
    cls = keras.Variable
    name = "_initialize_with_initializer"
    original = _get(cls, name, "how a variable is made from its "
                    "initializer")
    return _recording_initializers(cls, name, original)


@contextlib.contextmanager
def _recording_initializers(cls, name, original):
    own = name in vars(cls)
    found = {}

    def recording(variable, initializer):
        found[id(variable)] = (variable, initializer)
        return original(variable, initializer)

    setattr(cls, name, recording)
    try:
        yield found
    finally:
        if own:
            setattr(cls, name, original)
        else:
            delattr(cls, name)


def batch_norm_moments(layer, inputs, mask):
    """Keras BatchNormalization's batch `(mean, variance)` of `inputs`.

    Masked positions left out; all-reduced across replicas when the layer
    is `synchronized`, without Keras' cancellation (two centred
    all-reduces, `kerasbn/layers/_synchronized.py`). kerasbn's BN
    subclasses reuse it so that their training statistics are Keras' own
    to the last bit on one replica.
    """
    # Keras' own method, also for subclasses that route theirs here.
    moments = functools.partial(
        _get(keras.layers.BatchNormalization, "_moments",
             "BatchNormalization's batch moments"), layer)
    if not layer.synchronized or keras.backend.backend() != "tensorflow":
        return moments(inputs, mask)
    # Keras' own synchronized moments cancel (E[x^2] - E[x]^2 in float32,
    # even on one replica); kerasbn's are centred, and on one replica they
    # are the two-pass local ones. See kerasbn/layers/_synchronized.py.
    from kerasbn.layers._synchronized import synchronized_moments

    axes = _get(layer, "_reduction_axes", "BatchNormalization's axes")

    def local(inputs, mask):
        if mask is not None:  # Keras' masked moments never synchronize.
            return moments(inputs, mask)
        return keras.ops.moments(inputs, axes=axes)

    return synchronized_moments(inputs, mask, axes, local)


def training_moments(layer, inputs, mask):
    """`(inputs, mean, variance)` as Keras BN's training branch has them.

    The mask's rank is checked as Keras checks it, and float16/bfloat16
    inputs are upcast to float32 (the statistics are computed in at least
    float32); the returned `inputs` are the upcast ones.
    """
    if mask is not None and len(mask.shape) != len(inputs.shape) - 1:
        raise ValueError(
            "The mask provided should be one dimension less than the "
            f"inputs. Received: mask.shape={mask.shape}, "
            f"inputs.shape={inputs.shape}"
        )
    dtype = keras.backend.result_type(inputs.dtype, "float32")
    inputs = keras.ops.cast(inputs, dtype)
    mean, variance = batch_norm_moments(layer, inputs, mask)
    return inputs, mean, variance


# -- TensorFlow. -------------------------------------------------------------


def freeze_concrete_function(concrete_function, inline=False):
    """The function with its variables turned into constants (for TFLite).

    `inline=True` also inlines the functions it calls where TensorFlow can
    (for converters that cannot follow function calls).
    """
    from tensorflow.python.framework import convert_to_constants

    if inline:
        return convert_to_constants.convert_variables_to_constants_v2(
            concrete_function, lower_control_flow=False,
            aggressive_inlining=True)
    return convert_to_constants.convert_variables_to_constants_v2(
        concrete_function)


def frozen_graph_def(concrete_function):
    """The GraphDef of `freeze_concrete_function(concrete_function,
    inline=True)`, without the frozen function itself.

    TensorFlow makes the frozen GraphDef, then imports it into a new
    function, which holds every weight once more (and a GraphDef read
    back from that function, once again): the ONNX export needs only the
    GraphDef. Where TensorFlow's private helpers have moved, the frozen
    function is built and read back as before.
    """
    from tensorflow.python.framework import convert_to_constants as convert

    data_class = getattr(convert, "_FunctionConverterDataInEager", None)
    replace = getattr(convert, "_replace_variables_by_constants", None)
    if data_class is None or replace is None:
        frozen = freeze_concrete_function(concrete_function, inline=True)
        return frozen.graph.as_graph_def(add_shapes=True)
    data = data_class(func=concrete_function, lower_control_flow=False,
                      aggressive_inlining=True)
    graph_def, _ = replace(converter_data=data)
    return graph_def


# Function attributes that stop TensorFlow's graph optimizer from inlining a
# call: Keras (3, and tf-keras) runs a grouped convolution as a
# `tf.function(jit_compile=True)`, marked with both.
NO_INLINE = ("_noinline", "_XlaMustCompile")
CALL_OPS = ("StatefulPartitionedCall", "PartitionedCall")


def strip_no_inline(graph_def):
    """Remove the `NO_INLINE` marks from `graph_def`'s functions and nodes
    (in place), so TensorFlow's inliner takes every call."""
    for holder in list(graph_def.library.function) + list(graph_def.node):
        for attribute in NO_INLINE:
            if attribute in holder.attr:
                del holder.attr[attribute]
# kerasbn's own node attribute: the node ran inside an XLA-compiled call
# of the source that `inline_function_calls` inlined.
XLA_MARK = "_kerasbn_xla_compiled"


def inline_function_calls(graph_def, fetches):
    """A frozen `graph_def` with its remaining function calls inlined.

    `freeze_concrete_function(..., inline=True)` inlines only the calls
    TensorFlow may inline; this removes the `NO_INLINE` marks (from the
    library's functions and from the call nodes) and runs Grappler's
    function inliner again, the pass `convert_variables_to_constants_v2`
    runs, so a grouped convolution becomes a plain `Conv2D` a folder can
    rewrite. The nodes of a function that was XLA-compiled get the
    `XLA_MARK` attribute, so whoever RUNS the graph can compile them again
    (TensorFlow's CPU kernels without oneDNN refuse a grouped `Conv2D`
    fused with the `BiasAdd` after it: "Fused conv implementation does not
    support grouped convolutions"). Grappler keeps the `fetches`
    ("node:index" tensors: the graph's inputs and outputs) and names an
    inlined call's nodes under the call's name, its inputs and outputs
    `Func/<call>/input/_k` / `Func/<call>/output/_k` Identity nodes.
    Returns `graph_def` itself when it has no call, else a new GraphDef
    with `_output_shapes` recomputed. The rewrite runs with the large
    constants set aside (`_graph_weights`: grappler would copy them four
    times over).
    """
    if not any(n.op in CALL_OPS for n in graph_def.node):
        return graph_def
    import tensorflow as tf
    from tensorflow.core.protobuf import config_pb2
    from tensorflow.core.protobuf import rewriter_config_pb2
    from tensorflow.python.grappler import tf_optimizer

    from kerasbn import _graph_weights

    copy, aside = _graph_weights.set_weights_aside(graph_def)
    for function in copy.library.function:
        if "_XlaMustCompile" in function.attr and (
                function.attr["_XlaMustCompile"].b):
            for node in function.node_def:
                node.attr[XLA_MARK].b = True
    strip_no_inline(copy)
    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(copy, name="")
    meta_graph = tf.compat.v1.train.export_meta_graph(graph_def=copy,
                                                      graph=graph)
    # Grappler keeps what the "train_op" collection names.
    meta_graph.collection_def["train_op"].node_list.value.extend(fetches)
    config = config_pb2.ConfigProto()
    rewrite = config.graph_options.rewrite_options
    rewrite.min_graph_nodes = -1  # Do not skip small graphs.
    rewrite.optimizers.append("function")
    rewrite.function_optimization = (
        rewriter_config_pb2.RewriterConfig.AGGRESSIVE)
    inlined = tf_optimizer.OptimizeGraph(config, meta_graph)
    del copy, meta_graph, graph
    return _graph_weights.put_weights_back(with_output_shapes(inlined),
                                           aside)


def with_output_shapes(graph_def):
    """`graph_def` read back through a `tf.Graph`: every node with its
    `_output_shapes`."""
    import tensorflow as tf

    graph = tf.Graph()
    with graph.as_default():
        tf.graph_util.import_graph_def(graph_def, name="")
    return graph.as_graph_def(add_shapes=True)


# -- The check. --------------------------------------------------------------


def check_layout():
    """Probe every private structure above on a tiny model.

    Returns the Keras version; raises `KerasLayoutError` naming the piece
    that moved.

    >>> check_layout() == keras.__version__
    True
    """
    # Explicit names: auto-named layers would advance the user's name
    # counters (their next Dense would be "dense_1").
    inputs = keras.Input((3,), name="kerasbn_probe_input")
    hidden = keras.layers.Dense(2, name="kerasbn_probe_dense")(inputs)
    bn = keras.layers.BatchNormalization(name="kerasbn_probe_bn")
    model = keras.Model(inputs, bn(hidden), name="kerasbn_probe")
    sequential = keras.Sequential(
        [keras.Input((3,), name="kerasbn_probe_input"),
         keras.layers.Dense(2, name="kerasbn_probe_dense")],
        name="kerasbn_probe_sequential")
    if not is_functional(model) or sequential_graph(sequential) is None:
        raise _missing("a Sequential model's graph", sequential,
                       "_functional")
    depths = nodes_by_depth(model)
    if not isinstance(depths, dict) or not depths:
        raise _missing("a model's graph nodes", model, "_nodes_by_depth")
    input_structure(model)
    output_structure(model)
    if producing_operation(hidden) is None:
        raise _missing("a tensor's producer", hidden, "_keras_history")
    if not any(inner is bn for inner in sublayers(model)):
        raise _missing("a layer's nested layers", model, "_flatten_layers")
    mean, _ = batch_norm_moments(
        bn, keras.ops.ones((2, 2)), None)
    if tuple(mean.shape) != (2,):
        raise _missing("BatchNormalization's batch moments", bn, "_moments")
    with variable_initializers() as made:
        variable = keras.Variable(initializer="zeros", shape=(1,),
                                  name="kerasbn_probe_variable")
    if id(variable) not in made:
        raise _missing("how a variable is made from its initializer",
                       variable, "_initialize_with_initializer")
    legacy = model_from_keras2_config({
        "class_name": "Sequential", "config": {"name": "kerasbn_probe_k2",
                                               "layers": []}})
    if not isinstance(legacy, keras.Model):
        raise _missing("Keras' legacy (Keras 2) config reader", legacy,
                       "model_from_config")
    return keras.__version__


# -- Keras 2 files. ----------------------------------------------------------


def model_from_keras2_config(config, custom_objects=None):
    """A Keras 3 model built from a Keras 2 model config (a dict).

    The path `keras.models.load_model("model.h5")` takes: Keras' legacy
    config reader, in the legacy-config option scope and in safe mode (no
    Python bytecode is loaded). Keras has no public entry point to it.
    """
    try:
        from keras.src.legacy.saving import saving_options
        from keras.src.legacy.saving import saving_utils
        from keras.src.saving import serialization_lib
    except ImportError as error:  # pragma: no cover - depends on Keras.
        raise KerasLayoutError(
            "kerasbn reads Keras 2 model configs with Keras' legacy loader "
            "(keras.src.legacy.saving.saving_utils.model_from_config), "
            f"which Keras {keras.__version__} does not have ({error}). "
            f"kerasbn was checked against Keras {', '.join(CHECKED_KERAS)}."
        ) from None
    legacy = saving_options.keras_option_scope(use_legacy_config=True)
    with legacy, serialization_lib.SafeModeScope(True):
        return saving_utils.model_from_config(
            config, custom_objects=custom_objects)


# tf-keras' applications define a few layers of their own; Keras 3's
# applications define the same classes (same config, same weights, same
# computation), not exported: `{class name: (module, attribute)}`.
_STOCK_APPLICATION_LAYERS = {
    "LayerScale": ("keras.src.applications.convnext", "LayerScale"),
    "StochasticDepth": ("keras.src.applications.convnext", "StochasticDepth"),
    "CustomScaleLayer": ("keras.src.applications.inception_resnet_v2",
                         "CustomScaleLayer"),
}


def stock_application_layer(class_name):
    """Keras 3's class for a layer class of tf-keras' applications, or
    None (also when this Keras has moved it)."""
    import importlib

    where = _STOCK_APPLICATION_LAYERS.get(class_name)
    if where is None:
        return None
    try:
        return getattr(importlib.import_module(where[0]), where[1])
    except (ImportError, AttributeError):  # pragma: no cover - Keras moved.
        return None
