"""Exact re-estimation of every normalization layer's inference statistics.

Moving averages only estimate the population statistics, and they go stale
whenever the weights change after training (weight averaging, pruning,
quantization, fine-tuning with frozen statistics) or the data changes.
`recalibrate` replaces them by the exact population statistics of the
layer's inputs over a dataset, as seen by the model in inference mode.
"""

import contextlib
import os
import signal
import threading
import time
import warnings

import keras
import numpy as np

from kerasbn import _checks
from kerasbn import _keras_internal
from kerasbn import _models
from kerasbn import registry
from kerasbn.stats import _collect
from kerasbn.stats import _distributed
from kerasbn.stats import _nonfinite
from kerasbn.stats import _plan
from kerasbn.stats import _staged
from kerasbn.stats._select import select_layers

_WHAT = "kerasbn.recalibrate"
_CACHE_MODES = ("auto", "disk", "none")
_MIB = 2.0 ** 20
# Data is cut (arrays) or joined (batched data) into batches of up to this
# much input in the staged method, unless batch_size is given: the layers
# run eagerly, and each batch costs the dispatch of one forward pass
# (ResNet50: ~0.3 s) whatever its size.
_STAGE_BATCH_BYTES = 32 * 2 ** 20
# A layer that reads its own output is recalibrated to a fixed point:
# passes repeat until no statistic moves by more than `_SETTLE` of its
# scale, at most `_SETTLE_ROUNDS` times. The move is measured against the
# statistics the pass held, stored in float32: a layer with a gain of ~20
# on itself turns their rounding (~4e-7 of the scale) into ~5e-6 of
# movement, so the passes also stop, without a warning, once the move is
# within `_ACCEPT` (the exactness recalibration promises) and has not
# shrunk for `_STALL` rounds.
_SETTLE = 1e-6
_ACCEPT = 1e-5
_STALL = 3
_SETTLE_ROUNDS = 60
_ANDERSON = 5  # Rounds an Anderson step remembers.
_TINY = 1e-12  # Keeps a zero variance's logarithm and ratios finite.


