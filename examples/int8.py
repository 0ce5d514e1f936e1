"""int8 and float16 deployment of a BN CNN: what each choice costs.

Trains the examples' small CNN (three 3x3 convolutions, each with
kerasbn's BatchRenormalization and ReLU, GAP, Dense logits;
`_digits.build_cnn`) on
scikit-learn's handwritten digits (1347 training, 450 test images of 8x8,
shipped, offline), then exports it with `kerasbn.export` in these ways:

- `float32 ONNX`: the folded model, the reference for size and speed;
- `int8 ONNX, per-channel`: ONNX Runtime's `quantize_static`, QDQ, one
  weight scale per output channel (kerasbn's default);
- `int8 ONNX, per-tensor`: one weight scale per kernel;
- `int8 ONNX, per-tensor + equalize`: the same after cross-layer
  equalization (`equalize=True`, exact in float);
- `int8 ONNX, not folded`: per-channel, but the BN layers left in the
  graph (`fold=False`): what quantizing a model straight from Keras gives;
- `float32 TFLite`, `int8 TFLite` (full integer, float I/O), the same
  `not folded`, and `float16` ONNX and TFLite;
- `spread: ...`: the same trained network rewritten so that its folded
  kernels' channel ranges are 1000x apart (`with_spread`: the float
  outputs do not change), exported per-channel, per-tensor, and
  per-tensor after equalization: where the choice of scheme matters.

Every int8 artifact is calibrated on the same 256 training images and
measured on the 450 test images: test accuracy, top-1 agreement with the
float Keras model, size on disk, and batch-1 latency (median of
`--runs` calls each, all artifacts timed in interleaved rounds; ONNX
Runtime with spin-waiting off, TFLite with 2 threads). Latency on an
8x8 model is mostly the runtime's fixed cost per call: the ratios here
say little about big models (those are `tools/benchmark.py --only
quantized`). The per-layer int8 numerics of the folded model
(`kerasbn.quantization_report`) are printed and saved too.

Outputs, in `--out-dir` (default `example-output/int8`): `int8.json`
(every figure, the numerics report), `int8.png` (accuracy and latency
per artifact), and the artifacts themselves under `artifacts/`.

    python examples/int8.py            # about 20 s on 2 cores
    python examples/int8.py --quick    # fewer epochs and timing runs
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _digits  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerasbn  # noqa: E402

# label -> (model, format, export options); "spread" is the trained
# model with its channel ranges spread `SPREAD`x (`with_spread`).
VARIANTS = {
    "float32 ONNX": ("trained", "onnx", {}),
    "int8 ONNX, per-channel": ("trained", "onnx_int8", {}),
    "int8 ONNX, per-tensor": ("trained", "onnx_int8", {"per_channel": False}),
    "int8 ONNX, per-tensor + equalize": (
        "trained", "onnx_int8", {"per_channel": False, "equalize": True}),
    "int8 ONNX, not folded": ("trained", "onnx_int8", {"fold": False}),
    "float16 ONNX": ("trained", "onnx_fp16", {}),
    "float32 TFLite": ("trained", "tflite", {}),
    "int8 TFLite": ("trained", "tflite_int8", {}),
    "int8 TFLite, not folded": ("trained", "tflite_int8", {"fold": False}),
    "float16 TFLite": ("trained", "tflite_fp16", {}),
    "spread: int8 ONNX, per-channel": ("spread", "onnx_int8", {}),
    "spread: int8 ONNX, per-tensor": (
        "spread", "onnx_int8", {"per_channel": False}),
    "spread: int8 ONNX, per-tensor + equalize": (
        "spread", "onnx_int8", {"per_channel": False, "equalize": True}),
    "spread: int8 TFLite": ("spread", "tflite_int8", {}),
}
CALIBRATION = 256
SPREAD = 1000.0


def normalization():
    """Batch renormalization (kerasbn's), momentum 0.9 so that the moving
    statistics settle within a short run. Converters fold plain Keras BN
    themselves; they do not fold this layer's inference ops."""
    return kerasbn.layers.BatchRenormalization(momentum=0.9)


def train(x_train, y_train, epochs):
    model = _digits.build_cnn(norm=normalization)
    model.fit(x_train, y_train, epochs=epochs, batch_size=32, verbose=0)
    return model


def with_spread(model, factor=SPREAD, seed=0):
    """The same function, its channel ranges `factor`x apart after folding.

    For each normalization followed by ReLU (and pooling) and then a
    convolution, channel c's gamma and beta are multiplied by `s_c` and
    the convolution's input channel c divided by it (`ReLU(s x) = s
    ReLU(x)` for s > 0), with `s` log-spaced from 1/sqrt(factor) to
    sqrt(factor) in a random channel order. Float outputs are unchanged;
    the folded kernels now have the spread that trained networks often
    show on their own (Nagel et al. 2019 found it in MobileNetV2) and
    that per-tensor int8 cannot hold.
    """
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    rng = np.random.default_rng(seed)
    layers = copy.layers
    for i, layer in enumerate(layers):
        if not hasattr(layer, "moving_mean"):
            continue
        after = next((later for later in layers[i + 1:] if isinstance(
            later, keras.layers.Conv2D)), None)
        if after is None or not all(
                isinstance(b, (keras.layers.ReLU, keras.layers.MaxPooling2D))
                for b in layers[i + 1:layers.index(after)]):
            continue
        n = layer.gamma.shape[0]
        scale = rng.permutation(np.geomspace(factor ** -0.5, factor ** 0.5,
                                             n))
        layer.gamma.assign(layer.gamma.numpy() * scale)
        layer.beta.assign(layer.beta.numpy() * scale)
        kernel = after.kernel.numpy()
        after.kernel.assign(kernel / scale[:, None])
    return copy


def export_variant(model, directory, fmt, options, x_train, x_test):
    """`(path, check)`: the artifact and its reduced-precision check.

    The bounds are opened (agreement 0, relative RMS 1e9) so that every
    variant is written and measured, the bad ones included: this example
    reports, it does not gate.
    """
    result = kerasbn.export(
        model, directory, [fmt], name="digits",
        calibration=x_train[:CALIBRATION] if "int8" in fmt else None,
        validation=x_test, min_agreement=0.0, max_rel_rms=1e9,
        **options)
    return result.artifacts[fmt], result.reduced_checks().get(fmt)


def runner(path):
    """A batch-1 callable `x -> logits` for an ONNX or TFLite file."""
    if path.endswith(".onnx"):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning",
                                         "0")
        session = ort.InferenceSession(path, options,
                                       providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=path, num_threads=2)
    interpreter.allocate_tensors()
    source = interpreter.get_input_details()[0]["index"]
    target = interpreter.get_output_details()[0]["index"]

    def run(x):
        interpreter.set_tensor(source, x)
        interpreter.invoke()
        return interpreter.get_tensor(target)
    return run


