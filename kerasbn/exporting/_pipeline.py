"""The steps of `export`: check, fold, write, verify.

`kerasbn.exporting.export` runs them in order; this module imports Keras
and TensorFlow, so it is imported on the first export only.
"""

import os
import re

import keras
import numpy as np

from kerasbn import _batches
from kerasbn import _checks
from kerasbn import registry
from kerasbn.exporting import _openvino
from kerasbn.exporting import _options
from kerasbn.exporting._result import ExportError
from kerasbn.exporting.formats import FORMATS
from kerasbn.exporting.formats import newest_onnx_opset
from kerasbn.exporting.formats import onnx_op_census
from kerasbn.folding.plan import inference_affine

WHERE = "kerasbn.export"


def check_arguments(model, directory, formats, name, version, opset, rtol,
                    batch_sizes):
    """Check `export`'s arguments; returns `(formats, name)`, resolved."""
    _checks.check_model(model, WHERE)
    return check_options(directory, formats, model.name if name is None
                         else name, version, opset, rtol, batch_sizes)


def check_options(directory, formats, name, version, opset, rtol,
                  batch_sizes, where=WHERE):
    """Check the options every export takes; returns `(formats, name)`."""
    if not isinstance(directory, (str, os.PathLike)):
        raise _checks.argument_error(
            "directory", "a path (str or os.PathLike)", directory, where,
            error=TypeError)
    try:
        formats = _options.parse_formats(formats)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    name = str(name)
    if not _options.is_safe_name(name):
        raise ValueError(
            f"{where}: Artifact name {name!r} is not a safe file name: use "
            "letters, digits, '_', '.', '-' (pass `name=`)."
        )
    _checks.check_int("version", version, 1, where,
                      hint="It names the version directory of the "
                      "SavedModel (TF Serving) and OpenVINO layouts.")
    _checks.check_number("rtol", rtol, 0.0, where=where, low_open=True,
                         hint="It bounds max abs error / max |output|; "
                         f"the default is {_options.DEFAULT_RTOL:g}.")
    for size in batch_sizes:
        _checks.check_int("batch_sizes", size, 1, where)
    if "onnx" in formats:
        check_opset(opset, where)
    return formats, name


def check_opset(opset, where=WHERE):
    """`opset` must be None (tf2onnx's default) or one tf2onnx can write."""
    if opset is None:
        return
    if not _checks.is_integer(opset):
        raise _checks.argument_error("opset", "an integer", opset, where,
                                     error=TypeError)
    lowest, highest = _options.MIN_OPSET, newest_onnx_opset()
    if not lowest <= opset <= highest:
        raise _checks.argument_error(
            "opset", f"an ONNX opset from {lowest} to {highest}", opset,
            where, hint=f"The default is {_options.DEFAULT_OPSET}; "
            f"{highest} is the newest the installed tf2onnx and onnx write.")


def verification_inputs(signature, sample, batch_sizes, verify):
    """The flat inputs of each verification batch (none if not `verify`).

    A given `sample` is checked even without `verify`: it must fit the
    model's inputs and hold only finite values.
    """
    if sample is None:
        return ([signature.generate_inputs(b, seed=b) for b in batch_sizes]
                if verify else [])
    flat = signature.flatten_sample(sample)
    _check_finite(signature, flat)
    n = flat[0].shape[0]
    if n < 1:
        raise ValueError(f"{WHERE}: `sample` has an empty batch dimension.")
    if not verify:
        return []
    small = [a[:1] for a in flat]
    if n == 1:
        return [small, [np.concatenate([a] * 3, axis=0) for a in flat]]
    return [small, flat]


def _check_finite(signature, flat):
    for name, array in zip(signature.input_names, flat):
        if not np.issubdtype(array.dtype, np.inexact):
            continue
        bad = _batches.nonfinite_count([array])
        if bad:
            raise ValueError(
                f"{WHERE}: Argument `sample` must hold finite values. Input "
                f"{name!r} has {bad} non-finite value(s) (NaN or +-inf, "
                f"after casting to {array.dtype}) out of {array.size}. "
                "Outputs on them cannot be compared: replace them (e.g. "
                "np.nan_to_num) or leave `sample` out to verify on random "
                "inputs."
            )


