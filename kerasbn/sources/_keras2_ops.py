"""tf.keras' `TFOpLambda` / `SlicingOpLambda` layers, as Keras 3 layers.

Before: a Keras 2 config entry

    {"class_name": "TFOpLambda", "config": {"function": "math.multiply",
     ...}, "inbound_nodes": [["conv", 0, 0, {"y": ["gate", 0, 0],
     "name": null}]]}

(tf-keras saved the call's first argument as the node's inbound tensors,
each carrying every other argument by name; a first argument that was a
list, e.g. `tf.concat`'s values, is a list of such references, and a
constant in it is `["_CONSTANT_VALUE", -1, value, kwargs]`).

After: `kerasbn.layers.TFFunction(function="math.multiply",
arguments={"x": {"__tensor__": 0}, "y": {"__tensor__": 1}})` called on
`[conv, gate]`: every Keras tensor the call used becomes one of the layer's
inputs, in order of appearance, every constant stays in its config.

A function without a translation (`TFFunction.FUNCTIONS`), or a call whose
arguments do not have the form above, is a `Keras2Error` naming the
function and the layer.
"""

import inspect

_CONSTANT = "_CONSTANT_VALUE"
TF_OP_CLASSES = ("TFOpLambda", "SlicingOpLambda")
_CLASS = "kerasbn>TFFunction"


def _is_ref(data):
    """A Keras 2 tensor reference `[layer, node, tensor(, kwargs)]`."""
    return (isinstance(data, list) and len(data) in (3, 4)
            and isinstance(data[0], str) and isinstance(data[1], int)
            and not isinstance(data[1], bool) and isinstance(data[2], int)
            and (len(data) == 3 or isinstance(data[3], dict)))


class _Tensors:
    """The Keras tensors of one call, numbered in order of appearance."""

    def __init__(self):
        self.refs = []

    def placeholder(self, ref):
        from kerasbn.layers.tf_function import TENSOR

        key = [ref[0], ref[1], ref[2]]
        if key not in self.refs:
            self.refs.append(key)
        return {TENSOR: self.refs.index(key)}


def _first_argument(data, tensors, kwargs_seen):
    """The call's first argument from the node data, and its kwargs."""
    if (isinstance(data, list) and len(data) in (3, 4)
            and data[0] == _CONSTANT and data[1] == -1):
        if len(data) == 4 and isinstance(data[3], dict):
            kwargs_seen.append(data[3])
        return data[2]
    if _is_ref(data):
        if len(data) == 4:
            kwargs_seen.append(data[3])
        return tensors.placeholder(data)
    if isinstance(data, list):
        return [_first_argument(item, tensors, kwargs_seen) for item in data]
    raise ValueError(f"an inbound entry {data!r} that is neither a tensor "
                     "reference nor a list of them")


def _keyword(value, tensors):
    """A keyword argument's value with its tensor references replaced."""
    if isinstance(value, list) and len(value) == 3 and _is_ref(value):
        return tensors.placeholder(value)
    if isinstance(value, list):
        return [_keyword(item, tensors) for item in value]
    if isinstance(value, dict):
        return {k: _keyword(v, tensors) for k, v in value.items()}
    return value


def translate(where, entry, error):
    """The `kerasbn.layers.TFFunction` entry for a TFOpLambda `entry`.

    `error(message)` builds the exception to raise (a Keras2Error).
    """
    from kerasbn.layers.tf_function import FUNCTIONS

    config = entry.get("config") or {}
    function = config.get("function")
    if function not in FUNCTIONS:
        raise error(
            f"layer '{where}' is a {entry.get('class_name')} calling "
            f"TensorFlow's tf.{function}, which kerasbn does not translate "
            "to Keras 3 (it translates: "
            f"{', '.join('tf.' + name for name in sorted(FUNCTIONS))}): the "
            "same model saved as a SavedModel (Keras 2 model.save(dir)) "
            "folds at graph level with kerasbn-fold; or wrap the call in a "
            "custom layer and pass its module with --custom-module")
    nodes = entry.get("inbound_nodes") or []
    if len(nodes) != 1:
        raise error(
            f"layer '{where}' ({entry.get('class_name')} tf.{function}) has "
            f"{len(nodes)} calls; tf-keras makes one layer per call: the "
            "file's model config is damaged; save the model again with "
            "Keras 2")
    tensors, kwargs_seen = _Tensors(), []
    try:
        first = _first_argument(nodes[0], tensors, kwargs_seen)
    except ValueError as problem:
        raise error(f"layer '{where}' (tf.{function}) has {problem}: the "
                    "file's model config is damaged; save the model again "
                    "with Keras 2") from None
    kwargs = kwargs_seen[0] if kwargs_seen else {}
    parameters = list(inspect.signature(FUNCTIONS[function]).parameters)
    arguments = {parameters[0]: first}
    arguments.update({k: _keyword(v, tensors) for k, v in kwargs.items()
                      if k != "name"})
    unknown = sorted(set(arguments) - set(parameters))
    if unknown or not tensors.refs:
        what = (f"arguments {unknown} kerasbn's translation does not take"
                if unknown else "no Keras tensor input")
        raise error(
            f"layer '{where}' calls tf.{function} with {what}: kerasbn "
            "cannot translate this call; save the model as a SavedModel "
            "(Keras 2 model.save(dir)), which kerasbn-fold folds at graph "
            "level")
    layer_config = {"name": config.get("name"), "trainable": False,
                    "function": function, "arguments": arguments}
    dtype = config.get("dtype")
    if isinstance(dtype, dict):  # Keras 2's mixed precision Policy
        dtype = (dtype.get("config") or {}).get("name")
    if dtype is not None:
        layer_config["dtype"] = dtype
    node = [ref + [{}] for ref in tensors.refs]
    return {"class_name": _CLASS, "config": layer_config,
            "name": entry.get("name", config.get("name")),
            "inbound_nodes": [node]}
