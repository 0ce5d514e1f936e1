"""`kerasbn.quantization_report`: how each folded layer will take int8.

Folding multiplies each output channel of a kernel by its normalization's
`gamma / sqrt(variance + eps)`, so channels that had similar ranges end up
with very different ones; one int8 scale for the whole kernel (per-tensor)
then gives the small channels few levels. The report measures that on the
folded weights, per layer, with the arithmetic of the runtimes' schemes
(`_arrays`), and, given data, the int8 error of each layer's output
activations with calibration ranges taken from that data.
"""

import dataclasses
import json
import math
from typing import Optional, Tuple

import keras
import numpy as np

from kerasbn import _batches
from kerasbn import _checks
from kerasbn import registry
from kerasbn.folding.plan import inference_affine
from kerasbn.quantization import _arrays

WHERE = "kerasbn.quantization_report"
# Per-channel vs per-tensor SQNR gap worth a suggestion: one bit is 6 dB.
SQNR_GAP_DB = 6.0
# Below this SQNR (dB) an int8 tensor's error is over 10% RMS.
LOW_SQNR_DB = 20.0
# A channel whose folded scale is this far from the layer's median scale
# is degenerate: ~0 makes it constant, huge dwarfs the others.
TINY_SCALE, HUGE_SCALE = 1e-3, 1e2
# Output channels this far apart share one uint8 scale badly; below it, a
# low activation SQNR is the data's or the layer's, not the spread's.
SPREAD_FOR_EQUALIZE = 10.0
_CHUNK = 8


@dataclasses.dataclass(frozen=True)
class QuantizationEntry:
    """One linear layer of the folded model.

    Attributes:
        layer: Its path in the folded model (nested models joined by "/").
        kind: Its class name.
        normalizations: Paths of the normalizations folded into it.
        channels: Output channels of its kernel (the per-channel scales).
        weight_spread: Largest / smallest nonzero output channel range.
        sqnr_per_tensor, sqnr_per_channel: dB of int8 weights with one
            scale per kernel / per output channel, each channel against
            its own error, averaged over the channels
            (`_arrays.weight_sqnr`).
        constant_channels: Channels of a folded normalization whose scale
            is ~0 (gamma ~ 0): their output is a constant.
        huge_channels: Channels whose scale is >= 100x the median
            (variance ~ 0): they set a per-tensor scale alone.
        activation_sqnr: dB of its output with uint8 per-tensor ranges
            from the data, channel by channel and averaged like the
            weights' (None without data, or for nested layers).
        activation_spread: Largest / smallest per-channel output range.
        suggestions: What to do about it, if anything.
    """

    layer: str
    kind: str
    normalizations: Tuple[str, ...]
    channels: int
    weight_spread: float
    sqnr_per_tensor: float
    sqnr_per_channel: float
    constant_channels: Tuple[int, ...] = ()
    huge_channels: Tuple[int, ...] = ()
    activation_sqnr: Optional[float] = None
    activation_spread: Optional[float] = None
    suggestions: Tuple[str, ...] = ()

    def sqnr(self, per_channel=True):
        """The lower of its weight SQNR (in that scheme) and its output's."""
        weight = self.sqnr_per_channel if per_channel else self.sqnr_per_tensor
        if self.activation_sqnr is None:
            return weight
        return min(weight, self.activation_sqnr)

    def to_dict(self):
        data = dataclasses.asdict(self)
        for key in ("normalizations", "constant_channels", "huge_channels",
                    "suggestions"):
            data[key] = list(data[key])
        return data