def reference_outputs(model, signature, arrays):
    """The original model's flat outputs in inference mode, all finite.

    A model that itself outputs NaN or inf on finite inputs (NaN weights,
    corrupt statistics, an overflow) has nothing an artifact could be
    verified against: that is refused here as bad input, naming the
    weights that are not finite, rather than reported later as an artifact
    that "does not reproduce the model".
    """
    outputs = model(signature.pack([keras.ops.convert_to_tensor(a)
                                    for a in arrays]), training=False)
    flat = [np.asarray(keras.ops.convert_to_numpy(t))
            for t in keras.tree.flatten(outputs)]
    bad = _batches.nonfinite_count(flat)
    if bad:
        _check_normalizations(model)  # Names corrupt statistics, if any.
        weights = [w.path for w in model.weights
                   if np.issubdtype(np.dtype(w.dtype), np.inexact)
                   and not np.isfinite(keras.ops.convert_to_numpy(w)).all()]
        cause = (f"these weights hold NaN or inf: {weights[:5]}"
                 + (" ..." if len(weights) > 5 else "") if weights else
                 "every weight is finite, so a layer overflows; check the "
                 "model on real data")
        raise ValueError(
            f"{WHERE}: model '{model.name}' itself outputs {bad} NaN or "
            f"infinite value(s) on finite inputs, so no artifact can be "
            f"verified against it; {cause}. Fix the model (for corrupt "
            "normalization statistics: kerasbn.recalibrate) and export "
            "again."
        )
    return flat


def _check_normalizations(model):
    for layer in registry.normalization_layers(model, statistics=False):
        inference_affine(layer)  # Raises naming corrupt statistics.


def fold_for_export(model, fold, keep_bn, progress, qat=False):
    """`(deployable model, fold report or None)`; a QAT model's is its
    deployment model (`kerasbn.quantization.qat.deployment_model`)."""
    if qat:
        from kerasbn.quantization import qat as qat_lib

        progress("freezing the QAT model's fold and ranges")
        return qat_lib.deployment_model(model), None
    if not fold:
        return model, None
    from kerasbn.folding import fold as fold_model

    progress("folding batch normalization")
    return fold_model(model, keep_unfolded=keep_bn)


QAT_FORMATS = ("onnx_int8", "tflite_int8")
QAT_MAX_REL_RMS = 0.02


def check_qat(model, formats, calibration, fold, equalize, int8_io,
              opset=None, per_channel=True):
    """The weight bit width of a model made by `prepare_qat` (0 for any
    other model), whose options are checked: its int8 artifacts use the
    ranges it learned, so it takes no calibration, fold or equalization
    (its layers hold the fold)."""
    from kerasbn.quantization import qat

    if not qat.is_qat_model(model):
        return 0
    widths = qat.weight_bits(model)
    if len(widths) != 1:
        raise ValueError(
            f"{WHERE}: '{model.name}' mixes weight bit widths {widths}; the "
            "export writes one integer kernel type. Prepare it with one "
            "weight_bits.")
    others = [f for f in formats if f not in QAT_FORMATS]
    if others:
        raise ValueError(
            f"{WHERE}: '{model.name}' is a quantization-aware training model "
            f"(prepare_qat); it exports as the integer model it trained for, "
            f"formats {list(QAT_FORMATS)}, not {others}. Export the float "
            "model you prepared it from for float artifacts.")
    for name, wrong in (("calibration", calibration is not None),
                        ("equalize", equalize is True),
                        ("int8_io", int8_io is True),
                        ("per_channel", per_channel is not True)):
        if wrong:
            raise ValueError(
                f"{WHERE}: {name}= does not apply to a quantization-aware "
                "training model: its int8 artifacts use the weights, weight "
                "scales (prepare_qat's per_channel) and activation ranges it "
                "learned, with float inputs and outputs. Leave it out.")
    if not fold:
        raise ValueError(f"{WHERE}: fold=False does not apply to a QAT "
                         "model: its layers already hold the fold.")
    left = qat.float_weight_layers(model)
    if left:
        raise ValueError(
            f"{WHERE}: '{model.name}' holds {len(left)} layer(s) with "
            f"kernels that prepare_qat left float ({left}; its summary_qat "
            "says why). Between quantized tensors, the TFLite converter and "
            "ONNX Runtime/OpenVINO quantize such kernels on their own, so "
            "the int8 artifacts would not compute the QAT model. Make them "
            "quantizable before prepare_qat (layers in the outer graph, "
            "channels_last, one call each).")
    if widths[0] <= 4 and "onnx_int8" in formats and (opset or 0) < 21:
        raise ValueError(
            f"{WHERE}: '{model.name}' has {widths[0]}-bit weights, which ONNX "
            f"stores as INT4 from opset 21; got opset={opset}. Pass "
            "opset=21 (ONNX Runtime 1.20+ runs it).")
    if widths[0] <= 4 and "tflite_int8" in formats:
        raise ValueError(
            f"{WHERE}: '{model.name}' has {widths[0]}-bit weights; TFLite's "
            "integer kernels take 8-bit weights. Export onnx_int8 "
            "(opset=21) for 4-bit weights.")
    return widths[0]


