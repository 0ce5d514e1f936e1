"""A report on a model's normalization statistics that a user can act on.

`diagnose(model, data)` runs the model on `data` and reads its graph, then
lists, per normalization layer and for the model, what is likely wrong and
what to do about it. Checks (finding codes):

- `corrupt_statistics`: a stored statistic is NaN or infinite, or a stored
  variance (second moment for MABN) is negative: inference output is NaN
  or wrong on those channels. The suggestion says whether recalibrating
  on `data` will give finite statistics (the layer's inputs on it are
  finite, or NaN only because of an earlier corrupt layer).
- `stale_statistics`: the stored statistics differ from those of the
  layer's inputs on `data` (in inference mode): the normalized mean gap
  `max_c |mu_data - mu_stored| / sqrt(var_stored + eps)` or the variance
  ratio `(var_data + eps) / (var_stored + eps)` of some channel is large.
- `unconverged_statistics`: a moving average still holds a large share of
  its initial value, `momentum**steps`, where the step count is known (not
  reported when the stored statistics equal the population statistics of
  the data to 1e-3, as after `kerasbn.recalibrate`: they were set exactly,
  whatever the step count says).
- `normalization_before_output`: a normalization's output is a model output.
- `redundant_bias`: a layer with a bias feeds a normalization that subtracts
  a mean on the same channels, which cancels the bias.
- `small_batch`: batch normalization computes statistics over fewer than
  `min_batch` samples per replica.
- `train_inference_gap`: on one batch, the model's output with the
  normalizations in training mode (batch statistics) differs much from
  inference mode (stored statistics).

The model is never modified: the forward passes run with the layers' state
saved and restored, and nothing is written to its weights.

Data holding NaN or inf are refused, and so is a model that makes NaN or
inf itself from finite data (a ValueError names the first layer whose
output is not finite, the batch and the count): no measurement is
meaningful after it, and recalibrating would not help.
"""

import dataclasses
import json
import math
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from kerasbn import _checks
from kerasbn import _keras_internal
from kerasbn import registry
from kerasbn.folding import graph as graph_lib
from kerasbn.stats import _collect
from kerasbn.stats import _nonfinite

_WHAT = "kerasbn.diagnose"

STALE = "stale_statistics"
UNCONVERGED = "unconverged_statistics"
BEFORE_OUTPUT = "normalization_before_output"
REDUNDANT_BIAS = "redundant_bias"
SMALL_BATCH = "small_batch"
TRAIN_INFERENCE_GAP = "train_inference_gap"
CORRUPT = "corrupt_statistics"
NONFINITE_OUTPUTS = "nonfinite_outputs"

CODES = (NONFINITE_OUTPUTS, CORRUPT, STALE, UNCONVERGED, BEFORE_OUTPUT,
         REDUNDANT_BIAS, SMALL_BATCH, TRAIN_INFERENCE_GAP)


