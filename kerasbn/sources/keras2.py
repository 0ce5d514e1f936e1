"""Keras 2 (tf.keras, tf-keras) HDF5 model files, loaded into Keras 3.

`keras.models.load_model("model.h5")` in Keras 3 refuses most real Keras 2
files: Keras 2 wrote arguments Keras 3 does not take. `load_h5(path)`
reads the file with h5py (read-only; the file is never written), translates
its model config, builds the Keras 3 model with Keras' legacy config
reader, and loads the weights itself, checking every one. The result
computes what the Keras 2 model computed in inference; each change of
meaning is reported as a one-line note.

The mappings (anything else Keras 3 refuses is a `Keras2Error` naming the
layer, the argument and its value):

- `groups=1` on DepthwiseConv1D/2D, SeparableConv1D/2D and the transposed
  convolutions (Keras 2 wrote its base class' default; Keras 3 has no
  `groups` there; another value is an error), and the
  `kernel_initializer`, `kernel_regularizer`, `kernel_constraint` Keras 2
  took on SeparableConv layers whatever their value (tf-keras' NASNet
  passes 'he_normal'; its separable convolutions have depthwise and
  pointwise kernels and never used them): dropped, noted.
- BatchNormalization `fused` (chose TensorFlow's kernel, not the maths):
  dropped, noted.
- BatchNormalization `renorm=True`: `kerasbn.layers.BatchRenormalization`
  with constant clipping (`warmup_steps=rmax_steps=dmax_steps=0`) at
  `renorm_clipping`'s values, and `renorm_momentum` kept. A key missing
  from `renorm_clipping` meant "no clip" in Keras 2; the layer takes finite
  bounds, so an unclipped `rmax` or `dmax` becomes float32's maximum and an
  unclipped `rmin` 0 (`r` is never negative): training clips at values it
  never reaches, exactly as Keras 2 did not clip, and inference (batch
  normalization on the moving statistics) is identical. The weights are
  matched by name and the layer's `renorm_step` counter starts at 0.
- BatchNormalization `virtual_batch_size=N` (ghost batch normalization) is
  mapped, with a note: inference is identical (Keras 2 normalized each
  ghost batch with the same moving statistics) but training in Keras 3
  normalizes over the whole batch. The axis Keras 2 saved counted the ghost
  dimension it inserted, so it is shifted back by one, and the weights it
  saved with that dimension's shape `(1, ..., C, ...)` are loaded as `(C,)`.
- BatchNormalization `adjustment`: tf-keras never saves it (a function it
  cannot serialize), so `None` is dropped silently and anything else is an
  error: it changed training only, but a file that holds one was not
  written by tf-keras.
- BatchNormalization `axis=[3]` becomes `3` (the same axis); several axes
  have no Keras 3 equivalent: an error.
- Format-only differences (no note): LeakyReLU's `alpha` is Keras 3's
  `negative_slope`; a mixed precision `Policy` becomes its name; the input
  shape Keras 2 kept on a layer built with `input_shape=` moves to an
  InputLayer (added in front of a Sequential model that has none); calls
  of a nested model are numbered from 0 (Keras 2 gave a model with an
  input a node of its own first); a model with one input or output takes
  and returns a tensor, not a list of one, as in Keras 2.
- Layer names Keras 3 refuses ('/': tf-keras' DenseNet and MobileNetV3
  write 'conv1/conv') are renamed '/' -> '_' (made unique) wherever the
  config references them, with a note; the weights, which the file keeps
  under the Keras 2 names, are matched by those.
- tf.keras' `TFOpLambda` / `SlicingOpLambda` (a TensorFlow function called
  on a Keras tensor: `x + 3.0`, `tf.nn.relu6(x)`, `tf.concat`, `x[:, 1:]`)
  becomes `kerasbn.layers.TFFunction`, the same function with its saved
  arguments computed by `keras.ops` (`kerasbn.sources._keras2_ops`); a
  function without a translation is an error naming it and the layer.
- The layer classes of tf-keras' own applications (ConvNeXt's LayerScale
  and StochasticDepth, InceptionResNetV2's CustomScaleLayer) are Keras 3's
  classes of the same name.
- Lambda layers (Python bytecode) are not loaded: an error that says to
  replace them by a custom layer.
- A class neither Keras nor `custom_objects` knows (a custom layer) is an
  error that says to pass the module defining it (`--custom-module`, or
  `custom_objects=` in Python). A registered Keras 2 name "package>Name"
  is also found as "Name" in `custom_objects`.

Weights follow Keras' legacy rule, positional per layer (trainable weights,
then the others) and checked for count and shape; mapped renorm layers are
matched by name, and a nested model's weights (saved in its own group, each
named "<layer>/<weight>:0") go to its layers by layer name. Any missing,
extra or misshapen weight is an error before any weight is assigned, so no
half-loaded model is ever returned.
"""

import copy
import json
import os
import re

import numpy as np

from kerasbn.sources import _keras2_ops

FLOAT32_MAX = float(np.finfo("float32").max)
_MODELS = ("Functional", "Model", "Sequential")
_RENORM_CLASS = "kerasbn>BatchRenormalization"
_NO_GROUPS = ("DepthwiseConv1D", "DepthwiseConv2D", "SeparableConv1D",
              "SeparableConv2D", "Conv1DTranspose", "Conv2DTranspose",
              "Conv3DTranspose")
