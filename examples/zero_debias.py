"""How far the moving statistics are from the data's, step by step.

Feeds batches of scikit-learn's digits (64 pixel features, scaled to [0, 16])
through Keras' BatchNormalization and kerasbn's zero-debiased one, and
measures after every training step how far each layer's moving mean and
moving variance are from the population mean and variance of the whole
training set (relative RMS error over the 64 channels). Momenta 0.9, 0.99,
0.999; several shuffles. Nothing else is trained, so the only thing that
differs is how the averages start.

Prints a table at chosen steps and writes a plot.

    python examples/zero_debias.py [--steps 300] [--out example-output/zero_debias.png]
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from _digits import load_data  # noqa: E402
from _digits import save_figure  # noqa: E402

import kerasbn  # noqa: E402

MOMENTA = (0.9, 0.99, 0.999)
VARIANTS = {
    "Keras BN": lambda m: keras.layers.BatchNormalization(momentum=m),
    "kerasbn zero_debias='mean'": lambda m: kerasbn.layers.BatchNormalization(
        momentum=m, zero_debias="mean"),
    "kerasbn zero_debias=True": lambda m: kerasbn.layers.BatchNormalization(
        momentum=m, zero_debias=True),
}


def relative_rms(estimate, truth):
    return float(np.sqrt(np.mean((estimate - truth) ** 2))
                 / np.sqrt(np.mean(truth ** 2)))


def trace(factory, features, steps, batch, seed):
    """Mean and variance errors after each of `steps` training calls."""
    rng = np.random.default_rng(seed)
    mean, var = features.mean(0), features.var(0)
    layer = factory()
    layer.build((None, features.shape[1]))
    errors = np.zeros((steps, 2))
    order = rng.permutation(len(features))
    for step in range(steps):
        start = (step * batch) % (len(features) - batch)
        if start < batch:
            order = rng.permutation(len(features))
        layer(features[order[start:start + batch]], training=True)
        errors[step] = (
            relative_rms(layer.moving_mean.numpy(), mean),
            relative_rms(layer.moving_variance.numpy(), var),
        )
    return errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", default="example-output/zero_debias.png")
    args = parser.parse_args(argv)

    x_train, _, _, _ = load_data()
    # Raw pixel intensities 0..16 per channel: means far from BN's initial 0
    # and variances far from its initial 1, as real activations often are.
    features = (x_train.reshape(len(x_train), -1) * 16.0).astype("float32")
    features = features[:, features.std(0) > 0]  # drop constant pixels

    results = {}
    for momentum in MOMENTA:
        for name, make in VARIANTS.items():
            runs = [trace(lambda: make(momentum), features, args.steps,
                          args.batch, seed) for seed in range(args.seeds)]
            results[momentum, name] = np.mean(runs, axis=0)

    checkpoints = [s for s in (1, 10, 100, 1000) if s <= args.steps]
    print(f"digits, {features.shape[1]} pixel channels, batch {args.batch}, "
          f"mean over {args.seeds} shuffles")
    print("relative RMS error of the moving mean / moving variance vs the "
          "population statistics, after N steps")
    header = f"{'momentum':>8}  {'layer':<27}" + "".join(
        f"  {'N=' + str(s):>13}" for s in checkpoints)
    print(header)
    for (momentum, name), errors in results.items():
        cells = "".join(
            f"  {errors[s - 1, 0]:>5.3f} / {errors[s - 1, 1]:>5.3f}"
            for s in checkpoints)
        print(f"{momentum:>8}  {name:<27}{cells}")

    fig, axes = plt.subplots(2, len(MOMENTA), figsize=(4 * len(MOMENTA), 6),
                             sharex=True)
    steps = np.arange(1, args.steps + 1)
    for j, momentum in enumerate(MOMENTA):
        for name, style in zip(VARIANTS, ("-", "--", ":")):
            errors = results[momentum, name]
            for i, what in enumerate(("moving mean", "moving variance")):
                axes[i, j].semilogy(steps, np.maximum(errors[:, i], 1e-4),
                                    style, label=name, linewidth=1.6)
                axes[i, j].set_title(f"{what}, momentum {momentum}")
    for ax in axes[1]:
        ax.set_xlabel("training step")
    for ax in axes[:, 0]:
        ax.set_ylabel("relative RMS error")
    axes[0, 0].legend(fontsize=8)
    save_figure(fig, args.out)

    # The claim this example backs: debiased statistics are never worse at
    # the start, and much better with large momenta.
    early = min(10, args.steps) - 1
    plain = results[0.999, "Keras BN"][early, 0]
    debiased = results[0.999, "kerasbn zero_debias=True"][early, 0]
    if not debiased < plain:
        print("UNEXPECTED: debiased mean error not below Keras' at step "
              f"{early + 1}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
