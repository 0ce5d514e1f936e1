"""Two workers, one set of statistics: training and recalibration under
`tf.distribute.MultiWorkerMirroredStrategy` on 127.0.0.1.

The launcher starts two worker processes (free ports, `TF_CONFIG` set for
each). Each worker holds half of the digits training set and:

1. trains the small CNN with synchronized kerasbn layers (zero-debiased
   BatchNormalization, BatchRenormalization) in a custom loop
   (`strategy.run`; Keras 3's `model.fit` does not run under this
   strategy), global batch 64 = 32 per worker;
2. recalibrates the statistics inside `strategy.scope()` on its own half:
   `kerasbn.recalibrate` reduces each worker's half to (count, mean, m2)
   and merges them exactly over the workers, so both end with the
   statistics of all the data;
3. worker 0 folds the model and exports it (SavedModel + ONNX, verified).

The launcher then trains and recalibrates the same model in one process
on the same global batches and all the data, and prints the largest
differences; it exits non-zero if a worker differs from the single
process by more than 1e-5 (statistics: mean in units of the channel's
standard deviation, variance relative; weights relative to their scale).

    python examples/multi_worker.py [--steps 20] [--out-dir DIR]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np  # noqa: E402

GLOBAL_BATCH = 64
WORKERS = 2
TOLERANCE = 1e-5


def free_ports(count):
    sockets = []
    for _ in range(count):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# -- The model, the data and the training loop (every process). -------------


def build_model():
    import keras

    import kerasbn

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1), name="image")
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    h = kerasbn.layers.BatchNormalization(
        zero_debias=True, synchronized=True, momentum=0.9, name="bn1")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.Conv2D(32, 3, use_bias=False)(h)
    h = kerasbn.layers.BatchRenormalization(
        synchronized=True, momentum=0.9, warmup_steps=5, rmax_steps=20,
        dmax_steps=20, name="renorm2")(h)
    h = keras.layers.ReLU()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    outputs = keras.layers.Dense(10, name="logits")(h)
    return keras.Model(inputs, outputs, name="digits_cnn")


def shards(x, y, steps):
    """Worker i's local batches: step k holds rows [k*64 + 32*i, ... + 32)
    of the training set, so the global batch of step k is rows k*64..+64
    on every layout."""
    local = GLOBAL_BATCH // WORKERS
    for k in range(steps):
        start = k * GLOBAL_BATCH
        yield [(x[start + i * local:start + (i + 1) * local],
                y[start + i * local:start + (i + 1) * local])
               for i in range(WORKERS)]


def train_step_fn(model, optimizer):
    import keras
    import tensorflow as tf

    loss_fn = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="none")

    def step(x, y):
        with tf.GradientTape() as tape:
            logits = model(x, training=True)
            # Sum over this replica's samples / the GLOBAL batch: summed over
            # replicas this is the mean over the global batch.
            loss = tf.reduce_sum(loss_fn(y, logits)) / GLOBAL_BATCH
        grads = tape.gradient(loss, model.trainable_variables)
        optimizer.apply(grads, model.trainable_variables)
        return loss

    return step


def snapshot(model):
    import kerasbn

    out = {}
    for layer in kerasbn.registry.normalization_layers(model):
        for w in layer.non_trainable_weights:
            out[f"stat/{w.path}"] = w.numpy().tolist()
    for w in model.trainable_weights:
        out[f"weight/{w.path}"] = w.numpy().tolist()
    return out


def train_data():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _digits import load_data

    x_train, _, y_train, _ = load_data(seed=0)
    return x_train, y_train


# -- A worker. ---------------------------------------------------------------


def worker(index, ports, steps, out_dir):
    os.environ["TF_CONFIG"] = json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{p}" for p in ports]},
        "task": {"type": "worker", "index": index},
    })
    import keras
    import tensorflow as tf

    import kerasbn

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    x, y = train_data()
    with strategy.scope():
        model = build_model()
        optimizer = keras.optimizers.SGD(0.05)
        optimizer.build(model.trainable_variables)
    step = tf.function(train_step_fn(model, optimizer))
    started = time.perf_counter()
    for batches in shards(x, y, steps):
        xb, yb = batches[index]
        strategy.run(step, args=(tf.constant(xb), tf.constant(yb)))
    trained = time.perf_counter() - started
    np.savez(os.path.join(out_dir, f"worker{index}_trained.npz"),
             *[np.asarray(w) for w in model.get_weights()])

    trained_values = snapshot(model)
    # This worker's half of the data: rows index, index + 2, ...
    half = x[index::WORKERS]
    started = time.perf_counter()
    with strategy.scope():
        recalibrated = kerasbn.recalibrate(model, half, verbose=0)
    seconds = time.perf_counter() - started
    result = {"worker": index, "samples": int(len(half)),
              "train_seconds": trained, "recalibrate_seconds": seconds,
              "trained": trained_values, "values": snapshot(recalibrated)}
    if index == 0:
        report = kerasbn.export(recalibrated,
                                os.path.join(out_dir, "export"),
                                formats=("saved_model", "onnx"),
                                sample=x[:32], overwrite=True)
        result["exported"] = sorted(report.artifacts.values())
    with open(os.path.join(out_dir, f"worker{index}.json"), "w") as f:
        json.dump(result, f)


# -- The launcher. -----------------------------------------------------------


def single_process(steps, trained_weights):
    """One process: the same training on the same global batches (for
    context), and the recalibration of the workers' trained weights on
    all the data (the reference the workers must reproduce)."""
    import keras
    import tensorflow as tf

    import kerasbn

    x, y = train_data()
    model = build_model()
    optimizer = keras.optimizers.SGD(0.05)
    step = tf.function(train_step_fn(model, optimizer))
    for batches in shards(x, y, steps):
        xb = np.concatenate([b[0] for b in batches])
        yb = np.concatenate([b[1] for b in batches])
        step(tf.constant(xb), tf.constant(yb))
    trained_here = snapshot(model)
    model.set_weights(trained_weights)
    return trained_here, snapshot(kerasbn.recalibrate(model, x, verbose=0))


def load_weights(path):
    with np.load(path) as data:
        return [data[f"arr_{i}"] for i in range(len(data.files))]


def differences(worker_values, single_values):
    """Largest difference per kind: statistics (means in units of their
    standard deviation, variances and the rest relative) and weights."""
    worst = {"statistics": 0.0, "weights": 0.0}
    variances = {k.rsplit("/", 1)[0]: np.asarray(v, np.float64)
                 for k, v in single_values.items()
                 if k.endswith("/moving_variance")}
    for key, reference in single_values.items():
        reference = np.asarray(reference, np.float64)
        value = np.asarray(worker_values[key], np.float64)
        if reference.dtype.kind != "f" or reference.size == 0:
            continue
        layer = key.rsplit("/", 1)[0]
        if key.endswith("/moving_mean") and layer in variances:
            scale = np.sqrt(variances[layer]) + 1e-12
            error = float(np.max(np.abs(value - reference) / scale))
        else:
            scale = max(float(np.max(np.abs(reference))), 1e-12)
            error = float(np.max(np.abs(value - reference)) / scale)
        kind = "statistics" if key.startswith("stat/") else "weights"
        worst[kind] = max(worst[kind], error)
    return worst


def launch(steps, out_dir, timeout):
    os.makedirs(out_dir, exist_ok=True)
    ports = free_ports(WORKERS)
    processes = []
    for index in range(WORKERS):
        command = [sys.executable, os.path.abspath(__file__), "--worker",
                   str(index), "--ports", ",".join(map(str, ports)),
                   "--steps", str(steps), "--out-dir", out_dir]
        processes.append(subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True))
    print(f"started {WORKERS} workers on 127.0.0.1:{ports}")
    failed = False
    for index, process in enumerate(processes):
        try:
            output, _ = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            print(f"worker {index} did not finish in {timeout} s")
            return 1
        if process.returncode != 0:
            failed = True
            print(f"worker {index} failed (exit {process.returncode}):\n"
                  + "\n".join(output.splitlines()[-30:]))
    if failed:
        return 1
    trained = [load_weights(os.path.join(out_dir, f"worker{i}_trained.npz"))
               for i in range(WORKERS)]
    mirrored = max(float(np.max(np.abs(a - b)))
                   for a, b in zip(trained[0], trained[1]))
    trained_here, single = single_process(steps, trained[0])
    summary = {"steps": steps, "global_batch": GLOBAL_BATCH,
               "tolerance": TOLERANCE, "workers": [],
               "trained_weights_differ_between_workers": mirrored}
    print(f"trained weights, worker 0 vs worker 1: max difference "
          f"{mirrored:.1e}")
    ok = mirrored == 0.0
    for index in range(WORKERS):
        with open(os.path.join(out_dir, f"worker{index}.json")) as f:
            result = json.load(f)
        worst = differences(result["values"], single)
        training = differences(result["trained"], trained_here)
        ok = ok and worst["statistics"] <= TOLERANCE
        summary["workers"].append({
            "worker": index, "samples": result["samples"],
            "recalibrated_statistics_max_difference": worst["statistics"],
            "training_vs_one_process": training,
            "recalibrate_seconds": round(result["recalibrate_seconds"], 3),
            "exported": result.get("exported", [])})
        print(f"worker {index}: {result['samples']} samples; recalibrated "
              "statistics vs one process on all the data: largest "
              f"difference {worst['statistics']:.1e}")
        print(f"          training vs one process on the same global "
              f"batches (context): weights {training['weights']:.1e}, "
              f"moving statistics {training['statistics']:.1e}")
    summary["agree"] = ok
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"exported by worker 0: {summary['workers'][0]['exported']}")
    print("both workers hold the statistics of one process on all the data"
          if ok else "a worker's statistics differ from one process by more "
          f"than {TOLERANCE}")
    return 0 if ok else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20,
                        help="training steps (global batch 64)")
    parser.add_argument("--out-dir",
                        default=os.path.join("example-output", "multi_worker"))
    parser.add_argument("--timeout", type=float, default=600,
                        help="seconds to wait for the workers")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ports", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        worker(args.worker, [int(p) for p in args.ports.split(",")],
               args.steps, args.out_dir)
        return 0
    return launch(args.steps, os.path.abspath(args.out_dir), args.timeout)


if __name__ == "__main__":
    sys.exit(main())