@dataclasses.dataclass(frozen=True)
class QuantizationReport:
    """Per-layer int8 numerics of a folded model.

    Attributes:
        model: Name of the model.
        per_channel: The weight scheme `worst` and the suggestions assume.
        samples: Samples of data the activations were measured on (0
            without data).
        entries: One `QuantizationEntry` per linear layer, in layer order.
    """

    model: str
    per_channel: bool
    samples: int
    entries: Tuple[QuantizationEntry, ...]

    @property
    def worst(self):
        """The entry with the lowest SQNR in the report's scheme, or None."""
        return self.worst_for(self.per_channel)

    def worst_for(self, per_channel):
        """The entry with the lowest SQNR with weights per channel or per
        tensor (`QuantizationEntry.sqnr`), or None without entries."""
        if not self.entries:
            return None
        return min(self.entries, key=lambda e: e.sqnr(per_channel))

    @property
    def folded(self):
        """Entries of the layers a normalization was folded into."""
        return tuple(e for e in self.entries if e.normalizations)

    def to_dict(self):
        return {"model": self.model, "per_channel": self.per_channel,
                "samples": self.samples,
                "worst": self.worst.layer if self.worst else None,
                "entries": [e.to_dict() for e in self.entries]}

    def to_json(self, **kwargs):
        """JSON (infinite SQNR, a kernel int8 holds exactly, is null)."""
        return json.dumps(_finite(self.to_dict()), **kwargs)

    def __str__(self):
        scheme = "per-channel" if self.per_channel else "per-tensor"
        head = (f"{self.model}: int8 numerics of {len(self.entries)} linear "
                f"layers ({len(self.folded)} with folded normalization), "
                f"weights {scheme}"
                + (f", activations on {self.samples} samples"
                   if self.samples else ""))
        rows = [("layer", "spread", "SQNR tensor", "SQNR channel",
                 "act SQNR", "degenerate")]
        for e in self.entries:
            rows.append((e.layer, _times(e.weight_spread),
                         _db(e.sqnr_per_tensor), _db(e.sqnr_per_channel),
                         "-" if e.activation_sqnr is None
                         else _db(e.activation_sqnr),
                         _degenerate(e)))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head]
        for k, r in enumerate(rows):
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths))
                         .rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths))
        worst = self.worst
        if worst is not None:
            lines.append(f"worst: {worst.layer} "
                         f"({_db(worst.sqnr(self.per_channel))} dB)")
        for e in self.entries:
            lines.extend(f"{e.layer}: {s}" for s in e.suggestions)
        return "\n".join(lines)


def _db(value):
    return "inf" if math.isinf(value) and value > 0 else f"{value:.1f}"


def _times(value):
    return f"{value:.1f}" if value < 1e4 else f"{value:.2g}"


def _degenerate(entry):
    parts = []
    if entry.constant_channels:
        parts.append(f"{len(entry.constant_channels)} constant")
    if entry.huge_channels:
        parts.append(f"{len(entry.huge_channels)} huge")
    return ", ".join(parts) or "-"


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def quantization_report(model, data=None, *, fold=True, per_channel=True,
                        max_samples=256):
    """Int8 numerics of each linear layer of `model` after folding.

    Per layer: the spread of its kernel's output channel ranges, the SQNR
    of its weights in per-tensor and per-channel int8, the channels a
    folded normalization made degenerate (scale ~0: a constant channel;
    scale >= 100x the median, from a variance ~0: one channel sets a
    per-tensor scale), and, with `data`, the SQNR of its output in uint8
    with per-tensor ranges from that data (what ONNX Runtime and TFLite
    do with activations). Each problem comes with a suggestion.

    Args:
        model: A Functional or Sequential `keras.Model`; never modified.
        data: Optional representative inputs (arrays, a list or dict of
            them, a tf.data.Dataset or generator of batches), finite.
        fold: Fold its normalizations first (`kerasbn.fold`), as export
            does before it quantizes. False: report `model` as it is.
        per_channel: The weight scheme the suggestions and `worst` assume.
        max_samples: At most this many samples of `data` are used.

    Returns:
        `QuantizationReport`; `print(report)` shows the table.
    """
    _checks.check_model(model, WHERE)
    _checks.check_bool("fold", fold, WHERE)
    _checks.check_bool("per_channel", per_channel, WHERE)
    _checks.check_int("max_samples", max_samples, 1, where=WHERE)
    folded, sources = model, {}
    if fold:
        from kerasbn.folding import fold as fold_model

        folded, fold_report = fold_model(model)
        sources = _folded_into(model, fold_report)
    layers = _linear_layers(folded)
    activations, samples = ({}, 0)
    if data is not None:
        activations, samples = _activation_numerics(folded, layers, data,
                                                    max_samples)
    entries = tuple(_entry(path, layer, sources.get(path, ()),
                           activations.get(path), per_channel)
                    for path, layer in layers)
    return QuantizationReport(model=model.name, per_channel=per_channel,
                              samples=samples, entries=entries)


