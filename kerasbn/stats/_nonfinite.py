"""Where NaN or inf comes from when the data are finite.

The statistics tools refuse data holding NaN or inf (`_collect.Batches`).
A model can still make them itself: a layer whose weights hold NaN, one
that overflows float32 (a `Dense` with huge weights, `exp` of a large
activation), or a normalization whose stored statistics are corrupt. A
normalization's inputs then show it at no extra cost: their float64 mean
and sum of squared deviations, computed anyway, are not finite
(`Moments.finite`). Only then is the model run again on that one batch,
call by call in graph order (`_plan`'s flattened graph; inside a custom
layer or a subclassed model, in the order its layers finish), to find the
first layer whose output is not finite (`first_source`), and
`model_error` says so: which layer, on which batch, how many values, and
what to check.
"""

import dataclasses

import keras
import numpy as np

from kerasbn import _keras_internal
from kerasbn import registry
from kerasbn.stats import _collect
from kerasbn.stats import _plan
from kerasbn.stats import _staged


class NonFiniteInputs(Exception):
    """The inputs of normalization layer `layer` held NaN or inf on the
    `index`-th batch a pass over the data yields (raised inside the
    statistics tools, turned into `model_error` by their entry points)."""

    def __init__(self, layer, index):
        super().__init__(layer.name, index)
        self.layer = layer
        self.index = index


@dataclasses.dataclass(frozen=True)
class Source:
    """The first call whose output holds NaN or inf.

    `layer` is the layer (or Keras operation) called, None for a model
    input that is not finite once cast to the input's dtype (`name`);
    `inside` the custom layer or model whose call it is part of, if any;
    `bad` of the `size` output values are NaN or inf; `dtype` is a model
    input's.
    """

    layer: object
    name: str
    bad: int
    size: int
    inside: object = None
    dtype: str = "float32"


def corrupt_channels(layer):
    """`(non_finite, negative)`: boolean masks over a normalization
    layer's channels whose stored statistic is NaN or inf, or whose
    stored variance (second moment) is negative."""
    center, spread = registry.find_statistics(layer).stored(layer)
    values = [spread] if center is None else [center, spread]
    non_finite = ~np.all([np.isfinite(v) for v in values], axis=0)
    negative = np.isfinite(spread) & (spread < 0)
    return non_finite, negative


def is_corrupt(layer):
    """Whether `layer` is a normalization with corrupt stored statistics."""
    if registry.find_statistics(layer) is None:
        return False
    non_finite, negative = corrupt_channels(layer)
    return bool(non_finite.any() or negative.any())


def _float_values(value):
    """`value` as a NumPy float array, or None if it holds no floats."""
    try:
        dtype = keras.backend.standardize_dtype(value.dtype)
    except (AttributeError, TypeError, ValueError):
        return None
    if not keras.backend.is_float_dtype(dtype):
        return None
    if dtype not in ("float16", "float32", "float64"):
        value = keras.ops.cast(value, "float32")  # bfloat16, float8...
    return np.asarray(keras.ops.convert_to_numpy(value))


def count_nonfinite(values):
    """`(NaN/inf count, float value count)` over a structure of tensors."""
    bad = size = 0
    for value in keras.tree.flatten(values):
        array = None if value is None else _float_values(value)
        if array is not None:
            bad += int(array.size - np.count_nonzero(np.isfinite(array)))
            size += int(array.size)
    return bad, size


def first_source(model, x):
    """The first call of `model` whose output on batch `x` (model inputs)
    holds NaN or inf, as a `Source`, or None if none does.

    The model runs in inference mode; the normalization layers' state is
    restored afterwards (a custom layer may call one in training mode).
    """
    if keras.backend.backend() != "tensorflow":
        x = _collect.to_numpy(x)
    state = _collect.statistics_state(registry.normalization_layers(model))
    try:
        return _first_source(model, x)
    finally:
        _collect.restore_state(state)


def _first_source(model, x):
    try:
        plan = _plan.read(model, [])
    except _plan.PlanRefused:  # No layer graph: its layers, as they finish.
        return _inside(model, lambda: model(x, training=False), whole=True)
    flat = _keras_internal.standardize_inputs(plan.functional, x)
    for tensor, value in zip(plan.functional.inputs, flat):
        bad, size = count_nonfinite([value])
        if bad:
            return Source(None, f"model input '{tensor.name}'", bad, size,
                          dtype=keras.backend.standardize_dtype(value.dtype))
    values = dict(zip(plan.inputs, flat))
    for step in plan.steps:
        before = dict(values)
        _staged.run_step(step, values)
        outputs = [values[t] for t in step.outputs]
        bad, size = count_nonfinite(outputs)
        if bad:
            inner = _inside(step.operation, lambda: _staged.run_step(
                step, before, keep=False))
            return inner or Source(step.operation, _name(step.operation), bad,
                                   size)
    return None


def _name(operation):
    return f"layer '{operation.name}' ({type(operation).__name__})"


