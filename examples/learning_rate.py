"""Does BN mainly buy a larger learning rate? The same CNN with and without BN.

Trains the examples' small CNN on scikit-learn's digits with plain SGD
(momentum 0.9) over a range of learning rates, once with kerasbn's
BatchNormalization after every convolution and once without any
normalization (convolutions then get their bias back), several seeds each,
the same number of epochs everywhere. Prints test accuracy (inference mode)
per learning rate as mean and spread, and writes a plot.

    python examples/learning_rate.py [--epochs 6] [--seeds 2] [--out PNG]
    python examples/learning_rate.py --quick
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

LEARNING_RATES = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
VARIANTS = {
    "BN": lambda: kerasbn.layers.BatchNormalization(momentum=0.9),
    "no BN": None,
}


def run(norm, lr, seed, data, epochs):
    x_train, x_test, y_train, y_test = data
    model = build_cnn(norm, seed=seed,
                      optimizer=keras.optimizers.SGD(lr, momentum=0.9))
    history = model.fit(x_train, y_train, batch_size=32, epochs=epochs,
                        verbose=0, shuffle=True)
    if not np.isfinite(history.history["loss"][-1]):
        return 0.1  # diverged: chance level
    return accuracy(model, x_test, y_test)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--quick", action="store_true",
                        help="2 epochs, 1 seed, 4 learning rates")
    parser.add_argument("--out", default="example-output/learning_rate.png")
    args = parser.parse_args(argv)
    rates = LEARNING_RATES
    if args.quick:
        args.epochs, args.seeds, rates = 2, 1, (0.01, 0.1, 1.0, 3.0)

    data = load_data()
    start = time.perf_counter()
    scores = {name: np.zeros((len(rates), args.seeds)) for name in VARIANTS}
    for name, norm in VARIANTS.items():
        for i, lr in enumerate(rates):
            for seed in range(args.seeds):
                keras.backend.clear_session()
                scores[name][i, seed] = run(norm, lr, seed, data, args.epochs)

    print(f"digits, SGD(momentum=0.9), batch 32, {args.epochs} epochs, "
          f"{args.seeds} seed(s); test accuracy mean (min-max)")
    print(f"{'learning rate':>13}" + "".join(f"  {n:>19}" for n in VARIANTS))
    for i, lr in enumerate(rates):
        cells = "".join(
            f"  {s[i].mean():>7.3f} ({s[i].min():.3f}-{s[i].max():.3f})"
            for s in scores.values())
        print(f"{lr:>13g}{cells}")
    for name, s in scores.items():
        means = s.mean(1)
        good = [lr for lr, m in zip(rates, means) if m >= 0.9]
        span = (f"{min(good):g} to {max(good):g}" if good else "none")
        print(f"{name}: best {means.max():.3f} at lr={rates[means.argmax()]:g};"
              f" learning rates reaching 0.9: {span}")
    print(f"({time.perf_counter() - start:.0f} s)")

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in scores.items():
        ax.errorbar(rates, s.mean(1), yerr=[s.mean(1) - s.min(1),
                                            s.max(1) - s.mean(1)],
                    marker="o", capsize=3, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (SGD, momentum 0.9)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"digits CNN, {args.epochs} epochs")
    ax.legend()
    save_figure(fig, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
