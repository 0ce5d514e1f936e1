"""Artifact formats: where each one goes, how it is written, how it is run.

Each format is a small object with three methods, kept in the ordered
registry `FORMATS` (SavedModel first: the other TensorFlow-based writers
trace the same serving function):

- `relpath(name, version)`: the artifact's path inside the export directory;
- `write(path, model, signature, options)`: write it (into a staging area);
- `run(path, signature, arrays)`: run it in its own runtime and return the
  flat list of outputs, in `signature.output_names` order;
- optionally `companions(name, version, options, directory)`: small files
  the artifact is served with (OpenVINO's `config.json`), as
  `[(relpath, bytes, conflict)]`, staged and committed with it.

Optional tool chains (tf2onnx, onnx, onnxruntime, openvino) are imported
only when their format is asked for, with an install hint if they are
missing.
"""

import collections
import contextlib
import importlib
import os
import warnings

import numpy as np


def _require(module, extra="onnx"):
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"Exporting this format needs the Python package {module!r}, "
            f"which is not installed ({error}). Install it with "
            f"`pip install \"kerasbn[{extra}]\"`."
        ) from error


class SavedModelFormat:
    """TF Serving layout: `saved_model/<name>/<version>/`, one signature
    (`serving_default`, or a graph source's own signature key)."""

    name = "saved_model"

    def relpath(self, name, version):
        return os.path.join("saved_model", name, str(version))

    def write(self, path, model, signature, options):
        import tensorflow as tf

        module = tf.Module()
        module.model = model  # tracks every variable the function reads
        module.serve = signature.serving_function(model)
        tf.saved_model.save(
            module, path,
            signatures={signature.signature_key:
                        module.serve.get_concrete_function()},
        )

    def run(self, path, signature, arrays):
        import tensorflow as tf

        loaded = tf.saved_model.load(path)
        fn = loaded.signatures[signature.signature_key]
        outputs = fn(**{n: tf.constant(a)
                        for n, a in zip(signature.input_names, arrays)})
        return [outputs[n].numpy() for n in signature.output_names]


class OnnxFormat:
    """ONNX through tf2onnx, checked with `onnx.checker(full_check=True)`."""

    name = "onnx"

    def relpath(self, name, version):
        return f"{name}.onnx"

    def write(self, path, model, signature, options):
        proto, notes = self.convert(model, signature, options.get("opset"))
        self.save(proto, path)
        return notes

    def convert(self, model, signature, opset):
        """`(ModelProto, notes)` of the model's serving function."""
        _require("tf2onnx")
        _require("onnx")
        from kerasbn.exporting import _onnx_graph

        proto, notes = _onnx_graph.convert(
            signature.serving_function(model), signature.input_specs, opset)
        notes += _onnx_graph.guard_pad_max_pool(proto)
        # tf2onnx lists a dict's outputs sorted by name; list them in the
        # model's own output order, as the SavedModel and Keras files do.
        order = {n: i for i, n in enumerate(signature.output_names)}
        outputs = sorted(proto.graph.output,
                         key=lambda o: order.get(o.name, len(order)))
        del proto.graph.output[:]
        proto.graph.output.extend(outputs)
        return proto, notes

    @staticmethod
    def save(proto, path):
        """Write `proto` to `path` (a staging directory's: the export
        removes it if anything fails), then check the file in full.

        Serialized once: the check reads the file, where checking the
        proto would serialize it once more for ONNX's C++ checker (a
        large model's weights again, at the export's peak of memory)."""
        onnx = _require("onnx")
        data = proto.SerializeToString()
        with open(path, "wb") as f:
            f.write(data)
        del data
        onnx.checker.check_model(path, full_check=True)

    def run(self, path, signature, arrays):
        ort = _require("onnxruntime")
        session = ort.InferenceSession(path,
                                       providers=["CPUExecutionProvider"])
        return session.run(signature.output_names, signature.feeds(arrays))