_SEPARABLE = ("SeparableConv1D", "SeparableConv2D")


class Keras2Error(ValueError):
    """A Keras 2 file that cannot be loaded into Keras 3; one-line message
    naming what is wrong, the value seen and what to do."""


def load_h5(path, custom_objects=None):
    """The Keras 3 equivalent of the Keras 2 model in an HDF5 file.

    Args:
        path: A file written by Keras 2's `model.save("model.h5")`.
        custom_objects: `{name: class}` for the custom layers in the file.

    Returns:
        `(model, notes)`: a Keras 3 model whose inference outputs are the
        Keras 2 model's, and one line per mapping applied (module docstring),
        e.g. "layer 'dw': dropped Keras 2 argument groups=1 (DepthwiseConv2D
        has no groups in Keras 3)". `notes.renamed` maps each layer renamed
        for Keras 3 ('/' in its name) to its Keras 2 name.

    Raises:
        Keras2Error: The file is not a Keras 2 model file, or holds
            something without a Keras 3 equivalent (the message says what
            and what to do).
    """
    import keras

    import kerasbn.layers  # noqa: F401  (registers kerasbn's layers)
    from kerasbn import _keras_internal

    path = os.fspath(path)
    config, groups = _read_file(path)
    custom_objects = dict(custom_objects or {})
    notes = _Notes()
    config = _translate_model(config, "", notes, custom_objects,
                              top=True)
    notes.summarize()
    try:
        # Keras' reader edits the config it reads: give it a copy.
        model = _keras_internal.model_from_keras2_config(
            copy.deepcopy(config), custom_objects)
    except _keras_internal.KerasLayoutError:
        raise
    except Exception as error:  # Keras' reader raises many kinds.
        raise _build_error(path, config, error, custom_objects) from error
    if not isinstance(model, keras.Model):
        raise Keras2Error(
            f"{path} holds a single {type(model).__name__} layer, not a "
            "model: save the Keras 2 model that contains it")
    _assign(_match_model(model, groups, notes.renamed))
    return model, notes


_DROPPED = re.compile(r"^layer '([^']*)': (dropped Keras 2 .*)$", re.S)


class _Notes(list):
    """The translation's notes (a list of lines), and what it changed that
    the weights, the summary and the JSON report need: `renamed`
    (`{Keras 3 layer path: Keras 2 name}`) and `functions` (translated
    TFOpLambda calls per TensorFlow function)."""

    def __init__(self):
        super().__init__()
        self.renamed = {}
        self.functions = {}

    def summarize(self):
        # One line per kind of dropped argument, not one per layer (a
        # stock MobileNet drops groups=1 from 13 layers).
        dropped, kept = {}, []
        for note in self:
            found = _DROPPED.match(note)
            if found:
                if found.group(2) not in dropped:
                    kept.append(found.group(2))
                dropped.setdefault(found.group(2), []).append(found.group(1))
            else:
                kept.append(note)
        self[:] = [
            note if note not in dropped else (
                f"layer '{dropped[note][0]}': {note}"
                if len(dropped[note]) == 1 else
                f"{len(dropped[note])} layers ("
                + ", ".join(f"'{n}'" for n in dropped[note][:3])
                + (", ..." if len(dropped[note]) > 3 else "")
                + f"): {note}")
            for note in kept]
        if self.functions:
            shown = ", ".join(f"tf.{name} x{count}" for name, count in
                              sorted(self.functions.items()))
            self.append(
                f"{sum(self.functions.values())} TensorFlow function calls "
                "(tf-keras TFOpLambda) -> kerasbn.layers.TFFunction with "
                f"keras.ops: {shown}")


# --------------------------------------------------------------------------
# Reading the file (read-only).


def _read_file(path):
    """`(model config, {group name: [(weight name, array)]})` of `path`."""
    import h5py

    if os.path.isdir(path):
        raise Keras2Error(
            f"{path} is a directory, not an HDF5 file: pass the file Keras "
            "2's model.save('model.h5') wrote")
    if not os.path.isfile(path):
        raise Keras2Error(f"model file not found: {path}")
    if not h5py.is_hdf5(path):
        raise Keras2Error(
            f"{path} is not an HDF5 file: pass the file Keras 2's "
            "model.save('model.h5') wrote")
    try:
        with h5py.File(path, "r") as h5:
            raw = h5.attrs.get("model_config")
            if raw is None:
                raise Keras2Error(_no_config_message(path, h5))
            if "model_weights" not in h5:
                raise Keras2Error(
                    f"{path} has a model config but no 'model_weights' "
                    "group: save the model again with Keras 2's "
                    "model.save('model.h5')")
            groups = _read_weights(h5["model_weights"])
    except Keras2Error:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as error:
        # h5py's errors for a truncated or damaged file (bad superblock,
        # corrupt object header, unreadable dataset).
        reason = " ".join(str(error).split())[:200]
        raise Keras2Error(
            f"cannot read {path} as a Keras 2 HDF5 model (truncated or "
            f"corrupt?): {type(error).__name__}: {reason}") from None
    return _decode_config(path, raw), groups