def _layer_at(model, path):
    layer = model
    for name in path.split("/"):
        layer = layer.get_layer(name)
    return layer


def _folded_into(model, fold_report):
    """`{linear layer path: ((normalization path, layer), ...)}`."""
    sources = {}
    for entry in fold_report.entries:
        if entry.action != "folded":
            continue
        prefix = entry.layer.rpartition("/")[0]
        try:
            layer = _layer_at(model, entry.layer)
        except ValueError:  # Folded inside a traced custom layer.
            layer = None
        for name in entry.into:
            path = f"{prefix}/{name}" if prefix else name
            sources.setdefault(path, []).append((entry.layer, layer))
    return sources


def _linear_layers(model, prefix=""):
    """`[(path, layer)]` of every linear layer, nested models included."""
    found = []
    for layer in model.layers:
        path = prefix + layer.name
        if isinstance(layer, keras.Model):
            found.extend(_linear_layers(layer, path + "/"))
        elif registry.find_linear(layer) is not None and layer.built:
            found.append((path, layer))
    return found


def _entry(path, layer, sources, activation, per_channel):
    rule = registry.find_linear(layer)
    weights = rule.read(layer)
    ranges = _arrays.output_ranges(rule.layout, weights)
    constant, huge = _degenerate_channels(sources)
    entry = QuantizationEntry(
        layer=path, kind=type(layer).__name__,
        normalizations=tuple(name for name, _ in sources),
        channels=int(ranges.size), weight_spread=_arrays.spread(ranges),
        sqnr_per_tensor=_arrays.weight_sqnr(rule.layout, weights, False),
        sqnr_per_channel=_arrays.weight_sqnr(rule.layout, weights, True),
        constant_channels=constant, huge_channels=huge,
        activation_sqnr=None if activation is None else activation[0],
        activation_spread=None if activation is None else activation[1])
    return dataclasses.replace(entry,
                               suggestions=_suggestions(entry, per_channel))


def _degenerate_channels(sources):
    constant, huge = set(), set()
    for _, layer in sources:
        if layer is None:
            continue
        scale = np.abs(inference_affine(layer)[0])
        middle = float(np.median(scale))
        if middle <= 0:
            continue
        constant.update(np.flatnonzero(scale <= TINY_SCALE * middle).tolist())
        huge.update(np.flatnonzero(scale >= HUGE_SCALE * middle).tolist())
    return tuple(sorted(constant)), tuple(sorted(huge))


def _suggestions(entry, per_channel):
    said = []
    gap = entry.sqnr_per_channel - entry.sqnr_per_tensor
    if gap >= SQNR_GAP_DB:
        advice = ("per-channel weights (the default) avoid it" if
                  per_channel else "equalize first (equalize=True, exact "
                  "in float) or quantize per channel (per_channel=True)")
        said.append(
            f"per-tensor int8 loses {gap:.0f} dB on its weights (channel "
            f"range spread {entry.weight_spread:.0f}x after folding); "
            f"{advice}.")
    if entry.constant_channels:
        said.append(
            f"{len(entry.constant_channels)} channel(s) "
            f"{_few(entry.constant_channels)} have a folded scale ~0 "
            "(gamma ~ 0): they output a constant; prune them, or ignore "
            "it under per-channel int8.")
    if entry.huge_channels:
        said.append(
            f"{len(entry.huge_channels)} channel(s) "
            f"{_few(entry.huge_channels)} have a folded scale >= 100x the "
            "median (moving variance ~ 0): recalibrate the statistics on "
            "representative data (kerasbn.recalibrate) before quantizing.")
    if entry.activation_sqnr is not None and (
            entry.activation_sqnr < LOW_SQNR_DB):
        advice = ("equalize first (equalize=True, exact in float) to even "
                  "out its channels' ranges" if entry.activation_spread
                  >= SPREAD_FOR_EQUALIZE else "calibrate on more "
                  "representative data, or keep this layer in float")
        said.append(
            f"its output keeps {entry.activation_sqnr:.0f} dB in uint8 "
            f"(channel range spread {entry.activation_spread:.0f}x): "
            f"{advice}.")
    return tuple(said)