@dataclasses.dataclass(frozen=True)
class Finding:
    """One problem: a code from `CODES`, the layer (None: the whole model),
    what was measured and what to do.

    >>> import keras, numpy as np, kerasbn
    >>> model = keras.Sequential([
    ...     keras.Input((2,)), keras.layers.BatchNormalization(name="bn"),
    ... ])
    >>> report = kerasbn.diagnose(model, np.full((8, 2), 3.0), verbose=0)
    >>> finding = report.findings[0]
    >>> finding.code, finding.layer, "recalibrate" in finding.suggestion
    ('stale_statistics', 'bn', True)
    """

    code: str
    layer: Optional[str]
    message: str
    suggestion: str

    def to_dict(self):
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class LayerDiagnosis:
    """The measurements for one normalization layer.

    Attributes:
        name: The layer's name.
        kind: Its class name.
        channels: Number of channels.
        positions: Unmasked positions per channel seen in `data` (0 if the
            forward pass did not reach the layer).
        mean_gap: Largest normalized mean gap over channels, None for a
            layer that keeps no mean (MABN) or was not reached.
        variance_ratio: `(smallest, largest)` ratio over channels of the
            data's to the stored variance (second moment for MABN), both
            plus epsilon; None if not reached.
        momentum: Momentum of the moving averages.
        steps: Training updates of the averages, or None if unknown.
        steps_source: "layer" (the layer's own counter), "optimizer" (an
            estimate: the optimizer's iteration count), or None.
        exact: Whether the stored statistics equal the data's population
            statistics (to 1e-3), as after `kerasbn.recalibrate`: then
            `initial_weight` says nothing about them, and the table shows
            "exact" in its place.
        initial_weight: Share of the initial value still in the plain
            moving averages, `momentum**steps`; 0.0 if every average is
            zero-debiased; None if the steps are unknown.

    >>> import keras, numpy as np, kerasbn
    >>> model = keras.Sequential([
    ...     keras.Input((2,)), keras.layers.BatchNormalization(name="bn"),
    ... ])
    >>> report = kerasbn.diagnose(model, np.full((8, 2), 3.0), verbose=0)
    >>> layer = report.layers[0]  # stored mean 0, data mean 3
    >>> layer.name, layer.channels, layer.positions, round(layer.mean_gap, 2)
    ('bn', 2, 8, 3.0)
    >>> layer.steps is None  # Keras' layer does not count its updates
    True
    """

    name: str
    kind: str
    channels: int
    positions: int
    mean_gap: Optional[float]
    variance_ratio: Optional[tuple]
    momentum: float
    steps: Optional[int]
    steps_source: Optional[str]
    initial_weight: Optional[float]
    exact: bool = False

    def to_dict(self):
        values = dataclasses.asdict(self)
        if self.variance_ratio is not None:
            values["variance_ratio"] = list(self.variance_ratio)
        return values


