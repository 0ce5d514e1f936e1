"""`kerasbn-fold`: fold a trained model's BN away and export it, verified.

    kerasbn-fold MODEL -o OUT_DIR [--format saved_model,onnx,keras]
                 [--opset N] [--no-verify] [--keep-bn] [--json REPORT.json]
                 [--custom-module PY_MODULE] [--sample FILE.npz]
                 [--signature NAME] [--overwrite]

MODEL is a Keras 3 `.keras` file, a Keras 2 (tf.keras) `.h5` file, a
SavedModel directory (Keras 2 `model.save(dir)`, Keras 3
`model.export(dir)`) or a TF1 frozen `.pb` GraphDef (`kerasbn.sources`).
Keras files are folded layer by layer (`kerasbn.fold`); SavedModels and
GraphDefs, which have no Keras code, at TensorFlow graph level
(`kerasbn.fold_saved_model`).

Prints one progress line per stage and a final table: BN layers folded and
kept, parameter counts, the max error of every artifact against the
original model, and Keras inference latency before and after folding.

Every argument is checked before TensorFlow is imported (~4 s), so
`--help` and a mistyped argument answer at once.

Exit status: 0 on success; 1 when an artifact does not reproduce the model;
2 for bad input (the reason on one line, no traceback); 130 on SIGINT
(Ctrl-C) and 143 on SIGTERM (128 + the signal number, as a shell reports
a process killed by it). An export interrupted before its artifacts are
in place cleans up and leaves the output directory as it was; the message
says whether the artifacts had been written.
"""

import argparse
import contextlib
import importlib
import importlib.util
import json
import math
import os
import secrets
import signal
import statistics
import sys
import time
import warnings
import zipfile

# Light modules only: Keras and TensorFlow load after the arguments pass.
from kerasbn.exporting import FORMATS
from kerasbn.exporting import ExportError
from kerasbn.exporting import VerificationError
from kerasbn.exporting import _options
from kerasbn.exporting._result import openvino_lines
from kerasbn.exporting._result import precision_line
from kerasbn.exporting import _staging
from kerasbn.exporting import export
from kerasbn.exporting import fold_saved_model
from kerasbn import sources

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXIT_OK, EXIT_VERIFY, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A one-line reason for the user; exit status 2."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived (the signal's name is the message)."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)


def _parser():
    parser = argparse.ArgumentParser(
        prog="kerasbn-fold",
        description="Fold batch normalization into neighbouring layers and "
        "export the model to SavedModel/ONNX/Keras/TFLite/OpenVINO, verified "
        "against the original.",
    )
    parser.add_argument("model", help="trained model: .keras, Keras 2 .h5, "
                        "SavedModel directory, or TF1 frozen .pb")
    parser.add_argument("-o", "--output", required=True,
                        help="output directory (created if missing)")
    parser.add_argument("--format", default=",".join(_options.DEFAULT_FORMATS),
                        help="comma-separated formats from "
                        f"{','.join(FORMATS)} (default: %(default)s)")
    parser.add_argument("--opset", type=int, default=_options.DEFAULT_OPSET,
                        help=f"ONNX opset, {_options.MIN_OPSET} to the newest "
                        "the installed tf2onnx writes (default: %(default)s)")
    parser.add_argument("--no-verify", action="store_true",
                        help="skip running the artifacts against the model")
    parser.add_argument("--keep-bn", action="store_true",
                        help="keep BN layers that cannot be folded as they "
                        "are (default: replace them by a fixed scale-shift)")
    parser.add_argument("--no-fold", action="store_true",
                        help="export the model as it is")
    parser.add_argument("--json", metavar="REPORT.json",
                        help="also write the full report as JSON")
    parser.add_argument("--custom-module", action="append", default=[],
                        metavar="PY_MODULE",
                        help="module name or .py file to import before "
                        "loading (registers the model's custom layers); "
                        "repeatable")
    parser.add_argument("--name", help="artifact name (default: model name)")
    parser.add_argument("--version", type=int, default=1,
                        help="version directory of the SavedModel (TF "
                        "Serving) and OpenVINO layouts (default: 1)")
    parser.add_argument("--rtol", type=float, default=_options.DEFAULT_RTOL,
                        help="allowed error / max|output| (default: "
                        "%(default)g)")
    parser.add_argument("--precision", choices=("float32", "policy"),
                        default="float32",
                        help="for a mixed-precision model: export its "
                        "float32 twin (default), or keep its float16/"
                        "bfloat16 compute where the format can "
                        "(README: mixed precision)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing artifacts")
    parser.add_argument("--latency-runs", type=int, default=20,
                        help="timed runs for the latency line (0: skip)")
    parser.add_argument("--sample", metavar="FILE.npz",
                        help="verify on these inputs: one array per input "
                        "name (a one-input model: or one array saved "
                        "unnamed, np.savez(path, x), or keyed x)")
    _add_precision_options(parser)
    parser.add_argument("--signature", default=None, metavar="NAME",
                        help="SavedModel signature to fold (default: "
                        "serving_default)")
    return parser