def _no_config_message(path, h5):
    if "layer_names" in h5.attrs:
        return (
            f"{path} holds only weights (Keras 2's save_weights: "
            "'layer_names' but no 'model_config'): build the model in code, "
            f"call model.load_weights({path!r}), then model.save("
            "'model.keras') and pass that file")
    return (
        f"{path} is an HDF5 file without a Keras model config (attributes "
        f"{sorted(h5.attrs)}): pass the file Keras 2's model.save('model.h5') "
        "wrote")


def _text(value):
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _decode_config(path, raw):
    try:
        config = json.loads(_text(raw))
    except ValueError as error:
        raise Keras2Error(
            f"{path}: its 'model_config' attribute is not JSON ({error}): "
            "save the model again with Keras 2's model.save('model.h5')"
        ) from None
    if not isinstance(config, dict) or "class_name" not in config:
        raise Keras2Error(
            f"{path}: its 'model_config' is not a Keras model config "
            f"(starts {_text(raw)[:60]!r}): save the model again with Keras "
            "2's model.save('model.h5')")
    return config


def _attribute_list(group, name):
    """A list attribute, which Keras splits into `name0`, `name1`, ...
    when it is too large for one HDF5 attribute (64 kB)."""
    if name in group.attrs:
        return [_text(n) for n in group.attrs[name]]
    values, chunk = [], 0
    while f"{name}{chunk}" in group.attrs:
        values += [_text(n) for n in group.attrs[f"{name}{chunk}"]]
        chunk += 1
    return values


def _read_weights(model_weights):
    """Every layer group's `[(name, array)]`, in the file's order."""
    groups = {}
    # By the names Keras 2 listed: a layer named "conv1/conv" (tf-keras'
    # DenseNet) is the group model_weights["conv1"]["conv"] in HDF5.
    names = _attribute_list(model_weights, "layer_names") or list(
        model_weights)
    for name in names:
        group = model_weights.get(name)
        if group is not None and hasattr(group, "attrs"):
            groups[name] = [(n, np.asarray(group[n]))
                            for n in _attribute_list(group, "weight_names")]
    return groups


# --------------------------------------------------------------------------
# Translating the config.


def _translate_model(entry, prefix, notes, custom_objects, top=False):
    """A (nested) model's config entry with every layer translated."""
    config = entry.get("config")
    if entry.get("class_name") not in _MODELS or not isinstance(
            config, dict) or "layers" not in config:
        return _translate_layer(entry, prefix, notes, custom_objects)
    inner = "" if top else f"{prefix}{config.get('name', '?')}/"
    config = _rename_layers(config, inner, notes)
    layers = [_translate_model(layer, inner, notes, custom_objects)
              for layer in config["layers"]]
    layers = _split_hard_sigmoid(entry["class_name"], layers, inner, notes)
    layers = _input_shape_on_inputs(entry["class_name"], layers)
    config = dict(config, layers=layers)
    if entry["class_name"] != "Sequential":
        config = _single_input_output(_shift_model_nodes(config))
    return dict(entry, config=config)


# Keras 2's hard_sigmoid is clip(0.2 x + 0.5, 0, 1); Keras 3's, under the
# same name, is relu6(x + 3) / 6 = clip(x / 6 + 0.5, 0, 1): another function.
_HARD_SIGMOID = "hard_sigmoid"
_KERAS2_HARD_SIGMOID = "keras2.hard_sigmoid"


def _is_hard_sigmoid(value):
    if isinstance(value, dict):
        value = value.get("config") if value.get("class_name") in (
            "function", "builtins.function") else value.get("class_name")
    return value == _HARD_SIGMOID


def _hard_sigmoid_layer(name, dtype, inbound=None):
    entry = {"class_name": "kerasbn>TFFunction", "name": name, "config": {
        "name": name, "trainable": False, "dtype": dtype,
        "function": _KERAS2_HARD_SIGMOID,
        "arguments": {"x": {"__tensor__": 0}}}}
    if inbound is not None:
        entry["inbound_nodes"] = inbound
    return entry


