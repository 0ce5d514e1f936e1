#!/usr/bin/env python
"""kerasbn benchmarks: ratios measured side by side in one run.

Every benchmark times two (or more) models in the same process, interleaving
their repeats so that the machine's drift hits all of them alike, and
reports the ratio of medians against a stated target. Absolute times are
printed for context only; compare ratios.

    python tools/benchmark.py                 # everything, Markdown + JSON
    python tools/benchmark.py --quick         # fewer repeats
    python tools/benchmark.py --only bn_train_step --json out.json
    python tools/benchmark.py --only backends  # train steps on JAX, torch
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
    backend = keras.backend.backend()
    if backend != "tensorflow":
        benchmark = f"{benchmark} [{backend}]"
    return {
        "benchmark": benchmark,
        "backend": backend,
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


def small_cnn(bn_factory, seed=0, conv=keras.layers.Conv2D):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    h = inputs
    for filters in (16, 32, 64):
        h = conv(filters, 3, padding="same", use_bias=False)(h)
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


def train_step_seconds(models, batch, quick, seed=0):
    """Median seconds per `train_on_batch` step of each model, side by side.

    Each timed unit is several steps on one fixed batch (model.fit's
    compiled step, graph mode, XLA off), the models' units interleaved.
    """
    steps = 5 if quick else 10
    repeats = 7 if quick else 21
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=(batch,))

    def steps_of(model):
        def run():
            for _ in range(steps):
                model.train_on_batch(x, y)
        return run

    medians = interleaved_medians(
        {name: steps_of(m) for name, m in models.items()}, repeats)
    return {name: t / steps for name, t in medians.items()}


def bench_bn_train_step(quick):
    batch = 32
    factories = {
        "keras": keras.layers.BatchNormalization,
        "off": lambda: kerasbn.layers.BatchNormalization(),
        "mean": lambda: kerasbn.layers.BatchNormalization(zero_debias="mean"),
        "both": lambda: kerasbn.layers.BatchNormalization(zero_debias=True),
    }
    models = {name: small_cnn(f) for name, f in factories.items()}
    per_step = train_step_seconds(models, batch, quick)
    targets = {"off": "<= 1.03", "mean": "<= 1.08", "both": "<= 1.08"}
    labels = {"off": "zero_debias=False", "mean": "zero_debias='mean'",
              "both": "zero_debias=True"}
    return [
        row("train step / Keras BN", f"small CNN, {labels[name]}", batch,
            per_step[name], per_step["keras"], targets[name])
        for name in ("off", "mean", "both")
    ]


# --------------------------------------------------------------------------
# Issue 29: synchronized BN (2 replicas) vs Keras' synchronized BN.

# Set in the child process bench_sync_bn starts: TensorFlow's logical
# devices can only be split before its runtime starts.
_SPLIT_CPUS = "KERASBN_BENCH_SPLIT_CPUS"
if os.environ.get(_SPLIT_CPUS):
    import tensorflow as _tf

    _tf.config.set_logical_device_configuration(
        _tf.config.list_physical_devices("CPU")[0],
        [_tf.config.LogicalDeviceConfiguration()] * 2)


def _sync_variance_error(strategy, layer, loc):
    """Relative error of one step's moving variance against NumPy float64
    (inputs loc + N(0, 1), momentum 0, the global batch of 16)."""
    x = np.random.default_rng(29).normal(loc, 1.0, (16, 4, 4, 3)).astype(
        "float32")
    with strategy.scope():
        model = keras.Sequential([keras.Input((4, 4, 3)),
                                  layer(momentum=0.0, synchronized=True)])
        model.compile(loss="mse", optimizer=keras.optimizers.SGD(0.0))
    model.fit(x, np.zeros_like(x), batch_size=16, verbose=0, shuffle=False)
    want = x.astype(np.float64).var(axis=(0, 1, 2))
    got = np.asarray(model.layers[0].moving_variance, np.float64)
    return float(np.max(np.abs(got - want) / want))


def bench_sync_bn(quick):
    """Train step of the small CNN with `synchronized=True` BNs under a
    2-replica MirroredStrategy (2 logical CPUs), kerasbn / Keras, and each
    one's moving-variance error at mean/std 1000 (in the note)."""
    import subprocess
    import tempfile

    import tensorflow as tf

    if not os.environ.get(_SPLIT_CPUS):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.json")
            command = [sys.executable, os.path.abspath(__file__), "--json",
                       out, "--only", "sync_bn"] + (
                ["--quick"] if quick else [])
            subprocess.run(command, env=dict(os.environ, **{_SPLIT_CPUS: "1"}),
                           check=True, stdout=subprocess.DEVNULL)
            with open(out) as f:
                return json.load(f)["rows"]
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    strategy = tf.distribute.MirroredStrategy(devices)
    layers = {"keras": keras.layers.BatchNormalization,
              "kerasbn": kerasbn.layers.BatchNormalization}
    errors = {name: _sync_variance_error(strategy, layer, 1000.0)
              for name, layer in layers.items()}
    batch = 32
    with strategy.scope():
        models = {name: small_cnn(lambda l=layer: l(synchronized=True))
                  for name, layer in layers.items()}
    per_step = train_step_seconds(models, batch, quick)
    return [row("sync train step / Keras sync BN",
                "small CNN, 2 replicas (MirroredStrategy, 2 logical CPUs)",
                batch, per_step["kerasbn"], per_step["keras"], "<= 1.10",
                f"moving variance rel. error at mean/std 1000: kerasbn "
                f"{errors['kerasbn']:.1e}, Keras {errors['keras']:.1e}; "
                "all-reduces per BN: 2 vs 3")]