@dataclasses.dataclass(frozen=True)
class Diagnosis:
    """The result of `diagnose`: measurements and findings.

    `str(diagnosis)` (or `print`) gives a table and the findings;
    `to_dict()`/`to_json()` the same as data. `ok` is True when nothing was
    found; `codes()` lists `(code, layer)` pairs, handy in tests and scripts.

    >>> import keras, numpy as np, kerasbn
    >>> model = keras.Sequential([
    ...     keras.Input((2,)), keras.layers.BatchNormalization(name="bn"),
    ... ])
    >>> x = np.random.default_rng(0).normal(3.0, 1.0, (64, 2))
    >>> report = kerasbn.diagnose(model, x, verbose=0)
    >>> report.ok, report.codes()
    (False, [('stale_statistics', 'bn'), ('normalization_before_output', 'bn'),
             ('train_inference_gap', None)])
    >>> fixed = kerasbn.recalibrate(model, x, verbose=0)
    >>> kerasbn.diagnose(fixed, x, verbose=0).codes()
    [('normalization_before_output', 'bn')]
    """

    model: str
    batch_size: Optional[int]
    replicas: int
    output_gap: Optional[float]
    layers: tuple
    findings: tuple

    @property
    def ok(self):
        return not self.findings

    def codes(self):
        return [(f.code, f.layer) for f in self.findings]

    def findings_for(self, layer):
        return [f for f in self.findings if f.layer == layer]

    def to_dict(self):
        return {
            "model": self.model,
            "batch_size": self.batch_size,
            "replicas": self.replicas,
            # None where the outputs are not finite (JSON has no NaN).
            "output_gap": (None if self.output_gap is None
                           or math.isnan(self.output_gap)
                           else self.output_gap),
            "layers": [layer.to_dict() for layer in self.layers],
            "findings": [finding.to_dict() for finding in self.findings],
        }

    def to_json(self, **kwargs):
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self):
        def number(value, pattern="{:.3g}"):
            return "-" if value is None else pattern.format(value)

        header = ("Layer", "Kind", "Positions", "Mean gap", "Var ratio",
                  "Steps", "Init weight", "Findings")
        rows = []
        for layer in self.layers:
            ratio = layer.variance_ratio
            steps = "unknown" if layer.steps is None else str(layer.steps)
            if layer.steps_source == "optimizer":
                steps += " (opt.)"
            codes = [f.code for f in self.findings_for(layer.name)]
            rows.append((
                layer.name,
                layer.kind,
                str(layer.positions),
                number(layer.mean_gap),
                "-" if ratio is None else f"{ratio[0]:.3g}..{ratio[1]:.3g}",
                steps,
                "exact" if layer.exact else number(layer.initial_weight),
                ", ".join(codes) or "ok",
            ))
        widths = [max(len(row[i]) for row in [header, *rows])
                  for i in range(len(header))]

        def line(row):
            return "  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip()

        per_replica = (None if self.batch_size is None
                       else self.batch_size // max(self.replicas, 1))
        lines = [
            f"Normalization diagnosis of model '{self.model}': batch size "
            f"{number(self.batch_size, '{}')} on {self.replicas} replica(s) "
            f"({number(per_replica, '{}')} per replica), train/inference "
            f"output gap {number(self.output_gap)}",
            line(header),
            line(["-" * w for w in widths]),
            *[line(row) for row in rows],
        ]
        if self.findings:
            lines.append("")
            lines.append(f"{len(self.findings)} finding(s):")
            for finding in self.findings:
                where = finding.layer or "model"
                lines.append(f"- [{finding.code}] {where}: {finding.message}")
                lines.append(f"  Suggestion: {finding.suggestion}")
        else:
            lines.append("")
            lines.append("No problem found.")
        return "\n".join(lines)


# -- Measurements. -----------------------------------------------------------


def _optimizer_steps(model):
    optimizer = getattr(model, "optimizer", None)
    iterations = getattr(optimizer, "iterations", None)
    if iterations is None:
        return None
    try:
        steps = int(ops.convert_to_numpy(iterations))
    except Exception:  # noqa: BLE001 - an unbuilt optimizer: unknown.
        return None
    return steps if steps > 0 else None


def _averages(layer, kind, model):
    averages = kind.averages(layer)
    steps, source = averages.steps, "layer"
    if steps is None:
        steps, source = _optimizer_steps(model), "optimizer"
    if steps is None:
        source = None
    if not averages.plain:
        initial_weight = 0.0
    elif steps is None:
        initial_weight = None
    else:
        initial_weight = float(averages.momentum) ** steps
    return averages.momentum, steps, source, initial_weight


def _gaps(layer, kind, moments):
    if moments is None or moments.count == 0 or not moments.finite:
        return None, None  # Not reached, or NaN/inf inputs: not comparable.
    epsilon = np.float64(layer.epsilon)
    # Corrupt statistics give NaN here; `_corrupt` reports them.
    with np.errstate(invalid="ignore", divide="ignore"):
        return _gap_values(kind, moments, layer, epsilon)


def _gap_values(kind, moments, layer, epsilon):
    data_center, data_spread = kind.from_moments(moments.mean,
                                                 moments.variance)
    center, spread = kind.stored(layer)
    mean_gap = None
    if center is not None:
        mean_gap = float(np.max(
            np.abs(data_center - center) / np.sqrt(spread + epsilon)
        ))
    ratio = (data_spread + epsilon) / (np.maximum(spread, 0.0) + epsilon)
    return mean_gap, (float(np.min(ratio)), float(np.max(ratio)))


def _batch_size(batches, batch_size):
    if batch_size is not None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or (
            batch_size < 1
        ):
            raise ValueError(
                f"{_WHAT}: argument `batch_size` must be a positive integer "
                f"(the global training batch size). Received: "
                f"batch_size={batch_size!r}."
            )
        return batch_size
    if batches.batch_size is not None:
        return batches.batch_size
    return _collect.leading_size(batches.first())


def _replicas(model):
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None:
        strategy = tf.distribute.get_strategy()
    return int(strategy.num_replicas_in_sync)


def _output_gap(model, layers, x):
    """Relative RMS difference of the outputs, batch vs stored statistics."""
    state = _collect.statistics_state(layers)
    try:
        inference = model(x, training=False)
        with _collect.intercept(layers, training=True):
            training = model(x, training=False)
    finally:
        _collect.restore_state(state)
    gaps = []
    for a, b in zip(keras.tree.flatten(inference),
                    keras.tree.flatten(training)):
        a = np.asarray(ops.convert_to_numpy(a), np.float64)
        b = np.asarray(ops.convert_to_numpy(b), np.float64)
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            return float("nan")  # `_gap_findings` says why.
        scale = math.sqrt(float(np.mean(a * a)))
        difference = math.sqrt(float(np.mean((a - b) ** 2)))
        gaps.append(difference / scale if scale > 0 else difference)
    return max(gaps) if gaps else None


# -- Graph checks. -----------------------------------------------------------


def _is_linear(layer):
    activation = getattr(layer, "activation", None)
    return activation is None or activation is keras.activations.linear


def _graph_models(model):
    """`model` and every Functional/Sequential model nested in it."""
    found = [model] if graph_lib.is_graph_model(model) else []
    return found + [layer for layer in _keras_internal.sublayers(model)
                    if graph_lib.is_graph_model(layer)]


def _output_normalizations(model):
    """Normalization layers whose output is an output of `model`."""
    if not graph_lib.is_graph_model(model):
        return []
    graph = graph_lib.read_graph(model, trace=False)
    found = []
    for tensor in graph.functional.outputs:
        index = graph.producer.get(id(tensor))
        if index is None:
            continue
        operation = graph.calls[index].operation
        if registry.find_statistics(operation) is not None:
            found.append(operation)
        elif graph_lib.is_graph_model(operation):
            found.extend(_output_normalizations(operation))
    return found


def _redundant_biases(model):
    """`(producer, normalization)` pairs where the bias cancels out."""
    pairs = []
    for graph_model in _graph_models(model):
        graph = graph_lib.read_graph(graph_model, trace=False)
        for call in graph.calls:
            kind = registry.find_statistics(call.operation)
            if kind is None or not kind.subtracts_mean:
                continue
            input_id = call.first_input_id()
            index = graph.producer.get(input_id)
            if index is None:
                continue
            producer = graph.calls[index].operation
            rule = registry.find_linear(producer)
            if rule is None or not getattr(producer, "use_bias", False) or (
                not _is_linear(producer)
            ):
                continue
            rank = len(graph.tensors[input_id].shape)
            if rule.channel_axis(producer, rank) != registry.channel_axis(
                call.operation, rank
            ):
                continue
            consumers = graph.uses.get(input_id, [])
            if all(
                c != graph_lib.OUTPUT
                and registry.find_statistics(graph.calls[c].operation) is not None
                and registry.find_statistics(graph.calls[c].operation).subtracts_mean
                for c in consumers
            ):
                pairs.append((producer, call.operation))
    return pairs


def _is_plain_batch_norm(layer):
    return isinstance(layer, keras.layers.BatchNormalization) and not (
        layer.renorm
    )


# -- The entry point. --------------------------------------------------------


def diagnose(model, data, *, steps=None, batch_size=None, mean_gap=0.5,
             variance_ratio=2.0, initial_weight=0.05, output_gap=0.3,
             min_batch=8, verbose="auto"):
    """Check a model's normalization layers and say what to fix.

    Measures, for every BatchNormalization-like layer (Keras' and
    kerasbn's, MABN included), the statistics of its inputs over `data`
    with the model in inference mode, and compares them with the stored
    ones; reads the layers' step counters; reads the model's graph; and
    compares the model's output in training and inference mode on the first
    batch of `data`. See the module docstring for the checks and their
    codes. Each finding carries a message (the numbers measured) and a
    suggestion.

    Where a layer does not count its updates (Keras' `BatchNormalization`;
    kerasbn's without `zero_debias`), the step count is estimated by the
    iterations of the model's optimizer if it has trained, which assumes the
    layer trained at every step (an upper bound if it was frozen for part of
    training); otherwise the convergence is "unknown" and not flagged.

    The batch size checked against `min_batch` is `batch_size` if given,
    else the batch size of `data` (array data: 32, Keras' default), divided
    by the number of replicas of the model's distribution strategy; a
    `synchronized=True` layer is checked with the global batch size.
    Batch renormalization and MABN are not flagged (they are the remedy).

    The model is not modified: its layers' state is saved before the
    forward passes and restored after them.

    Args:
        model: A built `keras.Model`. Graph checks (output, bias) need a
            Functional or Sequential model (nested ones included); they are
            skipped for subclassed models.
        data: As for `kerasbn.recalibrate`: arrays, a `tf.data.Dataset`, a
            `keras.utils.PyDataset` or a generator; `(x, y)` batches use x.
        steps: Use at most this many batches.
        batch_size: The global training batch size (default: the data's).
        mean_gap: Threshold on the normalized mean gap of any channel.
        variance_ratio: Threshold `r`: a channel whose variance ratio is
            above `r` or below `1 / r` is stale.
        initial_weight: Threshold on `momentum**steps`.
        output_gap: Threshold on the relative RMS difference of the model's
            outputs between training-mode and inference-mode normalization.
        min_batch: Smallest healthy batch size per replica.
        verbose: 0, 1 (progress bar), 2, or "auto" (1).

    Returns:
        A `Diagnosis`; `print` it, or use `to_dict()`/`to_json()`.

    Raises:
        ValueError: `data` hold NaN or inf, or the model makes NaN or inf
            itself from them (the error names the first layer in graph
            order whose output is not finite, the batch and the count);
            NaN or inf that an earlier normalization with corrupt
            statistics outputs is a `corrupt_statistics` finding instead.

    Example:

    >>> import numpy as np, keras, kerasbn
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(3),
    ...                           keras.layers.BatchNormalization(),
    ...                           keras.layers.Dense(1)])
    >>> x = np.random.default_rng(0).normal(5.0, 1.0, (64, 3))
    >>> report = kerasbn.diagnose(model, x, verbose=0)
    >>> sorted({code for code, layer in report.codes()})
    ['redundant_bias', 'stale_statistics', 'train_inference_gap']
    """
    _checks.check_model(model, _WHAT)
    verbose = _collect.resolve_verbose(verbose, _WHAT)
    thresholds = _Thresholds(mean_gap, variance_ratio, initial_weight,
                             output_gap, min_batch)
    batches = _collect.Batches(data, steps=steps, what=_WHAT,
                               num_inputs=_collect.num_inputs(model))
    layers = registry.normalization_layers(model)
    first = batches.first()
    with _collect.no_gradients():
        moments, nonfinite = _measure(model, layers, batches, verbose)
        blamed = _corrupt_sources(model, batches, nonfinite)
        gap = _output_gap(model, layers, first) if layers else None
    global_batch = _batch_size(batches, batch_size)
    replicas = _replicas(model)

    reports, findings = [], []
    for layer in layers:
        report = _layer_report(layer, moments.get(id(layer)), model)
        reports.append(report)
        findings.extend(_layer_findings(layer, report, thresholds,
                                        global_batch, replicas,
                                        moments.get(id(layer)), blamed))
    findings.extend(_graph_findings(model))
    findings.extend(_gap_findings(gap, thresholds))
    order = {code: i for i, code in enumerate(CODES)}
    findings.sort(key=lambda f: order[f.code])
    return Diagnosis(
        model=model.name,
        batch_size=global_batch,
        replicas=replicas,
        output_gap=gap,
        layers=tuple(reports),
        findings=tuple(findings),
    )


# -- Steps of `diagnose`. ----------------------------------------------------

# A layer whose stored statistics match the data this closely was set from
# it (recalibrated): its step count says nothing about convergence.
_EXACT = 1e-3


@dataclasses.dataclass(frozen=True)
class _Thresholds:
    mean_gap: float
    variance_ratio: float
    initial_weight: float
    output_gap: float
    min_batch: float

    def __post_init__(self):
        for name, low in (("mean_gap", 0.0), ("variance_ratio", 1.0),
                          ("initial_weight", 0.0), ("output_gap", 0.0),
                          ("min_batch", 0)):
            _checks.check_number(name, getattr(self, name), low, where=_WHAT)


def _measure(model, layers, batches, verbose):
    """`({id(layer): Moments}, nonfinite)`: the moments of every layer's
    inputs over all batches, and the layers whose inputs held NaN or inf
    with the first such batch, `[(index, layer)]` in batch order."""
    if not layers:
        return {}, []
    progbar = None
    if verbose:
        progbar = keras.utils.Progbar(batches.num_batches, verbose=verbose)
    statistics = _collect.InputStatistics(model, layers, batches.first())
    moments = statistics.run(batches, progbar=progbar)
    by_id = {id(layer): layer for layer in layers}
    nonfinite = sorted(((index, by_id[layer_id]) for layer_id, index
                        in statistics.nonfinite.items()),
                       key=lambda item: item[0])
    return moments, nonfinite


def _corrupt_sources(model, batches, nonfinite):
    """`{id(layer): corrupt normalization layer}` for each layer whose
    inputs held NaN or inf because an earlier normalization with corrupt
    statistics outputs them (a finding, not an error).

    The data are finite (checked), so anything else is the model making
    NaN or inf itself: a ValueError names the first layer that does.
    """
    blamed, located = {}, {}
    for index, layer in nonfinite:  # sorted by batch: one run per batch
        if index not in located:
            try:
                located[index] = _nonfinite.first_source(
                    model, batches.nth(index))
            except Exception:  # noqa: BLE001 - model_error reports it.
                located[index] = None
        source = located[index]
        if source is not None and source.layer is not None and (
                _nonfinite.is_corrupt(source.layer)):
            blamed[id(layer)] = source.layer
            continue
        raise _nonfinite.model_error(
            _WHAT, batches, _nonfinite.NonFiniteInputs(layer, index), model,
            corrupt=[other.name for _, other in nonfinite
                     if _nonfinite.is_corrupt(other)])
    return blamed


def _layer_report(layer, moments, model):
    kind = registry.find_statistics(layer)
    mean_gap, ratio = _gaps(layer, kind, moments)
    momentum, steps, source, weight = _averages(layer, kind, model)
    return LayerDiagnosis(
        name=layer.name, kind=type(layer).__name__,
        channels=int(kind.stored(layer)[1].shape[0]),
        positions=0 if moments is None else int(moments.count),
        mean_gap=mean_gap, variance_ratio=ratio, momentum=momentum,
        steps=steps, steps_source=source, initial_weight=weight,
        exact=_is_exact(mean_gap, ratio),
    )


def _layer_findings(layer, report, thresholds, global_batch, replicas,
                    moments, blamed):
    found = [_corrupt(layer, moments, blamed), _stale(report, thresholds),
             _unconverged(report, thresholds),
             _small_batch(layer, thresholds, global_batch, replicas)]
    return [finding for finding in found if finding is not None]


def _corrupt(layer, moments, blamed):
    bad, negative = _nonfinite.corrupt_channels(layer)
    if not (bad.any() or negative.any()):
        return None
    # What the data showed of the layer's inputs decides the advice (a
    # model that makes NaN or inf itself was refused by `diagnose`).
    if moments is not None and moments.count and moments.finite:
        how = ("on these data: its inputs on them are finite, so the new "
               "statistics will be too")
    elif id(layer) in blamed:
        how = (f"on these data: its inputs on them hold NaN or inf only "
               f"because '{blamed[id(layer)].name}' before it has corrupt "
               "statistics too, which recalibrate re-estimates first")
    else:
        how = "on finite data that reach the layer (these did not)"
    return Finding(
        CORRUPT, layer.name,
        f"{int(bad.sum())} channel(s) hold a NaN or infinite statistic and "
        f"{int(negative.sum())} a negative variance (channels "
        f"{np.flatnonzero(bad | negative)[:8].tolist()}); inference output "
        "is NaN or wrong there, and kerasbn.fold refuses the layer.",
        f"Re-estimate the statistics with kerasbn.recalibrate(model, data) "
        f"{how}.",
    )


def _stale(report, thresholds):
    ratio, gap = report.variance_ratio, report.mean_gap
    if ratio is None:
        return None
    too_far = gap is not None and gap > thresholds.mean_gap
    limit = thresholds.variance_ratio
    if not (too_far or ratio[1] > limit or ratio[0] < 1.0 / limit):
        return None
    mean_text = ("" if gap is None else
                 f"mean gap up to {gap:.3g} stored standard deviations, ")
    return Finding(
        STALE, report.name,
        f"the stored statistics do not match its inputs on the data "
        f"({mean_text}variance ratio data/stored "
        f"{ratio[0]:.3g}..{ratio[1]:.3g}).",
        "Re-estimate them with kerasbn.recalibrate(model, data) on data like "
        "the deployment data (needed after weight averaging, pruning, "
        "fine-tuning or a change of data).",
    )


def _is_exact(mean_gap, ratio):
    """Stored statistics equal to the data's: set from it, e.g. recalibrated."""
    return (ratio is not None and abs(ratio[0] - 1.0) <= _EXACT
            and abs(ratio[1] - 1.0) <= _EXACT
            and (mean_gap is None or mean_gap <= _EXACT))


def _unconverged(report, thresholds):
    weight = report.initial_weight
    if weight is None or weight <= thresholds.initial_weight or report.exact:
        return None
    where = ("the optimizer's iteration count"
             if report.steps_source == "optimizer"
             else "the layer's step counter")
    return Finding(
        UNCONVERGED, report.name,
        f"after {report.steps} updates ({where}) with momentum "
        f"{report.momentum}, its moving averages still hold {weight:.1%} of "
        "their initial values.",
        "Train longer, lower the momentum, use zero-debiased averages "
        "(kerasbn.layers.BatchNormalization(zero_debias="
        "'mean_and_variance')), or run kerasbn.recalibrate.",
    )


def _small_batch(layer, thresholds, global_batch, replicas):
    if not _is_plain_batch_norm(layer) or global_batch is None:
        return None
    effective = global_batch
    if not layer.synchronized:
        effective = global_batch // max(replicas, 1)
    if effective >= thresholds.min_batch:
        return None
    scope = ("synchronized over all replicas" if layer.synchronized
             else "per replica")
    return Finding(
        SMALL_BATCH, layer.name,
        f"it computes batch statistics over {effective} sample(s) {scope} "
        f"(batch size {global_batch}, {replicas} replica(s)), fewer than "
        f"{thresholds.min_batch}.",
        "Use kerasbn.layers.BatchRenormalization, or MABN "
        "(kerasbn.convert_to_mabn), or synchronized=True across replicas, "
        "or a larger batch.",
    )


def _graph_findings(model):
    if not graph_lib.is_graph_model(model):
        return []
    findings = [Finding(
        BEFORE_OUTPUT, layer.name,
        "its output is a model output, so the model's predictions are "
        "forced to zero mean and unit variance per batch during training "
        "(shifted by beta, scaled by gamma).",
        "Remove it, or move it before the last linear layer.",
    ) for layer in _output_normalizations(model)]
    findings.extend(Finding(
        REDUNDANT_BIAS, layer.name,
        f"'{producer.name}' ({type(producer).__name__}) adds a bias that "
        f"'{layer.name}' subtracts again with its mean; the bias only costs "
        "parameters and memory.",
        f"Build '{producer.name}' with use_bias=False (the normalization's "
        "beta plays its role).",
    ) for producer, layer in _redundant_biases(model))
    return findings


def _gap_findings(gap, thresholds):
    if gap is not None and math.isnan(gap):
        return [Finding(
            NONFINITE_OUTPUTS, None,
            "on the first batch the model outputs NaN or inf (with its "
            "stored statistics or with batch statistics), after the last "
            "normalization had finite inputs: a layer after the "
            "normalizations overflows, divides by zero or leaves a "
            "function's domain.",
            "Check the layers after the last normalization on that batch "
            "(their weights and what they compute); recalibrating cannot "
            "change their outputs.",
        )]
    if gap is None or gap <= thresholds.output_gap:
        return []
    return [Finding(
        TRAIN_INFERENCE_GAP, None,
        f"on the first batch, the outputs with batch statistics differ from "
        f"those with the stored statistics by {gap:.3g} (relative RMS).",
        "If the statistics are stale, run kerasbn.recalibrate; if the "
        "batches are small or not representative, use larger shuffled "
        "batches, BatchRenormalization or MABN.",
    )]