class KerasFormat:
    """The (folded) Keras model as a `.keras` file."""

    name = "keras"

    def relpath(self, name, version):
        return f"{name}.keras"

    def write(self, path, model, signature, options):
        model.save(path)

    def run(self, path, signature, arrays):
        import keras

        loaded = keras.models.load_model(path)
        outputs = loaded(signature.pack(arrays), training=False)
        return [np.asarray(keras.ops.convert_to_numpy(t))
                for t in keras.tree.flatten(outputs)]


class TFLiteFormat:
    """TensorFlow Lite flatbuffer (float32, no quantization).

    Keras 3 variables reach the converter as resource variables that the
    TFLite interpreter cannot read, so the serving function is frozen
    (variables turned into constants) first. Frozen functions carry no
    signature: outputs are returned as a tuple in `output_names` order and
    inputs are matched by name.
    """

    name = "tflite"

    def relpath(self, name, version):
        return f"{name}.tflite"

    def write(self, path, model, signature, options):
        import tensorflow as tf

        from kerasbn import _keras_internal

        serve = signature.serving_function(model, named_outputs=False)
        frozen = _keras_internal.freeze_concrete_function(
            serve.get_concrete_function())
        converter = tf.lite.TFLiteConverter.from_concrete_functions([frozen])
        self.configure(converter, options)
        with open(path, "wb") as f:
            f.write(converter.convert())

    def configure(self, converter, options):
        """Set the converter's options (none for float32)."""

    def run(self, path, signature, arrays):
        import tensorflow as tf

        with warnings.catch_warnings():
            # tf.lite.Interpreter announces its move to ai_edge_litert.
            warnings.simplefilter("ignore", UserWarning)
            interpreter = tf.lite.Interpreter(model_path=path)
        details = interpreter.get_input_details()
        by_name = {d["name"]: d for d in details}
        ordered = [by_name.get(n, d)
                   for n, d in zip(signature.input_names, details)]
        for detail, array in zip(ordered, arrays):
            interpreter.resize_tensor_input(detail["index"], array.shape)
        interpreter.allocate_tensors()
        for detail, array in zip(ordered, arrays):
            interpreter.set_tensor(detail["index"], _to_io(detail, array))
        interpreter.invoke()
        return [_from_io(d, interpreter.get_tensor(d["index"]))
                for d in interpreter.get_output_details()]


def _to_io(detail, array):
    """`array` as the interpreter's input type: quantized with the tensor's
    own scale and zero point where the input is integer (`int8_io`)."""
    dtype = detail["dtype"]
    if np.issubdtype(dtype, np.integer) and np.issubdtype(array.dtype,
                                                          np.floating):
        scale, zero = detail["quantization"]
        info = np.iinfo(dtype)
        array = np.clip(np.round(array / scale) + zero, info.min, info.max)
    return array.astype(dtype)


def _from_io(detail, array):
    if np.issubdtype(array.dtype, np.integer) and detail["quantization"][0]:
        scale, zero = detail["quantization"]
        return (array.astype(np.float32) - zero) * scale
    return array


class OnnxFp16Format(OnnxFormat):
    """The ONNX graph with weights and compute in float16, float32 inputs
    and outputs (ONNX Runtime's `convert_float_to_float16`,
    `keep_io_types=True`)."""

    name = "onnx_fp16"

    def relpath(self, name, version):
        return f"{name}_fp16.onnx"

    def write(self, path, model, signature, options):
        onnx = _require("onnx")
        float16 = _require("onnxruntime.transformers.float16")
        notes = super().write(path, model, signature, options)
        half = float16.convert_float_to_float16(
            onnx.load(path), keep_io_types=True)
        onnx.save(half, path)
        return notes


