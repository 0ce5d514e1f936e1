"""Write TensorFlow artifacts of a model that lives on another backend.

SavedModel, ONNX (tf2onnx) and TFLite are written from a `tf.function` of
the model, which only a Keras model on the TensorFlow backend can be
traced into. Keras fixes its backend when it is imported, so a JAX or
PyTorch process cannot trace its own model: `write` saves the (folded)
model as a `.keras` file, which is backend-neutral, and runs one Python
subprocess with `KERAS_BACKEND=tensorflow` that loads it and writes every
requested TensorFlow artifact with the same writers a TensorFlow process
uses (`kerasbn.exporting.formats`). The parent then verifies what was
written against the user's model in the user's own backend, as for any
export.

Why not Keras' own exporters: on JAX, `model.export` goes through jax2tf
and writes the whole model as one `XlaCallModule` op, which tf2onnx 1.17
cannot convert (checked: "pass1 convert failed ... XlaCallModule"), and
whose graph is opaque to a reader of the SavedModel; on PyTorch it writes
ONNX only. One TensorFlow rebuild gives every format, with the same
fold-aware writers (pad guard, grouped convolutions) and the same graphs
on every backend.

The artifacts serve under the names of the user's model, which the
parent reads (`ServingSignature`) and hands down: the reloaded model may
name things otherwise (an input made without `name=` is `keras_tensor_<n>`
in the user's process and takes its InputLayer's name, `input_layer_<n>`,
when a `.keras` file is loaded; an output BN that was folded away leaves
the output to its producer), and a TensorFlow process exporting the same
model would use the user's names. The child serves under those names after
checking that the reloaded model has the same inputs (shapes, dtypes) and
number of outputs.

The child needs every class of the model: classes from Keras and kerasbn
load by name, and a user's own layer class is imported from its module
(the parent's `sys.path` is handed down). A class defined in `__main__`
or in a notebook cannot be imported by another process; that is refused
before anything is written, with what to do.

Run as a module (`python -m kerasbn.exporting._tf_process REQUEST`), the
child reads the JSON request, writes, and answers in the JSON file the
request names.
"""

import json
import os
import subprocess
import sys

TENSORFLOW_FORMATS = ("saved_model", "onnx", "tflite", "onnx_int8",
                      "tflite_int8", "onnx_fp16", "tflite_fp16", "openvino")
# The reduced-precision options a writer reads (`formats`), handed down.
_REDUCED_OPTIONS = ("per_channel", "int8_io", "qat")
_OWN_PACKAGES = ("keras", "kerasbn", "keras_hub", "tf_keras")


def needed(model, formats):
    """The formats of `formats` that need the TensorFlow process."""
    import keras

    if keras.backend.backend() == "tensorflow" or not hasattr(model,
                                                              "save"):
        return []
    return [f for f in formats if f in TENSORFLOW_FORMATS]


def user_modules(model):
    """Modules the child must import for `model`'s own classes.

    Raises `ValueError` naming a layer whose class no other process can
    import (defined in `__main__` or an interactive session).
    """
    from kerasbn import _keras_internal

    modules = set()
    for layer in [model, *_keras_internal.sublayers(model)]:
        module = type(layer).__module__ or ""
        if module.split(".")[0] in _OWN_PACKAGES:
            continue
        if module == "__main__" or module.startswith("<"):
            raise ValueError(
                f"kerasbn.export: layer {layer.name!r} is an instance of "
                f"{type(layer).__name__}, defined in {module!r}. On the "
                "JAX and PyTorch backends the SavedModel, ONNX and TFLite "
                "artifacts are written by a TensorFlow subprocess that "
                "loads the model, and it cannot import a class from "
                "another process's __main__: move the class into a module "
                "(a .py file on sys.path) and import it from there, or "
                "export the keras format only."
            )
        modules.add(module)
    return sorted(modules)