def _split_hard_sigmoid(class_name, layers, inner, notes):
    """Layers with Keras 2's `hard_sigmoid` activation, which Keras 3 would
    read as its own, different function: an Activation layer becomes a
    TFFunction computing Keras 2's; another layer (Dense, Conv2D...) is
    renamed '<name>_preact' with activation='linear' and followed by that
    TFFunction under its own name, so every reference to it still holds.
    `hard_sigmoid` in another argument (an RNN's recurrent_activation) has
    no such split: an error."""
    names = {(layer.get("config") or {}).get("name") for layer in layers}
    result = []
    for layer in layers:
        config = layer.get("config") or {}
        name = config.get("name")
        others = [key for key, value in config.items()
                  if key != "activation" and key.endswith("activation")
                  and _is_hard_sigmoid(value)]
        if others:
            raise Keras2Error(
                f"layer '{inner}{name}': {others[0]}='hard_sigmoid' is "
                "Keras 2's clip(0.2 x + 0.5, 0, 1), which Keras 3's "
                "hard_sigmoid (relu6(x + 3) / 6) is not, and kerasbn cannot "
                f"split it out of a {layer.get('class_name')}: use "
                "'sigmoid' or a custom layer in Keras 2 and save again")
        if not _is_hard_sigmoid(config.get("activation")):
            result.append(layer)
            continue
        dtype = config.get("dtype", "float32")
        if layer.get("class_name") == "Activation":
            result.append(_hard_sigmoid_layer(name, dtype,
                                              layer.get("inbound_nodes")))
            notes.append(f"layer '{inner}{name}': Activation('hard_sigmoid') "
                         "-> kerasbn.layers.TFFunction computing Keras 2's "
                         "hard_sigmoid, clip(0.2 x + 0.5, 0, 1) (Keras 3's "
                         "is relu6(x + 3) / 6)")
            continue
        linear = f"{name}_preact"
        while linear in names:
            linear += "_"
        names.add(linear)
        notes.renamed[inner + linear] = notes.renamed.get(inner + name, name)
        result.append(dict(layer, config=dict(config, name=linear,
                                              activation="linear"),
                           **({"name": linear} if "name" in layer else {})))
        inbound = None
        if "inbound_nodes" in layer:
            inbound = [[[linear, k, 0, {}]]
                       for k in range(len(layer["inbound_nodes"]))]
        result.append(_hard_sigmoid_layer(name, dtype, inbound))
        notes.append(
            f"layer '{inner}{name}': activation='hard_sigmoid' split out as "
            f"'{inner}{linear}' (activation='linear') followed by "
            f"kerasbn.layers.TFFunction '{inner}{name}' computing Keras 2's "
            "hard_sigmoid, clip(0.2 x + 0.5, 0, 1) (Keras 3's is "
            "relu6(x + 3) / 6)")
    return result


def _valid_name(name):
    """A name Keras 3 takes for a layer ('/' is refused)."""
    return name.replace("/", "_")


def _rename_refs(data, mapping):
    """`data` with tensor references `[layer, node, tensor(, kwargs)]` to a
    layer of `mapping` renamed, at any depth (TFOpLambda keyword arguments
    hold references too)."""
    if isinstance(data, list):
        if (len(data) in (3, 4) and isinstance(data[0], str)
                and data[0] in mapping and isinstance(data[1], int)):
            return [mapping[data[0]]] + [_rename_refs(d, mapping)
                                         for d in data[1:]]
        return [_rename_refs(item, mapping) for item in data]
    if isinstance(data, dict):
        return {k: _rename_refs(v, mapping) for k, v in data.items()}
    return data


def _rename_layers(config, inner, notes):
    """A model config whose layer names Keras 3 refuses (tf-keras'
    DenseNet writes 'conv1/conv') are renamed, everywhere they are
    referenced, with a note giving both names; `notes.renamed` maps each
    Keras 3 path back to the Keras 2 name the file's weights carry."""
    names = [layer.get("config", {}).get("name")
             for layer in config["layers"]]
    taken = {name for name in names if isinstance(name, str)}
    mapping = {}
    for name in names:
        if not isinstance(name, str) or _valid_name(name) == name:
            continue
        new = _valid_name(name)
        while new in taken:
            new += "_"
        taken.add(new)
        mapping[name] = new
        notes.renamed[inner + new] = name
    if not mapping:
        return config
    shown = [f"'{inner}{old}' -> '{inner}{new}'"
             for old, new in list(mapping.items())[:3]]
    more = (f", ... ({len(mapping)} in all; the JSON report's "
            "source.renamed lists each)" if len(mapping) > 3 else "")
    notes.append(
        f"{len(mapping)} layer name(s) with '/' renamed, '/' -> '_' (Keras 3 "
        "refuses '/' in a layer name; the file's weights are matched by the "
        "Keras 2 names): " + ", ".join(shown) + more)
    layers = []
    for layer in config["layers"]:
        layer = dict(layer)
        name = (layer.get("config") or {}).get("name")
        if name in mapping:
            layer["config"] = dict(layer["config"], name=mapping[name])
            if "name" in layer:
                layer["name"] = mapping[name]
        if "inbound_nodes" in layer:
            layer["inbound_nodes"] = _rename_refs(layer["inbound_nodes"],
                                                  mapping)
        layers.append(layer)
    return dict(config, layers=layers, **{
        key: _rename_refs(config[key], mapping)
        for key in ("input_layers", "output_layers") if key in config})


def _single_input_output(config):
    """One input (output) as a tensor, not a list of one, as Keras 2 called
    and returned it (Keras 3 keeps the list and warns on a bare tensor)."""
    config = dict(config)
    for key in ("input_layers", "output_layers"):
        refs = config.get(key)
        if isinstance(refs, list) and len(refs) == 1 and isinstance(
                refs[0], list) and refs[0] and isinstance(refs[0][0], str):
            config[key] = refs[0]
    return config