class OnnxInt8Format(OnnxFormat):
    """QDQ int8 ONNX from ONNX Runtime's `quantize_static`: int8 weights
    (per output channel by default), uint8 activations with ranges from
    the calibration batches (MinMax), float32 inputs and outputs."""

    name = "onnx_int8"

    def relpath(self, name, version):
        return f"{name}_int8.onnx"

    def write(self, path, model, signature, options):
        if options.get("qat"):
            # A QAT model's graph holds its own fake-quant ops with the
            # learned ranges: tf2onnx writes the activations' as
            # Quantize/DequantizeLinear pairs, and `_qdq` stores the
            # kernels (on their grid) as integer codes. No calibration.
            return self._write_qat(path, model, signature, options)
        quantization = _require("onnxruntime.quantization")
        notes = super().write(path, model, signature, options)
        source = path + ".float.onnx"
        os.replace(path, source)
        batches = iter(options["calibration"])

        class Reader(quantization.CalibrationDataReader):
            def get_next(self):
                batch = next(batches, None)
                return None if batch is None else signature.feeds(batch)

        try:
            quantization.quantize_static(
                source, path, Reader(),
                quant_format=quantization.QuantFormat.QDQ,
                per_channel=options.get("per_channel", True),
                activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8)
        finally:
            os.remove(source)
        return notes

    def _write_qat(self, path, model, signature, options):
        _require("onnx")
        from onnx import version_converter
        from tf2onnx import constants

        from kerasbn.exporting import _qdq

        # INT4 kernels need opset 21, past tf2onnx's newest: convert at
        # the newest it writes, then move the graph up (its ops are the
        # same from there on; Quantize/DequantizeLinear gained types).
        opset = options.get("opset")
        newest = max(constants.OPSET_TO_IR_VERSION)
        proto, notes = self.convert(model, signature,
                                    min(opset, newest) if opset else opset)
        if opset and opset > newest:
            proto = version_converter.convert_version(proto, opset)
            notes.append(f"converted at opset {newest} (tf2onnx's newest), "
                         f"then moved to opset {opset}")
        count, left = _qdq.integer_weights(proto, int(options["qat"]))
        if left:
            raise ValueError(
                f"{left} convolution kernel(s) of layers prepare_qat left "
                "float (its summary_qat and warning name them) sit between "
                "quantized tensors, where ONNX Runtime and OpenVINO quantize "
                "float kernels on their own: the artifact would not compute "
                "the QAT model. Export tflite_int8 (it keeps them float), or "
                "make the layers quantizable (channels_last, not nested)")
        self.save(proto, path)
        notes.append(f"{count} kernel(s) stored as {options['qat']}-bit "
                     "integer codes with the QAT model's scales")
        return notes


class TFLiteFp16Format(TFLiteFormat):
    """TFLite with float16 weights (the converter's float16 quantization);
    inputs and outputs stay float32, and runtimes with float16 kernels (GPU
    delegates) compute in float16."""

    name = "tflite_fp16"

    def relpath(self, name, version):
        return f"{name}_fp16.tflite"

    def configure(self, converter, options):
        import tensorflow as tf

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]