def _add_precision_options(parser):
    """The int8/float16 and OpenVINO precision options."""
    parser.add_argument("--calibration", metavar="FILE.npz",
                        help="representative inputs for the int8 formats "
                        "(onnx_int8, tflite_int8): one array per input "
                        "name (a one-input model: or one array saved "
                        "unnamed, or keyed x)")
    parser.add_argument("--validation", metavar="FILE.npz",
                        help="inputs the int8/fp16 artifacts are checked on "
                        "(default: the calibration data)")
    parser.add_argument("--min-agreement", type=float, default=0.98,
                        help="least top-1 agreement of an int8/fp16 "
                        "artifact with the float model (default: "
                        "%(default)g)")
    parser.add_argument("--max-rel-rms", type=float, default=None,
                        help="largest relative RMS error of an int8/fp16 "
                        "artifact's outputs (default: 0.1 int8, 0.01 fp16)")
    parser.add_argument("--per-tensor", action="store_true",
                        help="onnx_int8: one weight scale per tensor "
                        "instead of per output channel")
    parser.add_argument("--equalize", action="store_true",
                        help="after folding, even out channel ranges of "
                        "consecutive layers (cross-layer equalization, "
                        "exact in float; for --per-tensor)")
    parser.add_argument("--int8-io", action="store_true",
                        help="tflite_int8 takes and returns int8 tensors")
    parser.add_argument("--openvino-precision",
                        choices=list(FORMATS["openvino"].PRECISIONS),
                        default="f32",
                        help="what the openvino artifact's config.json pins "
                        "OpenVINO's CPU plugin to (default: %(default)s; "
                        "bf16 is faster on CPUs with AVX512-BF16/AMX and "
                        "verified at a bfloat16 bound)")


# -- Checks that need no TensorFlow. ------------------------------------------


def _check_arguments(args):
    """Check every argument that can be checked without TensorFlow.

    Returns the list of formats. Raises `CliError`. Only an ONNX opset
    above the newest every supported tf2onnx writes makes it import
    tf2onnx (and TensorFlow) to ask the installed one.
    """
    args.kind = _check_model_file(args.model)
    _check_source_options(args)
    try:
        _staging.check_output_directory(os.path.abspath(args.output))
    except ExportError as error:
        raise CliError(str(error)) from None
    try:
        formats = _options.parse_formats(args.format)
    except ValueError:
        unknown = [f.strip() for f in args.format.split(",")
                   if f.strip() and f.strip() not in FORMATS]
        raise CliError(f"unknown format(s) {','.join(unknown) or '(none)'}; "
                       f"choose from {','.join(FORMATS)}") from None
    _check_json_target(args.json, args.model)
    if args.name is not None and not _options.is_safe_name(args.name):
        raise CliError(f"--name {args.name!r} is not a safe file name: use "
                       "letters, digits, '_', '.', '-'")
    if args.version < 1:
        raise CliError(f"--version must be a positive integer (the version "
                       "directory of the SavedModel and OpenVINO layouts); "
                       f"received {args.version}")
    if not (math.isfinite(args.rtol) and args.rtol > 0):
        raise CliError(f"--rtol must be a positive finite number; received "
                       f"{args.rtol}")
    if args.latency_runs < 0:
        raise CliError(f"--latency-runs must be >= 0; received "
                       f"{args.latency_runs}")
    for spec in args.custom_module:
        if (spec.endswith(".py") or os.sep in spec) and not os.path.isfile(
                spec):
            raise CliError(f"--custom-module file not found: {spec}")
    if "onnx" in formats:
        _check_opset(args.opset)
    if "keras" in formats and args.kind in _GRAPH_KINDS:
        raise CliError(f"--format keras needs a Keras model, and {args.model}"
                       " is a TensorFlow graph; choose from saved_model, "
                       "onnx, tflite, openvino")
    if args.openvino_precision != "f32" and "openvino" not in formats:
        raise CliError(f"--openvino-precision {args.openvino_precision} "
                       "applies to the openvino format, which is not among "
                       f"--format {','.join(formats)}: add openvino or leave "
                       "the option out")
    return formats


