"""Export a (folded) Keras model to deployable artifacts, verified.

`export(model, directory)` folds the model's batch normalization away
(`kerasbn.fold`), writes each requested format into a staging area inside
`directory`, runs every staged artifact in its own runtime on the same
inputs at two batch sizes, compares with the ORIGINAL model in inference
mode, and only then moves the artifacts into place. `kerasbn.export`
is `kerasbn.exporting.export`. A failure at any stage
(conversion, a runtime error, an error past tolerance) leaves `directory`
as it was.

Layout (`name` defaults to the model's name, `version` to 1):

    <directory>/saved_model/<name>/<version>/   TF Serving, `serving_default`
    <directory>/<name>.onnx                     tf2onnx, dynamic batch
    <directory>/<name>.keras                    the folded Keras model
    <directory>/<name>.tflite                   optional

>>> import keras, kerasbn, tempfile
>>> inputs = keras.Input((8,), name="features")
>>> h = keras.layers.Dense(4, name="hidden")(inputs)
>>> outputs = kerasbn.layers.BatchNormalization(name="bn")(h)
>>> model = keras.Model(inputs, outputs, name="tiny")
>>> result = kerasbn.export(model, tempfile.mkdtemp(), formats=["keras"])
>>> result.passed, sorted(result.artifacts)
(True, ['keras'])
"""

import json
import os
import re
import shutil
import tempfile

import keras
import numpy as np

from kerasbn.exporting._signature import ServingSignature
from kerasbn.exporting.formats import FORMATS
from kerasbn.exporting.formats import onnx_op_census

__all__ = ["export", "ExportResult", "ExportError", "VerificationError",
           "FORMATS"]

DEFAULT_FORMATS = ("saved_model", "onnx")
DEFAULT_OPSET = 17
# Relative error bound, as a fraction of max|reference output|. Folding in
# float64 and casting gives ~3e-7; the runtimes' own kernels (oneDNN, ONNX
# Runtime's MLAS, TFLite's) reorder sums and use other conv algorithms, which
# costs up to ~1e-5 on deep networks. A wrong fold is off by O(1).
DEFAULT_RTOL = 1e-4

_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


class ExportError(RuntimeError):
    """The export could not be done; nothing was written.

    >>> import keras, kerasbn, os, tempfile
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)],
    ...                          name="net")
    >>> directory = tempfile.mkdtemp()
    >>> open(os.path.join(directory, "net.keras"), "w").close()
    >>> try:  # doctest: +ELLIPSIS
    ...     kerasbn.export(model, directory, formats=["keras"])
    ... except kerasbn.ExportError as error:
    ...     print(error)
    Refusing to overwrite existing artifact(s) ['.../net.keras']. Pass
    overwrite=True (CLI: --overwrite) or choose another directory.
    """


class VerificationError(ExportError):
    """An artifact's outputs differ from the original model past tolerance.

    Attributes:
        result: The `ExportResult` with every check, for inspection.

    >>> import keras, kerasbn, os, tempfile
    >>> model = keras.Sequential([
    ...     keras.Input((3,)), keras.layers.Dense(2),
    ...     keras.layers.BatchNormalization(),
    ... ])
    >>> _ = model.layers[1].moving_mean.assign([3.0, -1.0])
    >>> directory = tempfile.mkdtemp()
    >>> try:  # a tolerance below float32 rounding: folding cannot meet it
    ...     kerasbn.export(model, directory, formats=["keras"], rtol=1e-12)
    ... except kerasbn.VerificationError as error:
    ...     print(error.result.passed, os.listdir(directory))
    False []
    """

    def __init__(self, message, result):
        super().__init__(message)
        self.result = result


