"""Where should BN go? After every convolution, once early, or nowhere.

Trains the examples' small CNN on scikit-learn's digits in three layouts,
several seeds, the same optimizer (Adam 3e-3) and epochs:

- "every conv": kerasbn BatchNormalization after each of the 3 convolutions,
- "first conv only": one BN after the first convolution,
- "none": no normalization (convolutions keep their bias).

Prints test accuracy (inference mode) as mean and spread, and the
train/inference gap, writes learning curves, and prints `kerasbn.diagnose`'s
report for each trained model on the test data, which is where a
misplaced or redundant BN shows up.

    python examples/placement.py [--epochs 8] [--seeds 3] [--out PNG]
    python examples/placement.py --quick
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from _digits import accuracy  # noqa: E402
from _digits import build_cnn  # noqa: E402
from _digits import load_data  # noqa: E402
from _digits import save_figure  # noqa: E402

import kerasbn  # noqa: E402


def bn():
    return kerasbn.layers.BatchNormalization(momentum=0.9)


LAYOUTS = {
    "every conv": dict(norm=bn, norm_after=(True, True, True)),
    "first conv only": dict(norm=bn, norm_after=(True, False, False)),
    "none": dict(norm=None),
}


class TestAccuracy(keras.callbacks.Callback):
    def __init__(self, x, y):
        super().__init__()
        self.x, self.y, self.history = x, y, []

    def on_epoch_end(self, epoch, logs=None):
        self.history.append(accuracy(self.model, self.x, self.y))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="2 epochs, 1 seed")
    parser.add_argument("--out", default="example-output/placement.png")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds = 2, 1

    x_train, x_test, y_train, y_test = load_data()
    start = time.perf_counter()
    curves, finals, models = {}, {}, {}
    for name, layout in LAYOUTS.items():
        curves[name], finals[name] = [], []
        for seed in range(args.seeds):
            keras.backend.clear_session()
            model = build_cnn(seed=seed, name=name.replace(" ", "_"),
                              **layout)
            tracker = TestAccuracy(x_test, y_test)
            model.fit(x_train, y_train, batch_size=32, epochs=args.epochs,
                      verbose=0, callbacks=[tracker])
            curves[name].append(tracker.history)
            finals[name].append(tracker.history[-1])
        models[name] = model

    print(f"digits, Adam 3e-3, batch 32, {args.epochs} epochs, "
          f"{args.seeds} seed(s)")
    print(f"{'layout':<16} {'BN layers':>9}  test accuracy mean (min-max)")
    for name, accs in finals.items():
        count = sum(isinstance(layer, keras.layers.BatchNormalization)
                    for layer in models[name].layers)
        accs = np.asarray(accs)
        print(f"{name:<16} {count:>9}  {accs.mean():.3f} "
              f"({accs.min():.3f}-{accs.max():.3f})")
    print(f"({time.perf_counter() - start:.0f} s)")

    diagnose = getattr(kerasbn, "diagnose", None)
    if diagnose is not None:
        for name, model in models.items():
            if name == "none":
                continue
            print(f"\nkerasbn.diagnose, layout '{name}' (last seed), on the "
                  "test images:")
            print(diagnose(model, x_test, verbose=0))

    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = np.arange(1, args.epochs + 1)
    for name, runs in curves.items():
        runs = np.asarray(runs)
        ax.plot(epochs, runs.mean(0), marker="o", label=name)
        ax.fill_between(epochs, runs.min(0), runs.max(0), alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (inference mode)")
    ax.set_title("BN placement, digits CNN")
    ax.legend()
    save_figure(fig, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