_GRAPH_KINDS = (sources.SAVED_MODEL, sources.GRAPH_DEF)


def _check_model_file(path):
    """The kind of model at `path` (`kerasbn.sources.detect`)."""
    try:
        return sources.detect(path)
    except sources.UnknownSource as error:
        raise CliError(str(error)) from None


def _check_source_options(args):
    if args.signature is not None and args.kind != sources.SAVED_MODEL:
        raise CliError(f"--signature applies to SavedModel directories; "
                       f"{args.model} is a {args.kind} file")
    for flag, path in (("--sample", args.sample),
                       ("--calibration", args.calibration),
                       ("--validation", args.validation)):
        if path is not None and not os.path.isfile(path):
            raise CliError(f"{flag} file not found: {path}")
        if path is not None and not zipfile.is_zipfile(path):
            raise CliError(f"{flag} {path} is not a .npz file: save the "
                           "inputs with numpy.savez(path, input_name=array)")
    keras_only = [flag for flag, given in (
        ("--calibration", args.calibration), ("--validation", args.validation),
        ("--per-tensor", args.per_tensor), ("--equalize", args.equalize),
        ("--int8-io", args.int8_io)) if given]
    if keras_only and args.kind in _GRAPH_KINDS:
        raise CliError(f"{'/'.join(keras_only)} apply to Keras models; "
                       "int8/fp16 formats of a SavedModel or GraphDef are "
                       "not written yet")


def _check_opset(opset):
    low, high = _options.MIN_OPSET, _options.KNOWN_MAX_OPSET
    if low <= opset <= high:
        return
    if opset > high:
        from kerasbn.exporting.formats import newest_onnx_opset

        try:
            high = newest_onnx_opset()  # imports tf2onnx and TensorFlow
        except ImportError as error:
            raise CliError(str(error)) from None
        if opset <= high:
            return
    raise CliError(f"--opset {opset} is not supported: choose an ONNX opset "
                   f"from {low} to {high} (default: {_options.DEFAULT_OPSET})")


def _check_json_target(path, model_path):
    if path is None:
        return
    full = os.path.abspath(path)
    folder = os.path.dirname(full)
    if os.path.isdir(full):
        raise CliError(f"--json {path} is a directory; give a file path, e.g. "
                       f"{os.path.join(path, 'report.json')}")
    if os.path.exists(full) and os.path.samefile(full, model_path):
        raise CliError(f"--json {path} is the model file; give another path")
    if not os.path.isdir(folder):
        raise CliError(f"cannot write the JSON report to {path}: folder "
                       f"{folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CliError(f"cannot write the JSON report to {path}: folder "
                       f"{folder} is not writable")


# -- Loading (imports Keras). -------------------------------------------------


def _load(args):
    """`(model or GraphSource, notes)` of `args.model`, after registering
    the custom layers; `notes` say what reading it changed."""
    import kerasbn.layers  # noqa: F401  (registers kerasbn's layers)

    for spec in args.custom_module:
        _import_custom_module(spec)
    try:
        return _read_source(args)
    except CliError:
        raise
    except Exception as error:
        # Whatever the reader tripped on (h5py's OSError on a truncated
        # file, a KeyError on a corrupt object header, TensorFlow's
        # DataLossError): the source is bad input, not a failed export.
        raise CliError(_unreadable(args.model, args.kind, error)) from error


