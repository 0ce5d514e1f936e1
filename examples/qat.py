"""Quantization-aware training with folded BN against post-training
quantization, measured on the deployed integer artifacts.

A digits CNN with a depthwise-separable block (Conv+BN+ReLU,
DepthwiseConv+BN+ReLU6, 1x1 Conv+BN+ReLU, max pooling, Conv+BN+ReLU, GAP,
Dense logits) is trained in float on scikit-learn's handwritten digits
(1347 training, 450 test images of 8x8, shipped, offline). Then, for each
setting, from the same float weights:

- `ptq`: the best post-training quantization kerasbn offers. For 8-bit
  weights, `kerasbn.export(..., calibration=256 training images)`
  (ONNX Runtime's `quantize_static` and TFLite's converter; per-tensor
  with `equalize=True`). For 4-bit and fewer, which those tools do not
  write, `prepare_qat` with no training: round-to-nearest low-bit kernels
  and activation ranges observed on the same 256 images, exported by the
  same QAT path (ONNX INT4 storage, opset 21).
- `qat`: `prepare_qat` and `--qat-epochs` of `fit` (Adam 1e-4; batch
  statistics frozen after the first epoch, `FreezeBatchStatistics`),
  exported with the scales it learned (no calibration).

Each artifact's test accuracy is measured in its runtime (ONNX Runtime;
TFLite where the format holds the setting: not 4-bit). `float` is the
float Keras model's. Over `--seeds` seeds (each its own float training),
`qat.json` holds `{setting: {method: {"mean", "std", "runs"}}}` with, per
setting, the agreement of each QAT artifact with its Keras model and, where
PTQ loses 2 points or more, the share of that loss QAT recovers with a
bootstrap interval over seeds. `qat.png` plots the accuracies.

    python examples/qat.py            # 5 seeds, about 6 minutes on 2 cores
    python examples/qat.py --quick    # 1 seed, short training (a smoke run)
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _digits  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402

import kerasbn  # noqa: E402
from kerasbn.quantization import FreezeBatchStatistics  # noqa: E402
from kerasbn.quantization import freeze_batch_statistics  # noqa: E402
from kerasbn.quantization import prepare_qat  # noqa: E402

# The three settings, then lower until PTQ loses 2 points: on this
# network PTQ keeps its accuracy down to 4-bit weights per channel (and
# within a point per tensor), so 3-bit per tensor and 2-bit per channel
# are where quantization-aware training has something to recover.
SETTINGS = {
    "w8a8 per-channel": dict(weight_bits=8, per_channel=True),
    "w8a8 per-tensor": dict(weight_bits=8, per_channel=False),
    "w4a8 per-channel": dict(weight_bits=4, per_channel=True),
    "w4a8 per-tensor": dict(weight_bits=4, per_channel=False),
    "w3a8 per-tensor": dict(weight_bits=3, per_channel=False),
    "w2a8 per-channel": dict(weight_bits=2, per_channel=True),
}
CALIBRATION = 256
BOOTSTRAP = 10000
LOSS = keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def build(seed):
    keras.utils.set_random_seed(seed)

    def bn():
        return keras.layers.BatchNormalization(momentum=0.9)

    inputs = keras.Input((8, 8, 1), name="image")
    x = keras.layers.Conv2D(32, 3, padding="same", use_bias=False)(inputs)
    x = keras.layers.ReLU()(bn()(x))
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = keras.layers.ReLU(6.0)(bn()(x))
    x = keras.layers.Conv2D(64, 1, use_bias=False)(x)
    x = keras.layers.ReLU()(bn()(x))
    x = keras.layers.MaxPooling2D()(x)
    x = keras.layers.Conv2D(64, 3, use_bias=False)(x)
    x = keras.layers.ReLU()(bn()(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(10, name="logits")(x)
    model = keras.Model(inputs, outputs, name="digits")
    model.compile(keras.optimizers.Adam(3e-3), LOSS)
    return model


def runner(path):
    """`x -> logits` for an ONNX or TFLite file, the whole batch at once."""
    if path.endswith(".onnx"):
        import onnxruntime as ort

        session = ort.InferenceSession(path,
                                       providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: session.run(None, {name: x})[0]
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=path)
    source = interpreter.get_input_details()[0]["index"]

    def run(x):
        interpreter.resize_tensor_input(source, x.shape)
        interpreter.allocate_tensors()
        interpreter.set_tensor(source, x)
        interpreter.invoke()
        return interpreter.get_tensor(
            interpreter.get_output_details()[0]["index"])
    return run


def accuracy(logits, y):
    return float(np.mean(np.asarray(logits).argmax(-1) == y))


def formats_for(setting):
    return (("onnx_int8",) if setting["weight_bits"] <= 4
            else ("onnx_int8", "tflite_int8"))


def export(model, directory, formats, x_test, **options):
    """Artifacts `{format: path}`. The bounds are opened: this example
    measures every artifact, it does not gate them."""
    result = kerasbn.export(model, directory, formats, name="digits",
                            sample=x_test[:64], min_agreement=0.0,
                            max_rel_rms=1e9, **options)
    return result.artifacts


def ptq(model, setting, directory, x_train, x_test):
    formats = formats_for(setting)
    if setting["weight_bits"] == 8:
        per_channel = setting["per_channel"]
        return export(model, directory, formats, x_test,
                      calibration=x_train[:CALIBRATION],
                      per_channel=per_channel, equalize=not per_channel)
    # Round-to-nearest low-bit kernels, ranges observed on the calibration
    # images: the QAT model with no training step.
    quantized = prepare_qat(model, warmup_steps=0, range_momentum=0.9,
                            **setting)
    freeze_batch_statistics(quantized)
    for start in range(0, CALIBRATION, 32):
        quantized(x_train[start:start + 32], training=True)
    return export(quantized, directory, formats, x_test, opset=21)


def qat(model, setting, directory, x_train, y_train, x_test, epochs):
    quantized = prepare_qat(model, **setting)
    # Fine-tuning at a thirtieth of the float training's rate: at 3e-4, two
    # of five seeds lost 3-5 points at w3a8 per-tensor (mean 0.976 vs 0.988).
    quantized.compile(keras.optimizers.Adam(1e-4), LOSS)
    steps_per_epoch = -(-len(x_train) // 32)
    quantized.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=0,
                  callbacks=[FreezeBatchStatistics(steps_per_epoch)])
    opset = 21 if setting["weight_bits"] <= 4 else 17
    paths = export(quantized, directory, formats_for(setting), x_test,
                   opset=opset)
    keras_logits = keras.ops.convert_to_numpy(quantized(x_test,
                                                        training=False))
    return quantized, paths, keras_logits


def one_seed(seed, data, epochs, qat_epochs, work):
    x_train, x_test, y_train, y_test = data
    model = build(seed)
    model.fit(x_train, y_train, batch_size=32, epochs=epochs, verbose=0)
    rows = {}
    float_accuracy = accuracy(model.predict(x_test, verbose=0), y_test)
    for name, setting in SETTINGS.items():
        tag = "".join(c if c.isalnum() else "_" for c in name)
        row = {"float": float_accuracy}
        paths = ptq(model, setting, os.path.join(work, f"{tag}_ptq_{seed}"),
                    x_train, x_test)
        for fmt, path in paths.items():
            row[f"ptq {fmt}"] = accuracy(runner(path)(x_test), y_test)
        _, paths, keras_logits = qat(
            model, setting, os.path.join(work, f"{tag}_qat_{seed}"),
            x_train, y_train, x_test, qat_epochs)
        row["qat keras"] = accuracy(keras_logits, y_test)
        for fmt, path in paths.items():
            logits = runner(path)(x_test)
            row[f"qat {fmt}"] = accuracy(logits, y_test)
            row[f"agreement {fmt}"] = float(np.mean(
                logits.argmax(-1) == keras_logits.argmax(-1)))
        rows[name] = row
        print(f"seed {seed} {name}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in row.items()), flush=True)
    return rows


def summary(values):
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "runs": values}


def recovered(floats, ptqs, qats, seed=0):
    """Share of PTQ's loss that QAT recovers, `(qat - ptq) / (float -
    ptq)` of the means over seeds, and its 95% bootstrap interval (seeds
    resampled with replacement; with 3 seeds the interval is coarse)."""
    floats, ptqs, qats = (np.asarray(v, float) for v in (floats, ptqs, qats))
    share = (qats.mean() - ptqs.mean()) / (floats.mean() - ptqs.mean())
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(floats), (BOOTSTRAP, len(floats)))
    loss = floats[picks].mean(1) - ptqs[picks].mean(1)
    gain = qats[picks].mean(1) - ptqs[picks].mean(1)
    valid = loss > 0
    shares = gain[valid] / loss[valid]
    low, high = (np.percentile(shares, [2.5, 97.5]) if shares.size
                 else (float("nan"), float("nan")))
    return {"share": float(share), "interval_95": [float(low), float(high)],
            "bootstrap_samples": int(valid.sum())}


def collect(runs):
    """`{setting: {method: {"mean", "std", "runs"}}}`, methods `float`,
    `ptq`, `qat` (ONNX Runtime accuracy of the artifacts), each with its
    extras: the TFLite artifact's accuracy (`tflite`), PTQ's loss in
    points (`loss_points`), the QAT artifacts' top-1 agreement with the
    QAT Keras model (`agreement_with_keras`), the QAT Keras model's own
    accuracy (`keras`), and the share of PTQ's loss QAT recovers
    (`recovers`, where PTQ loses 2 points or more)."""
    out = {}
    for name, setting in SETTINGS.items():
        rows = [run[name] for run in runs]
        column = {key: [r[key] for r in rows] for key in rows[0]}
        methods = {"float": summary(column["float"]),
                   "ptq": summary(column["ptq onnx_int8"]),
                   "qat": summary(column["qat onnx_int8"])}
        if "tflite_int8" in formats_for(setting):
            methods["ptq"]["tflite"] = summary(column["ptq tflite_int8"])
            methods["qat"]["tflite"] = summary(column["qat tflite_int8"])
        methods["qat"]["keras"] = summary(column["qat keras"])
        methods["qat"]["agreement_with_keras"] = {
            fmt: summary(column[f"agreement {fmt}"])
            for fmt in formats_for(setting)}
        loss = methods["float"]["mean"] - methods["ptq"]["mean"]
        methods["ptq"]["loss_points"] = 100 * loss
        if loss >= 0.02:
            methods["qat"]["recovers"] = recovered(
                column["float"], column["ptq onnx_int8"],
                column["qat onnx_int8"])
        out[name] = methods
    return out


def table(results):
    lines = [f"{'setting':<18} {'float':>7} {'PTQ':>7} {'QAT':>7} "
             f"{'PTQ loss':>9} {'QAT recovers':>22}"]
    for name, entry in results.items():
        share = entry["qat"].get("recovers")
        text = "-" if share is None else (
            f"{share['share']:.0%} [{share['interval_95'][0]:.0%}, "
            f"{share['interval_95'][1]:.0%}]")
        lines.append(
            f"{name:<18} {entry['float']['mean']:>7.4f} "
            f"{entry['ptq']['mean']:>7.4f} {entry['qat']['mean']:>7.4f} "
            f"{entry['ptq']['loss_points']:>8.1f}p {text:>22}")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, axis = plt.subplots(figsize=(10, 4.5))
    width = 0.27
    for i, method in enumerate(("float", "ptq", "qat")):
        means = [results[n][method]["mean"] for n in names]
        stds = [results[n][method]["std"] for n in names]
        axis.bar(np.arange(len(names)) + (i - 1) * width, means, width,
                 yerr=stds, capsize=3, label=method)
    axis.set_xticks(np.arange(len(names)),
                    [n.replace(" ", "\n") for n in names])
    low = min(results[n][m]["mean"] for n in names
              for m in ("float", "ptq", "qat"))
    axis.set_ylim(max(0.0, low - 0.05), 1.0)
    axis.set_ylabel("test accuracy of the deployed artifact (ONNX Runtime)")
    axis.legend(loc="lower left")
    axis.set_title("digits CNN: post-training vs quantization-aware "
                   "training")
    _digits.save_figure(fig, path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 4 float epochs, 1 QAT epoch")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--epochs", type=int, default=None,
                        help="float training epochs (default 15)")
    parser.add_argument("--qat-epochs", type=int, default=None,
                        help="QAT fine-tuning epochs (default 5)")
    parser.add_argument("--out-dir", default="example-output")
    args = parser.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 5)
    epochs = args.epochs or (4 if args.quick else 15)
    qat_epochs = args.qat_epochs or (1 if args.quick else 5)
    data = _digits.load_data()
    with tempfile.TemporaryDirectory() as work:
        runs = [one_seed(seed, data, epochs, qat_epochs, work)
                for seed in range(seeds)]
    results = collect(runs)
    print(table(results))
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "qat.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {path}")
    plot(results, os.path.join(args.out_dir, "qat.png"))


if __name__ == "__main__":
    main()