class TFLiteInt8Format(TFLiteFormat):
    """Full-integer TFLite (int8 weights per channel, int8 activations with
    ranges from the calibration batches); float32 inputs and outputs, or
    int8 ones with `int8_io` (then `run` quantizes and dequantizes with
    the tensors' own scale and zero point)."""

    name = "tflite_int8"

    def relpath(self, name, version):
        return f"{name}_int8.tflite"

    def configure(self, converter, options):
        import tensorflow as tf

        if options.get("qat"):
            # The converter reads the QAT graph's fake-quant ops as the
            # quantization: integer kernels with the learned ranges.
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            return
        batches = options["calibration"]

        def representative():
            for batch in batches:
                for i in range(batch[0].shape[0]):
                    yield [a[i:i + 1] for a in batch]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        converter.target_spec.supported_ops = [
            tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if options.get("int8_io"):
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8


class OpenVinoFormat(OnnxFormat):
    """OpenVINO IR (`model.xml` + `model.bin`) in OpenVINO Model Server's
    layout, `openvino/<name>/<version>/`, beside a `config.json` in
    `openvino/<name>/` whose `plugin_config` pins the execution precision.

    Written from the verified ONNX graph (OpenVINO's ONNX front end is its
    most complete and the graph is the one ONNX Runtime runs; the IR keeps
    its input/output names and dynamic batch), with float32 weights
    (`save_model(compress_to_fp16=False)`: OpenVINO's default stores them
    in float16). An IR cannot carry its execution precision (its
    `rt_info` runtime options are ignored by `compile_model`), and
    OpenVINO's CPU plugin runs float32 models in bfloat16 where the CPU
    has AVX512-BF16 or AMX: the precision is a compile (server) setting,
    hence the `config.json`. `run` compiles with that file's
    `plugin_config`; `run_at_defaults` with none, as a server without it
    would.
    """

    name = "openvino"
    # `openvino_precision` -> the plugin configuration that pins it.
    PRECISIONS = {"f32": {"INFERENCE_PRECISION_HINT": "f32"},
                  "bf16": {"INFERENCE_PRECISION_HINT": "bf16"}}

    def relpath(self, name, version):
        return os.path.join("openvino", name, str(version))

    def companions(self, name, version, options, directory):
        """`[(relpath, bytes, conflict)]` written beside the IR: the model
        server's `config.json` (base path relative to it, as OVMS resolves
        it).

        An existing `config.json` in `directory` is updated, not replaced:
        its other settings (`nireq`, `model_version_policy`, other
        `plugin_config` keys, other models) stay. `conflict` is None when
        the update changes nothing the file already pinned, else why it
        needs `overwrite`: the precision applies to every version of the
        model, not only to the one being exported.
        """
        import json

        relpath = os.path.join("openvino", name, "config.json")
        path = os.path.join(directory, relpath)
        want = self.PRECISIONS[options.get("openvino_precision", "f32")]
        entry = {"name": name, "base_path": ".", "plugin_config": dict(want)}
        if not os.path.lexists(path):
            return [(relpath, _json_bytes(
                {"model_config_list": [{"config": entry}]}), None)]
        try:
            with open(path, "rb") as f:
                original = f.read()
            existing = json.loads(original)
            mine = [item["config"] for item in existing["model_config_list"]
                    if item["config"].get("name") == name]
        except (OSError, ValueError, KeyError, TypeError,
                AttributeError) as error:
            return [(relpath, _json_bytes(
                {"model_config_list": [{"config": entry}]}),
                f"{path} exists and is not one kerasbn can update "
                f"({type(error).__name__}: {error}), so it would be "
                "replaced")]
        if not mine:
            existing["model_config_list"].append({"config": entry})
            return [(relpath, _json_bytes(existing), None)]
        pinned = {}
        for config in mine:
            plugin = config.setdefault("plugin_config", {})
            pinned[str(self.pinned(plugin))] = True
            plugin.update(want)
        have = list(pinned)
        if have == [want["INFERENCE_PRECISION_HINT"]]:
            return [(relpath, original, None)]  # Already pinned: unchanged.
        versions = sorted(
            (d for d in os.listdir(os.path.dirname(path)) if d.isdigit()),
            key=int)
        said = ("no precision (OpenVINO's defaults)" if have == ["None"]
                else " / ".join(have))
        return [(relpath, _json_bytes(existing),
                 f"{path} pins {said} for every version of {name!r} "
                 f"(versions there: {', '.join(versions) or 'none'}) and "
                 f"this export pins {want['INFERENCE_PRECISION_HINT']}")]

    @staticmethod
    def pinned(plugin_config):
        """The precision a `plugin_config` pins: its
        INFERENCE_PRECISION_HINT, "f32" for EXECUTION_MODE_HINT=ACCURACY
        alone (OpenVINO then keeps float32), else None (the defaults)."""
        hint = plugin_config.get("INFERENCE_PRECISION_HINT")
        if hint is None and str(plugin_config.get(
                "EXECUTION_MODE_HINT", "")).upper() == "ACCURACY":
            return "f32"
        return hint

    def write(self, path, model, signature, options):
        ov = _require("openvino", "openvino")
        os.makedirs(path, exist_ok=True)
        source = path + ".onnx"
        try:
            notes = super().write(source, model, signature, options)
            ir = ov.convert_model(source)
            ov.save_model(ir, os.path.join(path, "model.xml"),
                          compress_to_fp16=False)
        finally:
            if os.path.exists(source):
                os.remove(source)
        return notes

    def plugin_config(self, path):
        """The `plugin_config` of the `config.json` beside the IR at
        `path` (a version directory)."""
        import json

        with open(os.path.join(os.path.dirname(path), "config.json")) as f:
            return json.load(f)["model_config_list"][0]["config"][
                "plugin_config"]

    def run(self, path, signature, arrays):
        return self.run_configured(path, signature, arrays)[0]

    def run_configured(self, path, signature, arrays):
        """`(outputs, precision)` compiled with the `config.json`'s
        `plugin_config`, as the model server runs it (the plugin reads
        "dynamic" under EXECUTION_MODE_HINT=ACCURACY, which keeps f32)."""
        config = self.plugin_config(path)
        outputs, precision = self.run_with(path, signature, arrays, config)
        if precision == "dynamic" and self.pinned(config) == "f32":
            precision = "f32"
        return outputs, precision

    def run_at_defaults(self, path, signature, arrays):
        """`(outputs, precision)` compiled with no configuration, as a
        server without the `config.json` runs it; `precision` is the
        plugin's own answer ("bf16", "f32", ...)."""
        return self.run_with(path, signature, arrays, {})

    def run_with(self, path, signature, arrays, config):
        """`(outputs, precision)` compiled with `config`."""
        return infer_openvino(os.path.join(path, "model.xml"),
                              signature.output_names,
                              signature.feeds(arrays), config)


def _json_bytes(config):
    import json

    return (json.dumps(config, indent=2) + "\n").encode()


@contextlib.contextmanager
def openvino_compiled(model, config):
    """`model` (an IR `.xml` or an `.onnx` path) compiled once in OpenVINO's
    CPU plugin with `config`: yields `(run, precision)`, where
    `run(output_names, feeds)` gives the outputs in `output_names` order
    and `precision` is the inference precision the plugin reports.

    Nothing of OpenVINO outlives the block (README: Limits, signals). No
    gc.collect() here: a Ctrl-C the CLI turns into an exception would be
    swallowed inside another library's garbage-collection callback.
    """
    ov = _require("openvino", "openvino")
    core = ov.Core()
    compiled = core.compile_model(model, "CPU", config)
    request = compiled.create_infer_request()

    def run(output_names, feeds):
        results = request.infer(feeds)
        return [np.array(results[compiled.output(n)]) for n in output_names]

    try:
        yield run, compiled.get_property(
            "INFERENCE_PRECISION_HINT").get_type_name()
    finally:
        del run, request, compiled, core


def infer_openvino(model, output_names, feeds, config):
    """`(outputs, precision)` of one run of `model` compiled with `config`
    (`openvino_compiled`)."""
    with openvino_compiled(model, config) as (run, precision):
        return run(output_names, feeds), precision


FORMATS = collections.OrderedDict(
    (f.name, f) for f in (SavedModelFormat(), OnnxFormat(), KerasFormat(),
                          TFLiteFormat(), OnnxInt8Format(), OnnxFp16Format(),
                          TFLiteInt8Format(), TFLiteFp16Format(),
                          OpenVinoFormat())
)


def newest_onnx_opset():
    """The newest ONNX opset the installed tool chain can write.

    The newest that both tf2onnx (its `constants.OPSET_TO_IR_VERSION`
    table) and the installed onnx package (`onnx.defs.onnx_opset_version()`)
    know. Imports tf2onnx, and with it TensorFlow.
    """
    _require("tf2onnx")
    onnx = _require("onnx")
    constants = importlib.import_module("tf2onnx.constants")
    return min(max(constants.OPSET_TO_IR_VERSION),
               onnx.defs.onnx_opset_version())


def onnx_op_census(path):
    """Counts of each ONNX op type in the model at `path`."""
    onnx = _require("onnx")
    graph = onnx.load(path).graph
    return dict(collections.Counter(node.op_type for node in graph.node))