def _inside(operation, run, whole=False):
    """Run `operation` (by `run()`) with every layer inside it watched:
    the first whose output is not finite (an inner layer finishes before
    the layer that calls it), or with `whole`, `operation` itself."""
    found = []

    def after(layer, outputs):
        if not found:
            bad, size = count_nonfinite(outputs)
            if bad:
                found.append(Source(layer, _name(layer), bad, size,
                                    inside=operation))

    with _collect.intercept(_keras_internal.sublayers(operation),
                            after=after):
        outputs = run()
    if found:
        return found[0]
    if whole:
        bad, size = count_nonfinite(outputs)
        if bad:
            return Source(operation, _name(operation), bad, size)
    return None


def _weights_note(layer):
    """What a layer's weights say about its non-finite output."""
    weights = [w for w in getattr(layer, "weights", [])
               if keras.backend.is_float_dtype(w.dtype)]
    arrays = [(w, _float_values(w)) for w in weights]
    broken = [w.path for w, a in arrays if not np.isfinite(a).all()]
    if broken:
        return (f"its weights hold NaN or inf ({broken[:5]}"
                + (" ..." if len(broken) > 5 else "")
                + "); restore them, e.g. from a checkpoint")
    largest = max((float(np.max(np.abs(a))) for _, a in arrays if a.size),
                  default=None)
    if largest is None:
        return ("its inputs are finite, so it overflows, divides by "
                "zero or leaves a function's domain (log or sqrt of a "
                "negative number); check what it computes")
    return ("its inputs and weights are finite, so it overflows, "
            "divides by zero or leaves a function's domain (log or sqrt of "
            "a negative number); check its weights (largest |weight| "
            f"{largest:.3g}) and what it computes")


def cause(source):
    """Why `source` (a layer) makes NaN or inf, and what to do, as far as
    known."""
    if is_corrupt(source.layer):
        return ("its own stored statistics are NaN, infinite or a negative "
                "variance; recalibrate it too (it must be among `layers`)")
    if isinstance(source.layer, keras.layers.Layer):
        note = _weights_note(source.layer)
        dtype = getattr(source.layer, "compute_dtype", None)
        if dtype in ("float16", "bfloat16"):
            largest = float(np.finfo(np.float16).max) if (
                dtype == "float16") else 3.39e38
            note += (f"; it computes in {dtype} (mixed precision), whose "
                     f"largest value is {largest:.6g}: values that fit "
                     "float32 can overflow there (run it in float32, or "
                     "scale the data or weights down)")
        return note
    return ("check that operation's inputs (an overflow, a division by 0, "
            "or a log or sqrt of a negative number)")


def model_error(what, batches, found, model, corrupt=()):
    """The ValueError for `NonFiniteInputs` `found`: the first call of
    `model` that makes NaN or inf on that batch, which the data (finite,
    checked) cannot explain. `corrupt`: names of normalization layers
    whose corrupt statistics such inputs explain."""
    batch = batches.describe(found.index)
    reached = found.layer.name
    try:
        source = first_source(model, batches.nth(found.index))
    except Exception as error:  # noqa: BLE001 - report what is known.
        return ValueError(
            f"{what}: the inputs of normalization layer '{reached}' hold NaN "
            f"or inf on {batch}, which is finite (checked): a layer before "
            "it makes them (running the layers one by one to find which "
            f"raised {type(error).__name__}: {error}). Check the outputs "
            "of the layers before it on that batch.")
    if source is None:
        return ValueError(
            f"{what}: the inputs of normalization layer '{reached}' on "
            f"{batch} give non-finite statistics, yet no "
            "layer's output is NaN or inf when that batch is run again: the "
            "inputs are too large for float64 sums of squares (|x| above "
            "~1e154). Scale the layer's inputs down (e.g. smaller weights "
            "before it)."
        )
    if source.layer is None:  # A model input, once cast to its dtype.
        try:
            limit = f" (|x| > {float(np.finfo(source.dtype).max):.3g})"
        except (TypeError, ValueError):  # bfloat16 and such
            limit = ""
        return ValueError(
            f"{what}: {batch} holds values beyond {source.dtype}'s range"
            f"{limit}, which become {source.bad} inf in "
            f"{source.name} (a {source.dtype} input), and they reach "
            f"normalization layer '{reached}', whose statistics would be "
            f"NaN. Rescale the data, or give the model a wider input dtype."
        )
    where = "" if source.inside in (None, model) else (
        f" inside '{source.inside.name}'")
    note = ""
    if corrupt:
        names = ", ".join(f"'{name}'" for name in corrupt)
        note = (f" The corrupt statistics of {names} are what such inputs "
                "give: kerasbn.recalibrate cannot repair them until the "
                "model is fixed.")
    finite = ("The data are finite (checked)" if not getattr(
        batches, "skip_nonfinite", False) else
        "The data skip_nonfinite=True kept are finite (checked; samples "
        "holding NaN or inf were left out of the batch above)")
    return ValueError(
        f"{what}: the model itself makes NaN or inf from finite data: on "
        f"{batch}, {source.name}{where} outputs "
        f"{source.bad} non-finite value(s) of {source.size}, the first "
        f"call in graph order to do so, and they reach normalization "
        f"layer '{reached}', whose statistics would be NaN. {finite}, so "
        f"the cause is in the model: {cause(source)}.{note}"
    )