def recalibrate(model, data, *, steps=None, layers=None, batch_size=None,
                inplace=False, verbose="auto", skip_nonfinite=False,
                cache="auto", memory_budget=None, cache_dir=None):
    """Set each normalization layer's statistics to their exact values on `data`.

    For every BatchNormalization-like layer, in the order a forward pass
    reaches them, the inputs the layer receives when the model runs in
    inference mode are gathered over all of `data`, and the layer's stored
    statistics become their population moments per channel:

        mean     = sum(x) / n
        variance = sum((x - mean)**2) / n      (biased, as NumPy's np.var)

    over the `n` positions of all samples (every axis but the channel
    axis), leaving out positions whose input mask is False (the mask Keras
    propagates from `Embedding(mask_zero=True)` or `Masking`). Moments are
    accumulated in float64 (on TensorFlow, float32 activations are summed
    in float32 over 32 positions at a time, shifted close to their mean,
    and those sums in float64: within ~1e-7 of the float64 moments) and
    merged batch by batch with Chan et al.'s pairwise update, so the
    result does not depend on the batch size, the batch order or the old
    statistics. A layer's statistics are gathered
    only once every normalization before it holds its new ones, so each
    layer sees the already recalibrated statistics of the layers before
    it, which is what it will see at inference.

    What is written, per layer kind:

    - Keras' and kerasbn's `BatchNormalization`: `moving_mean` and
      `moving_variance`. kerasbn's `debias_step` is left as it is (it counts
      training updates; the stored statistics are debiased values, as the
      recalibrated ones are; at 0, the next training step replaces them by
      batch statistics, as it always does).
    - With renorm (Keras' `renorm=True`, kerasbn's `BatchRenormalization`):
      also `moving_stddev = sqrt(variance + epsilon)`, and the training
      averages `renorm_mean` and `renorm_stddev` get the same mean and
      stddev, so training resumed afterwards corrects towards the
      recalibrated statistics. `renorm_step` is left as it is.
    - `MABN`: its running second moment `moving_variance = mean(x**2)`
      (`variance + mean**2`). Its step counter and ring buffers stay.

    No other weight changes. A layer called several times pools all its
    calls. A layer that sees no unmasked position in the data keeps its
    statistics, with a warning naming it.

    All or nothing. A layer's statistics must be in place before the
    layers after it are measured. For a layer graph (Functional or
    Sequential) the stages run on `model` itself inside a
    `keras.StatelessScope`, which holds each statistic as it is found
    and gives it to the layers after it: `model` is not written while
    they run, and at the end gets the new statistics all at once
    (`inplace=True`) or stays as it is while the copy made then holds
    them. Otherwise (a custom layer holding normalizations, a subclassed
    model) they are written into the copy, or with `inplace=True` into
    `model`, as each stage ends, and on any error every statistic
    written is set back to its old value, bit for bit (a second Ctrl-C
    waits until that is done). Either way, with `inplace=True` the model
    keeps its old values if anything fails (bad data, a full disk, an
    error raised by the data, KeyboardInterrupt). Data holding NaN or
    inf are refused (see `skip_nonfinite`); so is a model that makes NaN
    or inf itself from finite data: the inputs of a normalization layer
    whose float64 sums are not finite are traced back, on that one batch,
    to the first layer in graph order whose output is not finite, and
    the ValueError names it, the batch and the count.

    Cost. Layers that do not depend on each other are done in the same
    pass, and a layer graph (Functional or Sequential, nested models
    included) is run in *stages*: stage k runs only the layers between
    the normalizations of generation k-1 and those of generation k, on
    the activations stage k-1 kept (`cache`), so every layer runs once
    per batch in all, as the backend runs it eagerly: nothing is traced,
    so the fixed cost does not grow with the number of stages. The cost
    is about one eager inference pass, the float64 moments of every
    normalization's input (those of a concatenation come from its parts,
    each computed once: DenseNet's normalizations read ever wider
    concatenations of the same maps), copying the model (its variables
    made from their values, the new statistics included), and moving the
    kept activations; `verbose=2` prints the split. Measured
    (`tools/benchmark.py --only recalibrate`, 64x64 inputs, this
    project's 2-core machine): ResNet50, 53 layers in 49 stages, 1.3x
    one (already traced) `predict` pass on 512 images, 2.0x on 128 (the
    copy 0.3 s of that; 1.8x with `inplace=True`); the layer-by-layer
    method took 45x. Array data without a `batch_size` is
    cut, and batched data (datasets, generators) joined, into batches of
    up to 32 MiB of input (array data: at least 32 samples) here, since
    each batch costs the dispatch of one forward pass; memory for the
    stages' activations grows with it (pass `batch_size` to choose for
    arrays). Normalizations inside a custom layer are done one
    stage each, by running that layer alone on its kept inputs. A
    subclassed model (no layer graph) or a layer fed by its own output
    falls back to one pass over the data per layer. A layer called again
    on a path through its own output (a block applied twice) has
    statistics that depend on themselves: it gets their fixed point, the
    passes repeating until no statistic moves by more than 1e-6 of its
    scale, or stalls within 1e-5 where float32 statistics allow no better
    (Anderson-accelerated, as plain repetition oscillates when the
    layer amplifies its own normalization; at most 60 passes, else a
    warning).

    `cache` chooses where the kept activations wait between stages (peak:
    the activations crossing the widest stage boundary, for all of
    `data`; e.g. ResNet50 at 64x64 keeps ~0.3 MB per image):

    - "auto" (default): in memory up to `memory_budget` bytes (default:
      half the memory available when the call starts), the rest in `.npy`
      files in a temporary directory (under `cache_dir`), removed at the
      end, also on error (the directory of a run killed outright is
      removed by the next run that uses the same `cache_dir`): writing
      and reading them back is the only extra cost;
    - "disk": every kept activation in files (memory stays flat; for
      data far larger than memory);
    - "none": nothing kept; each stage recomputes what it reads from the
      data: no extra memory or disk, about `stages / 2` inference passes.

    Distributed. Called inside the scope of a `tf.distribute` strategy
    that spans several workers (MultiWorkerMirroredStrategy), each worker
    passes its own share of the data; per stage each reduces its share
    to (count, mean, sum of squared deviations) in float64 and the
    workers merge them exactly (two all-reduce sums), so every worker
    ends with the same statistics, those of one process holding all the
    shares (examples/multi_worker.py). Every worker must call it with
    the same model and arguments. Within one worker (MirroredStrategy,
    JAX's DataParallel) the process holds all its data: nothing is
    exchanged.

    Args:
        model: A built `keras.Model` (Functional, Sequential or subclassed;
            copying a subclassed model needs get_config/from_config, else
            use `inplace=True`).
        data: NumPy arrays or tensors (with `batch_size`; a list or
            tuple of one array per input for a model with several, as
            `predict` takes them, else `(x, y[, sample_weight])`), a
            `tf.data.Dataset` of batches, a `keras.utils.PyDataset`, or a
            generator of batches. Batches may be `x` or `(x, y[, weights])`;
            only `x` is used. It is read once in the staged method (more
            often with `cache="none"` or the layer-by-layer fallback; a
            generator is then kept in memory after its first pass).
        steps: Use at most this many batches per pass (required for an
            infinite dataset).
        layers: Layer names or layer objects to recalibrate (default: every
            normalization layer).
        batch_size: Batch size for array data (default 32, and in the
            staged method as many multiples of 32 as fit in 32 MiB of
            input); it does not change the result, only memory and
            speed.
        inplace: Update `model` itself. By default `model` is untouched and
            a copy (`keras.models.clone_model`, same weights) is returned.
        verbose: 0 (silent), 1 (a progress bar over the stages), 2 (a
            line per stage, with its layers and the cache's size, one per
            layer, and at the end the seconds spent copying the model,
            tracing (the layer-by-layer fallback), reading the data,
            running the layers, taking the moments, moving cached
            activations, writing the statistics, and the rest) or
            "auto" (1).
        skip_nonfinite: Leave out the samples whose inputs hold NaN or inf
            (a warning says how many). By default such data is refused with
            a ValueError naming the batch and the input: one NaN would make
            every channel's statistics NaN.
        cache: Where activations wait between stages: "auto", "disk" or
            "none" (see Cost above).
        memory_budget: Bytes of activations kept in memory with
            `cache="auto"` before spilling to disk (default: half the
            available memory).
        cache_dir: An existing directory for the spilled files (default:
            the system's temporary directory).

    Returns:
        The recalibrated model: `model` itself if `inplace`, else the copy.

    Raises:
        TypeError: `model` is not a keras.Model, or cannot be copied.
        ValueError: the model is not built, `data` holds no batches or
            holds NaN/inf (without `skip_nonfinite`), the model makes
            NaN/inf itself from the data (naming the first layer that
            does), or a layer in `layers` is not a known normalization
            layer.
        OSError: the activations could not be written to disk (`cache`);
            the message says how much and where.

    Example:

    >>> import numpy as np, keras, kerasbn
    >>> model = keras.Sequential([keras.Input((3,)),
    ...                           keras.layers.BatchNormalization()])
    >>> x = np.arange(12, dtype="float32").reshape(4, 3)
    >>> new = kerasbn.recalibrate(model, x, verbose=0)
    >>> new.layers[0].moving_mean.numpy().tolist()
    [4.5, 5.5, 6.5]
    >>> new.layers[0].moving_variance.numpy().tolist()
    [11.25, 11.25, 11.25]
    >>> model.layers[0].moving_mean.numpy().tolist()  # untouched
    [0.0, 0.0, 0.0]
    """
    clock = _staged.Clock()
    _checks.check_model(model, _WHAT)
    verbose = _collect.resolve_verbose(verbose, _WHAT)
    _checks.check_bool("inplace", inplace, _WHAT)
    _check_cache(cache, memory_budget, cache_dir)
    batches = _collect.Batches(data, batch_size=batch_size, steps=steps,
                               what=_WHAT, skip_nonfinite=skip_nonfinite,
                               num_inputs=_collect.num_inputs(model))
    chosen = select_layers(model, layers, _WHAT)
    if not chosen:
        if layers is None:  # Not by the caller's choice.
            warnings.warn(
                f"{_WHAT}: model '{model.name}' has no normalization layer "
                "kerasbn knows (Keras' BatchNormalization and its "
                "subclasses, kerasbn's layers, those declared with "
                "kerasbn.register_normalization): nothing to do.",
                stacklevel=2)
        return model if inplace else _copy(model, clock)
    _check_batched(model, batches.first())  # Also: empty data, clearly.
    _staged.remove_stale_spills(cache_dir)
    writer = _Writer(_distributed.worker_strategy(), verbose, clock)
    plan = _staged_plan(model, chosen)
    if plan is not None and _runs_stateless(plan):
        work, targets, reached = _recalibrate_stateless(
            model, chosen, plan, batches, writer, inplace, cache,
            memory_budget, cache_dir)
    else:
        work, targets, reached = _recalibrate_in_place(
            model, chosen, plan, batches, writer, inplace, cache,
            memory_budget, cache_dir)
    unreached = [layer.name for layer in targets
                 if not any(layer is r for r in reached)]
    if unreached:
        warnings.warn(
            f"{_WHAT}: layers {unreached} are not reached by a forward pass "
            f"of model '{work.name}'; their statistics are left as they are.",
            stacklevel=2,
        )
    if batches.skipped:
        warnings.warn(
            f"{_WHAT}: left out {batches.skipped} sample(s) per pass whose "
            "inputs hold NaN or inf (skip_nonfinite=True).", stacklevel=2)
    if verbose == 2:
        print(clock.line())
    return work


