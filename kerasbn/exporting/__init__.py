"""Export a (folded) Keras model to deployable artifacts, verified.

`export(model, directory)` folds the model's batch normalization away
(`kerasbn.fold`), writes each requested format into a staging directory
beside `directory` (`_staging`), runs every staged artifact in its own
runtime on the same inputs at two batch sizes, compares with the ORIGINAL
model in inference mode, and only then moves the artifacts into place.
`kerasbn.export` is `kerasbn.exporting.export`. A failure at any stage
(conversion, a runtime error, an error past tolerance, an interrupt)
leaves `directory` as it was.

Every Keras backend exports: on JAX and PyTorch the folded model is
saved as `.keras` and a TensorFlow subprocess writes the SavedModel, ONNX
and TFLite artifacts from it (`_tf_process`); they are verified here
against the user's model in its own backend.

Importing this package does not import TensorFlow: the steps that need it
(`_pipeline`) load on the first export, so `kerasbn-fold` checks its
arguments first.

Layout (`name` defaults to the model's name, `version` to 1):

    <directory>/saved_model/<name>/<version>/   TF Serving, `serving_default`
    <directory>/<name>.onnx                     tf2onnx, dynamic batch
    <directory>/<name>.keras                    the folded Keras model
    <directory>/<name>.tflite                   optional
    <directory>/openvino/<name>/<version>/      OpenVINO IR, model.xml/.bin
    <directory>/openvino/<name>/config.json     its OpenVINO Model Server
                                                configuration (precision)

>>> import keras, kerasbn, tempfile
>>> inputs = keras.Input((8,), name="features")
>>> h = keras.layers.Dense(4, name="hidden")(inputs)
>>> outputs = kerasbn.layers.BatchNormalization(name="bn")(h)
>>> model = keras.Model(inputs, outputs, name="tiny")
>>> result = kerasbn.export(model, tempfile.mkdtemp(), formats=["keras"])
>>> result.passed, sorted(result.artifacts)
(True, ['keras'])
"""

import os
import warnings

from kerasbn.exporting import _staging
from kerasbn.exporting._options import COMMIT_STAGE
from kerasbn.exporting._options import DEFAULT_FORMATS
from kerasbn.exporting._options import DEFAULT_OPSET
from kerasbn.exporting._options import DEFAULT_RTOL
from kerasbn.exporting._result import ExportError
from kerasbn.exporting._result import ExportResult
from kerasbn.exporting._result import VerificationError
from kerasbn.exporting.formats import FORMATS

__all__ = ["export", "fold_saved_model", "ExportResult", "ExportError",
           "VerificationError", "FORMATS"]

GRAPH_FORMATS = ("saved_model", "onnx")