def _has_own_node(entry):
    """Whether Keras 2 gave this nested model a node of its own.

    A Keras 2 model with a known input (a Functional, a Sequential with an
    Input) had node 0 linking its own input to its output, so its calls in
    the outer model were nodes 1, 2, ...; a Keras 3 model has no such node.
    """
    layers = (entry.get("config") or {}).get("layers")
    if entry.get("class_name") not in _MODELS or not layers:
        return False
    return (entry["class_name"] != "Sequential"
            or layers[0].get("class_name") == "InputLayer")


def _shift_refs(data, names):
    """Node references `[layer, node, tensor(, kwargs)]` in `data` to a
    layer in `names`, with the node index one lower."""
    if (isinstance(data, list) and len(data) in (3, 4)
            and isinstance(data[0], str) and isinstance(data[1], int)):
        if data[0] in names and data[1] > 0:
            return [data[0], data[1] - 1] + data[2:]
        return data
    if isinstance(data, list):
        return [_shift_refs(item, names) for item in data]
    return data


def _shift_model_nodes(config):
    """A Functional config whose references to nested models count their
    calls from 0, as Keras 3 does (see `_has_own_node`)."""
    nested = {layer["config"]["name"]: layer["class_name"]
              for layer in config["layers"] if _has_own_node(layer)}
    if not nested:
        return config
    layers = [dict(layer, inbound_nodes=_shift_refs(
        layer["inbound_nodes"], set(nested))) if "inbound_nodes" in layer
        else layer for layer in config["layers"]]
    # Keras 3's reader already shifts a nested Functional model named in
    # the outputs (not a Sequential one).
    sequential = {name for name, kind in nested.items()
                  if kind == "Sequential"}
    return dict(config, layers=layers, **{
        key: _shift_refs(config[key], sequential)
        for key in ("input_layers", "output_layers") if key in config})


def _without_input_shape(entry):
    return dict(entry, config={k: v for k, v in entry["config"].items()
                               if k != "batch_input_shape"})


def _input_shape_on_inputs(class_name, layers):
    """The layers with the input shape on an InputLayer only.

    Keras 2 kept `batch_input_shape` on a layer built with `input_shape=`;
    Keras 3 takes it (with a warning) but wants an Input. A Sequential
    model whose first layer carries it gets an InputLayer in front.
    """
    if not layers:
        return layers
    shape = layers[0].get("config", {}).get("batch_input_shape")
    layers = [layer if layer.get("class_name") == "InputLayer"
              or "batch_input_shape" not in layer.get("config", {})
              else _without_input_shape(layer) for layer in layers]
    if (class_name != "Sequential" or shape is None
            or layers[0].get("class_name") == "InputLayer"):
        return layers
    first = layers[0]["config"]
    dtype = first.get("dtype")  # a mixed precision policy is a dict
    inputs = {"class_name": "InputLayer", "config": {
        "batch_shape": shape,
        "dtype": dtype if isinstance(dtype, str) else "float32",
        "name": f"{first.get('name', 'sequential')}_input"}}
    return [inputs] + layers


def _layer_path(entry, prefix):
    return prefix + str(entry.get("config", {}).get("name", "?"))


def _translate_layer(entry, prefix, notes, custom_objects):
    """One layer's config entry, translated; records its notes."""
    where = _layer_path(entry, prefix)
    class_name = entry.get("class_name")
    if class_name in _keras2_ops.TF_OP_CLASSES and not _is_custom(
            class_name, custom_objects):
        translated = _keras2_ops.translate(where, entry, Keras2Error)
        function = translated["config"]["function"]
        notes.functions[function] = notes.functions.get(function, 0) + 1
        return translated
    _check_known(where, class_name, custom_objects)
    if class_name == "Lambda" and not _is_custom(class_name, custom_objects):
        raise Keras2Error(
            f"layer '{where}' is a Lambda layer, whose function Keras 2 "
            "saved as Python bytecode, which kerasbn does not run (unsafe, "
            "and tied to the Python that wrote it): replace it by a custom "
            "layer in Keras 2, save again and pass that layer's module with "
            "--custom-module")
    if _is_custom(class_name, custom_objects) or "config" not in entry:
        return entry  # A custom class reads its own config.
    config = dict(entry["config"])
    policy = config.get("dtype")
    if isinstance(policy, dict) and policy.get("class_name") == "Policy":
        # Keras 2's mixed precision policy; Keras 3 takes the policy name.
        config["dtype"] = (policy.get("config") or {}).get("name")
    if class_name in _NO_GROUPS:
        _drop_default(where, class_name, config, "groups", 1, notes,
                      f"{class_name} has no groups in Keras 3")
    if class_name in _SEPARABLE:
        _drop_separable_kernel_args(where, class_name, config, notes)
    if class_name == "LeakyReLU" and "alpha" in config:
        config.setdefault("negative_slope", config.pop("alpha"))
    entry = dict(entry, config=config)
    if class_name == "BatchNormalization":
        entry = _translate_batch_norm(where, entry, notes)
    return entry


def _is_custom(class_name, custom_objects):
    """Whether `custom_objects` gives a class other than Keras' own."""
    import keras

    cls = custom_objects.get(class_name)
    return cls is not None and cls is not getattr(keras.layers, class_name,
                                                  None)