def reduced_options(model, signature, formats, calibration, validation,
                    inputs, verify, min_agreement, max_rel_rms, per_channel,
                    int8_io, equalize=False, qat=False):
    """The reduced-precision formats' options, checked before any work:
    `{"calibration": [batches], "validation": flat inputs, ...}` (empty
    when no such format is asked for). `qat`: the model is a QAT model
    (`check_qat`), whose int8 formats need no calibration."""
    from kerasbn.exporting import _reduced

    _checks.check_bool("equalize", equalize, WHERE)
    wanted = [f for f in formats if f in _reduced.REDUCED_FORMATS]
    if qat:
        options = {"qat": int(qat)}
        if not wanted:
            return options
        _reduced.check_thresholds(min_agreement, max_rel_rms, WHERE)
        options.update(min_agreement=min_agreement,
                       max_rel_rms=(QAT_MAX_REL_RMS if max_rel_rms is None
                                    else max_rel_rms),
                       per_channel=True, int8_io=False)
        if verify:
            batches = (_reduced.read_batches(signature, validation,
                                             "validation", WHERE)
                       if validation is not None else inputs[-1:])
            options["validation"] = _reduced.joined(batches, limit=2048)
        return options
    if not wanted:
        return {}
    _reduced.check_thresholds(min_agreement, max_rel_rms, WHERE)
    _checks.check_bool("per_channel", per_channel, WHERE)
    _checks.check_bool("int8_io", int8_io, WHERE)
    int8 = [f for f in wanted if f in _reduced.INT8_FORMATS]
    if int8 and calibration is None:
        raise ValueError(
            f"{WHERE}: formats {int8} need calibration data for their "
            "activation ranges: pass `calibration=` (CLI: --calibration "
            "data.npz), a few hundred representative inputs.")
    options = {"min_agreement": min_agreement, "max_rel_rms": max_rel_rms,
               "per_channel": per_channel, "int8_io": int8_io}
    if calibration is not None:
        options["calibration"] = _reduced.read_batches(
            signature, calibration, "calibration", WHERE)
    if not verify:
        return options
    if validation is not None:
        batches = _reduced.read_batches(signature, validation,
                                        "validation", WHERE)
    else:
        batches = options.get("calibration") or inputs[-1:]
    options["validation"] = _reduced.joined(batches, limit=2048)
    return options


def openvino_options(formats, openvino_precision):
    """`{"openvino_precision": ...}` when the openvino format is asked for
    (OpenVINO imported first, so a missing install is said before any
    work); the value is checked either way."""
    from kerasbn.exporting.formats import OpenVinoFormat
    from kerasbn.exporting.formats import _require

    choices = sorted(OpenVinoFormat.PRECISIONS)
    if openvino_precision not in choices:
        raise _checks.argument_error(
            "openvino_precision", f"one of {choices}", openvino_precision,
            WHERE, hint="It is the precision the OpenVINO artifact's "
            "config.json pins the CPU plugin to.")
    if "openvino" not in formats:
        if openvino_precision != "f32":
            raise ValueError(
                f"{WHERE}: openvino_precision={openvino_precision!r} "
                "(CLI --openvino-precision) applies to the openvino "
                f"format, which is not among formats {list(formats)}: add "
                "'openvino' or leave the option out.")
        return {}
    _require("openvino", "openvino")
    return {"openvino_precision": openvino_precision}


def equalize_for_export(model, progress):
    """`(equalized model, [note])` (`kerasbn.equalize`)."""
    from kerasbn.quantization import equalize

    progress("equalizing channel ranges across consecutive layers")
    result = equalize(model)
    if not result.pairs:
        return model, ["no pair of consecutive linear layers "
                       "joined by ReLU/linear steps; nothing changed"]
    before = max(result.spread_before.values())
    after = max(result.spread_after.values())
    return result.model, [
        f"{len(result.pairs)} layer pair(s) rescaled in "
        f"{result.sweeps} sweep(s); largest output channel range spread "
        f"{before:.3g}x -> {after:.3g}x"]


def numerics_for_export(model, staged, reduced, progress):
    """`kerasbn.quantization_report` of the deployable model on (at most
    256 of) the validation inputs, when an int8 artifact is checked."""
    from kerasbn.exporting import _reduced
    from kerasbn.quantization import quantization_report

    if reduced.get("qat") or not reduced.get("validation") or not any(
            f in _reduced.INT8_FORMATS for f in staged):
        return None
    progress("measuring int8 numerics per layer")
    return quantization_report(model, reduced["validation"], fold=False,
                               per_channel=reduced["per_channel"],
                               max_samples=256)