def _copy(model, clock, values=None):
    start = time.perf_counter()
    copy = _models.clone_with_weights(model, _WHAT, values=values)
    clock.add("copy", start)
    return copy


def _staged_plan(model, targets):
    """`model`'s staged plan, or None if it has none (`_recalibrate` then
    says why and goes layer by layer)."""
    try:
        return _plan.read(model, targets)
    except _plan.PlanRefused:
        return None


def _runs_stateless(plan):
    """Whether `plan` can run on the model itself without writing to it
    (`_recalibrate_stateless`): not with an opaque call (a custom layer
    holding normalizations), whose inner layers are reached by wrapping
    their `call`, which is not done to the caller's own layers."""
    return not any(step.kind == "opaque" for step in plan.steps)


def _recalibrate_stateless(model, targets, plan, batches, writer, inplace,
                           cache, memory_budget, cache_dir):
    """The staged method on `model` itself, inside a `keras.StatelessScope`:
    each statistic written is held by the scope, and the layers after it
    read it from there, so `model` is not written while the stages run;
    its variables get the new values only at the end, all at once with
    `inplace`, else the copy is made then, holding them (so no copy is
    made before, and none written twice). Returns `(model or its copy,
    targets in it, layers reached in it)`."""
    with keras.StatelessScope() as scope:
        try:
            reached = _recalibrate(model, targets, batches, writer, cache,
                                   memory_budget, cache_dir, plan=plan)
        except _nonfinite.NonFiniteInputs as found:
            # Located with the statistics held when it happened.
            raise _nonfinite.model_error(_WHAT, batches, found,
                                         model) from None
    weights = {id(variable) for variable in model.weights}
    values = {}
    for layer in targets:
        for variable in layer.variables:
            value = scope.get_current_value(variable)
            if value is None or id(variable) in values:
                continue
            if id(variable) not in weights:  # A kind registered so.
                raise TypeError(
                    f"{_WHAT}: layer '{layer.name}' "
                    f"({type(layer).__name__}) keeps its statistics in "
                    f"variable '{variable.path}', which is not among the "
                    f"weights of model '{model.name}', so a copy cannot "
                    "hold them. Nothing was written; pass inplace=True.")
            values[id(variable)] = (variable, value)
    if not inplace:
        copy = _copy(model, writer.clock,
                     {key: value for key, (_, value) in values.items()})
        return (copy,) + _same_layers(model, copy, targets, reached)
    start = time.perf_counter()
    with _written_back_on_error(targets):
        for variable, value in values.values():
            variable.assign(value)
    writer.clock.add("write", start)
    return model, targets, reached


