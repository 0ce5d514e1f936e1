#!/usr/bin/env python
"""kerasbn benchmarks: ratios measured side by side in one run.

Every benchmark times two (or more) models in the same process, interleaving
their repeats so that the machine's drift hits all of them alike, and
reports the ratio of medians against a stated target. Absolute times are
printed for context only; compare ratios.

    python tools/benchmark.py                 # everything, Markdown + JSON
    python tools/benchmark.py --quick         # fewer repeats
    python tools/benchmark.py --only bn_train_step --json out.json
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import kerasbn  # noqa: E402


def interleaved_medians(functions, repeats, warmup=2):
    """Median seconds per call of each function, calls interleaved.

    Args:
        functions: Dict name -> zero-argument callable doing one unit of work.
        repeats: Timed rounds; each round calls every function once.
        warmup: Untimed rounds first (tracing, allocation).
    """
    for _ in range(warmup):
        for fn in functions.values():
            fn()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, fn in functions.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def row(benchmark, model, batch, numerator, denominator, target, note=""):
    return {
        "benchmark": benchmark,
        "model": model,
        "batch": batch,
        "ratio": numerator / denominator,
        "numerator_ms": 1e3 * numerator,
        "denominator_ms": 1e3 * denominator,
        "target": target,
        "note": note,
    }


# --------------------------------------------------------------------------
# Issue 2: training step of kerasbn.layers.BatchNormalization vs Keras' layer.


def small_cnn(bn_factory, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    h = inputs
    for filters in (16, 32, 64):
        h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
        h = bn_factory()(h)
        h = keras.layers.ReLU()(h)
        h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(10)(h)
    model = keras.Model(inputs, outputs)
    model.compile(
        optimizer=keras.optimizers.SGD(0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def bench_bn_train_step(quick):
    batch = 32
    steps = 5 if quick else 10
    repeats = 7 if quick else 21
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=(batch,))
    factories = {
        "keras": keras.layers.BatchNormalization,
        "off": lambda: kerasbn.layers.BatchNormalization(),
        "mean": lambda: kerasbn.layers.BatchNormalization(zero_debias="mean"),
        "both": lambda: kerasbn.layers.BatchNormalization(zero_debias=True),
    }
    models = {name: small_cnn(f) for name, f in factories.items()}

    def steps_of(model):
        def run():
            for _ in range(steps):
                model.train_on_batch(x, y)
        return run

    medians = interleaved_medians(
        {name: steps_of(m) for name, m in models.items()}, repeats
    )
    per_step = {name: t / steps for name, t in medians.items()}
    targets = {"off": "<= 1.03", "mean": "<= 1.08", "both": "<= 1.08"}
    labels = {"off": "zero_debias=False", "mean": "zero_debias='mean'",
              "both": "zero_debias=True"}
    return [
        row("train step / Keras BN", f"small CNN, {labels[name]}", batch,
            per_step[name], per_step["keras"], targets[name])
        for name in ("off", "mean", "both")
    ]


BENCHMARKS = {
    "bn_train_step": bench_bn_train_step,
}


def markdown_table(rows):
    lines = [
        "| benchmark | model | batch | ratio | numerator ms | denominator ms "
        "| target |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['benchmark']} | {r['model']} | {r['batch']} "
            f"| {r['ratio']:.3f} | {r['numerator_ms']:.2f} "
            f"| {r['denominator_ms']:.2f} | {r['target']} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="fewer repeats (a smoke run, noisier ratios)")
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS),
                        help="run only this benchmark (repeatable)")
    parser.add_argument("--json", default="bench-results.json",
                        help="where to write the rows (default: %(default)s)")
    args = parser.parse_args(argv)

    rows = []
    for name in args.only or list(BENCHMARKS):
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.extend(BENCHMARKS[name](args.quick))
    table = markdown_table(rows)
    print(table)
    meta = {
        "command": "python tools/benchmark.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "keras": keras.__version__,
        "kerasbn": kerasbn.__version__,
        "quick": args.quick,
    }
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
