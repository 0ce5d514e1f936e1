"""Batch size 2, i.i.d. and non-i.i.d.: which normalization recovers BN@32?

Trains the examples' small CNN (three 3x3 convolutions, each followed by a
normalization and ReLU; `_digits.build_cnn`) on scikit-learn's handwritten
digits (1347 training and 450 test images of 8x8, shipped, offline) with
five normalizations, in two settings, for several seeds, and asks how much
of the accuracy that Keras BN loses at batch 2 each method wins back.

Settings (how the training batches are drawn):

- `iid`: every epoch is a fresh uniform permutation of the training set cut
  into consecutive batches of `b`; the last `n mod b` images of the
  permutation are not used in that epoch (so every batch has exactly `b`
  images: a batch of 1 would give BN a zero variance).
- `non-iid`: every batch holds images of ONE class. Per epoch, for each
  class `c` in 0..9 in turn, the class's training indices are permuted and
  cut into `floor(n_c / b)` consecutive chunks of `b` (its last `n_c mod b`
  images are not used in that epoch); the chunks of all classes are then
  put in a uniformly random order, one chunk per batch. So every batch has
  exactly `b` images of a single class, and every training image is used
  at most once per epoch (all but at most `b - 1` per class). At batch 2
  this is the only rule that is really non-i.i.d.: an i.i.d. batch of 2
  already holds at most 2 classes. It is the extreme of Ioffe's (2017,
  section 4.2) experiment, where 2 classes per batch of 32 hurt BN:
  statistics of one class are biased, so the moving averages used at
  inference differ from the normalization seen in training.

Both use `numpy.random.default_rng(seed)` and draw the epochs one after
another, so a seed fixes the whole batch sequence; the same seed also fixes
the weight initialization, so all methods of a seed start from the same
weights and (at the same batch size and setting) see the same batches.

Methods (labels as in the outputs):

- `BN@32`: `keras.layers.BatchNormalization(momentum=0.9)` at batch 32: the
  large-batch reference. It always trains on i.i.d. batches, in both
  settings (the same runs are reported under both): it stands for what the
  net reaches with BN trained the ordinary way, which the small-batch
  methods should get back to. Single-class batches of 32 break BN itself
  (that is Ioffe's experiment), so they would not give a ceiling, and the
  gap would then mix in the very effect being measured. Momentum 0.9: the
  run has 16x fewer steps than at batch 2, and with Keras' 0.99 the moving
  statistics would still hold 0.99**(42*epochs) of their initial values.
- `BN@2`: Keras BN at batch 2, Keras' momentum 0.99.
- `BatchRenormalization@2`: `kerasbn.layers.BatchRenormalization`, rmax=3,
  dmax=5, momentum and renorm_momentum 0.99, and the paper's schedule
  (plain BN for 5k steps, dmax reached at 25k, rmax at 40k) scaled to this
  run: the three milestones keep their ratios 5 : 25 : 40 and rmax is
  reached half-way through the run (`warmup_steps = T/16`, `dmax_steps =
  5T/16`, `rmax_steps = T/2` for `T` training steps).
- `MABN@2`: `kerasbn.layers.CenteredConv2D` + `MovingAverageBatchNormalization`
  with the reference's defaults (momentum 0.98, `buffer_size=16`, i.e.
  batch 2 averaged over 16 steps to act like batch 32, `warmup_steps=100`,
  `clip_start_step=1000`).
- `GroupNorm@2`: `keras.layers.GroupNormalization(groups=4)` (all layers
  have 32 or 64 channels): per-image statistics, no batch dependence, the
  usual replacement for BN at tiny batch.

By default the small-batch methods also run at batch 4 (`BN@4`, ...;
`--batches` picks the small batch sizes); the gap is always the one
between BN@2 (the smallest batch) and BN@32.

Budget: the same number of epochs for every method (batch 2 takes 16x as
many optimizer steps as batch 32); Adam, lr 1e-3 everywhere.

Evaluation, on the 450 test images: inference mode (moving statistics),
and again after `kerasbn.recalibrate(model, x_train)`, which sets every
BN/BatchRenormalization/MABN layer's statistics to the exact population
statistics of its inputs over the training set. GroupNorm has no
statistics: its recalibrated accuracy is its plain one.

Report, per setting and method: mean, standard deviation (NumPy's default,
ddof=0) and the runs; and the share of the BN@2 -> BN@32 gap each method
closes, `(acc_method - acc_BN@2) / (acc_BN@32 - acc_BN@2)`, always measured
against the plain (inference-mode) BN@2 and BN@32 of the same setting, for
the recalibrated accuracies too (so "BN@2 recalibrated" says how much of
the gap recalibration alone wins back). Its 95% interval is a percentile
bootstrap: 2000 resamples (seed 0), each resampling the seeds with
replacement within BN@2, BN@32 and the method independently. With few
seeds the interval is coarse: a resample of 3 runs can only be one of 10
multisets, of 5 runs (the default) one of 126, and the spread of 3-5 runs
underestimates the seed-to-seed spread. It is left out ("n/a (gap within
noise)") where more than 2.5% of the resamples have no positive gap.

Outputs, in `--out-dir` (default `example-output`):

- `small_batch.json`: `{setting: {method: {"mean", "std", "runs"}}}`, the
  plain inference-mode accuracies;
- `small_batch_details.json`: configuration, recalibrated accuracies in the
  same shape, the gap shares with their intervals, and timings;
- `small_batch.png`: mean +- std per method and setting, plain and
  recalibrated, with the seeds as dots;

and prints a Markdown table.

    python examples/small_batch.py [--epochs 4] [--seeds 5] [--batches 2 4]
    python examples/small_batch.py --quick --out-dir /tmp/x   # smoke run
"""

