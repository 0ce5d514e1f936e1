"""`make sweep`: every tf-keras application, from every file, to every format.

    python tools/sweep.py [--out sweep-work] [--results sweep-results.json]
                          [--only NAME,NAME] [--formats saved_model,onnx]
                          [--no-jax] [--retry]

For each application tf-keras ships (`tests/stock_files.py`: FAMILIES):

1. tf-keras writes `NAME.h5`, `NAME_savedmodel/` and the oracle `NAME.npz`
   (its own float32 output and the exact float64 one) -- one process for
   all, resumable;
2. `kerasbn-fold NAME.h5` and `kerasbn-fold NAME_savedmodel` each write
   the `--formats` (SavedModel and ONNX; add tflite for the interpreter
   too) in a subprocess per run, so a large model's memory is given back,
   and each artifact is run in its own runtime (`tf.saved_model.load`,
   ONNX Runtime, the TFLite interpreter) and
   compared with the exact output, against the bound of
   tests/test_stock_applications.py: max(1e-5, 8 x the float32 noise of
   the network -- tf-keras' own float32 error, or the exact network's
   response to its input rounded by half an ulp) of the output's scale;
3. on the JAX backend, `load_h5` + `kerasbn.export` (SavedModel, ONNX),
   compared the same way.

Each row is written to `--results` as soon as it is measured (a rerun
skips the rows already there), with the fold counts (folded, replaced by a
multiply-add, kept), the normalization ops left in the SavedModel, the
error and bound of every artifact, the exit status and the first line of
any error. `--table` prints the README table from the results.
"""

import argparse
import glob
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.stock_files import FAMILIES  # noqa: E402
from tests.stock_files import make_stock_files  # noqa: E402

FLOOR, FACTOR = 1e-5, 8.0
# A bound past this verifies nothing: tests/stock_files.py redraws a
# network whose own float32 noise exceeds 1%, and a row whose bound still
# exceeds MAX_BOUND is not counted as verified.
MAX_BOUND = 0.1

# Runs in a subprocess: fold one source with the CLI, check its artifacts.
_CHECK = r'''
import glob, json, os, sys
import numpy as np
source, out, formats, oracle_path, rtol = sys.argv[1:6]
from kerasbn import cli
os.makedirs(os.path.dirname(out), exist_ok=True)
report, sample = out + ".report.json", out + ".sample.npz"
# Verified on the oracle's images, as a user verifies with --sample (see
# tests/test_stock_applications.py).
np.savez(sample, np.load(oracle_path)["input_0"])
status = cli.main([source, "-o", out, "--format", formats, "--latency-runs",
                   "0", "--overwrite", "--json", report, "--sample", sample,
                   "--rtol", rtol])
row = {"status": status}
if os.path.exists(report):
    summary = (json.load(open(report)).get("fold") or {}).get("summary", {})
    for key in ("folded", "replaced", "kept"):
        row[key] = summary.get(key)
oracle = np.load(oracle_path)
x, exact = oracle["input_0"], oracle["exact_0"]
errors = {}
if status == 0:
    import tensorflow as tf
    for saved in glob.glob(os.path.join(out, "saved_model", "*", "1")):
        function = tf.saved_model.load(saved).signatures["serving_default"]
        (key,) = function.structured_input_signature[1]
        (y,) = function(**{key: tf.constant(x)}).values()
        errors["saved_model"] = float(np.abs(y.numpy() - exact).max())
        from kerasbn.folding import tfgraph
        from kerasbn.sources import saved_model as sm
        graph = sm.load_saved_model(saved, "serving_default").graph_def
        row["bn_ops_left"] = sum(n.op in tfgraph.FUSED_OPS
                                 for n in graph.node)
    for path in glob.glob(os.path.join(out, "*.onnx")):
        import onnxruntime as ort
        session = ort.InferenceSession(path,
                                       providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {session.get_inputs()[0].name: x})
        errors["onnx"] = float(np.abs(y - exact).max())
    for path in glob.glob(os.path.join(out, "*.tflite")):
        import tensorflow as tf
        interpreter = tf.lite.Interpreter(model_path=path)
        interpreter.resize_tensor_input(
            interpreter.get_input_details()[0]["index"], x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
        interpreter.invoke()
        y = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        errors["tflite"] = float(np.abs(y - exact).max())
row["errors"] = errors
import resource
# The largest resident memory of this process and of its own children
# (the export's TensorFlow subprocess), in GB.
row["peak_rss_gb"] = round(max(
    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 2 ** 20, 2)
print("ROW " + json.dumps(row))
'''