def export(model, directory, formats=DEFAULT_FORMATS, *, fold=True,
           keep_bn=False, sample=None, verify=True, name=None, version=1,
           opset=DEFAULT_OPSET, rtol=DEFAULT_RTOL, batch_sizes=(1, 4),
           overwrite=False, progress=None, calibration=None,
           validation=None, min_agreement=0.98, max_rel_rms=None,
           per_channel=True, int8_io=False, equalize=False,
           precision="float32", openvino_precision="f32"):
    """Fold, export and verify `model`; returns an `ExportResult`.

    Args:
        model: A built Keras model (Functional, Sequential, or nested), on
            any Keras backend. It is never modified. On JAX and PyTorch
            the TensorFlow artifacts are written by a TensorFlow subprocess
            (a few seconds more), which must be able to import the
            model's own layer classes (not from `__main__`).
        directory: Export directory; created if missing.
        formats: Iterable (or comma-separated string) of `"saved_model"`,
            `"onnx"`, `"keras"`, `"tflite"`, and the reduced-precision
            `"onnx_int8"`, `"tflite_int8"` (need `calibration`),
            `"onnx_fp16"`, `"tflite_fp16"` (written beside the float ones
            as `<name>_int8.onnx` etc.).
        fold: Fold batch normalization first (`kerasbn.fold`).
        keep_bn: With `fold`, keep the BN layers that cannot be folded as
            they are instead of replacing them with a fixed scale-and-shift.
        sample: Inputs to verify on (an array, a list/tuple in the model's
            input order, or a dict by input name: a key that names no
            input is refused, except "arr_0" or "x" as the only key of a
            one-input model's, e.g. `dict(np.load(path))` of
            `np.savez(path, array)`), all finite. The first
            sample and the whole sample make the two batch sizes. Default:
            random inputs of the model's shapes at `batch_sizes`.
        verify: Run every artifact in its own runtime and compare it with
            the original model in inference mode; raises
            `VerificationError` past `rtol` and writes nothing.
        name: Artifact name (default: the model's name).
        version: The version directory of the SavedModel (TF Serving) and
            OpenVINO (Model Server) layouts (default 1).
        opset: ONNX opset for tf2onnx, from 7 to the newest the installed
            tf2onnx writes (18 for tf2onnx 1.17); None: tf2onnx's default.
        rtol: Allowed max abs error as a fraction of max |reference output|.
        batch_sizes: The two batch sizes of generated verification inputs.
        overwrite: Replace existing artifacts of the same paths. Without
            it an existing path is an error and nothing is written.
        progress: Optional callable taking one short string per stage
            (the CLI prints them). If it raises, the export stops and
            writes nothing.
        calibration: Representative inputs for the int8 formats'
            activation ranges: arrays (one, a list in input order, or a
            dict by input name) or a tf.data.Dataset / generator of
            batches (`(x, y)` gives `x`). All finite, a few hundred
            samples. The model is folded before it is quantized.
        validation: Inputs the reduced-precision artifacts are checked
            on (default: the calibration data; for fp16 alone, `sample`
            or the random verification inputs). At most 2048 samples are
            used.
        min_agreement: Least share of samples whose top-1 class (for
            `[batch, classes]` outputs) the artifact gives as the float
            model does.
        max_rel_rms: Largest RMS(artifact - float) / RMS(float) of any
            output (default 0.1 for int8, 0.01 for float16).
        per_channel: int8 ONNX weights with one scale per output channel
            (False: one per tensor).
        int8_io: The int8 TFLite takes and returns int8 tensors (with the
            scale and zero point in its tensor details).
        equalize: After folding, even out the channel ranges of
            consecutive layers (`kerasbn.equalize`, cross-layer
            equalization: exact in float, so every format still verifies).
            Worth it for per-tensor int8 (`per_channel=False`).
        precision: What a model trained in mixed precision (a
            "mixed_float16" or "mixed_bfloat16" policy) computes in once
            exported. "float32" (default): its float32 twin (same
            weights, every layer in float32) is folded and exported, and
            every artifact is checked against that twin at `rtol`; the gap
            between the user's mixed model and the twin is reported
            (`ExportResult.precision`). "policy": the folded model keeps
            its compute dtype (float16 SavedModel / ONNX / TFLite; bfloat16
            is refused for the formats whose runtimes do not run it) and
            is checked against the twin at a bound derived from the
            measured gap of the unfolded mixed model (stated in the
            result). Models without a reduced-precision policy ignore it.
        openvino_precision: What the `"openvino"` artifact's
            `config.json` pins OpenVINO's CPU plugin to: "f32" (default;
            verified at `rtol`) or "bf16" (faster on CPUs with AVX512-BF16
            or AMX; verified at the stated bfloat16 bound,
            `_openvino.BF16_RTOL`, and at f32 to `rtol`). Either way the
            IR is also run at OpenVINO's plain defaults, and the result
            says (and warns) when they change the numbers past the
            artifact's bound.

    Returns:
        `ExportResult`.

    Raises:
        TypeError, ValueError: a bad argument (nothing written).
        ExportError: a path exists, the directory is not writable, or a
            writer or a runtime failed (nothing written).
        VerificationError: an artifact is off past `rtol` (nothing written).

    >>> import keras, numpy as np, kerasbn, os, tempfile
    >>> inputs = keras.Input((3,), name="x")
    >>> hidden = keras.layers.Dense(2, name="dense")(inputs)
    >>> outputs = keras.layers.BatchNormalization(name="bn")(hidden)
    >>> model = keras.Model(inputs, outputs, name="net")
    >>> directory = tempfile.mkdtemp()
    >>> result = kerasbn.export(model, directory, formats=["keras"],
    ...                         sample=np.ones((2, 3), "float32"))
    >>> os.listdir(directory), [c["batch"] for c in result.checks]
    (['net.keras'], [1, 2])
    >>> loaded = keras.saving.load_model(result.artifacts["keras"])
    >>> [layer.name for layer in loaded.layers]   # "bn" is folded away
    ['x', 'dense']
    """
    # Keras and TensorFlow load here, on the first export (see above).
    from kerasbn.exporting import _pipeline as steps
    from kerasbn import _models
    from kerasbn.exporting import _precision
    from kerasbn.exporting._signature import ServingSignature

    progress = progress or _quiet
    formats, name = steps.check_arguments(
        model, directory, formats, name, version, opset, rtol, batch_sizes)
    directory = os.path.abspath(os.fspath(directory))
    signature = ServingSignature(model)
    inputs = steps.verification_inputs(signature, sample, batch_sizes, verify)
    qat = steps.check_qat(model, formats, calibration, fold, equalize,
                          int8_io, opset, per_channel)
    reduced = steps.reduced_options(
        model, signature, formats, calibration, validation, inputs, verify,
        min_agreement, max_rel_rms, per_channel, int8_io, equalize, qat)
    reduced.update(steps.openvino_options(formats, openvino_precision))
    targets = _plan_targets(directory, formats, name, version, overwrite,
                            reduced)
    # A mixed-precision model is checked against (and, by default,
    # exported as) its float32 twin: `_precision`.
    exported, meaning, precision = _precision.plan(
        model, precision, formats, progress)
    # What the float32 model means, also on GPUs that default to TF32.
    with _models.full_float32():
        references = [steps.reference_outputs(meaning, signature, arrays)
                      for arrays in inputs]
        if precision is not None:
            rtol = _precision.measure(precision, model, signature, inputs,
                                      references, rtol)
        if reduced.get("validation"):
            reduced["references"] = steps.in_chunks(
                lambda flat: steps.reference_outputs(meaning, signature,
                                                     flat),
                reduced["validation"])
    deployable, fold_report = steps.fold_for_export(exported, fold, keep_bn,
                                                    progress, qat)
    notes = {"signature": signature.name_changes} if (
        signature.name_changes) else {}
    if equalize:
        deployable, notes["equalize"] = steps.equalize_for_export(
            deployable, progress)
    try:
        return _write_verified(directory, targets, deployable, signature,
                               inputs, references, fold_report, opset, rtol,
                               progress, overwrite, notes, reduced, precision)
    except ExportError as error:
        clearer = _precision.policy_write_error(precision, error)
        if clearer is None:
            raise
        raise clearer from error