class ExportResult:
    """What `export` wrote and how well each artifact matched.

    Attributes:
        directory: The export directory.
        artifacts: `{format: path}` of the artifacts written.
        fold_report: The `kerasbn.fold` report, or None with `fold=False`.
        checks: One dict per (artifact, batch size): `format`, `batch`,
            `max_abs_error`, `rel_error` (max abs error / max |reference|),
            `rtol`, `passed`.
        onnx_ops: `{op_type: count}` of the ONNX graph, when ONNX was written.
        model: The Keras model that was exported (the folded one with
            `fold=True`), in memory.
        passed: Whether every check passed (always True for a returned
            result with `verify=True`: failures raise).

    >>> import keras, kerasbn, os, tempfile
    >>> model = keras.Sequential([
    ...     keras.Input((3,)),
    ...     keras.layers.Dense(2, use_bias=False),
    ...     keras.layers.BatchNormalization(),
    ... ], name="net")
    >>> result = kerasbn.export(model, tempfile.mkdtemp(), formats=["keras"])
    >>> os.path.basename(result.artifacts["keras"]), result.fold_report.folded
    ('net.keras', 1)
    >>> [(c["format"], c["batch"], c["passed"]) for c in result.checks]
    [('keras', 1, True), ('keras', 4, True)]
    >>> max_abs_error, rel_error = result.max_errors()["keras"]
    >>> rel_error < 1e-4
    True
    """

    def __init__(self, directory, artifacts, fold_report, checks, onnx_ops,
                 model=None):
        self.model = model
        self.directory = directory
        self.artifacts = artifacts
        self.fold_report = fold_report
        self.checks = checks
        self.onnx_ops = onnx_ops

    @property
    def passed(self):
        return all(c["passed"] for c in self.checks)

    def max_errors(self):
        """`{format: (max abs error, max rel error)}` over the batch sizes."""
        worst = {}
        for c in self.checks:
            a, r = worst.get(c["format"], (0.0, 0.0))
            worst[c["format"]] = (max(a, c["max_abs_error"]),
                                  max(r, c["rel_error"]))
        return worst

    def to_dict(self):
        return {
            "directory": self.directory,
            "artifacts": dict(self.artifacts),
            "fold": self.fold_report.to_dict() if self.fold_report else None,
            "checks": list(self.checks),
            "onnx_ops": self.onnx_ops,
            "passed": self.passed,
        }

    def to_json(self, **kwargs):
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self):
        lines = ["artifact     batch  max abs error  rel error  status"]
        for c in self.checks:
            status = "ok" if c["passed"] else f"FAIL (rtol {c['rtol']:g})"
            lines.append(
                f"{c['format']:<12} {c['batch']:>5}  {c['max_abs_error']:>13.3g}"
                f"  {c['rel_error']:>9.3g}  {status}"
            )
        for fmt, path in self.artifacts.items():
            lines.append(f"{fmt}: {path}")
        return "\n".join(lines)


def _check_arguments(model, directory, formats, name, version, rtol):
    if not isinstance(model, keras.Model):
        raise TypeError(
            "export() takes a keras.Model; received an object of type "
            f"{type(model).__name__}. Load a model file first with "
            "`keras.models.load_model(path)`."
        )
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(
            f"Unknown export format(s) {unknown or formats!r}. Choose from "
            f"{list(FORMATS)}."
        )
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(
            f"`directory` must be a path; received {directory!r}."
        )
    if not _NAME_OK.match(name):
        raise ValueError(
            f"Artifact name {name!r} is not a safe file name: use letters, "
            "digits, '_', '.', '-' (pass `name=`)."
        )
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ValueError(
            f"`version` must be a positive integer (TF Serving's version "
            f"directory); received {version!r}."
        )
    if not rtol > 0:
        raise ValueError(f"`rtol` must be positive; received {rtol!r}.")
    return formats


