"""What `kerasbn.fold` did to each normalization layer, and its summary."""

import dataclasses
import json
from typing import Optional, Tuple

FOLDED = "folded"
REPLACED = "replaced"
KEPT = "kept"
BACKWARD = "backward"
FORWARD = "forward"

# Every reason code a FoldEntry can carry, by when it is decided.
CODES = (
    # Kept as it is whatever the direction:
    "training_mode", "axis_not_single", "unusual_call", "shape",
    "inside_layer",
    # Backward (into the layer before it):
    "after_model_input", "after_nested_model", "after_nonlinear_layer",
    "shared_producer", "producer_activation", "producer_output_shared",
    # Forward (into the layers after it):
    "model_output", "before_nested_model", "before_nonlinear_layer",
    "shared_consumer", "consumer_inputs", "forward_not_exact",
    "forward_disabled",
    # Either direction:
    "producer_unsupported", "axis_mismatch",
)


@dataclasses.dataclass(frozen=True)
class FoldEntry:
    """One call of one normalization layer.

    Attributes:
        layer: Path of the layer from the folded model, nested models
            joined by "/" (e.g. "backbone/Conv1_bn").
        kind: Class name of the normalization layer.
        call: Index of this call among the layer's calls in its model
            (0 unless the layer is shared).
        action: "folded" (gone into `into`), "replaced" (by a ScaleShift of
            the same name; at graph level, `fold_saved_model`, by one
            multiply-add under the node's name) or "kept" (left as it was).
        direction: "backward" (into the layer before it, whose output it
            normalized), "forward" (into the layer(s) after it), or None.
        into: Names of the layers that absorbed it.
        reason: Why it was not folded ("" when folded).
        codes: Short machine-readable reason codes, one per direction tried,
            e.g. ("after_nonlinear_layer", "before_nonlinear_layer").

    >>> import keras, kerasbn
    >>> model = keras.Sequential([
    ...     keras.Input((4,)),
    ...     keras.layers.Dense(3, activation="relu", name="dense"),
    ...     keras.layers.BatchNormalization(name="bn"),
    ... ])
    >>> entry = kerasbn.fold(model).report.entries[0]
    >>> entry.layer, entry.action, entry.codes
    ('bn', 'replaced', ('producer_activation', 'model_output'))
    >>> entry.reason.split(";")[0]
    "backward: Dense 'dense' applies activation 'relu' before the normalization"
    """

    layer: str
    kind: str
    call: int
    action: str
    direction: Optional[str] = None
    into: Tuple[str, ...] = ()
    reason: str = ""
    codes: Tuple[str, ...] = ()

    def to_dict(self):
        data = dataclasses.asdict(self)
        data["into"] = list(self.into)
        data["codes"] = list(self.codes)
        return data