def _read_source(args):
    if args.kind == sources.H5:
        problem = sources.probe_hdf5(args.model)
        if problem:
            raise CliError(f"cannot read {args.model} as a Keras 2 HDF5 "
                           f"model (truncated or corrupt?): {problem}")
        return _load_h5(args.model)
    if args.kind in _GRAPH_KINDS:
        from kerasbn.exporting import _graph

        try:
            source, _ = _graph.read_source(
                args.model, args.signature or "serving_default")
        except Exception as error:
            damage = (sources.saved_model_damage(args.model)
                      if args.kind == sources.SAVED_MODEL else None)
            if damage:
                raise CliError(f"cannot load the SavedModel {args.model}: "
                               f"{damage}") from error
            if not isinstance(error, ValueError):
                raise
            raise CliError(_first_line(error)) from None
        return source, source.notes
    return load_model(args.model), []


_KIND_TEXT = {sources.KERAS: "a Keras 3 .keras file",
              sources.H5: "a Keras 2 HDF5 model",
              sources.SAVED_MODEL: "a SavedModel",
              sources.GRAPH_DEF: "a TensorFlow GraphDef"}


def _unreadable(path, kind, error):
    """One line: `path` could not be read as `kind`, and the reader's
    reason."""
    return (f"cannot read {path} as {_KIND_TEXT.get(kind, 'a model')} "
            f"(truncated or corrupt?): {type(error).__name__}: "
            f"{_first_line(error, 300) or 'no message'}")


def _first_line(error, limit=None):
    """`kerasbn._checks.first_line`, which imports Keras: loaded here
    only once the source is read."""
    from kerasbn import _checks

    return _checks.first_line(error, limit)


def _load_h5(path):
    from kerasbn.sources import keras2

    try:
        return keras2.load_h5(path)
    except keras2.Keras2Error as error:
        raise CliError(str(error)) from None


def _load_sample(path, flag="--sample"):
    """The arrays of a .npz file, a dict by key: `kerasbn._batches.flatten`
    matches the keys to the model's inputs (and refuses a key that names
    none, rather than feed a misnamed array to the one input there is)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except Exception as error:
        raise CliError(f"cannot read {flag} {path}: "
                       f"{type(error).__name__}: {error}") from None
    if not arrays:
        raise CliError(f"{flag} {path} holds no arrays")
    return arrays


def load_model(path):
    """Load a `.keras` model file; `CliError` with the reason if it fails."""
    if _check_model_file(path) != sources.KERAS:
        raise CliError(f"{path} is not a Keras 3 .keras file")
    import keras

    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:
        missing = _missing_object(error)
        if missing:
            kind, name = missing
            raise CliError(
                f"{path} needs the custom {kind} '{name}', which is not "
                "registered: pass --custom-module MODULE (a module or .py "
                f"file that defines it with "
                "@keras.saving.register_keras_serializable)."
            ) from error
        raise CliError(
            f"cannot load {path} as a Keras model: "
            f"{type(error).__name__}: {_root_cause(error)}"
        ) from error
    if not isinstance(model, keras.Model):
        raise CliError(f"{path} holds a {type(model).__name__}, not a model")
    return model


def _import_custom_module(spec):
    try:
        if spec.endswith(".py") or os.sep in spec:
            # `_check_arguments` made sure the file exists.
            name = os.path.splitext(os.path.basename(spec))[0]
            module_spec = importlib.util.spec_from_file_location(name, spec)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)
    except CliError:
        raise
    except Exception as error:
        raise CliError(
            f"cannot import --custom-module {spec}: "
            f"{type(error).__name__}: {error}"
        ) from error


def _missing_object(error):
    """`(kind, name)` from Keras' "Could not locate class/function 'X'" or
    "Unknown layer: 'X'" errors, wherever they are nested; else None."""
    text = str(error)
    for marker, kind in (("Could not locate class '", "class"),
                         ("Could not locate function '", "function"),
                         ("Unknown layer: '", "class")):
        if marker in text:
            return kind, text.rsplit(marker, 1)[1].split("'", 1)[0]
    return None


def _root_cause(error):
    """The innermost cause of a nested Keras deserialization error.

    Keras wraps each failing level as "... could not be deserialized
    properly ... Exception encountered: <inner error>"; the last inner error
    is the one that says what is wrong.
    """
    text = str(error).rsplit("Exception encountered: ", 1)[-1]
    first = text.strip().splitlines()[0] if text.strip() else ""
    return first[:300] + ("..." if len(first) > 300 else "")


# -- Export and report. -------------------------------------------------------


def _progress(message):
    print(f"[kerasbn-fold] {message}", flush=True)


def _export(args, model, formats, progress):
    """`kerasbn.export` (or `fold_saved_model` for a graph) with the CLI's
    options; VerificationError passes. kerasbn's own warnings (e.g.
    OpenVINO's defaults change the numbers) print as one line each."""
    with warnings.catch_warnings():
        # Said as they come: a warning that the system may stop the
        # process (memory) is of no use once it has.
        warnings.showwarning = _say_warning(warnings.showwarning)
        return _export_quietly(args, model, formats, progress)