def numerics_notes(numerics, staged, reduced):
    """A note on per-tensor ONNX int8 where a kernel's channels are far
    apart (the case cross-layer equalization is for)."""
    from kerasbn.quantization.report import SQNR_GAP_DB

    if numerics is None or "onnx_int8" not in staged or reduced.get(
            "per_channel", True):
        return {}
    worst = min(numerics.entries, default=None, key=lambda e: (
        e.sqnr_per_tensor - e.sqnr_per_channel))
    if worst is None or (worst.sqnr_per_channel - worst.sqnr_per_tensor
                         < SQNR_GAP_DB):
        return {}
    return {"onnx_int8": [
        f"per-tensor weights: '{worst.layer}' loses "
        f"{worst.sqnr_per_channel - worst.sqnr_per_tensor:.0f} dB against "
        f"per-channel (channel range spread {worst.weight_spread:.3g}x); "
        "equalize=True (exact) or per_channel=True narrow it"]}


def in_chunks(run, flat, size=128):
    """`run(flat inputs) -> flat outputs` over chunks of `size` samples,
    outputs joined (bounded memory for the validation set)."""
    parts = [run([a[i:i + size] for a in flat])
             for i in range(0, int(flat[0].shape[0]), size)]
    return [np.concatenate(outputs, axis=0) for outputs in zip(*parts)]


def write_artifacts(staging, targets, model, signature, opset, progress,
                    reduced=None):
    """Write each format into `staging`.

    Returns `({format: staged path}, {format: [notes]})`; a note says what
    a writer changed in the artifact to make it run right (e.g. a runtime
    hazard it guarded against).
    """
    from kerasbn.exporting import _tf_process

    staged, notes = {}, {}
    elsewhere = _tf_process.needed(model, targets)
    if elsewhere:
        staged = {f: staging.new(targets[f]) for f in elsewhere}
        try:
            notes = _tf_process.write(staging, staged, model, signature,
                                      opset, progress, reduced)
        except RuntimeError as error:
            raise ExportError(
                f"Writing the {', '.join(elsewhere)} artifact(s) failed: "
                f"{error}") from error
    for fmt, relpath in targets.items():
        if fmt in staged:
            continue
        path = staging.new(relpath)
        progress(f"writing {fmt}")
        try:
            said = FORMATS[fmt].write(path, model, signature,
                                      {"opset": opset, **(reduced or {})})
        except ImportError:
            raise
        except Exception as error:
            # The hint goes on the first line (the CLI prints that one).
            first, _, rest = str(error).partition("\n")
            raise ExportError(
                f"Writing the {fmt} artifact failed: "
                f"{type(error).__name__}: {first}"
                f"{opset_hint(fmt, str(error), opset)}"
                + (f"\n{rest}" if rest else "")
            ) from error
        staged[fmt] = path
        if said:
            notes[fmt] = list(said)
    return {f: staged[f] for f in targets}, notes


_NO_OP = re.compile(r"No Op registered for (\w+) with domain_version of "
                    r"(\d+)")
_NODE = re.compile(r"node name: ([^\s)]+)")


def opset_hint(fmt, message, opset):
    """What to do when an ONNX artifact fails at a non-default opset: the
    ONNX op the opset lacks, the layer (where the message names its node)
    and the first opset that has the op; "" for other formats."""
    if (not fmt.startswith("onnx") or opset is None
            or opset >= _options.DEFAULT_OPSET):
        return ""
    hint = ""
    missing = _NO_OP.search(message)
    if missing:
        since = _first_opset(missing.group(1))
        hint = (f" ONNX opset {opset} has no {missing.group(1)}"
                + (f"; it exists from opset {since}" if since else ""))
    node = _NODE.search(message)
    if node:
        parts = node.group(1).split("/")
        hint += f" (layer {parts[1] if len(parts) > 2 else parts[0]!r})"
    return (hint + f". Tried at opset {opset} (nothing written): the "
            f"default opset {_options.DEFAULT_OPSET} converts every "
            "keras.activations function and the deployment layers (README: "
            "op coverage); pass a higher opset if the runtime takes it.")


def _first_opset(op):
    """The first ONNX opset that defines `op` (default domain), or None."""
    try:
        import onnx

        versions = [schema.since_version for schema in
                    onnx.defs.get_all_schemas_with_history()
                    if schema.name == op and schema.domain == ""]
    except Exception:  # noqa: BLE001 - only a hint.
        return None
    return min(versions) if versions else None


