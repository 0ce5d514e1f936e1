"""`make op-sweep`: every keras.activations function and the deployment
keras.layers classes, each behind a foldable BN, through SavedModel, ONNX
and TFLite, at the lowest, default and highest opset.

    python tools/op_sweep.py [--opset 13] [--only gelu,Attention]
                             [--results op-sweep-results.json] [--table]

Each case (`tests/op_cases.py`) is exported with `kerasbn.export` and
verified by it in each runtime (max error <= 1e-4 of the output scale).
A row records, per format, "ok", "ok (rewrite)" when kerasbn rewrote an op
for the converter (`ExportResult.notes`), or the first line of the
refusal; `--table` prints the README table.
"""

import argparse
import json
import os
import re
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FORMATS = ("saved_model", "onnx", "tflite")


def run_case(builder, opset, formats=FORMATS):
    """`{format: outcome}` of one case: "ok", "ok (rewrite: ...)" or the
    first line of the error (a refusal, or a check that failed)."""
    import numpy as np

    import kerasbn
    from tests.helpers import randomize_normalizations

    model = randomize_normalizations(builder(), seed=5)
    shape = (3,) + tuple(model.inputs[0].shape[1:])
    sample = np.random.default_rng(0).uniform(-2.0, 2.0, shape).astype(
        "float32")
    outcome = {}
    for fmt in formats:
        with tempfile.TemporaryDirectory() as tmp:
            try:
                result = kerasbn.export(model, tmp, formats=(fmt,),
                                        sample=sample, opset=opset)
            except Exception as error:  # noqa: BLE001 - recorded.
                outcome[fmt] = (f"{type(error).__name__}: "
                                + (str(error).splitlines() or [""])[0])
                continue
            said = [n for n in result.notes.get(fmt, [])
                    if "rewr" in n or "replaced" in n]
            errors = result.max_errors().get(fmt, (0.0, 0.0))
            outcome[fmt] = ("ok" if not said else "ok (rewrite)") + (
                f" {errors[1]:.1e}")
    return outcome


def cases():
    from tests.op_cases import ACTIVATIONS
    from tests.op_cases import LAYERS

    return {**{f"keras.activations.{k}": v for k, v in ACTIVATIONS.items()},
            **{f"keras.layers.{k}": v for k, v in LAYERS.items()}}


def _cell(outcome):
    """A table cell: "ok", "ok (rewrite)", or the refusal, shortened."""
    if outcome is None:
        return "-"
    if outcome.startswith("ok"):
        return "ok (rewrite)" if "rewrite" in outcome else "ok"
    missing = re.search(r"has no (\w+); it exists from opset (\d+)", outcome)
    if missing:
        return f"refused: no {missing.group(1)} before opset {missing.group(2)}"
    if outcome.startswith("VerificationError"):
        return "refused: differs from Keras (not written)"
    return "refused: " + outcome.split(": ", 2)[-1][:60]


def table(results):
    """Case | SavedModel | TFLite | ONNX at each opset swept."""
    opsets = sorted({int(key.split("@")[1]) for key in results})
    names = list(dict.fromkeys(key.split("@")[0] for key in results))
    lines = ["| case | SavedModel | TFLite | "
             + " | ".join(f"ONNX opset {o}" for o in opsets) + " |",
             "|" + "---|" * (3 + len(opsets))]
    for name in names:
        rows = [results.get(f"{name}@{o}", {}) for o in opsets]
        full = next((r for r in rows if "saved_model" in r), {})
        cells = [name, _cell(full.get("saved_model")),
                 _cell(full.get("tflite"))]
        cells += [_cell(r.get("onnx")) for r in rows]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--opset", action="append", type=int)
    parser.add_argument("--only", default="")
    parser.add_argument("--results", default="op-sweep-results.json")
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args(argv)
    results = {}
    if os.path.exists(args.results):
        with open(args.results) as handle:
            results = json.load(handle)
    if args.table:
        print(table(results))
        return 0
    from kerasbn.exporting._options import DEFAULT_OPSET
    from kerasbn.exporting._options import MIN_OPSET
    from kerasbn.exporting.formats import newest_onnx_opset

    low, high = MIN_OPSET, newest_onnx_opset()
    opsets = args.opset or [DEFAULT_OPSET, low, high]
    wanted = set(filter(None, args.only.split(",")))
    for opset in opsets:
        for name, builder in cases().items():
            short = name.rsplit(".", 1)[-1]
            if wanted and short not in wanted:
                continue
            key = f"{name}@{opset}"
            formats = FORMATS if opset == opsets[0] else ("onnx",)
            results[key] = run_case(builder, opset, formats)
            print(key, results[key], flush=True)
            with open(args.results, "w") as handle:
                json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