# Runs in a subprocess on the JAX backend: load the .h5, export, check.
_JAX = r'''
import glob, json, os, sys
os.environ["KERAS_BACKEND"] = "jax"
import numpy as np
source, out, oracle_path, rtol = sys.argv[1:5]
import kerasbn
from kerasbn.sources import keras2
model, _ = keras2.load_h5(source)
oracle = np.load(oracle_path)
x, exact = oracle["input_0"], oracle["exact_0"]
# Checked at the network's float32 noise bound, as the CLI rows are, and
# at least at JAX's own: the same float32 network computed by XLA's
# kernels can stray further from the exact output than TensorFlow's does
# (a chaotic random EfficientNetB1: 3.2e-4 of scale against 1.0e-4), and
# the export compares its artifacts with the JAX model.
scale = float(np.abs(exact).max())
jax_error = float(np.abs(np.asarray(model.predict(x, verbose=0)) - exact).max()
                  / scale)
rtol = max(float(rtol), 8.0 * jax_error)
result = kerasbn.export(model, out, formats=("saved_model", "onnx"),
                        sample=x, overwrite=True, rtol=rtol)
errors = {}
import tensorflow as tf
for saved in glob.glob(os.path.join(out, "saved_model", "*", "1")):
    function = tf.saved_model.load(saved).signatures["serving_default"]
    (key,) = function.structured_input_signature[1]
    (y,) = function(**{key: tf.constant(x)}).values()
    errors["saved_model"] = float(np.abs(y.numpy() - exact).max())
for path in glob.glob(os.path.join(out, "*.onnx")):
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {session.get_inputs()[0].name: x})
    errors["onnx"] = float(np.abs(y - exact).max())
import resource
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
           resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print("ROW " + json.dumps({"status": 0, "errors": errors,
                          "backend_float32_error": jax_error,
                          "peak_rss_gb": round(peak / 2 ** 20, 2)}))
'''


def _run(script, args, env=None, timeout=3600):
    start = time.time()
    try:
        done = subprocess.run([sys.executable, "-c", script] + args,
                              capture_output=True, text=True, env=env,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "seconds": round(time.time() - start)}
    rows = [line[4:] for line in done.stdout.splitlines()
            if line.startswith("ROW ")]
    row = json.loads(rows[-1]) if rows else {"status": done.returncode}
    if row.get("status") != 0:
        lines = [line for line in (done.stdout + done.stderr).splitlines()
                 if line.strip() and not line.startswith(("I0000", "W0000",
                                                           "E0000"))]
        row["error"] = lines[-1][:300] if lines else ""
        if done.returncode < 0:  # the last line says nothing then
            row["error"] = (f"killed by signal {-done.returncode}"
                            + (" (SIGKILL: out of memory?)"
                               if done.returncode == -9 else ""))
    row["seconds"] = round(time.time() - start, 1)
    return row


def _judge(row, oracle_path):
    import numpy as np

    oracle = np.load(oracle_path)
    exact = oracle["exact_0"]
    scale = float(np.abs(exact).max())
    own = float(np.abs(oracle["output_0"] - exact).max()) / scale
    rounding = float(np.abs(oracle["rounded_0"] - exact).max()) / scale
    row["tf_keras_float32_error"] = own
    row["input_rounding_error"] = rounding
    # A JAX row: the JAX model's own float32 error, which its export is
    # checked against (see _JAX).
    backend = row.get("backend_float32_error", 0.0)
    row["bound"] = max(FLOOR, FACTOR * max(own, rounding, backend))
    row["relative_errors"] = {k: v / scale
                              for k, v in row.get("errors", {}).items()}
    row["verified"] = (row.get("status") == 0 and bool(row["relative_errors"])
                       and row["bound"] <= MAX_BOUND
                       and all(v <= row["bound"]
                               for v in row["relative_errors"].values()))
    if row["bound"] > MAX_BOUND:
        row["error"] = (f"the drawn network is chaotic (its own float32 "
                        f"noise gives a bound of {row['bound']:.1e}): "
                        "nothing can be verified on it")
    return row