def _say_warning(previous):
    own = os.path.dirname(os.path.abspath(__file__))

    def say(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(own + os.sep):
            print(f"[kerasbn-fold] warning: {message}", file=sys.stderr,
                  flush=True)
        else:
            previous(message, category, filename, lineno, file, line)
    return say


def _export_quietly(args, model, formats, progress):
    sample = None if args.sample is None else _load_sample(args.sample)
    common = dict(verify=not args.no_verify, name=args.name,
                  version=args.version, opset=args.opset, rtol=args.rtol,
                  overwrite=args.overwrite, progress=progress, sample=sample,
                  openvino_precision=args.openvino_precision)
    try:
        if args.kind in _GRAPH_KINDS:
            return fold_saved_model(model, args.output, formats,
                                    fold=not args.no_fold, **common)
        reduced = dict(min_agreement=args.min_agreement,
                       max_rel_rms=args.max_rel_rms,
                       per_channel=not args.per_tensor,
                       equalize=args.equalize, int8_io=args.int8_io,
                       precision=args.precision)
        for flag in ("calibration", "validation"):
            path = getattr(args, flag)
            reduced[flag] = (None if path is None
                             else _load_sample(path, f"--{flag}"))
        return export(model, args.output, formats, fold=not args.no_fold,
                      keep_bn=args.keep_bn, **common, **reduced)
    except VerificationError:
        raise
    except (ExportError, ValueError, TypeError, ImportError) as error:
        raise CliError(str(error).splitlines()[0]) from error


def _latencies(original, exported, runs):
    """Median ms per batch-1 call of each model, rounds interleaved.

    For a graph source both are its frozen graph, before and after folding.
    """
    import tensorflow as tf

    from kerasbn.exporting._signature import GraphSignature
    from kerasbn.exporting._signature import ServingSignature

    graph = hasattr(original, "graph_def")  # A GraphSource.
    if graph:
        from kerasbn.sources.saved_model import FrozenGraph

        signature = GraphSignature(original)
        unfolded = FrozenGraph(original.graph_def, original.input_tensors,
                               original.output_tensors, original.input_specs,
                               "unfolded")
        fns = [signature.serving_function(m, named_outputs=False)
               for m in (unfolded, exported)]
    else:
        signature = ServingSignature(original)
        fns = [_compiled_call(m, signature) for m in (original, exported)]
    if any(d is None for s in signature.input_specs for d in s.shape[1:]):
        return None  # Unknown sizes: nothing meaningful to time.
    arrays = signature.generate_inputs(1, seed=3)
    if graph or keras_backend() == "tensorflow":
        arrays = [tf.constant(a) for a in arrays]
    for fn in fns:
        for _ in range(3):
            fn(*arrays)
    times = ([], [])
    for _ in range(runs):
        for fn, bucket in zip(fns, times):
            start = time.perf_counter()
            fn(*arrays)
            bucket.append(time.perf_counter() - start)
    return tuple(1e3 * statistics.median(t) for t in times)


def keras_backend():
    import keras

    return keras.backend.backend()


def _compiled_call(model, signature):
    """The model's inference call as its backend compiles it: a
    `tf.function` on TensorFlow, Keras' own predict step elsewhere (jit
    on JAX, the module call on PyTorch)."""
    if keras_backend() != "tensorflow":
        return lambda *xs: model.predict_on_batch(signature.pack(xs))
    import tensorflow as tf

    return tf.function(lambda *xs: model(signature.pack(xs),
                                         training=False))


def _summary(original, result, latency):
    lines = []
    report = result.fold_report
    if report is not None:
        lines.append(
            f"BN layers: {report.normalizations_before} before, "
            f"{report.folded} folded ({report.folded_backward} backward, "
            f"{report.folded_forward} forward), {report.replaced} replaced "
            f"by ScaleShift, {report.kept} kept"
        )
    if hasattr(original, "count_params"):
        lines.append(f"parameters: {original.count_params():,} before, "
                     f"{result.model.count_params():,} after")
    else:
        lines.append(f"TensorFlow graph nodes: {len(original.graph_def.node)}"
                     f" before, {len(result.model.graph_def.node)} after")
    width = max(len(f) for f in result.artifacts)
    if result.max_errors():
        lines.append(f"{'artifact':<{width}}  max abs error  rel error  "
                     "path")
    for fmt, (abs_err, rel_err) in result.max_errors().items():
        lines.append(f"{fmt:<{width}}  {abs_err:>13.3g}  {rel_err:>9.3g}  "
                     f"{result.artifacts[fmt]}")
    reduced = result.reduced_checks()
    if reduced:
        lines.append(f"{'artifact':<{width}}  samples  top-1 agreement  "
                     "rel RMS  worst layer (SQNR)  path")
    for fmt, check in reduced.items():
        share = ("-" if check["agreement"] is None
                 else f"{check['agreement']:.4f}")
        worst = check.get("worst_layer")
        worst = ("-" if worst is None else
                 f"{worst['layer']} ({worst['sqnr_db']:.0f} dB)")
        lines.append(f"{fmt:<{width}}  {check['batch']:>7}  {share:>15}  "
                     f"{check['rel_rms']:>7.3g}  {worst:<18}  "
                     f"{result.artifacts[fmt]}")
    if not result.checks:
        for fmt, path in result.artifacts.items():
            lines.append(f"{fmt:<{width}}  {'not verified':>24}  {path}")
    lines.extend(openvino_lines(result.checks))
    if result.precision:
        lines.append(precision_line(result.precision))
    for fmt, notes in result.notes.items():
        lines.extend(f"note ({fmt}): {note}" for note in notes)
    if latency:
        before, after = latency
        what = "Keras" if hasattr(original, "count_params") else "TensorFlow"
        lines.append(f"{what} latency, batch 1: {before:.2f} ms before, "
                     f"{after:.2f} ms after ({after / before:.2f}x)")
    return "\n".join(lines)


def _report(args, model, result, progress):
    """Print the fold report and summary; write the JSON report if asked."""
    latency = None
    if args.latency_runs > 0:
        progress("timing inference before/after folding")
        latency = _latencies(model, result.model, args.latency_runs)
    if result.fold_report is not None:
        print(result.fold_report)
    print(_summary(model, result, latency))
    if args.json:
        report = result.to_dict()
        report["source"] = {"path": args.model, "kind": args.kind}
        renamed = getattr(args, "renamed", None)
        if renamed:
            # {Keras 3 layer name: Keras 2 name} for the '/' names an .h5
            # file's layers had (kerasbn.sources.keras2).
            report["source"]["renamed"] = dict(renamed)
        if hasattr(model, "count_params"):
            report["parameters"] = {"before": model.count_params(),
                                    "after": result.model.count_params()}
        if latency:
            report["latency_ms_batch1"] = {"before": latency[0],
                                           "after": latency[1]}
        _write_json(args.json, report)


def _write_json(path, payload):
    """Write `payload` to `path` atomically: the whole report or nothing.

    The temporary file sits beside `path` (hidden, named after this
    process) and is removed whatever happens.
    """
    full = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(full), f".{os.path.basename(full)}."
                       f"{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "x") as f:
            json.dump(payload, f, indent=2, default=str)
        os.replace(tmp, full)
    except OSError as error:
        raise CliError(f"cannot write the JSON report to {path}: "
                       f"{error.strerror or error}") from error
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def run(argv=None, interrupts=None):
    """Parse, check, load, export, report; returns the exit status.

    Raises `CliError` for bad input and `KeyboardInterrupt` when
    interrupted; `main` turns both into one message and an exit status.
    `interrupts` (an `_Interrupts`) learns when the artifacts are written.
    """
    interrupts = interrupts or _Interrupts()
    args = _parser().parse_args(argv)
    formats = _check_arguments(args)

    def progress(message):
        interrupts.check()
        if message.startswith(_options.COMMIT_STAGE):
            interrupts.defer()
        _progress(message)

    progress(f"loading {args.model}")
    model, notes = _load(args)
    args.renamed = getattr(notes, "renamed", None)
    try:
        result = _export(args, model, formats, progress)
    except VerificationError as error:
        if notes:
            error.result.notes.setdefault("source", list(notes))
        print(str(error), file=sys.stderr)
        if args.json:
            _write_json(args.json, error.result.to_dict())
        print("kerasbn-fold: verification failed; nothing was written",
              file=sys.stderr)
        return EXIT_VERIFY
    interrupts.wrote(result.directory)
    if notes:
        result.notes.setdefault("source", list(notes))
    _report(args, model, result, progress)
    return EXIT_OK


# -- Signals. -----------------------------------------------------------------


class _Interrupts:
    """SIGINT and SIGTERM, raised as `Interrupted` in the main thread.

    An exception raised inside TensorFlow's C++ code can come out as
    another exception, or not at all; so the signal is also recorded:
    `main` reports any failure after a signal as the interruption, and
    `check()`, run at every progress line, raises if it was swallowed.
    While the export moves its verified artifacts into place (`defer()`
    until `written`), a signal is only recorded, so the message can tell
    whether they were written.

    Attributes:
        signum: The signal received, or None.
        written: The export directory once the artifacts are in place.
    """

    def __init__(self):
        self.signum = None
        self.written = None
        self._deferred = False

    def _handle(self, signum, frame):
        # A second signal ends the process at once; the next export
        # removes what it leaves (see kerasbn.exporting._staging).
        signal.signal(signum, signal.SIG_DFL)
        self.signum = signum
        if not self._deferred:
            raise Interrupted(signum)

    def defer(self):
        """Record signals without raising until `wrote()`."""
        self._deferred = True

    def wrote(self, directory):
        """The artifacts are in `directory`; raise a deferred signal now."""
        self.written = directory
        self._deferred = False
        self.check()

    def check(self):
        if self.signum is not None:
            raise Interrupted(self.signum)

    @contextlib.contextmanager
    def installed(self):
        previous = {}
        try:
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, self._handle)
        except ValueError:  # not the main thread: signals stay as they are
            pass
        try:
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def report(self):
        """Print what the interruption left; returns the exit status."""
        print("kerasbn-fold: interrupted; " + (
            f"the artifacts were already written to {self.written}, the "
            "report is incomplete" if self.written else "nothing was written"),
            file=sys.stderr)
        return 128 + (self.signum or signal.SIGINT)


def _one_line(error):
    """`error`'s message on one line that any terminal prints: a name
    read from a corrupt file can hold undecodable bytes (lone surrogates),
    which would make printing the message fail."""
    text = " ".join(str(error).split("\n"))
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    return text.encode(encoding, "backslashreplace").decode(encoding)


def main(argv=None):
    interrupts = _Interrupts()
    with interrupts.installed():
        try:
            status = run(argv, interrupts)
        except CliError as error:
            if interrupts.signum is None:
                print(f"kerasbn-fold: error: {_one_line(error)}",
                      file=sys.stderr)
                return EXIT_USAGE
        except KeyboardInterrupt:
            pass
        except Exception:
            if interrupts.signum is None:
                raise
        else:
            if interrupts.signum is None:
                return status
        return interrupts.report()


if __name__ == "__main__":
    sys.exit(main())