def _check_known(where, class_name, custom_objects):
    """Raise Keras2Error unless Keras or `custom_objects` knows the class."""
    import keras

    from kerasbn import _keras_internal

    if not isinstance(class_name, str):
        raise Keras2Error(
            f"layer '{where}': its config has no class name (class_name="
            f"{class_name!r}): the file's model config is damaged; save the "
            "model again with Keras 2's model.save('model.h5')")
    if class_name in _MODELS or class_name in custom_objects:
        return
    short = class_name.split(">")[-1]
    if ">" in class_name and short in custom_objects:
        custom_objects[class_name] = custom_objects[short]
        return
    stock = _keras_internal.stock_application_layer(short)
    if stock is not None:
        # A layer class of tf-keras' own applications (ConvNeXt's
        # LayerScale, InceptionResNetV2's CustomScaleLayer): Keras 3's
        # applications define the same class, same config, same weights.
        custom_objects[class_name] = stock
        return
    known = getattr(keras.layers, class_name, None)
    if isinstance(known, type) and issubclass(known, keras.layers.Layer):
        return
    if keras.saving.get_registered_object(class_name) is not None:
        return
    raise Keras2Error(_unknown_class_message(where, class_name))


def _unknown_class_message(where, class_name):
    return (
        f"layer '{where}' has class '{class_name}', which is not a Keras 3 "
        "layer: pass the module that defines it (a Keras 3 version of the "
        f"class, named '{class_name.split('>')[-1]}' or registered as "
        f"'{class_name}') with --custom-module (Python: custom_objects=)")


def _drop_default(where, class_name, config, name, default, notes, why):
    """Drop Keras 2 argument `name` if it is at `default`, with a note."""
    if name not in config:
        return
    value = config.pop(name)
    if value != default:
        raise Keras2Error(
            f"layer '{where}': Keras 2 argument {name}={value!r} of "
            f"{class_name} has no Keras 3 equivalent ({why}, and only "
            f"{name}={default!r} means the same): rebuild the layer without "
            f"it in Keras 2 and save again")
    notes.append(f"layer '{where}': dropped Keras 2 argument {name}="
                 f"{value!r} ({why})")


def _drop_separable_kernel_args(where, class_name, config, notes):
    """Keras 2's SeparableConv layers took their base class' kernel
    arguments (tf-keras' NASNet passes kernel_initializer='he_normal') and
    never used them: the kernels are depthwise_kernel and pointwise_kernel,
    each with its own initializer, regularizer and constraint."""
    found = {name: config.pop(name) for name in (
        "kernel_initializer", "kernel_regularizer", "kernel_constraint")
        if name in config}
    found = {name: value for name, value in found.items()
             if value is not None}
    if not found:
        return
    shown = ", ".join(f"{name}={_short_repr(value)}"
                      for name, value in found.items())
    notes.append(
        f"layer '{where}': dropped Keras 2 arguments {shown} (Keras 2's "
        f"{class_name} never used them: its kernels are depthwise_kernel "
        "and pointwise_kernel)")


def _short_repr(value):
    """'HeNormal' for a serialized Keras object, else repr."""
    if isinstance(value, dict) and "class_name" in value:
        return str(value["class_name"])
    return repr(value)


# --------------------------------------------------------------------------
# BatchNormalization.


def _single_axis(where, axis):
    if isinstance(axis, list):
        if len(axis) != 1:
            raise Keras2Error(
                f"layer '{where}': BatchNormalization over several axes "
                f"(axis={axis!r}) has no Keras 3 equivalent (Keras 3 takes "
                "one axis): reshape so that the channels are one axis, in "
                "Keras 2, and save again")
        axis = axis[0]
    if isinstance(axis, bool) or not isinstance(axis, (int, float)) or (
            axis != int(axis)):
        raise Keras2Error(
            f"layer '{where}': BatchNormalization axis={axis!r} is not an "
            "axis: the file's model config is damaged; save the model again "
            "with Keras 2")
    return int(axis)


def _translate_batch_norm(where, entry, notes):
    config = entry["config"]
    if "axis" in config:
        config["axis"] = _single_axis(where, config["axis"])
    if "fused" in config:
        value = config.pop("fused")
        notes.append(
            f"layer '{where}': dropped Keras 2 argument fused={value!r} (it "
            "chose TensorFlow's kernel, not the computation)")
    adjustment = config.pop("adjustment", None)
    if adjustment is not None:
        raise Keras2Error(
            f"layer '{where}': BatchNormalization adjustment={adjustment!r} "
            "has no Keras 3 equivalent (tf-keras never saves one): rebuild "
            "the layer without it in Keras 2 and save again")
    ghost = config.pop("virtual_batch_size", None)
    if ghost is not None:
        _map_ghost_batch(where, config, ghost, notes)
    if config.get("renorm"):
        return _to_batch_renormalization(where, entry, notes)
    return entry


def _map_ghost_batch(where, config, ghost, notes):
    axis = config.get("axis", -1)
    if axis > 0:
        # tf-keras shifted its axis past the ghost dimension it inserted at
        # 1 when it built the layer; the saved config has the shifted axis.
        config["axis"] = axis - 1
    notes.append(
        f"layer '{where}': dropped Keras 2 argument virtual_batch_size="
        f"{ghost!r} (ghost batch normalization); inference is identical, "
        "training in Keras 3 normalizes over the whole batch")