import argparse
import json
import logging
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

SETTINGS = ("iid", "non-iid")
REFERENCE_BATCH = 32
BOOTSTRAP_RESAMPLES = 2000


# --------------------------------------------------------------------------
# Batch samplers.


def iid_batches(n, batch_size, rng):
    """One epoch of i.i.d. batches: a permutation of `range(n)` cut into
    `n // batch_size` rows of `batch_size` indices (the rest is unused)."""
    order = rng.permutation(n)
    count = n // batch_size
    return order[:count * batch_size].reshape(count, batch_size)


def non_iid_batches(labels, batch_size, rng):
    """One epoch of single-class batches, `(batches, batch_size)` indices.

    For each class in increasing order its indices are permuted and cut
    into `floor(n_c / batch_size)` chunks (the last `n_c mod batch_size`
    are unused this epoch); the chunks of all classes are then shuffled.
    """
    labels = np.asarray(labels)
    chunks = []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        count = len(members) // batch_size
        chunks.append(members[:count * batch_size].reshape(count, batch_size))
    chunks = np.concatenate(chunks)
    return chunks[rng.permutation(len(chunks))]


def training_order(labels, batch_size, epochs, setting, seed):
    """Indices of all training batches of a run, epoch after epoch, flat."""
    rng = np.random.default_rng(seed)
    epochs_of_batches = [
        iid_batches(len(labels), batch_size, rng) if setting == "iid"
        else non_iid_batches(labels, batch_size, rng)
        for _ in range(epochs)]
    return np.concatenate(epochs_of_batches).ravel()


# --------------------------------------------------------------------------
# Methods and one training run.