def sweep(args):
    results = {}
    if os.path.exists(args.results):
        with open(args.results) as handle:
            results = json.load(handle)
    names = args.only.split(",") if args.only else list(FAMILIES)
    env_tf = dict(os.environ, KERAS_BACKEND="tensorflow",
                  TF_CPP_MIN_LOG_LEVEL="2")
    env_jax = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2")
    for name in names:
        make_stock_files(args.out, [name], savedmodel=True)
        oracle = os.path.join(args.out, name + ".npz")
        runs = {"h5": [_CHECK, os.path.join(args.out, name + ".h5")],
                "saved_model": [_CHECK, os.path.join(
                    args.out, name + "_savedmodel")]}
        for source, (script, path) in runs.items():
            key = f"{name}/{source}/tensorflow"
            if key in results and not _retry(args, results[key]):
                continue
            out = os.path.join(args.out, "out", name, source)
            # The CLI checks its artifacts against the Keras / graph model
            # it folded, at this network's float32 noise bound (its default
            # 1e-4 is below the noise of the deepest random networks).
            rtol = str(_judge({}, oracle)["bound"])
            row = _run(script, [path, out, args.formats, oracle, rtol],
                       env_tf)
            results[key] = _judge(dict(row, model=name, source=source,
                                       family=FAMILIES[name][1],
                                       backend="tensorflow"), oracle)
            _write(args.results, results)
            print(_line(key, results[key]), flush=True)
        key = f"{name}/h5/jax"
        if not args.no_jax and (key not in results
                                or _retry(args, results[key])):
            out = os.path.join(args.out, "out", name, "jax")
            rtol = str(_judge({}, oracle)["bound"])
            row = _run(_JAX, [os.path.join(args.out, name + ".h5"), out,
                              oracle, rtol], env_jax)
            results[key] = _judge(dict(row, model=name, source="h5",
                                       family=FAMILIES[name][1],
                                       backend="jax"), oracle)
            _write(args.results, results)
            print(_line(key, results[key]), flush=True)
        for path in glob.glob(os.path.join(args.out, "out", name)):
            subprocess.run(["rm", "-rf", path])
    return results


def _retry(args, row):
    return args.retry and not row.get("verified")


def _write(path, results):
    tmp = path + ".tmp"
    with open(tmp, "w") as handle:
        json.dump(results, handle, indent=1, sort_keys=True)
    os.replace(tmp, path)


def _line(key, row):
    errors = " ".join(f"{k} {v:.1e}"
                      for k, v in row.get("relative_errors", {}).items())
    state = "verified" if row["verified"] else f"FAILED {row.get('error', '')}"
    return f"{key:40s} {state} {errors} (bound {row['bound']:.1e}, " \
           f"{row.get('seconds')} s)"


def _result(row):
    if row["verified"]:
        return "verified"
    if row.get("status") == -9:
        return "not run: out of memory (SIGKILL)"
    return "FAILED"


def table(results):
    """The README's table: one row per application and source."""
    lines = ["| application | source | backend | BN folded / multiply-add / "
             "kept | BN ops left | worst rel. error (bound) | peak memory "
             "| result |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(results, key=lambda k: (
            results[k]["family"], results[k]["model"], k)):
        row = results[key]
        errors = row.get("relative_errors") or {}
        worst = max(errors.values()) if errors else float("nan")
        counts = (f"{row.get('folded', '')} / {row.get('replaced', '')} / "
                  f"{row.get('kept', '')}" if "folded" in row else "")
        h5 = results.get(f"{row['model']}/h5/tensorflow", {})
        if row["source"] == "saved_model" and "folded" in h5 and (
                "folded" in row) and (
                (row.get("folded"), row.get("replaced"))
                != (h5["folded"], h5["replaced"])):
            # The graph-level fold should find what kerasbn.fold finds on
            # the Keras 3 model the .h5 becomes.
            counts += " (.h5: other counts)"
        lines.append(
            f"| {row['model']} | {row['source']} | {row['backend']} | "
            f"{counts} | {row.get('bn_ops_left', '')} | {worst:.1e} "
            f"({row['bound']:.0e}) | "
            + (f"{row['peak_rss_gb']:.1f} GB" if "peak_rss_gb" in row
               else "") + f" | {_result(row)} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="sweep-work")
    parser.add_argument("--results", default="sweep-results.json")
    parser.add_argument("--only", default="")
    parser.add_argument("--formats", default="saved_model,onnx")
    parser.add_argument("--no-jax", action="store_true")
    parser.add_argument("--retry", action="store_true",
                        help="run again the rows of --results that are "
                        "not verified (by default a rerun skips every row "
                        "already there)")
    parser.add_argument("--table", action="store_true",
                        help="print the README table from --results")
    args = parser.parse_args(argv)
    if args.table:
        with open(args.results) as handle:
            print(table(json.load(handle)))
        return 0
    results = sweep(args)
    failed = [key for key, row in results.items() if not row["verified"]]
    print(f"{len(results) - len(failed)} verified, {len(failed)} failed")
    for key in failed:
        print(_line(key, results[key]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