def predict(run, x):
    """Logits of every image, one at a time (the artifacts' batch is 1
    for TFLite)."""
    return np.concatenate([run(x[i:i + 1]) for i in range(len(x))])


def latencies(runs, x, repeats):
    """Median seconds per batch-1 call of each runner, interleaved."""
    times = {label: [] for label in runs}
    for round_ in range(repeats + 2):
        for label, run in runs.items():
            start = time.perf_counter()
            run(x)
            if round_ >= 2:  # Two untimed warm-up rounds.
                times[label].append(time.perf_counter() - start)
    return {label: statistics.median(t) for label, t in times.items()}


def measure(model, out_dir, x_train, x_test, y_test, repeats):
    float_logits = model.predict(x_test, verbose=0)
    models = {"trained": model, "spread": with_spread(model)}
    rows, runs = {}, {}
    for label, (which, fmt, options) in VARIANTS.items():
        directory = os.path.join(out_dir, "artifacts", "".join(
            c if c.isalnum() else "_" for c in label))
        path, check = export_variant(models[which], directory, fmt,
                                     options, x_train, x_test)
        runs[label] = runner(path)
        logits = predict(runs[label], x_test)
        rows[label] = {
            "model": which, "format": fmt, "options": options, "path": path,
            "accuracy": float(np.mean(logits.argmax(-1) == y_test)),
            "agreement": float(np.mean(logits.argmax(-1)
                                       == float_logits.argmax(-1))),
            "rel_rms": None if check is None else check["rel_rms"],
            "worst_layer": None if check is None else check["worst_layer"],
            "bytes": os.path.getsize(path)}
    seconds = latencies(runs, x_test[:1], repeats)
    for label, row in rows.items():
        row["latency_ms"] = 1e3 * seconds[label]
    spread = models["spread"].predict(x_test, verbose=0)
    return float(np.max(np.abs(spread - float_logits))
                 / np.max(np.abs(float_logits))), rows