def verify_artifacts(staged, signature, inputs, references, rtol, progress,
                     reduced=None, numerics=None):
    """Run each staged artifact on each input batch; returns the checks.

    Float artifacts are held to `rtol`; reduced-precision ones to the
    agreement and relative RMS bounds in `reduced`, on its validation
    inputs (`_reduced.check`); int8 ones name their worst layer from
    `numerics` (a `QuantizationReport`).
    """
    from kerasbn.exporting import _reduced

    reduced = reduced or {}
    exact = {f: p for f, p in staged.items() if not _reduced.precision(f)}
    if inputs and exact:
        progress("verifying " + ", ".join(exact) + " at batch sizes "
                 + ", ".join(str(int(a[0].shape[0])) for a in inputs))
    checks = []
    if inputs:
        for fmt, path in staged.items():
            if fmt in exact:
                continue
            progress(f"checking {fmt} on "
                     f"{len(reduced['validation'][0])} samples")
            outputs = in_chunks(
                lambda flat, f=fmt, p=path: _run(f, p, signature, flat),
                reduced["validation"])
            check = _reduced.check(
                fmt, reduced["references"], outputs,
                reduced["min_agreement"], reduced["max_rel_rms"],
                _reduced.worst_layer(fmt, numerics, reduced))
            check.update(_openvino.also_in_openvino(
                fmt, path, signature, reduced, outputs, check))
            checks.append(check)
    for arrays, reference in zip(inputs, references):
        batch = int(arrays[0].shape[0]) if arrays else 0
        for fmt, path in exact.items():
            bound = _bound(fmt, rtol, reduced)
            if fmt == "openvino":  # Twice: as configured, at defaults.
                outputs, extra = _run(fmt, path, signature, arrays, lambda: (
                    _openvino.verify(path, signature, arrays, reference,
                                     rtol, bound)))
            else:
                outputs, extra = _run(fmt, path, signature, arrays), {}
            max_abs, rel = compare(reference, outputs)
            passed = rel <= bound and extra.get("f32", {}).get("passed",
                                                              True)
            checks.append({
                "format": fmt, "batch": batch, "max_abs_error": max_abs,
                "rel_error": rel, "rtol": bound, "passed": passed, **extra})
    _openvino.warn_at_defaults(checks)
    return checks


def _bound(fmt, rtol, reduced):
    """The error bound of a float artifact: `rtol`, or for an OpenVINO IR
    pinned to bfloat16 the stated bfloat16 bound."""
    if fmt == "openvino" and reduced.get("openvino_precision") == "bf16":
        return max(rtol, _openvino.BF16_RTOL)
    return rtol


def _run(fmt, path, signature, arrays, run=None):
    """`FORMATS[fmt].run` (or `run()`), its errors said as the artifact's."""
    try:
        if run is not None:
            return run()
        return FORMATS[fmt].run(path, signature, arrays)
    except ImportError:
        raise
    except Exception as error:
        hint = {"keras": " A subclassed model inside must be registered "
                "with @keras.saving.register_keras_serializable to load.",
                "openvino": " (compiled with the plugin_config of its "
                "config.json)"}.get(fmt, "")
        # OpenVINO's first line is where in its sources it threw; the
        # reason is its last line.
        said = ([line for line in str(error).splitlines() if line.strip()]
                or [""])[-1] if fmt == "openvino" else _checks.first_line(
                    error)
        raise ExportError(
            f"Running the written {fmt} artifact failed: "
            f"{type(error).__name__}: {said}{hint}"
        ) from error


def onnx_ops(staged):
    """`{op_type: count}` of the staged ONNX graph, or None without one."""
    return onnx_op_census(staged["onnx"]) if "onnx" in staged else None


def compare(reference, outputs):
    """Max abs error and max abs error / max |reference| over all outputs.

    A shape mismatch, or a NaN/inf where the reference is finite, is an
    infinite error (NumPy's max would silently skip NaNs in a comparison).
    """
    max_abs, scale = 0.0, 0.0
    if len(reference) != len(outputs):
        return float("inf"), float("inf")
    for ref, out in zip(reference, outputs):
        ref = np.asarray(ref, np.float64)
        out = np.asarray(out, np.float64)
        if ref.shape != out.shape:
            return float("inf"), float("inf")
        if not ref.size:
            continue
        diff = np.abs(out - ref)
        if not np.isfinite(diff).all():
            return float("inf"), float("inf")
        max_abs = max(max_abs, float(diff.max()))
        scale = max(scale, float(np.abs(ref).max()))
    rel = max_abs / scale if scale > 0 else max_abs
    return max_abs, rel