def _prepare_directory(directory):
    """Create `directory` if needed; returns whether this call created it."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise ExportError(
            f"Output path {directory!r} exists and is not a directory. "
            "Choose a directory."
        )
    created = not os.path.exists(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as error:
        raise ExportError(
            f"Cannot create output directory {directory!r}: {error.strerror}. "
            "Choose a writable location."
        ) from error
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ExportError(
            f"Output directory {directory!r} is not writable. Choose a "
            "writable location or fix its permissions."
        )
    return created


def _compare(reference, outputs):
    """Max abs error and max abs error / max |reference| over all outputs.

    A shape mismatch, or a NaN/inf where the reference is finite, is an
    infinite error (NumPy's max would silently skip NaNs in a comparison).
    """
    max_abs, scale = 0.0, 0.0
    if len(reference) != len(outputs):
        return float("inf"), float("inf")
    for ref, out in zip(reference, outputs):
        ref = np.asarray(ref, np.float64)
        out = np.asarray(out, np.float64)
        if ref.shape != out.shape:
            return float("inf"), float("inf")
        if not ref.size:
            continue
        diff = np.abs(out - ref)
        if not np.isfinite(diff).all():
            return float("inf"), float("inf")
        max_abs = max(max_abs, float(diff.max()))
        scale = max(scale, float(np.abs(ref).max()))
    rel = max_abs / scale if scale > 0 else max_abs
    return max_abs, rel


def _verification_inputs(signature, sample, batch_sizes):
    if sample is None:
        return [signature.generate_inputs(b, seed=b) for b in batch_sizes]
    flat = signature.flatten_sample(sample)
    n = flat[0].shape[0]
    if n < 1:
        raise ValueError("`sample` has an empty batch dimension.")
    small = [a[:1] for a in flat]
    if n == 1:
        large = [np.concatenate([a] * 3, axis=0) for a in flat]
    else:
        large = flat
    return [small, large]


def _reference_outputs(model, signature, arrays):
    outputs = model(signature.pack([keras.ops.convert_to_tensor(a)
                                    for a in arrays]), training=False)
    return [np.asarray(keras.ops.convert_to_numpy(t))
            for t in keras.tree.flatten(outputs)]


def export(model, directory, formats=DEFAULT_FORMATS, *, fold=True,
           keep_bn=False, sample=None, verify=True, name=None, version=1,
           opset=DEFAULT_OPSET, rtol=DEFAULT_RTOL, batch_sizes=(1, 4),
           overwrite=False, progress=None):
    """Fold, export and verify `model`; returns an `ExportResult`.

    Args:
        model: A built Keras model (Functional, Sequential, or nested). It is
            never modified.
        directory: Export directory; created if missing.
        formats: Iterable (or comma-separated string) of `"saved_model"`,
            `"onnx"`, `"keras"`, `"tflite"`.
        fold: Fold batch normalization first (`kerasbn.fold`).
        keep_bn: With `fold`, keep the BN layers that cannot be folded as
            they are instead of replacing them with a fixed scale-and-shift.
        sample: Inputs to verify on (an array, a list/tuple in the model's
            input order, or a dict by input name). The first sample and the
            whole sample make the two batch sizes. Default: random inputs
            of the model's shapes at `batch_sizes`.
        verify: Run every artifact in its own runtime and compare it with
            the original model in inference mode; raises
            `VerificationError` past `rtol` and writes nothing.
        name: Artifact name (default: the model's name).
        version: TF Serving version directory (default 1).
        opset: ONNX opset for tf2onnx.
        rtol: Allowed max abs error as a fraction of max |reference output|.
        batch_sizes: The two batch sizes of generated verification inputs.
        overwrite: Replace existing artifacts of the same paths. Without
            it an existing path is an error and nothing is written.
        progress: Optional callable taking one short string per stage
            (the CLI prints them).

    Returns:
        `ExportResult`.

    Raises:
        ExportError: a path exists, the directory is not writable, or a
            writer failed (nothing written).
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
    if name is None and isinstance(model, keras.Model):
        name = model.name
    formats = _check_arguments(model, directory, formats, str(name), version,
                               rtol)
    directory = os.path.abspath(os.fspath(directory))
    signature = ServingSignature(model)
    targets = {f: FORMATS[f].relpath(name, version) for f in formats}
    existing = [os.path.join(directory, p) for p in targets.values()
                if os.path.lexists(os.path.join(directory, p))]
    if existing and not overwrite:
        raise ExportError(
            f"Refusing to overwrite existing artifact(s) {existing}. Pass "
            "overwrite=True (CLI: --overwrite) or choose another directory."
        )
    verification_inputs = (
        _verification_inputs(signature, sample, batch_sizes) if verify else []
    )
    references = [_reference_outputs(model, signature, arrays)
                  for arrays in verification_inputs]

    progress = progress or (lambda message: None)
    fold_report = None
    deployable = model
    if fold:
        from kerasbn.folding import fold as fold_model

        progress("folding batch normalization")
        deployable, fold_report = fold_model(model, keep_unfolded=keep_bn)

    created = _prepare_directory(directory)
    staging = tempfile.mkdtemp(prefix=".kerasbn-staging-", dir=directory)
    try:
        staged = {}
        for fmt in formats:
            path = os.path.join(staging, "new", targets[fmt])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            progress(f"writing {fmt}")
            try:
                FORMATS[fmt].write(path, deployable, signature,
                                   {"opset": opset})
            except ImportError:
                raise
            except Exception as error:
                raise ExportError(
                    f"Writing the {fmt} artifact failed: "
                    f"{type(error).__name__}: {error}"
                ) from error
            staged[fmt] = path

        checks = []
        if verification_inputs:
            progress("verifying " + ", ".join(formats) + " at batch sizes "
                     + ", ".join(str(int(a[0].shape[0]))
                                 for a in verification_inputs))
        for arrays, reference in zip(verification_inputs, references):
            batch = int(arrays[0].shape[0]) if arrays else 0
            for fmt in formats:
                outputs = FORMATS[fmt].run(staged[fmt], signature, arrays)
                max_abs, rel = _compare(reference, outputs)
                checks.append({
                    "format": fmt, "batch": batch, "max_abs_error": max_abs,
                    "rel_error": rel, "rtol": rtol, "passed": rel <= rtol,
                })
        onnx_ops = onnx_op_census(staged["onnx"]) if "onnx" in staged else None
        final = {f: os.path.join(directory, targets[f]) for f in formats}
        result = ExportResult(directory, final, fold_report, checks, onnx_ops,
                              model=deployable)
        if not result.passed:
            raise VerificationError(
                "Exported artifacts do not reproduce the original model; "
                "nothing was written.\n" + str(result), result
            )
        _commit(staging, directory, targets, overwrite)
        return result
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created:
            try:
                os.rmdir(directory)
            except OSError:
                pass
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _commit(staging, directory, targets, overwrite):
    """Move staged artifacts into place; roll back if any move fails."""
    moved, backups = [], []
    try:
        for rel in targets.values():
            source = os.path.join(staging, "new", rel)
            final = os.path.join(directory, rel)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            if os.path.lexists(final):
                if not overwrite:
                    raise ExportError(
                        f"{final} appeared during the export; not replaced."
                    )
                backup = os.path.join(staging, "old", rel)
                os.makedirs(os.path.dirname(backup), exist_ok=True)
                os.replace(final, backup)
                backups.append((backup, final))
            os.replace(source, final)
            moved.append(final)
    except BaseException:
        for final in moved:
            if os.path.isdir(final):
                shutil.rmtree(final, ignore_errors=True)
            elif os.path.lexists(final):
                os.remove(final)
        for backup, final in backups:
            os.replace(backup, final)
        raise