def _recalibrate_in_place(model, chosen, plan, batches, writer, inplace,
                          cache, memory_budget, cache_dir):
    """Any model: the statistics written into `model` (`inplace`) or a
    copy made first, stage by stage; on any error, written back. `plan`:
    `model`'s staged plan or None (refused, or not read)."""
    if inplace:
        work, targets = model, chosen
    else:
        work = _copy(model, writer.clock)
        targets = _same_layers(model, work, chosen)[0]
        plan = None  # The copy's layers: read again.
    # All or nothing: each stage needs the statistics of the stages before
    # it in place, so they are written as they are found; on any error
    # (KeyboardInterrupt included) the old values are written back.
    with _written_back_on_error(targets):
        try:
            reached = _recalibrate(work, targets, batches, writer, cache,
                                   memory_budget, cache_dir, plan=plan)
        except _nonfinite.NonFiniteInputs as found:
            # Located with the statistics in place when it happened.
            raise _nonfinite.model_error(_WHAT, batches, found,
                                         work) from None
    return work, targets, reached


@contextlib.contextmanager
def _written_back_on_error(layers):
    """On any error in the block (KeyboardInterrupt included), every
    statistic of `layers` is set back to its value at the start, bit for
    bit, a second Ctrl-C held until that is done."""
    old = _collect.statistics_state(layers)
    try:
        yield
    except BaseException:
        with _interrupts_held():
            _collect.restore_state(old)
        raise


