"""What `export` returns and raises.

Kept apart from the export pipeline (which imports Keras and TensorFlow) so
that `kerasbn.exporting` and the CLI load without TensorFlow.
"""

import dataclasses
import json
from typing import Optional


class ExportError(RuntimeError):
    """The export could not be done; nothing was written.

    >>> import keras, kerasbn, os, tempfile
    >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)],
    ...                          name="net")
    >>> directory = tempfile.mkdtemp()
    >>> open(os.path.join(directory, "net.keras"), "w").close()
    >>> try:  # doctest: +ELLIPSIS
    ...     kerasbn.export(model, directory, formats=["keras"])
    ... except kerasbn.ExportError as error:
    ...     print(error)
    Refusing to overwrite existing artifact(s) ['.../net.keras']. Pass
    overwrite=True (CLI: --overwrite) or choose another directory.
    """


class VerificationError(ExportError):
    """An artifact's outputs differ from the original model past tolerance.

    Attributes:
        result: The `ExportResult` with every check, for inspection.

    >>> import keras, kerasbn, os, tempfile
    >>> model = keras.Sequential([
    ...     keras.Input((3,)), keras.layers.Dense(2),
    ...     keras.layers.BatchNormalization(),
    ... ])
    >>> _ = model.layers[1].moving_mean.assign([3.0, -1.0])
    >>> directory = tempfile.mkdtemp()
    >>> try:  # a tolerance below float32 rounding: folding cannot meet it
    ...     kerasbn.export(model, directory, formats=["keras"], rtol=1e-12)
    ... except kerasbn.VerificationError as error:
    ...     print(error.result.passed, os.listdir(directory))
    False []
    """

    def __init__(self, message, result):
        super().__init__(message)
        self.result = result