def fold_saved_model(source, directory, formats=GRAPH_FORMATS, *,
                     signature="serving_default", fold=True, sample=None,
                     verify=True, name=None, version=1, opset=DEFAULT_OPSET,
                     rtol=DEFAULT_RTOL, batch_sizes=(1, 4), overwrite=False,
                     progress=None, openvino_precision="f32"):
    """Fold a SavedModel's batch normalization without its Keras code.

    For models that exist only as a SavedModel directory (Keras 2's
    `model.save(dir)`, Keras 3's `model.export(dir)`, `tf.saved_model.save`)
    or a TF1 frozen GraphDef (`.pb`): the signature is frozen into
    constants, every batch normalization right after a Conv / Depthwise /
    transposed Conv / MatMul is folded into it at graph level
    (`kerasbn.folding.tfgraph`), and the artifacts are written and verified
    against the SOURCE as TensorFlow loads it, exactly as `export` does for
    a Keras model.

    The SavedModel keeps the source's signature key, input and output
    names, dtypes and dynamic batch; its weights are constants in the
    graph. The Keras format is not available (there is no Keras model).

    Args:
        source: SavedModel directory, frozen GraphDef file, or a
            `kerasbn.sources.saved_model.GraphSource` already read.
        directory: Export directory; created if missing.
        formats: From "saved_model", "onnx", "tflite", "openvino".
        signature: The SavedModel signature to fold and serve.
        fold: Fold (False: re-export as it is, verified).
        sample: Inputs to verify on (array, list, or dict by input name).
            Needed when an input has unknown non-batch dimensions.
        verify, name, version, opset, rtol, batch_sizes, overwrite,
        progress, openvino_precision: As for `export`; `name` defaults
            to the source's directory or file name.

    Returns:
        `ExportResult`, whose `fold_report` names each normalization node
        (folded into which node, or kept and why) and whose `model` is the
        folded graph (`kerasbn.sources.saved_model.FrozenGraph`).

    Raises:
        ValueError: not a SavedModel / GraphDef, no such signature, unknown
            dimensions without `sample`, or a bad argument.
        ExportError, VerificationError: as for `export` (nothing written).
    """
    from kerasbn import _models
    from kerasbn.exporting import _graph
    from kerasbn.exporting import _pipeline as steps

    progress = progress or _quiet
    source, graph_signature = _graph.read_source(source, signature)
    formats, name = steps.check_options(
        directory, formats, source.name if name is None else name, version,
        opset, rtol, batch_sizes, where=_graph.WHERE)
    if "keras" in formats:
        raise ValueError(f"{_graph.WHERE}: the keras format needs a Keras "
                         "model; a SavedModel or GraphDef has none. Choose "
                         "from saved_model, onnx, tflite, openvino.")
    directory = os.path.abspath(os.fspath(directory))
    inputs = _graph.verification_inputs(graph_signature, sample, batch_sizes,
                                        verify)
    options = steps.openvino_options(formats, openvino_precision)
    targets = _plan_targets(directory, formats, name, version, overwrite,
                            options)
    # Folding first: it names a normalization with corrupt statistics,
    # which would otherwise surface as a source that outputs NaN.
    model, fold_report = _graph.fold(source, name, fold, progress)
    with _models.full_float32():
        references = [_graph.reference_outputs(source, a) for a in inputs]
    return _write_verified(directory, targets, model, graph_signature,
                           inputs, references, fold_report, opset, rtol,
                           progress, overwrite,
                           {"source": source.notes} if source.notes else {},
                           options)