# --------------------------------------------------------------------------
# Issue 6: training step of kerasbn.layers.BatchRenormalization vs Keras'
# renorm layer (whose clipping is constant).


def bench_renorm(quick):
    """Train-step time with the scheduled layer / Keras' renorm layer
    (target <= 1.05 on TensorFlow, issue 6; <= 1.03 on JAX and PyTorch,
    issue 15). The schedule is mid-ramp, so every clip bound is a live
    tensor computed from the step counter."""
    batch = 32
    clipping = {"rmax": 3.0, "rmin": 1.0 / 3.0, "dmax": 5.0}
    factories = {
        "keras": lambda: keras.layers.BatchNormalization(
            renorm=True, renorm_clipping=clipping),
        "scheduled": lambda: kerasbn.layers.BatchRenormalization(
            warmup_steps=0, rmax_steps=10**6, dmax_steps=10**6),
        "debiased": lambda: kerasbn.layers.BatchRenormalization(
            warmup_steps=0, rmax_steps=10**6, dmax_steps=10**6,
            zero_debias=True),
    }
    models = {name: small_cnn(f) for name, f in factories.items()}
    per_step = train_step_seconds(models, batch, quick)
    labels = {"scheduled": "linear schedule",
              "debiased": "linear schedule, zero_debias=True"}
    targets = {"scheduled": "<= 1.05", "debiased": "<= 1.05"}
    if keras.backend.backend() != "tensorflow":
        targets = {"scheduled": "<= 1.03", "debiased": "<= 1.08"}
    return [
        row("train step / Keras renorm", f"small CNN, {labels[name]}", batch,
            per_step[name], per_step["keras"], targets[name])
        for name in ("scheduled", "debiased")
    ]


# --------------------------------------------------------------------------
# Issue 5: training step of MABN + weight-centred convolutions vs Keras BN.


def bench_mabn(quick):
    """Train-step time of the small CNN with CenteredConv2D + MABN / the
    same CNN with Conv2D + Keras BN (target <= 1.3), at batch 32 and at the
    batch size MABN is for, 2. Both models run in model.fit's compiled
    step (graph mode, XLA off)."""
    rows = []
    for batch in (32, 2):
        models = {
            "keras": small_cnn(keras.layers.BatchNormalization),
            "mabn": small_cnn(kerasbn.layers.MovingAverageBatchNormalization,
                              conv=kerasbn.layers.CenteredConv2D),
        }
        per_step = train_step_seconds(models, batch, quick, seed=batch)
        rows.append(row(
            "train step / Keras BN", "small CNN, CenteredConv2D + MABN",
            batch, per_step["mabn"], per_step["keras"], "<= 1.3"))
        keras.backend.clear_session()
    return rows


def _application(name, seed=0, **kwargs):
    """A keras.applications model (weights=None) with non-trivial BN state."""
    keras.utils.set_random_seed(seed)
    model = getattr(keras.applications, name)(weights=None,
                                              input_shape=(224, 224, 3),
                                              **kwargs)
    _randomize_statistics(model, seed)
    return model


# --------------------------------------------------------------------------
# Issue 3: folded model latency vs the same network without BN; fold time.


def bench_fold(quick):
    """Folded / BN-removed latency (target <= 1.02), original / BN-removed
    (what BN costs before folding), and fold time / clone_model time
    (target <= 1.5). Every model runs through the same compiled inference
    function, traced and warmed up before timing."""
    import tensorflow as tf

    from kerasbn import strip_normalization

    fold_repeats = 3 if quick else 7
    repeats = {1: 10, 32: 3} if quick else {1: 40, 32: 9}
    rows = []
    for arch in ("ResNet50", "MobileNetV2"):
        model = _application(arch)
        times = interleaved_medians(
            {"fold": lambda: kerasbn.fold(model),
             "clone": lambda: keras.models.clone_model(model)},
            fold_repeats, warmup=1)
        rows.append(row("fold time / clone_model time", arch, 0,
                        times["fold"], times["clone"], "<= 1.5"))
        models = {"folded": kerasbn.fold(model).model,
                  # The limit: no BN, and a bias where BN stood (as a
                  # network built without BN would have), so both sides
                  # get TF's Conv+BiasAdd+activation fusions.
                  "stripped": strip_normalization(model, add_bias=True),
                  "original": model}
        functions = {k: tf.function(lambda x, m=m: m(x, training=False),
                                    jit_compile=False, autograph=False)
                     for k, m in models.items()}
        for batch in (1, 32):
            x = tf.constant(np.random.default_rng(batch).normal(
                size=(batch, 224, 224, 3)).astype("float32"))
            times = interleaved_medians(
                {k: (lambda f=f: f(x).numpy()) for k, f in functions.items()},
                repeats[batch])
            rows.append(row("Keras latency: folded / BN removed", arch, batch,
                            times["folded"], times["stripped"], "<= 1.02"))
            rows.append(row("Keras latency: original / BN removed", arch,
                            batch, times["original"], times["stripped"],
                            "reference (1.05-1.8)"))
        keras.backend.clear_session()
    return rows