def _same_layers(model, copy, *groups):
    """Each list of `model`'s layers in `groups`, as the layers of `copy`
    at the same places."""
    position = {id(layer): i for i, layer in
                enumerate(_keras_internal.sublayers(model))}
    copied = _keras_internal.sublayers(copy)
    return tuple([copied[position[id(layer)]] for layer in group]
                 for group in groups)


def _recalibrate(work, targets, batches, writer, cache, memory_budget,
                 cache_dir, plan=None):
    """Write the new statistics of `targets`; returns the layers reached.
    `plan`: `work`'s staged plan, if read already."""
    with _collect.no_gradients():
        if plan is None:
            try:
                plan = _plan.read(work, targets)
            except _plan.PlanRefused as refused:
                return _layer_by_layer(work, targets, batches, writer,
                                       str(refused))
        budget = (_staged.default_memory_budget() if memory_budget is None
                  else memory_budget)
        store = _staged.ActivationCache(cache, budget, cache_dir)
        batches.widen(_STAGE_BATCH_BYTES)
        try:
            return _by_stages(plan, batches, store, writer)
        finally:
            store.close()


def _check_batched(model, first):
    """Refuse batches that do not give the model its inputs: another
    number of arrays (a tuple is read as `(x, y[, w])` unless it holds one
    array per input), dict keys that name no input, or single samples
    (one axis short of every input). Keras' own errors print the data or
    an object id."""
    try:
        inputs = keras.tree.flatten(model.inputs)
    except (AttributeError, ValueError, TypeError):
        return  # No graph: the model says what it takes.
    if not inputs:
        return
    names = [x.name for x in inputs]
    if isinstance(first, dict):
        # Keras knows an input by its tensor's or its InputLayer's name.
        known = set(names)
        for x in inputs:
            layer = getattr(getattr(x, "_keras_history", None), "operation",
                            None)
            if layer is not None:
                known.add(layer.name)
        unknown = sorted(str(k) for k in first if k not in known)
        if unknown:
            raise ValueError(
                f"{_WHAT}: the data's batches are dicts with key(s) "
                f"{unknown} that name no input of model '{model.name}' "
                f"(its inputs: {names}). Key each array by its input's "
                "name.")
        return
    values = keras.tree.flatten(first)
    if len(values) != len(inputs):
        raise ValueError(
            f"{_WHAT}: the data's batches give {len(values)} input "
            f"array(s); model '{model.name}' takes {len(inputs)} "
            f"({names}). A batch that is a tuple or list is read as "
            "(x, y[, sample_weight]) unless it holds exactly one array per "
            "input: give the inputs as one tuple, e.g. ((xa, xb), y), or a "
            "dict by input name.")
    if all(len(v.shape) == len(x.shape) - 1 for v, x in zip(values, inputs)):
        raise ValueError(
            f"{_WHAT}: the data's batches have shape "
            f"{tuple(values[0].shape)}, one axis short of the model's input "
            f"{tuple(inputs[0].shape)}: they look like single samples. "
            "Batch them (a tf.data.Dataset: `.batch(32)`; a generator: "
            "yield arrays of several samples).")