def renorm_schedule(total_steps):
    """The paper's milestones (5k warm-up, dmax at 25k, rmax at 40k) with
    their ratios kept and rmax reached at half of `total_steps`."""
    return dict(warmup_steps=max(1, total_steps // 16),
                dmax_steps=max(1, 5 * total_steps // 16),
                rmax_steps=max(1, total_steps // 2))


def methods(batches):
    """label -> (batch size, factory(total_steps) -> (norm factory, conv)).

    The reference first, then each small-batch method at each batch size.
    """
    conv = keras.layers.Conv2D
    table = {f"BN@{REFERENCE_BATCH}": (REFERENCE_BATCH, lambda steps: (
        lambda: keras.layers.BatchNormalization(momentum=0.9), conv))}
    for b in batches:
        table[f"BN@{b}"] = (b, lambda steps: (
            keras.layers.BatchNormalization, conv))
        table[f"BatchRenormalization@{b}"] = (b, lambda steps: (
            lambda: kerasbn.layers.BatchRenormalization(
                rmax=3.0, dmax=5.0, momentum=0.99, renorm_momentum=0.99,
                **renorm_schedule(steps)), conv))
        table[f"MABN@{b}"] = (b, lambda steps: (
            kerasbn.layers.MovingAverageBatchNormalization,
            kerasbn.layers.CenteredConv2D))
        table[f"GroupNorm@{b}"] = (b, lambda steps: (
            lambda: keras.layers.GroupNormalization(groups=4), conv))
    return table


def train_and_evaluate(make, batch, setting, seed, data, epochs):
    """Train one model; test accuracy `(plain, recalibrated)`."""
    x_train, x_test, y_train, y_test = data
    order = training_order(y_train, batch, epochs, setting, seed)
    norm, conv = make(len(order) // batch)
    # Several optimizer steps per call of the compiled function: the same
    # updates, less Python overhead per step (which dominates at batch 2).
    model = build_cnn(norm, conv=conv, seed=seed,
                      optimizer=keras.optimizers.Adam(1e-3),
                      steps_per_execution=32)
    model.fit(x_train[order], y_train[order], batch_size=batch, epochs=1,
              shuffle=False, verbose=0)
    plain = accuracy(model, x_test, y_test)
    if any(isinstance(layer, keras.layers.GroupNormalization)
           for layer in model.layers):
        recalibrated = plain  # no statistics to recalibrate
    else:
        fresh = kerasbn.recalibrate(model, x_train, batch_size=256,
                                    verbose=0)
        recalibrated = accuracy(fresh, x_test, y_test)
    keras.backend.clear_session()
    return plain, recalibrated


def run_all(args, data):
    """`results[kind][setting][label]` = accuracies per seed (kind: plain or
    recalibrated), and seconds per label."""
    results = {kind: {s: {} for s in SETTINGS}
               for kind in ("plain", "recalibrated")}
    seconds = {}
    for label, (batch, make) in methods(args.batches).items():
        start = time.perf_counter()
        for setting in SETTINGS:
            if batch == REFERENCE_BATCH and setting != "iid":
                # The reference trains on i.i.d. batches in both settings.
                for kind in results:
                    results[kind][setting][label] = results[kind]["iid"][label]
                continue
            runs = [train_and_evaluate(make, batch, setting, seed, data,
                                       args.epochs)
                    for seed in range(args.seeds)]
            results["plain"][setting][label] = [r[0] for r in runs]
            results["recalibrated"][setting][label] = [r[1] for r in runs]
            print(f"  {label:<24} {setting:<8} plain "
                  + " ".join(f"{r[0]:.3f}" for r in runs) + "  recalibrated "
                  + " ".join(f"{r[1]:.3f}" for r in runs), flush=True)
        seconds[label] = time.perf_counter() - start
    return results, seconds


# --------------------------------------------------------------------------
# Statistics.


def summary(runs):
    """`{"mean", "std", "runs"}` of a list of accuracies (std with ddof=0)."""
    runs = [float(a) for a in runs]
    return {"mean": float(np.mean(runs)), "std": float(np.std(runs)),
            "runs": runs}


def gap_share(method, low, high, resamples=BOOTSTRAP_RESAMPLES, seed=0):
    """Share of the `low` -> `high` gap that `method` closes, and its 95%
    percentile-bootstrap interval (seeds resampled within each group);
    the interval is None where over 2.5% of resamples have no positive gap."""
    method, low, high = (np.asarray(a, dtype=float)
                         for a in (method, low, high))
    gap = high.mean() - low.mean()
    estimate = (method.mean() - low.mean()) / gap if gap > 0 else None
    rng = np.random.default_rng(seed)

    def means(a):
        return a[rng.integers(0, len(a), (resamples, len(a)))].mean(1)

    m, lo, hi = means(method), means(low), means(high)
    ok = hi - lo > 0
    if estimate is None or ok.mean() < 0.975:
        return {"estimate": estimate, "ci95": None}
    shares = (m[ok] - lo[ok]) / (hi[ok] - lo[ok])
    interval = np.percentile(shares, [2.5, 97.5])
    return {"estimate": float(estimate), "ci95": [float(v) for v in interval]}


def analyse(results, batches):
    """Summaries and gap shares per kind, setting and method."""
    reference, low = f"BN@{REFERENCE_BATCH}", f"BN@{min(batches)}"
    summaries = {kind: {s: {label: summary(runs)
                            for label, runs in by_label.items()}
                        for s, by_label in by_setting.items()}
                 for kind, by_setting in results.items()}
    shares = {kind: {s: {label: gap_share(runs, results["plain"][s][low],
                                          results["plain"][s][reference])
                         for label, runs in by_label.items()}
                     for s, by_label in by_setting.items()}
              for kind, by_setting in results.items()}
    return summaries, shares


# --------------------------------------------------------------------------
# Output.


def format_share(share):
    if share["estimate"] is None:
        return "n/a (no gap)"
    text = f"{100 * share['estimate']:.0f}%"
    if share["ci95"] is None:
        return "n/a (gap within noise)"
    lo, hi = share["ci95"]
    return text + f" [{100 * lo:.0f}, {100 * hi:.0f}]"


def markdown_table(summaries, shares):
    """The Markdown table of the run, one row per setting and method."""
    lines = ["| setting | method | test accuracy | share of gap closed "
             "[95% CI] | recalibrated | share of gap closed [95% CI] |",
             "|---|---|---|---|---|---|"]
    for setting in SETTINGS:
        for label, plain in summaries["plain"][setting].items():
            recal = summaries["recalibrated"][setting][label]
            lines.append(
                f"| {setting} | {label} | {plain['mean']:.3f} +- "
                f"{plain['std']:.3f} | "
                f"{format_share(shares['plain'][setting][label])} | "
                f"{recal['mean']:.3f} +- {recal['std']:.3f} | "
                f"{format_share(shares['recalibrated'][setting][label])} |")
    return "\n".join(lines)


def plot(summaries, path):
    """Bars: mean +- std per method, plain and recalibrated; dots: seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SETTINGS), figsize=(12, 4.2), sharey=True)
    width = 0.38
    for ax, setting in zip(axes, SETTINGS):
        labels = list(summaries["plain"][setting])
        for shift, kind, colour in ((-width / 2, "plain", "tab:blue"),
                                    (width / 2, "recalibrated", "tab:orange")):
            for i, label in enumerate(labels):
                s = summaries[kind][setting][label]
                ax.bar(i + shift, s["mean"], width, yerr=s["std"], capsize=3,
                       color=colour, alpha=0.75,
                       label=kind if i == 0 else None)
                ax.scatter(np.full(len(s["runs"]), i + shift), s["runs"],
                           color="k", s=8, zorder=3)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_title(f"{setting} training batches")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("test accuracy (bar: mean +- std; dots: seeds)")
    axes[0].legend(loc="lower left")
    fig.suptitle("Small CNN on scikit-learn digits: small-batch "
                 "normalizations vs BN at batch 32 (i.i.d.)")
    save_figure(fig, path)
    plt.close(fig)


def write_outputs(args, summaries, shares, seconds, total_seconds):
    os.makedirs(args.out_dir, exist_ok=True)
    main_path = os.path.join(args.out_dir, "small_batch.json")
    with open(main_path, "w") as f:
        json.dump(summaries["plain"], f, indent=1)
    details = {
        "config": {"epochs": args.epochs, "seeds": args.seeds,
                   "batches": args.batches,
                   "reference_batch": REFERENCE_BATCH,
                   "reference_setting": "iid",
                   "non_iid_rule": "one class per batch",
                   "train_size": args.train_size or None,
                   "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
                   "quick": args.quick},
        "plain": summaries["plain"],
        "recalibrated": summaries["recalibrated"],
        "gap_share": shares,
        "seconds_per_method": seconds,
        "seconds_total": total_seconds,
    }
    with open(os.path.join(args.out_dir, "small_batch_details.json"),
              "w") as f:
        json.dump(details, f, indent=1)
    print(f"wrote {main_path} and small_batch_details.json")
    plot(summaries, os.path.join(args.out_dir, "small_batch.png"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--batches", type=int, nargs="+", default=None,
                        help="small batch sizes (default: 2 4; --quick: 2)")
    parser.add_argument("--train-size", type=int, default=0,
                        help="use only the first N training images (0: all)")
    parser.add_argument("--out-dir", default="example-output",
                        help="folder of the JSON files and the plot")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 epoch, 1 seed, 200 images, "
                        "batch 2")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.seeds, args.train_size = 1, 1, 200
    if args.batches is None:
        args.batches = [2] if args.quick else [2, 4]

    # Every run builds new models, so TensorFlow warns that it retraces
    # their predict function; that is expected here.
    logging.getLogger("tensorflow").setLevel(logging.ERROR)
    start = time.perf_counter()
    data = load_data()
    if args.train_size:
        x_train, x_test, y_train, y_test = data
        data = (x_train[:args.train_size], x_test, y_train[:args.train_size],
                y_test)
    print(f"digits: {len(data[0])} training and {len(data[1])} test images; "
          f"{args.epochs} epochs per run, seeds {list(range(args.seeds))}, "
          f"batches {args.batches} and {REFERENCE_BATCH} (i.i.d.)")
    results, seconds = run_all(args, data)
    summaries, shares = analyse(results, args.batches)
    total = time.perf_counter() - start
    print()
    print(markdown_table(summaries, shares))
    print(f"\n{total:.0f} s in all")
    write_outputs(args, summaries, shares, seconds, total)
    reference = summaries["plain"]["iid"][f"BN@{REFERENCE_BATCH}"]["mean"]
    if reference < 0.9 and not args.quick:
        print(f"FAILED: the BN@{REFERENCE_BATCH} reference reached only "
              f"{reference:.3f} test accuracy", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
