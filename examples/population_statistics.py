"""The untold story of BN's moving averages: how far they are from the
population statistics, and what exact statistics give back.

The digits CNN (Keras BatchNormalization after each convolution) is
trained with BN momentum 0.9, 0.99 and 0.999, 3 seeds each. Inference
mode uses the moving averages, which are

- *late* at a high momentum: after t steps a fraction momentum**t of the
  initial values (mean 0, variance 1) is still in them, and the rest
  averages the statistics of weights from many steps ago;
- *stale by construction* after weight averaging: SWA (the mean of the
  weights at the end of the last epochs) and EMA of the weights (decay
  0.99 per step) give weights no batch was ever normalized with, and the
  moving averages still describe the last trained weights.

Each model is evaluated on the test set in inference mode (a) with its
moving averages and (b) after `kerasbn.recalibrate` on the training set
(the exact population statistics of the model's own inputs). Prints a
Markdown table; writes `population_statistics.json` (mean, std and runs
per weights/momentum/statistics) and `population_statistics.png` under
`--out-dir`.

    python examples/population_statistics.py [--seeds 3] [--epochs 6]
                                             [--quick] [--out-dir DIR]
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _digits import accuracy  # noqa: E402
from _digits import build_cnn  # noqa: E402
from _digits import load_data  # noqa: E402
from _digits import save_figure  # noqa: E402

import kerasbn  # noqa: E402

MOMENTA = (0.9, 0.99, 0.999)
WEIGHTS = ("final", "SWA", "EMA")
EMA_DECAY = 0.99
BATCH = 32


class WeightAverages(keras.callbacks.Callback):
    """EMA of the trainable weights after every step, and the weights at
    the end of every epoch from `swa_start` on (their mean is SWA)."""

    def __init__(self, swa_start):
        super().__init__()
        self.swa_start = swa_start
        self.ema = None
        self.snapshots = []

    def on_train_batch_end(self, batch, logs=None):
        current = [np.asarray(w) for w in self.model.trainable_weights]
        if self.ema is None:
            self.ema = current
        else:
            self.ema = [EMA_DECAY * e + (1.0 - EMA_DECAY) * w
                        for e, w in zip(self.ema, current)]

    def on_epoch_end(self, epoch, logs=None):
        if epoch >= self.swa_start:
            self.snapshots.append(
                [np.asarray(w) for w in self.model.trainable_weights])

    def swa(self):
        return [np.mean(ws, axis=0) for ws in zip(*self.snapshots)]


def with_weights(model, trainable):
    """A copy of `model` (moving averages included) whose trainable
    weights are `trainable`."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for variable, value in zip(copy.trainable_weights, trainable):
        variable.assign(value)
    return copy


def run(momentum, seed, epochs, data):
    x_train, x_test, y_train, y_test = data
    model = build_cnn(
        lambda: keras.layers.BatchNormalization(momentum=momentum),
        seed=seed)
    averages = WeightAverages(swa_start=epochs // 2)
    model.fit(x_train, y_train, batch_size=BATCH, epochs=epochs,
              shuffle=True, verbose=0, callbacks=[averages])
    models = {"final": model,
              "SWA": with_weights(model, averages.swa()),
              "EMA": with_weights(model, averages.ema)}
    result = {}
    for name, trained in models.items():
        exact = kerasbn.recalibrate(trained, x_train, batch_size=256,
                                    verbose=0)
        result[name] = {"moving averages": accuracy(trained, x_test, y_test),
                        "recalibrated": accuracy(exact, x_test, y_test)}
    return result


def summarize(runs):
    """`{weights: {momentum: {statistics: {mean, std, runs}}}}`."""
    out = {}
    for weights in WEIGHTS:
        out[weights] = {}
        for momentum in MOMENTA:
            cell = {}
            for kind in ("moving averages", "recalibrated"):
                values = [r[weights][kind] for r in runs[momentum]]
                cell[kind] = {"mean": float(np.mean(values)),
                              "std": float(np.std(values)),
                              "runs": values}
            out[weights][str(momentum)] = cell
    return out


def table(summary):
    lines = ["| weights | BN momentum | moving averages | recalibrated |",
             "|---|---:|---:|---:|"]
    for weights, by_momentum in summary.items():
        for momentum, cell in by_momentum.items():
            a, b = cell["moving averages"], cell["recalibrated"]
            lines.append(
                f"| {weights} | {momentum} | {a['mean']:.3f} +- "
                f"{a['std']:.3f} | {b['mean']:.3f} +- {b['std']:.3f} |")
    return "\n".join(lines)


def plot(summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(WEIGHTS), figsize=(11, 3.6),
                             sharey=True)
    positions = np.arange(len(MOMENTA))
    for ax, weights in zip(axes, WEIGHTS):
        for offset, kind in ((-0.18, "moving averages"),
                             (0.18, "recalibrated")):
            cells = [summary[weights][str(m)][kind] for m in MOMENTA]
            ax.bar(positions + offset, [c["mean"] for c in cells], 0.36,
                   yerr=[c["std"] for c in cells], capsize=3, label=kind)
        ax.set_xticks(positions, [str(m) for m in MOMENTA])
        ax.set_xlabel("BN momentum")
        ax.set_title(f"{weights} weights")
    axes[0].set_ylabel("test accuracy (inference mode)")
    axes[0].set_ylim(0, 1)
    axes[-1].legend(loc="lower right")
    save_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 2 epochs: a smoke run")
    parser.add_argument("--out-dir", default="example-output")
    args = parser.parse_args(argv)
    seeds, epochs = (1, 2) if args.quick else (args.seeds, args.epochs)
    data = load_data(seed=0)
    started = time.perf_counter()
    runs = {m: [run(m, seed, epochs, data) for seed in range(seeds)]
            for m in MOMENTA}
    summary = summarize(runs)
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "population_statistics.json"),
              "w") as f:
        json.dump({"configuration": {"seeds": seeds, "epochs": epochs,
                                     "batch_size": BATCH,
                                     "ema_decay": EMA_DECAY,
                                     "swa_from_epoch": epochs // 2 + 1},
                   "accuracy": summary,
                   "seconds": time.perf_counter() - started}, f, indent=2)
    print(table(summary))
    plot(summary, os.path.join(args.out_dir, "population_statistics.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