@dataclasses.dataclass(eq=False, repr=False)
class ExportResult:
    """What `export` wrote and how well each artifact matched.

    Attributes:
        directory: The export directory.
        artifacts: `{format: path}` of the artifacts written.
        fold_report: The `kerasbn.fold` report, or None with `fold=False`.
        checks: One dict per (artifact, batch size): `format`, `batch`,
            `max_abs_error`, `rel_error` (max abs error / max |reference|),
            `rtol`, `passed`; for an int8/float16 artifact one dict on the
            validation set (`reduced_checks`). An openvino check adds
            `runtime_precision` (what OpenVINO ran it in, configured by its
            config.json) and `defaults` (`precision`, `max_abs_error`,
            `rel_error`, `within_rtol` at OpenVINO's plain defaults); an
            onnx_int8/onnx_fp16 check, where OpenVINO is installed,
            `openvino` (the same figures in OpenVINO, and against ONNX
            Runtime's outputs).
        onnx_ops: `{op_type: count}` of the ONNX graph, when ONNX was written.
        model: The Keras model that was exported (the folded one with
            `fold=True`), in memory; for `fold_saved_model`, the folded
            graph (`kerasbn.sources.saved_model.FrozenGraph`).
        notes: `{format: [note]}`: what a writer changed to make its
            artifact run right, e.g. a zero pad before a MaxPool guarded
            against ONNX Runtime's pad fusion, or function calls inlined
            (and `"equalize"`: what `equalize=True` did).
        numerics: With an int8 format, the `kerasbn.QuantizationReport`
            of the exported model on (256 of) the validation inputs,
            where each int8 check's `worst_layer` comes from.
        precision: For a model with a mixed-precision policy: `policy`
            (e.g. "mixed_float16"), `deployed` (what the artifacts compute
            in), `reference` ("float32 twin": what they were checked
            against), `mixed_vs_float32` (max |user's model - twin| /
            max |twin| on the verification inputs: what deploying the
            twin changes for the user; inf where the mixed model overflows)
            and, with `precision="policy"`, `rtol` and how it was derived.
            None for a float32 model.
        passed: Whether every check passed (always True for a returned
            result with `verify=True`: failures raise).

    >>> import keras, kerasbn, os, tempfile
    >>> model = keras.Sequential([
    ...     keras.Input((3,)),
    ...     keras.layers.Dense(2, use_bias=False),
    ...     keras.layers.BatchNormalization(),
    ... ], name="net")
    >>> result = kerasbn.export(model, tempfile.mkdtemp(), formats=["keras"])
    >>> os.path.basename(result.artifacts["keras"]), result.fold_report.folded
    ('net.keras', 1)
    >>> [(c["format"], c["batch"], c["passed"]) for c in result.checks]
    [('keras', 1, True), ('keras', 4, True)]
    >>> max_abs_error, rel_error = result.max_errors()["keras"]
    >>> rel_error < 1e-4
    True
    """

    directory: str
    artifacts: dict
    fold_report: Optional[object]
    checks: list
    onnx_ops: Optional[dict]
    model: Optional[object] = None
    notes: dict = dataclasses.field(default_factory=dict)
    numerics: Optional[object] = None
    precision: Optional[dict] = None

    @property
    def passed(self):
        return all(c["passed"] for c in self.checks)

    def max_errors(self):
        """`{format: (max abs error, max rel error)}` over the batch sizes."""
        worst = {}
        for c in self.checks:
            if "max_abs_error" not in c:
                continue  # A reduced-precision check: `reduced_checks`.
            a, r = worst.get(c["format"], (0.0, 0.0))
            worst[c["format"]] = (max(a, c["max_abs_error"]),
                                  max(r, c["rel_error"]))
        return worst

    def reduced_checks(self):
        """`{format: check}` of the int8/float16 artifacts: `agreement`
        (top-1, None if no output is shaped like class scores), `rel_rms`,
        their bounds, `passed`, and `batch` (the samples checked)."""
        return {c["format"]: c for c in self.checks if "rel_rms" in c}

    def to_dict(self):
        return {
            "directory": self.directory,
            "artifacts": dict(self.artifacts),
            "fold": self.fold_report.to_dict() if self.fold_report else None,
            "checks": list(self.checks),
            "onnx_ops": self.onnx_ops,
            "notes": {k: list(v) for k, v in self.notes.items()},
            "numerics": (json.loads(self.numerics.to_json())
                         if self.numerics is not None else None),
            "precision": self.precision,
            "passed": self.passed,
        }

    def to_json(self, **kwargs):
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self):
        reduced = self.reduced_checks()
        lines = (["artifact     batch  max abs error  rel error  status"]
                 if len(self.checks) > len(reduced) else [])
        for c in self.checks:
            if c["format"] in reduced:
                continue
            status = "ok" if c["passed"] else f"FAIL (rtol {c['rtol']:g})"
            lines.append(
                f"{c['format']:<12} {c['batch']:>5}  {c['max_abs_error']:>13.3g}"
                f"  {c['rel_error']:>9.3g}  {status}"
            )
        if reduced:
            lines.append("artifact     samples  top-1 agreement  rel RMS  "
                         "worst layer (SQNR)  status")
        for c in reduced.values():
            share = ("-" if c["agreement"] is None
                     else f"{c['agreement']:.4f}")
            status = ("ok" if c["passed"] else
                      f"FAIL (agreement >= {c['min_agreement']:g}, rel "
                      f"RMS <= {c['max_rel_rms']:g})")
            worst = c.get("worst_layer")
            worst = ("-" if worst is None else
                     f"{worst['layer']} ({worst['sqnr_db']:.0f} dB)")
            lines.append(f"{c['format']:<12} {c['batch']:>7}  {share:>15}"
                         f"  {c['rel_rms']:>7.3g}  {worst:<18}  {status}")
        lines.extend(openvino_lines(self.checks))
        if self.precision:
            lines.append(precision_line(self.precision))
        for fmt, path in self.artifacts.items():
            # A failed check writes nothing: no path is given as if it were.
            lines.append(f"{fmt}: {path}" if self.passed else
                         f"{fmt}: not written (would have been {path})")
        for fmt, said in self.notes.items():
            lines.extend(f"note ({fmt}): {note}" for note in said)
        return "\n".join(lines)


def precision_line(precision):
    """One line on a mixed-precision model's export
    (`ExportResult.precision`)."""
    gap = precision["mixed_vs_float32"]
    line = (f"precision: the model computes in {precision['policy']}; the "
            f"artifacts compute in {precision['deployed']} and were checked "
            f"against its {precision['reference']}")
    if precision.get("rtol_reason"):
        line += f" at rtol {precision['rtol']:.2g} ({precision['rtol_reason']})"
    if gap != gap or gap == float("inf"):  # NaN or inf
        return (line + f"; WARNING: the {precision['policy']} model itself "
                "outputs NaN or inf on the verification inputs (its reduced-"
                "precision activations overflow), which its float32 twin and "
                "the artifacts do not: check the model you trained")
    return (line + f"; the {precision['policy']} model itself differs from "
            f"that twin by {gap:.2g} of output scale")


def openvino_lines(checks):
    """Lines on the OpenVINO runs: the IR at OpenVINO's plain defaults
    (the worst batch), and the int8/float16 ONNX files in OpenVINO."""
    from kerasbn.exporting import _openvino

    lines = [_openvino.check_line(checks)]
    lines.extend(_openvino.reduced_line(c) for c in checks)
    return [line for line in lines if line]
