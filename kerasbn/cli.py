"""`kerasbn-fold`: fold a trained Keras model's BN away and export it, verified.

    kerasbn-fold MODEL.keras -o OUT_DIR [--format saved_model,onnx,keras]
                 [--opset N] [--no-verify] [--keep-bn] [--json REPORT.json]
                 [--custom-module PY_MODULE] [--overwrite]

Prints one progress line per stage and a final table: BN layers folded and
kept, parameter counts, the max error of every artifact against the
original model, and Keras inference latency before and after folding.
Exit status: 0 on success; 1 when an artifact does not reproduce the model;
2 for bad input (the reason on one line, no traceback).
"""

import argparse
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

EXIT_OK, EXIT_VERIFY, EXIT_USAGE = 0, 1, 2


class CliError(Exception):
    """A one-line reason for the user; exit status 2."""


def _parser():
    from kerasbn.exporting import DEFAULT_OPSET, DEFAULT_RTOL, FORMATS

    parser = argparse.ArgumentParser(
        prog="kerasbn-fold",
        description="Fold batch normalization into neighbouring layers and "
        "export the model to SavedModel/ONNX/Keras/TFLite, verified against "
        "the original.",
    )
    parser.add_argument("model", help="trained model file (.keras)")
    parser.add_argument("-o", "--output", required=True,
                        help="output directory (created if missing)")
    parser.add_argument("--format", default="saved_model,onnx",
                        help="comma-separated formats from "
                        f"{','.join(FORMATS)} (default: %(default)s)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help="ONNX opset (default: %(default)s)")
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
                        help="TF Serving version directory (default: 1)")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                        help="allowed error / max|output| (default: "
                        "%(default)g)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing artifacts")
    parser.add_argument("--latency-runs", type=int, default=20,
                        help="timed runs for the latency line (0: skip)")
    return parser


def _import_custom_module(spec):
    try:
        if spec.endswith(".py") or os.sep in spec:
            if not os.path.isfile(spec):
                raise CliError(f"--custom-module file not found: {spec}")
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


def _missing_class(error):
    """The class name in Keras' 'Could not locate class' errors, if any."""
    text = str(error)
    marker = "Could not locate class '"
    if marker in text:
        return text.split(marker, 1)[1].split("'", 1)[0]
    marker = "Unknown layer: '"
    if marker in text:
        return text.split(marker, 1)[1].split("'", 1)[0]
    return None


def load_model(path):
    import keras

    if not os.path.exists(path):
        raise CliError(f"model file not found: {path}")
    if os.path.isdir(path):
        raise CliError(
            f"{path} is a directory; kerasbn-fold takes a Keras 3 model file "
            "(.keras). A SavedModel directory cannot be folded: load the "
            "Keras model that produced it and save it with model.save("
            "'model.keras')."
        )
    if not zipfile.is_zipfile(path):
        raise CliError(
            f"{path} is not a Keras model file (.keras is a zip archive); "
            "save the model with model.save('model.keras')."
        )
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as error:
        missing = _missing_class(error)
        if missing:
            raise CliError(
                f"{path} needs the custom object '{missing}', which is not "
                "registered: pass --custom-module MODULE (a module or .py "
                "file that defines it with "
                "@keras.saving.register_keras_serializable)."
            ) from error
        raise CliError(
            f"cannot load {path} as a Keras model: "
            f"{type(error).__name__}: {str(error).splitlines()[0]}"
        ) from error
    if not isinstance(model, keras.Model):
        raise CliError(f"{path} holds a {type(model).__name__}, not a model")
    return model


def _latencies(original, exported, runs):
    """Median ms per batch-1 call of each model, rounds interleaved."""
    import tensorflow as tf

    from kerasbn.exporting._signature import ServingSignature

    signature = ServingSignature(original)
    arrays = [tf.constant(a) for a in signature.generate_inputs(1, seed=3)]
    fns = [tf.function(lambda *xs, m=m: m(signature.pack(xs), training=False))
           for m in (original, exported)]
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
    lines.append(f"parameters: {original.count_params():,} before, "
                 f"{result.model.count_params():,} after")
    width = max(len(f) for f in result.artifacts)
    lines.append(f"{'artifact':<{width}}  max abs error  rel error  path")
    for fmt, (abs_err, rel_err) in result.max_errors().items():
        lines.append(f"{fmt:<{width}}  {abs_err:>13.3g}  {rel_err:>9.3g}  "
                     f"{result.artifacts[fmt]}")
    if not result.checks:
        for fmt, path in result.artifacts.items():
            lines.append(f"{fmt:<{width}}  {'not verified':>24}  {path}")
    if latency:
        before, after = latency
        lines.append(f"Keras latency, batch 1: {before:.2f} ms before, "
                     f"{after:.2f} ms after ({after / before:.2f}x)")
    return "\n".join(lines)


def run(argv=None):
    parser = _parser()
    args = parser.parse_args(argv)
    from kerasbn.exporting import FORMATS

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise CliError(f"unknown format(s) {','.join(unknown) or '(none)'}; "
                       f"choose from {','.join(FORMATS)}")
    if args.json and not os.access(os.path.dirname(
            os.path.abspath(args.json)), os.W_OK):
        raise CliError(f"cannot write the JSON report to {args.json}")

    def progress(message):
        print(f"[kerasbn-fold] {message}", flush=True)

    progress(f"loading {args.model}")
    import kerasbn  # registers kerasbn's layers before loading

    for spec in args.custom_module:
        _import_custom_module(spec)
    model = load_model(args.model)

    from kerasbn.exporting import ExportError, VerificationError

    try:
        result = kerasbn.export(
            model, args.output, formats, fold=not args.no_fold,
            keep_bn=args.keep_bn, verify=not args.no_verify,
            name=args.name, version=args.version, opset=args.opset,
            rtol=args.rtol, overwrite=args.overwrite, progress=progress,
        )
    except VerificationError as error:
        print(str(error), file=sys.stderr)
        if args.json:
            _write_json(args.json, error.result.to_dict())
        print("kerasbn-fold: verification failed; nothing was written",
              file=sys.stderr)
        return EXIT_VERIFY
    except (ExportError, ValueError, TypeError, ImportError) as error:
        raise CliError(str(error).splitlines()[0]) from error

    latency = None
    if args.latency_runs > 0:
        progress("timing Keras inference before/after folding")
        latency = _latencies(model, result.model, args.latency_runs)
    if result.fold_report is not None:
        print(result.fold_report)
    print(_summary(model, result, latency))
    if args.json:
        report = result.to_dict()
        report["parameters"] = {"before": model.count_params(),
                                "after": result.model.count_params()}
        if latency:
            report["latency_ms_batch1"] = {"before": latency[0],
                                           "after": latency[1]}
        _write_json(args.json, report)
    return EXIT_OK


def _write_json(path, payload):
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, path)


def main(argv=None):
    try:
        return run(argv)
    except CliError as error:
        print(f"kerasbn-fold: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("kerasbn-fold: interrupted; nothing was written",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