def _few(channels):
    shown = ", ".join(str(c) for c in channels[:5])
    return f"[{shown}{', ...' if len(channels) > 5 else ''}]"


def _activation_numerics(model, layers, data, max_samples):
    """`({path: (SQNR dB, channel range spread)}, samples)` of the
    top-level layers' outputs: ranges in a first pass, errors in a
    second (each layer's outputs are never all held at once)."""
    inputs = _batches.model_inputs(model)
    if not inputs.names:
        raise ValueError(
            f"{WHERE}: model '{model.name}' has no known inputs "
            f"({type(model).__name__}), so `data` cannot be run through its "
            "layers. Pass a Functional or Sequential model, or leave `data` "
            "out for the weight figures alone.")
    batches = _batches.read_batches(inputs, data, "data", WHERE)
    flat = _batches.joined(batches, limit=max_samples)
    top = [(p, l) for p, l in layers if "/" not in p]
    if not top:
        return {}, int(flat[0].shape[0])
    probe = keras.Model(model.inputs, [l.output for _, l in top])
    # Every linear layer's output of a chunk is held at once (ResNet50 at
    # 224x224: ~40 MB per image in float32), so chunks are small.
    chunks = [[a[i:i + _CHUNK] for a in flat]
              for i in range(0, int(flat[0].shape[0]), _CHUNK)]
    lows = [None] * len(top)
    highs = [None] * len(top)
    for chunk in chunks:
        for k, out in enumerate(_outputs(probe, chunk)):
            axes = tuple(range(out.ndim - 1))
            lo, hi = out.min(axis=axes), out.max(axis=axes)
            lows[k] = lo if lows[k] is None else np.minimum(lows[k], lo)
            highs[k] = hi if highs[k] is None else np.maximum(highs[k], hi)
    for k, (path, _) in enumerate(top):
        if not (np.isfinite(lows[k]).all() and np.isfinite(highs[k]).all()):
            raise ValueError(
                f"{WHERE}: layer '{path}' outputs NaN or infinite values on "
                "`data`, so it has no int8 range. Check the model on this "
                "data (kerasbn.diagnose; kerasbn.recalibrate for corrupt "
                "normalization statistics).")
    low = [float(np.min(v)) for v in lows]
    high = [float(np.max(v)) for v in highs]
    signal = [0.0] * len(top)
    noise = [0.0] * len(top)
    for chunk in chunks:
        for k, out in enumerate(_outputs(probe, chunk)):
            error = _arrays.quantize_activations(out, low[k], high[k]) - out
            axes = tuple(range(out.ndim - 1))
            signal[k] = signal[k] + np.sum(np.square(out, dtype=np.float64),
                                           axis=axes)
            noise[k] = noise[k] + np.sum(np.square(error, dtype=np.float64),
                                         axis=axes)
    found = {}
    for k, (path, _) in enumerate(top):
        found[path] = (_arrays.mean_channel_sqnr(signal[k], noise[k]),
                       _arrays.spread(highs[k] - lows[k]))
    return found, int(flat[0].shape[0])


def _outputs(probe, chunk):
    outputs = probe(list(chunk), training=False)
    if not isinstance(outputs, (list, tuple)):
        outputs = [outputs]
    return [np.asarray(keras.ops.convert_to_numpy(o)) for o in outputs]