@dataclasses.dataclass(frozen=True)
class FoldReport:
    """Per-layer outcome of a fold and the counts a user can act on.

    Attributes:
        model: Name of the input model.
        entries: One `FoldEntry` per normalization call, in graph order.
        normalizations_before: Normalization layers in the input model,
            nested models included (each layer counted once).
        normalizations_after: Normalization layers left in the new model
            (the kept ones).
        scale_shift_layers: ScaleShift layers fold inserted (at graph
            level: the multiply-adds, `x * scale + shift`).
        forward: Whether forward folds were allowed.
        dtype_policy: The reduced-precision compute policy of the input
            model (e.g. "mixed_float16"), which the folded model keeps
            (folded weights stay float32 variables, computed in the
            policy's dtype); None for a float32 model.

    >>> import keras, kerasbn
    >>> model = keras.Sequential([
    ...     keras.Input((4,)),
    ...     keras.layers.Dense(3, use_bias=False, name="dense"),
    ...     keras.layers.BatchNormalization(name="bn"),
    ... ], name="net")
    >>> report = kerasbn.fold(model).report
    >>> print(report)
    net: normalization layers 1 -> 0; 1 folded (1 backward, 0 forward),
    0 replaced by ScaleShift, 0 kept
    layer  kind                action           into   reason
    -----  ------------------  ---------------  -----  ------
    bn     BatchNormalization  folded backward  dense
    >>> report.summary()["folded"], report.not_folded
    (1, ())
    """

    model: str
    entries: Tuple[FoldEntry, ...]
    normalizations_before: int
    normalizations_after: int
    scale_shift_layers: int
    forward: bool = True
    dtype_policy: Optional[str] = None

    def _count(self, action, direction=None):
        return sum(
            1
            for e in self.entries
            if e.action == action
            and (direction is None or e.direction == direction)
        )

    @property
    def folded_backward(self):
        return self._count(FOLDED, BACKWARD)

    @property
    def folded_forward(self):
        return self._count(FOLDED, FORWARD)

    @property
    def folded(self):
        return self._count(FOLDED)

    @property
    def replaced(self):
        return self._count(REPLACED)

    @property
    def kept(self):
        return self._count(KEPT)

    @property
    def not_folded(self):
        """Entries that were not folded (replaced or kept)."""
        return tuple(e for e in self.entries if e.action != FOLDED)

    def summary(self):
        return {
            "normalizations_before": self.normalizations_before,
            "normalizations_after": self.normalizations_after,
            "calls": len(self.entries),
            "folded": self.folded,
            "folded_backward": self.folded_backward,
            "folded_forward": self.folded_forward,
            "replaced": self.replaced,
            "kept": self.kept,
            "scale_shift_layers": self.scale_shift_layers,
        }

    def to_dict(self):
        return {
            "model": self.model,
            "forward": self.forward,
            "dtype_policy": self.dtype_policy,
            "summary": self.summary(),
            "entries": [e.to_dict() for e in self.entries],
        }

    def to_json(self, **kwargs):
        """The report as JSON; `kwargs` go to `json.dumps` (e.g. indent=2)."""
        return json.dumps(self.to_dict(), **kwargs)

    def headline(self):
        return (
            f"{self.model}: normalization layers {self.normalizations_before}"
            f" -> {self.normalizations_after}; {self.folded} folded "
            f"({self.folded_backward} backward, {self.folded_forward} "
            f"forward), {self.replaced} replaced by ScaleShift, "
            f"{self.kept} kept"
            + (f"; dtype policy {self.dtype_policy} kept (float32 weights)"
               if self.dtype_policy else "")
        )

    def __str__(self):
        rows = [("layer", "kind", "action", "into", "reason")]
        for e in self.entries:
            layer = e.layer if e.call == 0 else f"{e.layer} (call {e.call})"
            action = e.action + (f" {e.direction}" if e.direction else "")
            rows.append((layer, e.kind, action, ", ".join(e.into), e.reason))
        widths = [
            max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)
        ]
        lines = [self.headline()]
        for k, row in enumerate(rows):
            cells = [row[i].ljust(widths[i]) for i in range(len(widths))]
            lines.append("  ".join(cells + [row[-1]]).rstrip())
            if k == 0:
                lines.append("  ".join("-" * w for w in widths + [6]))
        return "\n".join(lines)


class FoldResult:
    """The folded model and its report; unpacks as `(model, report)`.

    >>> import keras, kerasbn
    >>> model = keras.Sequential([
    ...     keras.Input((4,)),
    ...     keras.layers.Dense(3, use_bias=False),
    ...     keras.layers.BatchNormalization(),
    ... ], name="net")
    >>> result = kerasbn.fold(model)
    >>> result
    FoldResult(model=<Sequential 'net'>, report=<net: normalization layers
    1 -> 0; 1 folded (1 backward, 0 forward), 0 replaced by ScaleShift,
    0 kept>)
    >>> folded, report = result
    >>> folded is result.model, report is result.report
    (True, True)
    """

    def __init__(self, model, report):
        self.model = model
        self.report = report

    def __iter__(self):
        return iter((self.model, self.report))

    def __repr__(self):
        return (
            f"FoldResult(model=<{type(self.model).__name__} "
            f"'{self.model.name}'>, report=<{self.report.headline()}>)"
        )