@contextlib.contextmanager
def _interrupts_held():
    """Hold back SIGINT (Ctrl-C) while the block runs, and deliver it
    after, so that a second Ctrl-C cannot stop the old statistics from
    being written back half-way. Only the main thread receives signals;
    elsewhere the block runs as it is."""
    previous = signal.getsignal(signal.SIGINT)
    if (threading.current_thread() is not threading.main_thread()
            or previous is None):  # None: a handler not set from Python.
        yield
        return
    received = []
    signal.signal(signal.SIGINT, lambda *args: received.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            signal.raise_signal(signal.SIGINT)  # As the user's handler says.


def _check_cache(cache, memory_budget, cache_dir):
    if cache not in _CACHE_MODES:
        raise ValueError(
            f"{_WHAT}: argument `cache` must be one of {_CACHE_MODES}. "
            f"Received: cache={cache!r}."
        )
    _checks.check_int("memory_budget", memory_budget, 0, _WHAT,
                      allow_none=True, hint="It is a number of bytes.")
    if cache_dir is not None and not os.path.isdir(cache_dir):
        raise ValueError(
            f"{_WHAT}: argument `cache_dir` must be an existing directory. "
            f"Received: cache_dir={cache_dir!r}."
        )


def _check_storable(layer, center, spread):
    """Refuse statistics the layer's variables cannot hold: finite float64
    moments of finite float32 activations can still exceed float32's range
    (a variance of activations near 1e20 is 1e40), and the cast would
    store inf, which normalizes every output to beta."""
    dtype = np.dtype(keras.backend.standardize_dtype(
        layer.moving_variance.dtype if hasattr(layer, "moving_variance")
        else "float32"))
    largest = float(np.finfo(dtype).max)
    for what, value in (("mean", center), ("variance", spread)):
        value = np.asarray(value, np.float64)
        if np.any(np.abs(value) > largest):
            raise ValueError(
                f"{_WHAT}: layer '{layer.name}' ({type(layer).__name__}): "
                f"the population {what} of its inputs reaches "
                f"{float(np.max(np.abs(value))):.3g}, beyond what its "
                f"{dtype.name} statistics can hold ({largest:.3g}); stored, "
                "it would be inf and the layer would output its beta for "
                "every input. The activations reaching it are that large "
                f"(largest |{what}| channel: "
                f"{int(np.argmax(np.abs(value).ravel()))}): rescale the "
                "data or the layers before it. Nothing was written.")


class _Writer:
    """Merges a stage's moments over workers, writes them, reports."""

    def __init__(self, strategy, verbose, clock):
        self.strategy = strategy
        self.verbose = verbose
        self.clock = clock

    def write(self, layers, moments):
        start = time.perf_counter()
        try:
            self._write(layers, moments)
        finally:
            self.clock.add("write", start)

    def _write(self, layers, moments):
        moments = _distributed.merge_over_workers(self.strategy, moments)
        for layer, result in zip(layers, moments):
            if result.count == 0:
                warnings.warn(
                    f"{_WHAT}: layer '{layer.name}' saw no unmasked "
                    "position in the data; its statistics are left as they "
                    "are.", stacklevel=4)
                continue
            kind = registry.find_statistics(layer)
            center, spread = kind.from_moments(result.mean, result.variance)
            _check_storable(layer, center, spread)
            kind.write(layer, center, spread)
            if self.verbose == 2:
                print(f"  '{layer.name}': {int(result.count)} positions, "
                      "mean |mean| "
                      f"{float(np.mean(np.abs(result.mean))):.4g}, mean "
                      f"variance {float(np.mean(result.variance)):.4g}")


def _layer_by_layer(work, targets, batches, writer, why):
    """A model without a layer graph: one pass over the data per layer,
    each layer written before the next is measured. A layer called more
    than once may read its own output: then `_settle`."""
    start = time.perf_counter()
    statistics = _collect.InputStatistics(work, targets, batches.first(),
                                          selective=True)
    writer.clock.add("trace", start)
    order = statistics.order
    if writer.verbose:
        print(f"Recalibrating {len(order)} normalization layer(s) layer by "
              f"layer, one pass over the data each ({why})")
    found = _measure(statistics, order, batches, writer, write=True)
    if statistics.called_again:
        _settle(statistics, order, batches, writer, found)
    return order


def _measure(statistics, order, batches, writer, write, round_=1):
    """`{id(layer): Moments}` of every layer of `order`, one pass over the
    data each; with `write`, each is written before the next is
    measured."""
    found = {}
    for number, layer in enumerate(order, start=1):
        progbar = None
        if writer.verbose:
            again = f", round {round_}" if round_ > 1 else ""
            print(f"Layer {number}/{len(order)}: '{layer.name}' "
                  f"({type(layer).__name__}{again})")
            progbar = keras.utils.Progbar(batches.num_batches,
                                          verbose=writer.verbose)
        start = time.perf_counter()
        moments = statistics.run(batches, layer, progbar).get(id(layer))
        writer.clock.add("layers", start)
        if id(layer) in statistics.nonfinite:
            raise _nonfinite.NonFiniteInputs(
                layer, statistics.nonfinite[id(layer)])
        if moments is None:
            moments = _collect.Moments(0, 0.0, 0.0)
        found[id(layer)] = moments
        if write:
            writer.write([layer], [moments])
    return found


def _settle(statistics, order, batches, writer, found):
    """Make the statistics a fixed point of the pass.

    A layer called again on a path through its own output (a block
    applied twice) has statistics S that depend on themselves: the pass
    measures F(S), and the model is consistent only where S = F(S).
    Repeating the pass (S <- F(S)) oscillates once the layer amplifies its
    own normalization into its second input; here each round measures
    F(S) with S held (every layer, then written together) and takes an
    Anderson step (type II, the last `_ANDERSON` rounds) on the means in
    units of the first round's standard deviations and the log-variances.
    It stops once no statistic moves by more than `_SETTLE` (means in
    standard deviations, variances relative); at most `_SETTLE_ROUNDS`
    rounds, else a warning.
    """
    layers = [layer for layer in order if found[id(layer)].count]
    if not layers:
        return
    scale = np.concatenate([np.sqrt(found[id(layer)].variance + _TINY)
                            for layer in layers])

    def vector(results):
        return np.concatenate(
            [results[id(layer)].mean for layer in layers] + [
                np.log(results[id(layer)].variance + _TINY)
                for layer in layers]) / np.concatenate(
            [scale, np.ones_like(scale)])

    def held(x):
        """The `Moments` per layer that vector `x` stands for."""
        means, logs = np.split(x, 2)
        means, variances = means * scale, np.exp(logs) - _TINY
        result, start = {}, 0
        for layer in layers:
            count = found[id(layer)].count
            stop = start + found[id(layer)].mean.size
            variance = np.maximum(variances[start:stop], 0.0)
            result[id(layer)] = _collect.Moments(
                count, means[start:stop], variance * count)
            start = stop
        return result

    x, history, best, stalled = vector(found), [], np.inf, 0
    for round_ in range(2, _SETTLE_ROUNDS + 1):
        now = _measure(statistics, order, batches, writer, write=False,
                       round_=round_)
        g = vector(now) - x
        # Against what the pass held (x), not the previous measurement.
        moved, name = _largest_move(layers, held(x), now)
        if moved <= _SETTLE:
            return  # What is written (x) is what the pass reproduces.
        best, stalled = (moved, 0) if moved < best else (best, stalled + 1)
        if moved <= _ACCEPT and stalled >= _STALL:
            return  # At float32's floor (see _ACCEPT).
        history.append((x, g))
        history = history[-_ANDERSON:]
        step = g
        if len(history) > 1:
            dx = np.stack([b[0] - a[0] for a, b in zip(history, history[1:])],
                          axis=1)
            dg = np.stack([b[1] - a[1] for a, b in zip(history, history[1:])],
                          axis=1)
            gamma = np.linalg.lstsq(dg, g, rcond=None)[0]
            step = g - (dx + dg) @ gamma
        # At most one first-round standard deviation, or a factor e of a
        # variance, per round: an extrapolation far outside the data's
        # range would make activations overflow.
        x = x + np.clip(step, -1.0, 1.0)
        moments = held(x)
        for layer in layers:
            writer.write([layer], [moments[id(layer)]])
    warnings.warn(
        f"{_WHAT}: layer '{name}' reads its own output (it is called again "
        "after itself), so its statistics are a fixed point of a pass; "
        f"after {_SETTLE_ROUNDS} passes the pass still moves them by "
        f"{moved:.2g} (of the channel's scale): they are not consistent "
        "with the inputs the layer receives.", stacklevel=4)


def _largest_move(layers, held, measured):
    """How far a pass moved the statistics `held` when measuring
    `measured` (means in units of the held standard deviation, variances
    relative), and the layer that moved most."""
    largest, name = 0.0, None
    for layer in layers:
        old, new = held[id(layer)], measured[id(layer)]
        move = max(
            float(np.max(np.abs(new.mean - old.mean)
                         / np.sqrt(old.variance + _TINY), initial=0.0)),
            float(np.max(np.abs(new.variance - old.variance)
                         / (old.variance + _TINY), initial=0.0)))
        if move > largest:
            largest, name = move, layer.name
    return largest, name


def _by_stages(plan, batches, store, writer):
    """The staged method (see `_plan`): returns the layers reached."""
    stages = _staged.build_stages(plan, recompute=store.mode == "none")
    # Moments of a concatenation's parts are reused across stages; without
    # the cache each stage reads the data again (a shuffling dataset would
    # pair other batches), so not then.
    memo = _staged.MomentsMemo(plan, enabled=store.mode != "none")
    progbar = None
    if writer.verbose:
        layers = len({id(step.operation) for step in plan.steps
                      if step.kind == "target"}
                     | {id(inner) for step in plan.steps
                        for inner in step.inner})
        how = ("cache: none, each stage recomputes its inputs from the "
               "data" if store.mode == "none" else
               f"cache: {store.mode}, the data read once and each layer "
               "run once per batch")
        print(f"Recalibrating {layers} normalization layer(s) in "
              f"{len(stages)} stage(s) ({how})")
    if writer.verbose == 1:
        progbar = keras.utils.Progbar(len(stages), unit_name="stage")
    reached, count = [], None
    for stage in stages:
        totals, count = _run_stage(plan, stage, batches, store, count,
                                   memo, writer.clock)
        _check_finite(plan, stage, totals)
        pooled = {}  # id(layer) -> [layer, Moments]: all its calls.
        for step in plan.gathered_in(stage.number):
            layer = _gathered_layer(step, stage)
            values = [v for v in totals.get(f"g{step.index}", [])
                      if v is not None]
            result = _staged.as_moments(values or None)
            if layer is None or result is None:
                continue
            if id(layer) in pooled:
                pooled[id(layer)][1] = pooled[id(layer)][1].merge(result)
            else:
                pooled[id(layer)] = [layer, result]
        layers = [layer for layer, _ in pooled.values()]
        moments = [result for _, result in pooled.values()]
        if writer.verbose == 2:
            print(f"Stage {stage.number}/{len(stages)}: "
                  f"{[layer.name for layer in layers]} ({count} batches, "
                  f"{len(stage.runs)} calls run, cache "
                  f"{store.in_memory / _MIB:.1f} MiB in memory, "
                  f"{store.on_disk / _MIB:.1f} MiB on disk)")
        writer.write(layers, moments)
        reached.extend(layers)
        if progbar is not None:
            progbar.update(stage.number)
    return reached


def _check_finite(plan, stage, totals):
    """Raise `NonFiniteInputs` for the first batch (then the first layer)
    whose gathered inputs held NaN or inf."""
    first = None
    for step in plan.gathered_in(stage.number):
        for index, moments in enumerate(totals.get(f"g{step.index}", [])):
            if moments is not None and not moments.finite:
                if first is None or index < first[0]:
                    first = (index, step)
                break
    if first is not None:
        index, step = first
        layer = _gathered_layer(step, stage)
        raise _nonfinite.NonFiniteInputs(layer, index)


def _gathered_layer(step, stage):
    if step.kind == "target":
        return step.operation
    order = stage.order.get(step.index, [])
    k = stage.number - step.gather_stage
    return order[k] if k < len(order) else None


def _run_stage(plan, stage, batches, store, count, memo, clock):
    """Run `stage` over every batch: `({gather: [Moments per batch]},
    batch count)`."""
    touched = [layer for step in stage.steps if step.kind == "opaque"
               for layer in step.inner]
    state = _collect.statistics_state(touched)
    totals = {}
    try:
        for number, feed in enumerate(_feeds(plan, stage, batches, store,
                                             count, clock)):
            out = stage(feed, memo, number, clock)
            start = time.perf_counter()
            for name, value in out.items():
                if name.startswith("g"):
                    totals.setdefault(name, []).append(value)
                else:
                    store.put(name, number, value)
            clock.add("cache", start)
            count = number + 1
    finally:
        _collect.restore_state(state)
    for tensor in plan.last_read_in(stage.number):  # Its last reader ran.
        store.drop(_staged.value_name(tensor))
        store.drop(_staged.mask_name(tensor))
        memo.drop(tensor)
    # Per gather, one `Moments` (or None) per batch, in batch order.
    totals = {name: [_staged.as_moments(v) for v in values]
              for name, values in totals.items()}
    return totals, count


def _feeds(plan, stage, batches, store, count, clock):
    """The inputs of `stage`, batch after batch."""
    from_data = stage.number == 1 or store.mode == "none"
    if from_data:
        source = iter(batches)
        while True:
            start = time.perf_counter()
            x = next(source, None)
            if x is None:
                return
            if keras.backend.backend() != "tensorflow":
                x = _collect.to_numpy(x)
            flat = _keras_internal.standardize_inputs(plan.functional, x)
            values = dict(zip(plan.inputs, flat))
            clock.add("data", start)
            yield {_staged.value_name(t): values[t] for t in stage.reads}
    for number in range(count):
        start = time.perf_counter()
        feed = {}
        for tensor in stage.reads:
            feed[_staged.value_name(tensor)] = store.get(
                _staged.value_name(tensor), number)
            mask = _staged.mask_name(tensor)
            if (mask, number) in store:
                feed[mask] = store.get(mask, number)
        clock.add("cache", start)
        yield feed