def table(rows, float_accuracy):
    lines = [f"float Keras model: test accuracy {float_accuracy:.4f}",
             f"{'artifact':<42} {'accuracy':>8} {'agree':>6} {'rel RMS':>8}"
             f" {'KiB':>7} {'ms':>6}"]
    for label, r in rows.items():
        rms = "-" if r["rel_rms"] is None else f"{r['rel_rms']:.4f}"
        lines.append(f"{label:<42} {r['accuracy']:>8.4f} "
                     f"{r['agreement']:>6.3f} {rms:>8} "
                     f"{r['bytes'] / 1024:>7.1f} {r['latency_ms']:>6.3f}")
    return "\n".join(lines)


def plot(rows, float_accuracy, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(rows)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    positions = np.arange(len(labels))
    left.barh(positions, [rows[k]["accuracy"] for k in labels],
              color="tab:blue")
    left.axvline(float_accuracy, color="k", linestyle="--",
                 label="float Keras model")
    left.axvline(float_accuracy - 0.01, color="tab:red", linestyle=":",
                 label="-1 point")
    lows = [rows[k]["accuracy"] for k in labels] + [float_accuracy]
    left.set_xlim(max(0.0, min(lows) - 0.02), 1.0)
    left.set_yticks(positions, labels)
    left.invert_yaxis()
    left.set_xlabel("test accuracy (450 images)")
    left.legend(loc="upper left", bbox_to_anchor=(0.0, -0.12), ncol=2,
                fontsize=8)
    right.barh(positions, [rows[k]["latency_ms"] for k in labels],
               color="tab:green")
    right.set_xlabel("batch-1 latency, ms (median)")
    fig.suptitle("digits CNN: int8 and float16 artifacts by kerasbn.export")
    _digits.save_figure(fig, path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="4 epochs, 30 timing rounds (a smoke run)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default 15, --quick 4)")
    parser.add_argument("--runs", type=int, default=None,
                        help="timing rounds (default 200, --quick 30)")
    parser.add_argument("--out-dir",
                        default=os.path.join("example-output", "int8"))
    args = parser.parse_args(argv)
    epochs = args.epochs or (4 if args.quick else 15)
    repeats = args.runs or (30 if args.quick else 200)
    x_train, x_test, y_train, y_test = _digits.load_data()
    model = train(x_train, y_train, epochs)
    float_accuracy = _digits.accuracy(model, x_test, y_test)
    shutil.rmtree(os.path.join(args.out_dir, "artifacts"),
                  ignore_errors=True)
    spread_gap, rows = measure(model, args.out_dir, x_train, x_test,
                               y_test, repeats)
    report = kerasbn.quantization_report(model, x_train[:CALIBRATION])
    spread_report = kerasbn.quantization_report(
        with_spread(model), x_train[:CALIBRATION], per_channel=False)
    print(table(rows, float_accuracy))
    print(f"spread model vs trained model, float: max logit gap "
          f"{spread_gap:.2g} of the largest logit")
    print()
    print(report)
    print()
    print(spread_report)
    os.makedirs(args.out_dir, exist_ok=True)
    summary = {"epochs": epochs, "timing_rounds": repeats,
               "calibration_images": CALIBRATION,
               "test_images": int(len(x_test)),
               "float_accuracy": float_accuracy, "spread": SPREAD,
               "spread_float_gap": spread_gap, "artifacts": rows,
               "numerics": json.loads(report.to_json()),
               "spread_numerics": json.loads(spread_report.to_json())}
    path = os.path.join(args.out_dir, "int8.json")
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
    print(f"wrote {path}")
    plot(rows, float_accuracy, os.path.join(args.out_dir, "int8.png"))


if __name__ == "__main__":
    main()
