"""kerasbn quickstart on scikit-learn's handwritten digits (shipped, offline).

1. Trains the same small CNN twice, once with Keras' BatchNormalization and
   once with kerasbn's zero-debiased BatchNormalization, and evaluates both
   in inference mode early in training (where stale moving statistics hurt)
   and at the end.
2. Folds every BN of the kerasbn model into its convolutions, exports the
   folded model to a TF Serving SavedModel and ONNX (verified against the
   trained model), serves the test set from each runtime, and times each
   runtime at batch 1 and 32.

Prints tables; exits non-zero if the trained model is not a working
classifier or a runtime disagrees with it.

    python examples/quickstart.py [--epochs 8] [--momentum 0.99] [--out DIR]
"""

import argparse
import os
import shutil
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from _digits import build_cnn  # noqa: E402
from _digits import load_data  # noqa: E402

import kerasbn  # noqa: E402


class EarlyEvaluation(keras.callbacks.Callback):
    """Inference-mode test accuracy after a given number of training steps."""

    def __init__(self, x, y, at_step):
        super().__init__()
        self.x, self.y, self.at_step = x, y, at_step
        self.accuracy = None
        self._step = 0

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if self._step == self.at_step:
            logits = self.model.predict(self.x, verbose=0)
            self.accuracy = float(np.mean(logits.argmax(-1) == self.y))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--momentum", type=float, default=0.99)
    parser.add_argument("--early-step", type=int, default=15)
    parser.add_argument("--out", default="demo-output",
                        help="export directory (replaced on each run)")
    args = parser.parse_args(argv)

    x_train, x_test, y_train, y_test = load_data()
    print(f"digits: {len(x_train)} training and {len(x_test)} test images "
          f"of 8x8, 10 classes")
    variants = {
        "keras.layers.BatchNormalization": lambda: (
            keras.layers.BatchNormalization(momentum=args.momentum)),
        "kerasbn BatchNormalization(zero_debias=True)": lambda: (
            kerasbn.layers.BatchNormalization(momentum=args.momentum,
                                              zero_debias=True)),
    }
    results, models = {}, {}
    for name, factory in variants.items():
        model = build_cnn(factory)
        early = EarlyEvaluation(x_test, y_test, args.early_step)
        start = time.perf_counter()
        model.fit(x_train, y_train, batch_size=32, epochs=args.epochs,
                  callbacks=[early], verbose=0)
        seconds = time.perf_counter() - start
        loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
        results[name] = (early.accuracy, accuracy, loss, seconds)
        models[name] = model

    width = max(map(len, results))
    print(f"\nmomentum={args.momentum}; test accuracy in inference mode")
    print(f"{'layer':<{width}}  after {args.early_step:>3} steps  "
          f"after {args.epochs} epochs  test loss  train s")
    for name, (early_acc, acc, loss, seconds) in results.items():
        print(f"{name:<{width}}  {early_acc:>14.3f}  {acc:>15.3f}  "
              f"{loss:>9.3f}  {seconds:>7.1f}")
    leftover = args.momentum ** args.early_step
    print("\nEarly in training Keras' moving statistics still hold "
          f"momentum**t of their initial value ({args.momentum}**"
          f"{args.early_step} = {leftover:.2f}); the zero-debiased ones are "
          "a proper average of the batches seen.")

    final_accuracy = results[list(variants)[1]][1]
    if final_accuracy < 0.9:
        print(f"FAILED: kerasbn model reached only {final_accuracy:.3f} test "
              "accuracy (expected >= 0.9)", file=sys.stderr)
        return 1
    return fold_export_and_serve(models[list(variants)[1]], x_test, y_test,
                                 args.out)


def median_ms(fn, repeats=50):
    """Median milliseconds of `fn()` after two warm-up calls."""
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


def print_latency(original, folded, serve, session, x_test):
    """Batch-1 and batch-32 latency in each runtime (medians of 50 calls)."""
    import tensorflow as tf

    runtimes = {
        "Keras (original, with BN)": tf.function(
            lambda x: original(x, training=False)),
        "Keras (folded)": tf.function(lambda x: folded(x, training=False)),
        "TF SavedModel (folded)": lambda x: serve(image=x),
        "ONNX Runtime (folded)": lambda x: session.run(
            ["logits"], {"image": x.numpy()}),
    }
    print(f"\n{'runtime':<28} {'batch 1 ms':>10} {'batch 32 ms':>11}")
    for name, fn in runtimes.items():
        cells = [median_ms(lambda b=b: fn(tf.constant(x_test[:b])))
                 for b in (1, 32)]
        print(f"{name:<28} {cells[0]:>10.3f} {cells[1]:>11.3f}")


def fold_export_and_serve(model, x_test, y_test, out):
    """Fold, export (SavedModel + ONNX, verified) and serve the test set."""
    import onnxruntime as ort
    import tensorflow as tf

    print("\n== fold and export ==")
    shutil.rmtree(out, ignore_errors=True)
    result = kerasbn.export(model, out, formats=["saved_model", "onnx"],
                            sample=x_test[:32])
    print(result.fold_report)
    print(result)

    keras_logits = model.predict(x_test, verbose=0)
    served = tf.saved_model.load(result.artifacts["saved_model"])
    serve = served.signatures["serving_default"]
    session = ort.InferenceSession(result.artifacts["onnx"],
                                   providers=["CPUExecutionProvider"])
    runtimes = {
        "Keras (original, with BN)": keras_logits,
        "TF SavedModel (folded)": serve(image=tf.constant(x_test))[
            "logits"].numpy(),
        "ONNX Runtime (folded)": session.run(["logits"],
                                             {"image": x_test})[0],
    }
    print(f"\nserving {len(x_test)} test images from each runtime")
    print(f"{'runtime':<28} accuracy  max |logit - Keras|  "
          "predictions = Keras")
    failed = False
    for name, logits in runtimes.items():
        accuracy = float(np.mean(logits.argmax(-1) == y_test))
        gap = float(np.max(np.abs(logits - keras_logits)))
        same = float(np.mean(logits.argmax(-1) == keras_logits.argmax(-1)))
        print(f"{name:<28} {accuracy:>8.3f}  {gap:>19.2e}  {same:>19.1%}")
        failed |= same < 1.0
    if failed:
        print("FAILED: a runtime disagrees with the Keras model",
              file=sys.stderr)
        return 1
    print_latency(model, result.model, serve, session, x_test)
    print(f"\nartifacts in {os.path.abspath(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