def _write_verified(directory, targets, model, signature, inputs, references,
                    fold_report, opset, rtol, progress, overwrite, notes,
                    reduced=None, precision=None):
    """Stage, write, verify and commit the artifacts; the `ExportResult`.

    `reduced`: the reduced-precision options (`_pipeline.reduced_options`).
    """
    from kerasbn import _models
    from kerasbn.exporting import _pipeline as steps

    reduced = reduced or {}
    with _staging.StagingArea(directory) as staging:
        staged, said = steps.write_artifacts(staging, targets, model,
                                             signature, opset, progress,
                                             reduced)
        companions, said_companions = _stage_companions(
            staging, directory, targets, reduced)
        numerics = steps.numerics_for_export(model, staged, reduced,
                                             progress)
        with _models.full_float32():
            checks = steps.verify_artifacts(staged, signature, inputs,
                                            references, rtol, progress,
                                            reduced, numerics)
        final = {f: os.path.join(directory, p) for f, p in targets.items()}
        said.update(steps.numerics_notes(numerics, staged, reduced))
        for fmt, more in _openvino_notes(final, said_companions).items():
            said[fmt] = list(said.get(fmt, [])) + more
        result = ExportResult(directory, final, fold_report, checks,
                              steps.onnx_ops(staged), model=model,
                              notes={**notes, **said}, numerics=numerics,
                              precision=precision)
        if not result.passed:
            raise VerificationError(
                "Exported artifacts do not reproduce the original model; "
                "nothing was written.\n" + str(result), result
            )
        progress(f"{COMMIT_STAGE} {directory}")
        staging.commit(list(targets.values()) + companions, overwrite,
                       replace=companions)
    return result


def _companions(directory, targets, options):
    """`[(relpath, bytes, conflict)]`: the files the formats in `targets`
    are served with (`formats.OpenVinoFormat.companions`)."""
    files = []
    for fmt, relpath in targets.items():
        companions = getattr(FORMATS[fmt], "companions", None)
        if companions is not None:
            name, version = _name_version(relpath)
            files += companions(name, version, options or {}, directory)
    return files


def _openvino_notes(final, said):
    """Where the OpenVINO IR's `config.json` is, and what it replaced."""
    if "openvino" not in final:
        return {}
    config = os.path.join(os.path.dirname(final["openvino"]), "config.json")
    return {"openvino": [f"serve with {config} (OpenVINO Model Server: "
                         "--config_path; its plugin_config pins the "
                         "precision)"] + said}


def _name_version(relpath):
    """The artifact name and version a versioned `relpath` ends with."""
    parts = relpath.split(os.sep)
    return parts[-2], int(parts[-1])


def _stage_companions(staging, directory, targets, options):
    """Stage the companion files; returns `(relpaths to commit, notes)`
    (a file already in place with the same bytes is left as it is)."""
    commit, notes = [], []
    for relpath, data, conflict in _companions(directory, targets, options):
        with open(staging.new(relpath), "wb") as f:
            f.write(data)
        if not _same_file(os.path.join(directory, relpath), data):
            commit.append(relpath)
        if conflict is not None:  # Only with overwrite (_plan_targets).
            said = (f"overwrite=True changed the OpenVINO Model Server "
                    f"configuration: {conflict}; the versions already there "
                    "now serve under the new setting too (other settings "
                    "kept)")
            notes.append(said)
            warnings.warn(f"kerasbn.export: {said}.", stacklevel=4)
    return commit, notes


def _same_file(path, data):
    try:
        with open(path, "rb") as f:
            return f.read() == data
    except OSError:
        return False


def _quiet(message):
    """The default `progress`: say nothing."""


def _plan_targets(directory, formats, name, version, overwrite,
                  options=None):
    """`{format: path inside directory}`; refuses existing paths.

    Without `overwrite`, any existing target is an `ExportError` before
    anything is folded or written; so is an existing companion file
    (OpenVINO's `config.json`) with other contents than this export's.
    """
    targets = {f: FORMATS[f].relpath(name, version) for f in formats}
    existing = [os.path.join(directory, p) for p in targets.values()
                if os.path.lexists(os.path.join(directory, p))]
    conflicts = [conflict for _, _, conflict in _companions(
        directory, targets, options) if conflict is not None]
    if conflicts and not overwrite:
        raise ExportError(
            "Refusing to change the OpenVINO Model Server configuration: "
            f"{conflicts[0]}. overwrite=True changes it for every version "
            "(settings it does not set are kept), or export under another "
            "name.")
    if existing and not overwrite:
        raise ExportError(
            f"Refusing to overwrite existing artifact(s) {existing}. Pass "
            "overwrite=True (CLI: --overwrite) or choose another directory."
        )
    return targets