def _clip_value(where, clipping, key, unclipped, low, high):
    value = clipping.get(key)
    if value is None:
        return unclipped
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            not low <= value <= high):
        raise Keras2Error(
            f"layer '{where}': renorm_clipping {key}={value!r} has no "
            "kerasbn.layers.BatchRenormalization equivalent (it takes "
            f"{key} in [{low:g}, {high:g}]): clip within that range in Keras "
            "2 and save again")
    return float(value)


def _to_batch_renormalization(where, entry, notes):
    config = dict(entry["config"])
    clipping = config.pop("renorm_clipping", None) or {}
    config.pop("renorm")
    unknown = sorted(set(clipping) - {"rmax", "rmin", "dmax"})
    if unknown or not isinstance(clipping, dict):
        raise Keras2Error(
            f"layer '{where}': renorm_clipping={clipping!r} has keys other "
            "than rmax, rmin, dmax: the file was not written by tf-keras; "
            "save the model again with Keras 2")
    config.update(
        rmax=_clip_value(where, clipping, "rmax", FLOAT32_MAX, 1.0,
                         FLOAT32_MAX),
        rmin=_clip_value(where, clipping, "rmin", 0.0, 0.0, 1.0),
        dmax=_clip_value(where, clipping, "dmax", FLOAT32_MAX, 0.0,
                         FLOAT32_MAX),
        warmup_steps=0, rmax_steps=0, dmax_steps=0)
    shown = ", ".join(
        f"{k}={config[k]:g}" + (" (unclipped in Keras 2)"
                                if clipping.get(k) is None else "")
        for k in ("rmax", "rmin", "dmax"))
    notes.append(
        f"layer '{where}': BatchNormalization(renorm=True) -> "
        f"kerasbn.layers.BatchRenormalization with constant clipping "
        f"{shown} (warmup_steps=rmax_steps=dmax_steps=0); inference is "
        "identical (training clips as Keras 2 did: float32's maximum, or 0 "
        "for rmin, is never reached)")
    entry = {k: v for k, v in entry.items()
             if k not in ("module", "registered_name")}
    return dict(entry, class_name=_RENORM_CLASS, config=config)


# --------------------------------------------------------------------------
# Building the model.


def _one_line(error, limit=300):
    text = " ".join(str(error).split())
    marker = "Exception encountered:"
    if marker in text:  # Keras repeats the whole config before it.
        text = text.split(marker)[-1].strip()
    return text if len(text) <= limit else text[:limit] + "..."


def _build_error(path, config, error, custom_objects):
    """Keras2Error for a translated config Keras 3 still refuses, naming
    the first layer it refuses and the arguments it does not take."""
    found = _first_refused_layer(config, "", custom_objects, top=True)
    if found is None:
        return Keras2Error(
            f"{path}: Keras 3 cannot build this Keras 2 model "
            f"({_one_line(error)}): save the model again with Keras 2, or "
            "report it to kerasbn")
    where, class_name, unknown, layer_error = found
    if unknown:
        shown = ", ".join(f"{k}={v!r}" for k, v in unknown.items())
        return Keras2Error(
            f"layer '{where}': Keras 2 argument(s) {shown} of {class_name} "
            f"have no Keras 3 equivalent (Keras 3's {class_name} does not "
            "take them): rebuild the layer without them in Keras 2 and save "
            "again, or report the argument to kerasbn")
    return Keras2Error(
        f"layer '{where}': Keras 3 cannot build {class_name} from its Keras "
        f"2 config ({_one_line(layer_error)}): rebuild the layer in Keras 2 "
        "and save again, or report it to kerasbn")


def _first_refused_layer(entry, prefix, custom_objects, top=False):
    """`(path, class name, {argument: value} Keras 3 does not take, error)`
    for the first layer Keras 3 cannot build on its own, or None."""
    from kerasbn import _keras_internal

    config = entry.get("config")
    if entry.get("class_name") in _MODELS and isinstance(config, dict) and (
            "layers" in config):
        inner = "" if top else f"{prefix}{config.get('name', '?')}/"
        for layer in config["layers"]:
            found = _first_refused_layer(layer, inner, custom_objects)
            if found is not None:
                return found
        return None
    try:
        _keras_internal.model_from_keras2_config(
            copy.deepcopy(entry), custom_objects)
    except Exception as error:  # noqa: BLE001 - reported, not swallowed.
        return (_layer_path(entry, prefix), entry.get("class_name"),
                _not_taken(entry, custom_objects), error)
    return None


def _not_taken(entry, custom_objects):
    """The config's arguments no `__init__` of the layer's class names."""
    import inspect

    import keras

    cls = keras.saving.get_registered_object(
        entry["class_name"], custom_objects, vars(keras.layers))
    if not isinstance(cls, type):
        return {}
    taken = {"input_shape", "input_dim", "batch_input_shape", "batch_size"}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is not None:
            taken.update(inspect.signature(init).parameters)
    return {k: v for k, v in (entry.get("config") or {}).items()
            if k not in taken}


# --------------------------------------------------------------------------
# Weights: every Keras 3 variable paired with its Keras 2 array first, then
# assigned, so that a mismatch leaves no half-loaded model.