def write(staging, targets, model, signature, opset, progress,
          reduced=None):
    """Write `targets` (`{format: staged path}`) in a TensorFlow process.

    `reduced`: the int8/float16 options (`_pipeline.reduced_options`);
    its calibration batches go to the child in a `.npz` file.
    Returns `{format: [notes]}`, the writers' notes. Raises `ValueError`
    for a model the child could not import (nothing started) and
    `RuntimeError` with the child's own error when a writer fails.
    """
    modules = user_modules(model)
    handoff = staging.new(os.path.join(".tensorflow", "model.keras"))
    model.save(handoff)
    answer = staging.new(os.path.join(".tensorflow", "answer.json"))
    request = {
        "model": handoff, "targets": targets, "opset": opset,
        "modules": modules, "answer": answer,
        "signature": signature.described(),
        "options": {k: v for k, v in (reduced or {}).items()
                    if k in _REDUCED_OPTIONS},
    }
    if (reduced or {}).get("calibration"):
        request["calibration"] = _hand_down(staging, reduced["calibration"])
    request_path = staging.new(os.path.join(".tensorflow", "request.json"))
    with open(request_path, "w") as f:
        json.dump(request, f)
    progress("writing " + ", ".join(targets)
             + " (in a TensorFlow subprocess: the model's backend is "
             f"{_backend()})")
    env = dict(os.environ, KERAS_BACKEND="tensorflow",
               PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    process = subprocess.run(
        [sys.executable, "-m", "kerasbn.exporting._tf_process",
         request_path], env=env, capture_output=True, text=True)
    return _read_answer(answer, process)


def _hand_down(staging, batches):
    """Save calibration batches for the child: `{path, batches, inputs}`."""
    import numpy as np

    path = staging.new(os.path.join(".tensorflow", "calibration.npz"))
    np.savez(path, **{f"b{i}_{k}": array for i, batch in enumerate(batches)
                      for k, array in enumerate(batch)})
    return {"path": path, "batches": len(batches),
            "inputs": len(batches[0])}


def _handed_down(calibration):
    """The calibration batches `_hand_down` saved."""
    import numpy as np

    with np.load(calibration["path"]) as arrays:
        return [[arrays[f"b{i}_{k}"] for k in range(calibration["inputs"])]
                for i in range(calibration["batches"])]


def _backend():
    import keras

    return keras.backend.backend()


def _read_answer(path, process):
    try:
        with open(path) as f:
            answer = json.load(f)
    except (OSError, ValueError):
        if process.returncode == -9:
            from kerasbn.exporting import _onnx_graph

            # Its output then ends wherever it was (a TensorFlow warning).
            raise RuntimeError(
                "the TensorFlow subprocess was killed (SIGKILL), as the "
                "system stops a process that runs out of memory; an export "
                "with ONNX needs about "
                f"{_onnx_graph.MEMORY_PER_WEIGHT_BYTE} bytes of memory per "
                "byte of weights") from None
        tail = (process.stderr or "").strip().splitlines()[-3:]
        raise RuntimeError(
            f"the TensorFlow subprocess exited with code "
            f"{process.returncode} without an answer: "
            + (" | ".join(tail) or "no output")
        ) from None
    if "error" in answer:
        raise RuntimeError(answer["error"])
    return answer["notes"]


def _serve(request):
    """The child's work: load, check the signature, write each format."""
    import importlib

    import keras

    from kerasbn.exporting._signature import ServingSignature
    from kerasbn.exporting.formats import FORMATS

    for module in request["modules"]:
        importlib.import_module(module)
    model = keras.saving.load_model(request["model"], compile=False,
                                    safe_mode=False)
    # The user's names, not the reloaded model's (`renamed`).
    try:
        signature = ServingSignature(model).renamed(request["signature"])
    except ValueError as error:
        raise RuntimeError(f"the model reloaded under TensorFlow is not "
                           f"the original: {error}") from None
    options = {"opset": request["opset"], **request.get("options", {})}
    if options.get("qat"):
        # The exporting constants of a QAT deployment model do not travel
        # in a .keras file: set them again (its fold is already done).
        from kerasbn.quantization import qat

        model = qat.deployment_model(model)
    if "calibration" in request:
        options["calibration"] = _handed_down(request["calibration"])
    notes = {}
    for fmt, path in request["targets"].items():
        said = FORMATS[fmt].write(path, model, signature, options)
        if said:
            notes[fmt] = list(said)
    return notes


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0]) as f:
        request = json.load(f)
    try:
        answer = {"notes": _serve(request)}
    except Exception as error:  # Reported to the parent, which raises.
        from kerasbn import _checks

        answer = {"error": f"{type(error).__name__}: "
                           f"{_checks.first_line(error, 600)}"}
    with open(request["answer"], "w") as f:
        json.dump(answer, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