# --------------------------------------------------------------------------
# Issue 4: latency of the exported artifacts.


def _tf2onnx_direct(model, path):
    """tf2onnx's own export of the unfolded model (what users do today)."""
    import tensorflow as tf
    import tf2onnx

    specs = [tf.TensorSpec((None,) + tuple(t.shape[1:]), t.dtype, name=t.name)
             for t in model.inputs]
    fn = tf.function(lambda x: model(x, training=False))
    tf2onnx.convert.from_function(fn, input_signature=specs, opset=17,
                                  output_path=path)


def _onnx_muls(path):
    import onnx

    return sum(n.op_type == "Mul" for n in onnx.load(path).graph.node)


def bench_export(quick):
    import tempfile

    import onnxruntime as ort
    import tensorflow as tf

    rows = []
    repeats = {1: 10 if quick else 40, 32: 3 if quick else 11}
    for arch in ("MobileNetV2", "ResNet50"):
        model = _application(arch)
        with tempfile.TemporaryDirectory() as tmp:
            folded = kerasbn.export(model, os.path.join(tmp, "folded"),
                                    ["onnx", "saved_model"], verify=False,
                                    name="m")
            plain = kerasbn.export(model, os.path.join(tmp, "plain"),
                                   ["saved_model"], fold=False, verify=False,
                                   name="m")
            direct_path = os.path.join(tmp, "direct.onnx")
            _tf2onnx_direct(model, direct_path)
            # Default optimizations (what the target is about), and none:
            # ORT's basic level already fuses a Conv's trailing Mul
            # (ConvMulFusion), so the leftover Muls cost time only in
            # runtimes, or settings, without that fusion.
            plain_options = ort.SessionOptions()
            plain_options.graph_optimization_level = (
                ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
            sessions, bare = {}, {}
            for key, path in (("kerasbn", folded.artifacts["onnx"]),
                              ("tf2onnx", direct_path)):
                sessions[key] = ort.InferenceSession(
                    path, providers=["CPUExecutionProvider"])
                bare[key] = ort.InferenceSession(
                    path, plain_options, providers=["CPUExecutionProvider"])
            served = {
                "folded": tf.saved_model.load(
                    folded.artifacts["saved_model"]).signatures[
                        "serving_default"],
                "unfolded": tf.saved_model.load(
                    plain.artifacts["saved_model"]).signatures[
                        "serving_default"],
            }
            muls = (_onnx_muls(folded.artifacts["onnx"]),
                    _onnx_muls(direct_path))
            input_name = model.inputs[0].name
            for batch in (1, 32):
                x = np.random.default_rng(batch).standard_normal(
                    (batch, 224, 224, 3)).astype("float32")
                feeds = {s: {sessions[s].get_inputs()[0].name: x}
                         for s in sessions}
                onnx_times = interleaved_medians(
                    {s: (lambda s=s: sessions[s].run(None, feeds[s]))
                     for s in sessions}, repeats[batch])
                target = "< 0.97" if muls[1] else "<= 1.0"
                rows.append(row(
                    "ONNX Runtime: kerasbn export / tf2onnx direct", arch,
                    batch, onnx_times["kerasbn"], onnx_times["tf2onnx"],
                    target, f"Mul nodes {muls[0]} vs {muls[1]}"))
                bare_times = interleaved_medians(
                    {s: (lambda s=s: bare[s].run(None, feeds[s]))
                     for s in bare}, repeats[batch])
                rows.append(row(
                    "ONNX Runtime, optimizations off: kerasbn / tf2onnx",
                    arch, batch, bare_times["kerasbn"], bare_times["tf2onnx"],
                    "(context)", f"Mul nodes {muls[0]} vs {muls[1]}"))
                tx = tf.constant(x)
                sm_times = interleaved_medians(
                    {k: (lambda f=f: f(**{input_name: tx}))
                     for k, f in served.items()}, repeats[batch])
                rows.append(row(
                    "SavedModel: folded / unfolded", arch, batch,
                    sm_times["folded"], sm_times["unfolded"], "< 1.0"))
    return rows


# --------------------------------------------------------------------------
# Issue 13: models nobody here wrote (keras-hub blocks, ResNetV2's stem).


def _census(path):
    import onnx

    from kerasbn.exporting import _onnx_graph

    census = _onnx_graph.normalization_census(onnx.load(path))
    return f"BN {census['BatchNormalization']}, " \
        f"Mul/Add after linear {census['affine_after_linear']}"


def _zoo_model(arch):
    from tests import helpers
    from tests import zoo

    if arch == "HGNetV2":
        model = zoo.hgnetv2(size=224)
    else:
        model = getattr(keras.applications, arch)(
            weights=None, input_shape=(224, 224, 3))
    return helpers.randomize_normalizations(model, seed=0)


def bench_zoo_export(quick):
    """ORT batch-1 latency of kerasbn's verified export / tf2onnx's
    `from_function` of the unfolded model (goal <= 1.0), with the
    BN-derived node census of both. Where tf2onnx's own graph cannot run
    (HGNetV2: Keras' grouped convolutions stay TensorFlow calls), the
    denominator is kerasbn's export without folding, as the note says."""
    import tempfile

    import onnx
    import onnxruntime as ort

    rows = []
    repeats = 10 if quick else 40
    for arch in ("HGNetV2", "ResNet50V2"):
        model = _zoo_model(arch)
        with tempfile.TemporaryDirectory() as tmp:
            ours = kerasbn.export(model, os.path.join(tmp, "ours"), ["onnx"],
                                  name="m").artifacts["onnx"]
            other = os.path.join(tmp, "direct.onnx")
            _tf2onnx_direct(model, other)
            ops = {n.op_type for n in onnx.load(other).graph.node}
            label = "tf2onnx direct"
            if ops & {"StatefulPartitionedCall", "PartitionedCall"}:
                other = kerasbn.export(
                    model, os.path.join(tmp, "unfolded"), ["onnx"],
                    fold=False, name="m").artifacts["onnx"]
                label = ("kerasbn unfolded (tf2onnx direct leaves "
                         "StatefulPartitionedCall: ORT cannot load it)")
            sessions = {k: ort.InferenceSession(
                p, providers=["CPUExecutionProvider"])
                for k, p in (("ours", ours), ("other", other))}
            x = np.random.default_rng(1).standard_normal(
                (1, 224, 224, 3)).astype("float32")
            feeds = {k: {s.get_inputs()[0].name: x}
                     for k, s in sessions.items()}
            times = interleaved_medians(
                {k: (lambda k=k: sessions[k].run(None, feeds[k]))
                 for k in sessions}, repeats)
            rows.append(row(
                f"ONNX Runtime: kerasbn export / {label}", arch, 1,
                times["ours"], times["other"], "<= 1.0",
                f"kerasbn: {_census(ours)}; other: {_census(other)}"))
        keras.backend.clear_session()
    return rows


# --------------------------------------------------------------------------
# Issue 14: graph-level fold of SavedModels, against TensorFlow's own
# optimize_for_inference.

_KERAS2_RESNET = r"""
import sys
import numpy as np
import tf_keras as keras
model = keras.applications.ResNet50(weights=None, input_shape=(224, 224, 3))
rng = np.random.default_rng(0)
for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
        n = layer.moving_mean.shape[0]
        layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, .1, n),
                           rng.normal(0, .1, n), rng.uniform(.5, 2, n)])
model.save(sys.argv[1])
"""


def _keras2_resnet50(path):
    """ResNet50 saved by tf-keras (Keras 2) as a SavedModel directory."""
    import subprocess

    env = dict(os.environ, TF_USE_LEGACY_KERAS="1", CUDA_VISIBLE_DEVICES="")
    subprocess.run([sys.executable, "-c", _KERAS2_RESNET, path], env=env,
                   check=True, capture_output=True)
    return path


def _optimize_for_inference_left(source):
    """Normalization ops TensorFlow's optimize_for_inference leaves."""
    import tensorflow as tf
    from tensorflow.python.tools import optimize_for_inference_lib

    from kerasbn.folding import tfgraph

    optimized = optimize_for_inference_lib.optimize_for_inference(
        source.graph_def, [t.split(":")[0] for t in source.input_tensors],
        [t.split(":")[0] for t in source.output_tensors],
        tf.float32.as_datatype_enum)
    return sum(tfgraph.census(optimized).values())


def bench_graph_fold(quick):
    """TensorFlow batch-1 latency of the graph-folded SavedModel / the
    SavedModel kerasbn.export writes from the Keras model (goal <= 1.02:
    the graph pass is as good as folding the Keras model), for a Keras 3
    export and a Keras 2 (tf-keras) SavedModel of ResNet50; the note
    counts the normalization ops left by kerasbn and by TensorFlow's
    optimize_for_inference on the same frozen graph."""
    import subprocess
    import tempfile

    import tensorflow as tf

    from kerasbn.folding import tfgraph
    from kerasbn.sources import saved_model

    rows, repeats = [], 10 if quick else 40
    with tempfile.TemporaryDirectory() as tmp:
        keras3 = os.path.join(tmp, "keras3")
        model = _application("ResNet50")
        model.export(keras3, verbose=False)
        reference = kerasbn.export(model, os.path.join(tmp, "k"),
                                   ["saved_model"], name="m")
        sources = {"ResNet50 (Keras 3 export)": keras3}
        try:
            sources["ResNet50 (Keras 2 SavedModel)"] = _keras2_resnet50(
                os.path.join(tmp, "keras2"))
        except (subprocess.CalledProcessError, OSError) as error:
            print(f"skipping the Keras 2 source (tf-keras): {error}")
        x = tf.constant(np.random.default_rng(1).normal(
            size=(1, 224, 224, 3)).astype("float32"))
        fixed = tf.saved_model.load(reference.artifacts["saved_model"])
        for k, (label, path) in enumerate(sources.items()):
            source = saved_model.load_saved_model(path)
            result = kerasbn.fold_saved_model(
                source, os.path.join(tmp, f"folded{k}"), ["saved_model"],
                name="m")
            before = sum(tfgraph.census(source.graph_def).values())
            theirs = _optimize_for_inference_left(source)
            key = source.input_names[0]
            ours = tf.saved_model.load(result.artifacts["saved_model"])
            calls = {
                "graph": lambda: ours.signatures["serving_default"](
                    **{key: x}),
                "keras": lambda: fixed.signatures["serving_default"](x),
                "source": lambda: source.reference(x)}
            times = interleaved_medians(calls, repeats)
            note = (f"normalization ops {before}; left by kerasbn "
                    f"{result.fold_report.kept} (and "
                    f"{result.fold_report.replaced} multiply-adds), by "
                    f"optimize_for_inference {theirs}")
            rows.append(row("TF latency: graph-folded SavedModel / kerasbn."
                            "export of the Keras model", label, 1,
                            times["graph"], times["keras"], "<= 1.02", note))
            rows.append(row("TF latency: graph-folded / source SavedModel",
                            label, 1, times["graph"], times["source"],
                            "reference (< 1)"))
    keras.backend.clear_session()
    return rows


# --------------------------------------------------------------------------
# Issue 16: recalibrate in stages vs one inference pass.


def _seconds(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _recalibrate_once(model, x, **options):
    """Seconds of one `kerasbn.recalibrate` (a copy, as by default), its
    result, the peak bytes its activation cache held and where the time
    went (the `Clock` that `verbose=2` prints)."""
    from kerasbn.stats import _staged

    caches, clocks = [], []
    originals = _staged.ActivationCache, _staged.Clock

    class Recorded(originals[0]):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            caches.append(self)

    class Timed(originals[1]):
        def __init__(self):
            super().__init__()
            clocks.append(self)

    _staged.ActivationCache, _staged.Clock = Recorded, Timed
    try:
        start = time.perf_counter()
        result = kerasbn.recalibrate(model, x, verbose=0, **options)
        seconds = time.perf_counter() - start
    finally:
        _staged.ActivationCache, _staged.Clock = originals
    peak = max((c.peak_memory + c.peak_disk for c in caches), default=0)
    return seconds, result, peak, clocks[-1].seconds


def _layer_by_layer(model, x):
    from kerasbn.stats import _plan

    original = _plan.read

    def refuse(*args, **kwargs):
        raise _plan.PlanRefused("benchmark: the layer-by-layer method")

    _plan.read = refuse
    try:
        start = time.perf_counter()
        result = kerasbn.recalibrate(model, x, verbose=0)
        return time.perf_counter() - start, result
    finally:
        _plan.read = original


def _statistics_gap(actual, expected):
    """Largest mean error in units of the channel's standard deviation,
    and largest relative variance error, over all normalizations."""
    worst_mean = worst_var = 0.0
    for a, e in zip(kerasbn.registry.normalization_layers(actual),
                    kerasbn.registry.normalization_layers(expected)):
        var = np.asarray(e.moving_variance, np.float64)
        mean_error = np.abs(np.asarray(a.moving_mean, np.float64)
                            - np.asarray(e.moving_mean, np.float64))
        worst_mean = max(worst_mean, float(np.max(mean_error
                                                  / np.sqrt(var))))
        worst_var = max(worst_var, float(np.max(
            np.abs(np.asarray(a.moving_variance, np.float64) - var) / var)))
    return worst_mean, worst_var


def bench_recalibrate(quick):
    """`kerasbn.recalibrate` time / one `predict` pass over the same data
    (warm: traced before timing), ResNet50 and DenseNet121 at 64x64 on 128
    and 512 images (128 only with --quick), medians of 3 runs (1 with
    --quick); targets (issue 30) <= 2.5 at 128 images, <= 1.5 at 512.
    Notes: where the time went (the medians of each part, as
    `verbose=2` prints them), the peak of the activation cache, the
    ratio to a cold predict (its trace included), and against the
    layer-by-layer method (ResNet50, 512 images, full runs only): its
    time and the largest difference of the statistics."""
    from kerasbn.stats import _plan

    sizes = (128,) if quick else (128, 512)
    repeats = 1 if quick else 3
    rows = []
    for arch in ("ResNet50", "DenseNet121"):
        keras.utils.set_random_seed(0)
        model = getattr(keras.applications, arch)(
            weights=None, input_shape=(64, 64, 3), classes=10)
        _randomize_statistics(model)
        layers = kerasbn.registry.normalization_layers(model)
        stages = _plan.read(model, layers).num_stages
        for images in sizes:
            x = np.random.default_rng(0).normal(
                0.5, 1.0, size=(images, 64, 64, 3)).astype("float32")
            cold = keras.models.clone_model(model)
            start = time.perf_counter()
            cold.predict(x, batch_size=32, verbose=0)
            cold_seconds = time.perf_counter() - start
            model.predict(x[:64], batch_size=32, verbose=0)
            kerasbn.recalibrate(model, x[:32], verbose=0)  # Warm as well.
            # Interleaved, one predict before and after each run: this
            # machine's predict moves between two speeds (0.75 and 1.3 s
            # for the same 128 images) from one call to the next.
            predicts, runs = [], []
            for _ in range(repeats):
                predicts.append(_seconds(lambda: model.predict(
                    x, batch_size=32, verbose=0)))
                runs.append(_recalibrate_once(model, x))
            predicts.append(_seconds(lambda: model.predict(
                x, batch_size=32, verbose=0)))
            predict = statistics.median(predicts)
            seconds = statistics.median(r[0] for r in runs)
            staged, peak = runs[0][1], runs[0][2]
            parts = ", ".join(
                f"{part} {statistics.median(r[3][part] for r in runs):.2f}"
                for part in runs[0][3])
            label = (f"{arch} 64x64, {images} images, {len(layers)} BN in "
                     f"{stages} stages")
            note = (f"seconds: {parts}, predict {predict:.2f}; cache peak "
                    f"{peak / 2 ** 20:.0f} MiB; / cold predict "
                    f"{seconds / cold_seconds:.2f}")
            if arch == "ResNet50" and images == 512:
                old_seconds, old = _layer_by_layer(model, x)
                gap_mean, gap_var = _statistics_gap(staged, old)
                note += (f"; layer by layer {old_seconds / predict:.1f}x "
                         f"predict; staged vs layer by layer: mean "
                         f"{gap_mean:.1e} std, variance {gap_var:.1e}")
            goal = "<= 2.5" if images <= 128 else "<= 1.5"
            rows.append(row("recalibrate / one predict pass", label, 32,
                            seconds, predict, goal, note))
    return rows


def _randomize_statistics(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            shape = layer.moving_mean.shape
            layer.gamma.assign(rng.uniform(0.5, 1.5, shape))
            layer.beta.assign(rng.normal(0.0, 0.1, shape))
            layer.moving_mean.assign(rng.normal(0.0, 0.1, shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, shape))


# --------------------------------------------------------------------------
# Issue 15: the layer benchmarks again on the JAX and PyTorch backends.

LAYER_BENCHMARKS = ("bn_train_step", "renorm", "mabn")


def bench_backends(quick):
    """The train-step rows (`LAYER_BENCHMARKS`) on JAX and PyTorch, each
    in its own process (Keras fixes its backend at import). A backend that
    is not installed gives one row saying so."""
    import importlib.util
    import subprocess
    import tempfile

    rows = []
    for backend in ("jax", "torch"):
        if importlib.util.find_spec(backend) is None:
            rows.append({"benchmark": f"train step [{backend}]",
                         "backend": backend, "model": "-", "batch": 0,
                         "ratio": float("nan"), "numerator_ms": float("nan"),
                         "denominator_ms": float("nan"), "target": "-",
                         "note": f"{backend} is not installed"})
            continue
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.json")
            command = [sys.executable, os.path.abspath(__file__),
                       "--json", out] + (["--quick"] if quick else [])
            for name in LAYER_BENCHMARKS:
                command += ["--only", name]
            env = dict(os.environ, KERAS_BACKEND=backend)
            subprocess.run(command, env=env, check=True,
                           stdout=subprocess.DEVNULL)
            with open(out) as f:
                rows.extend(json.load(f)["rows"])
    return rows


# --------------------------------------------------------------------------
# Issue 17: int8 and float16 artifacts against the float32 export.


def _tflite_runner(path):
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=path, num_threads=2)
    interpreter.allocate_tensors()
    index = interpreter.get_input_details()[0]["index"]

    def run(x):
        interpreter.set_tensor(index, x)
        interpreter.invoke()
    return run


def bench_quantized(quick):
    """Batch-1 latency of the int8 (and float16) artifacts / the float32
    ones of the same folded model, side by side in one process: ONNX
    Runtime (goal <= 0.45 on ResNet50) and TFLite (2 threads both), with
    the file size ratios and each artifact's relative RMS error against
    the float model's logits on held-out inputs (random weights, random
    images: agreement is not meaningful here, so it is not bounded).

    ONNX Runtime's threads spin-wait after each run by default; with
    several sessions interleaved, the spinning of one slows the next
    (int8 / fp32 read 0.51 with it, 0.33 without, on ResNet50), so every
    session here turns it off."""
    import tempfile

    import onnxruntime as ort

    rows = []
    repeats = 10 if quick else 40
    formats = ["onnx", "onnx_int8", "onnx_fp16", "tflite", "tflite_int8"]
    for arch in ("ResNet50", "MobileNetV2"):
        model = _application(arch, classifier_activation=None)
        rng = np.random.default_rng(0)
        calibration = rng.standard_normal((32, 224, 224, 3)).astype("f4")
        validation = rng.standard_normal((16, 224, 224, 3)).astype("f4")
        with tempfile.TemporaryDirectory() as tmp:
            result = kerasbn.export(
                model, tmp, formats, name="m", calibration=calibration,
                validation=validation, min_agreement=0.0, max_rel_rms=1.0)
            paths = result.artifacts
            errors = {f: c["rel_rms"]
                      for f, c in result.reduced_checks().items()}
            sizes = {f: os.path.getsize(p) for f, p in paths.items()}
            x = validation[:1]
            runners = {}
            quiet = ort.SessionOptions()
            quiet.add_session_config_entry(
                "session.intra_op.allow_spinning", "0")
            for fmt in ("onnx", "onnx_int8", "onnx_fp16"):
                session = ort.InferenceSession(
                    paths[fmt], quiet, providers=["CPUExecutionProvider"])
                feed = {session.get_inputs()[0].name: x}
                runners[fmt] = (lambda s=session, f=feed: s.run(None, f))
            for fmt in ("tflite", "tflite_int8"):
                run = _tflite_runner(paths[fmt])
                runners[fmt] = (lambda r=run: r(x))
            times = interleaved_medians(runners, repeats)
        for fmt, base, target in (("onnx_int8", "onnx",
                                   "<= 0.45" if arch == "ResNet50"
                                   else "(context)"),
                                  ("onnx_fp16", "onnx", "(context)"),
                                  ("tflite_int8", "tflite", "(context)")):
            note = (f"size {sizes[fmt] / sizes[base]:.2f}x; rel RMS "
                    f"{errors[fmt]:.4f} on 16 inputs")
            runtime = "ONNX Runtime" if base == "onnx" else "TFLite"
            rows.append(row(f"{runtime}: {fmt} / {base}", arch, 1,
                            times[fmt], times[base], target, note))
        keras.backend.clear_session()
    return rows


def bench_qat(quick):
    """Issue 28. The QAT train step / the float train step of the same
    model (`small_cnn` with Keras BN, TensorFlow, batch 32, `fit`'s
    compiled step), side by side; and the batch-1 latency of the int8
    artifacts written from the QAT model / from post-training quantization
    of its float model (ONNX Runtime, spin-waiting off; TFLite 2 threads),
    which should be equal: the same integer graph, other scales."""
    import tempfile

    import onnxruntime as ort

    from kerasbn.quantization import prepare_qat

    batch = 32
    model = small_cnn(keras.layers.BatchNormalization)
    qat = prepare_qat(model, warmup_steps=0)
    qat.compile(optimizer=keras.optimizers.SGD(0.01),
                loss=keras.losses.SparseCategoricalCrossentropy(
                    from_logits=True))
    per_step = train_step_seconds({"float": model, "qat": qat}, batch,
                                  quick)
    rows = [row("QAT train step / float train step", "small CNN", batch,
                per_step["qat"], per_step["float"], "<= 1.6",
                "fused Conv+BN+ReLU with fake quantization vs Keras BN")]
    rng = np.random.default_rng(0)
    calibration = rng.standard_normal((64, 32, 32, 3)).astype("f4")
    for start in range(0, 64, 32):  # ranges for the QAT export
        qat(calibration[start:start + 32], training=True)
    repeats = 20 if quick else 100
    with tempfile.TemporaryDirectory() as tmp:
        formats = ["onnx_int8", "tflite_int8"]
        from_qat = kerasbn.export(qat, os.path.join(tmp, "qat"), formats,
                                  name="m", sample=calibration[:8],
                                  min_agreement=0.0,
                                  max_rel_rms=1e9).artifacts
        from_ptq = kerasbn.export(model, os.path.join(tmp, "ptq"), formats,
                                  name="m", calibration=calibration,
                                  min_agreement=0.0,
                                  max_rel_rms=1e9).artifacts
        x = calibration[:1]
        quiet = ort.SessionOptions()
        quiet.add_session_config_entry("session.intra_op.allow_spinning",
                                       "0")
        runners = {}
        for source, paths in (("qat", from_qat), ("ptq", from_ptq)):
            session = ort.InferenceSession(
                paths["onnx_int8"], quiet,
                providers=["CPUExecutionProvider"])
            feed = {session.get_inputs()[0].name: x}
            runners[f"onnx {source}"] = (
                lambda s=session, f=feed: s.run(None, f))
            run = _tflite_runner(paths["tflite_int8"])
            runners[f"tflite {source}"] = (lambda r=run: r(x))
        times = interleaved_medians(runners, repeats)
    for runtime, name in (("onnx", "ONNX Runtime"), ("tflite", "TFLite")):
        rows.append(row(f"{name}: int8 from QAT / int8 from PTQ",
                        "small CNN", 1, times[f"{runtime} qat"],
                        times[f"{runtime} ptq"], "~1.0",
                        "the same integer graph with other scales"))
    return rows


def bench_openvino(quick):
    """OpenVINO / ONNX Runtime latency of the same folded model, float32
    and int8, batch 1 and 32, side by side in one process (issue 31).

    Each runtime runs the file kerasbn wrote: ONNX Runtime the `.onnx` and
    `_int8.onnx` (spin-waiting off, as in `quantized`); OpenVINO the IR
    compiled with its `config.json` (f32) and the same `_int8.onnx` (it
    reads QDQ natively), both with PERFORMANCE_HINT=LATENCY (one stream
    over every core, as ONNX Runtime's one session). A third row times
    the IR at OpenVINO's plain defaults (bf16 on CPUs with AVX512-BF16)
    against the pinned f32, with the error that costs (the export's own
    figure)."""
    import tempfile

    import onnxruntime as ort
    import openvino as ov

    rows = []
    repeats = 3 if quick else 10
    latency = {"PERFORMANCE_HINT": "LATENCY"}
    for arch in ("ResNet50", "MobileNetV2"):
        model = _application(arch, classifier_activation=None)
        rng = np.random.default_rng(0)
        calibration = rng.standard_normal((32, 224, 224, 3)).astype("f4")
        with tempfile.TemporaryDirectory() as tmp:
            result = kerasbn.export(
                model, tmp, ("onnx", "onnx_int8", "openvino"), name="m",
                calibration=calibration, min_agreement=0.0, max_rel_rms=1.0)
            paths = result.artifacts
            xml = os.path.join(paths["openvino"], "model.xml")
            with open(os.path.join(os.path.dirname(paths["openvino"]),
                                   "config.json")) as f:
                pinned = json.load(f)["model_config_list"][0]["config"][
                    "plugin_config"]
            defaults = max(c["defaults"]["rel_error"] for c in result.checks
                           if "defaults" in c)
            core = ov.Core()
            compiled = {
                "ov_f32": core.compile_model(xml, "CPU",
                                             {**pinned, **latency}),
                "ov_defaults": core.compile_model(xml, "CPU", latency),
                "ov_int8": core.compile_model(paths["onnx_int8"], "CPU",
                                              {**pinned, **latency})}
            precision = compiled["ov_defaults"].get_property(
                "INFERENCE_PRECISION_HINT").get_type_name()
            quiet = ort.SessionOptions()
            quiet.add_session_config_entry(
                "session.intra_op.allow_spinning", "0")
            sessions = {
                name: ort.InferenceSession(
                    paths[fmt], quiet, providers=["CPUExecutionProvider"])
                for name, fmt in (("ort_f32", "onnx"),
                                  ("ort_int8", "onnx_int8"))}
            for batch in (1, 32):
                x = calibration[:batch]
                runners = {}
                for name, session in sessions.items():
                    feed = {session.get_inputs()[0].name: x}
                    runners[name] = (lambda s=session, f=feed: s.run(None, f))
                for name, net in compiled.items():
                    request = net.create_infer_request()
                    runners[name] = (lambda r=request: r.infer([x]))
                times = interleaved_medians(runners, repeats)
                rows.append(row("OpenVINO / ONNX Runtime: f32", arch, batch,
                                times["ov_f32"], times["ort_f32"],
                                "(context)", "IR with its config.json"))
                rows.append(row("OpenVINO / ONNX Runtime: int8", arch, batch,
                                times["ov_int8"], times["ort_int8"],
                                "(context)", "the same _int8.onnx"))
                rows.append(row(f"OpenVINO defaults ({precision}) / f32",
                                arch, batch, times["ov_defaults"],
                                times["ov_f32"], "(context)",
                                f"rel error at defaults {defaults:.2g}"))
        keras.backend.clear_session()
    return rows


BENCHMARKS = {
    "bn_train_step": bench_bn_train_step,
    "renorm": bench_renorm,
    "mabn": bench_mabn,
    "fold": bench_fold,
    "export": bench_export,
    "zoo_export": bench_zoo_export,
    "graph_fold": bench_graph_fold,
    "backends": bench_backends,
    "recalibrate": bench_recalibrate,
    "sync_bn": bench_sync_bn,
    "quantized": bench_quantized,
    "openvino": bench_openvino,
    "qat": bench_qat,
}


def markdown_table(rows):
    lines = [
        "| benchmark | model | batch | ratio | numerator ms | denominator ms "
        "| target | note |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['benchmark']} | {r['model']} | {r['batch']} "
            f"| {r['ratio']:.3f} | {r['numerator_ms']:.2f} "
            f"| {r['denominator_ms']:.2f} | {r['target']} | {r['note']} |"
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
        "backend": keras.backend.backend(),
        "kerasbn": kerasbn.__version__,
        "quick": args.quick,
    }
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