def _short_name(weight_name):
    """'bn1/moving_mean:0' -> 'moving_mean'."""
    return weight_name.split("/")[-1].split(":")[0]


def _is_renorm(layer):
    from kerasbn.layers import BatchRenormalization

    return isinstance(layer, BatchRenormalization)


def _match_model(model, groups, renamed):
    """`[(variable, array)]` for every weight of `model`, from `groups`;
    `renamed` gives the Keras 2 name of each renamed layer by path."""
    from kerasbn import _keras_internal

    pairs, claimed = [], set()
    for layer in model.layers:
        if not layer.weights:
            continue
        name = renamed.get(layer.name, layer.name)
        if name not in groups:
            raise Keras2Error(
                f"layer '{name}' has {len(layer.weights)} weights but "
                "the file has no weights for it: the file's config and "
                "weights disagree; save the model again with Keras 2")
        claimed.add(name)
        entries = groups[name]
        if _keras_internal.is_graph_model(layer):
            pairs += _match_nested(layer, entries, f"{layer.name}/",
                                   renamed)
        else:
            pairs += _match_layer(layer, entries, name)
    extra = sorted(name for name, entries in groups.items()
                   if entries and name not in claimed)
    if extra:
        raise Keras2Error(
            f"the file has weights for {extra}, which the model built from "
            "its config does not have: the file's config and weights "
            "disagree; save the model again with Keras 2")
    return pairs


def _match_nested(model, entries, prefix, renamed):
    """Pairs for a nested model from its group's entries, by layer name.

    Keras 2 saved a nested model's weights in one group, ordered trainable
    first across its layers, each named "<layer>/<weight>:0"; the layers of
    models nested in it are in the same group.
    """
    pairs, left = [], list(entries)
    for layer, where in _leaf_layers(model, prefix):
        name = renamed.get(where, layer.name)
        own = [e for e in left if e[0].startswith(name + "/")]
        left = [e for e in left if not e[0].startswith(name + "/")]
        pairs += _match_layer(layer, own, where)
    if left:
        raise Keras2Error(
            f"nested model '{prefix.rstrip('/')}': the file has weights "
            f"{[name for name, _ in left]} that none of its layers has: the "
            "file's config and weights disagree; save the model again with "
            "Keras 2")
    return pairs


def _leaf_layers(model, prefix):
    """`(layer, path)` for the layers with weights in `model`, at any
    depth of nested models (a layer's own sublayers are its business)."""
    from kerasbn import _keras_internal

    for layer in model.layers:
        if _keras_internal.is_graph_model(layer):
            yield from _leaf_layers(layer, f"{prefix}{layer.name}/")
        elif layer.weights:
            yield layer, prefix + layer.name


def _match_layer(layer, entries, where):
    if _is_renorm(layer):
        return _match_by_name(layer, entries, where)
    variables = layer.trainable_weights + layer.non_trainable_weights
    if len(variables) != len(entries):
        raise Keras2Error(
            f"layer '{where}': the file has {len(entries)} weights "
            f"({[name for name, _ in entries]}) but the Keras 3 "
            f"{type(layer).__name__} has {len(variables)} "
            f"({[v.name for v in variables]}): the layer's Keras 3 "
            "equivalent holds different weights; pass a custom layer that "
            "matches with --custom-module")
    return [_pair(variable, name, array, layer, where)
            for variable, (name, array) in zip(variables, entries)]


def _match_by_name(layer, entries, where):
    """A BatchRenormalization's weights by name; `renorm_step` starts at 0."""
    by_name = {_short_name(name): (name, array) for name, array in entries}
    variables = {v.name: v for v in layer.weights if v.name != "renorm_step"}
    missing = sorted(set(variables) - set(by_name))
    extra = sorted(set(by_name) - set(variables))
    if missing or extra or len(by_name) != len(entries):
        raise Keras2Error(
            f"layer '{where}': the file's renorm weights "
            f"{[name for name, _ in entries]} do not match "
            f"BatchRenormalization's {sorted(variables)} (missing {missing}, "
            f"unexpected {extra}): save the model again with Keras 2")
    pairs = [_pair(v, *by_name[name], layer, where)
             for name, v in variables.items()]
    step = layer.renorm_step
    return pairs + [(step, np.zeros(step.shape, step.dtype))]


def _pair(variable, name, array, layer, where):
    """`(variable, array)`, the array reshaped where Keras 2 saved a ghost
    batch norm's weights with its extra dimensions of size 1."""
    import keras

    shape = tuple(variable.shape)
    if array.shape != shape and isinstance(
            layer, keras.layers.BatchNormalization) and (
            tuple(d for d in array.shape if d != 1)
            == tuple(d for d in shape if d != 1)):
        array = array.reshape(shape)
    if array.shape != shape:
        raise Keras2Error(
            f"layer '{where}': weight {name} has shape {array.shape} in the "
            f"file but {shape} in Keras 3 ({variable.name}): the file's "
            "config and weights disagree; save the model again with Keras 2")
    return variable, array


def _assign(pairs):
    for variable, array in pairs:
        variable.assign(array)
