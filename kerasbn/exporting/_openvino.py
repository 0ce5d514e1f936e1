"""OpenVINO as a verified runtime: its defaults, and the ONNX files in it.

OpenVINO's CPU plugin runs a float32 model in bfloat16 by default where
the CPU has AVX512-BF16 or AMX (`INFERENCE_PRECISION_HINT` reads "bf16"),
and in float16 on its GPU plugin: the same IR serves other numbers
depending on the server's hardware. An IR cannot carry its execution
precision (`rt_info` runtime options are ignored by `compile_model`), so
the `"openvino"` artifact ships a `config.json` whose `plugin_config` pins
it, is verified compiled with that configuration, and is run a second
time at the plain defaults, whose precision and error are reported
(`verify`), with a warning when they change the numbers past the
artifact's bound (`warn_at_defaults`).

The reduced-precision ONNX artifacts (`onnx_int8`, `onnx_fp16`) also run
in OpenVINO when it is installed (it reads QDQ ONNX natively): the same
agreement and relative RMS figures, and how far OpenVINO's answers are
from ONNX Runtime's (`also_in_openvino`). That check reports and warns; it
does not fail the export, whose artifact is verified in ONNX Runtime.
"""

import importlib.util
import warnings

# The error bound of an IR pinned to bfloat16 (`openvino_precision="bf16"`),
# as a fraction of max |output|: bfloat16 keeps 8 significant bits (unit
# roundoff 2**-8 = 3.9e-3), and a deep network's rounding adds up over its
# layers (measured here: 3.4e-3 on MobileNetV2 at 96 px, 3.9e-3 on ResNet50
# at 160 px, random BN statistics; issue 31's own draw of MobileNetV2:
# 5.9e-3). 2**-5 is 8 unit roundoffs, 5x the worst measured; a wrong fold
# is off by O(1).
BF16_RTOL = 2.0**-5
# The plugin configuration that pins float32 (what the openvino artifact's
# config.json holds by default).
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def installed():
    return importlib.util.find_spec("openvino") is not None


def verify(path, signature, arrays, reference, rtol, bound):
    """The IR at `path` (a version directory) compiled with its
    `config.json`, then at the plain defaults, and at f32 when the
    configuration pins another precision.

    Returns `(outputs with the configuration, fields for the check)`:
    `runtime_precision` (what the plugin reports it runs in),
    `defaults` (`precision`, `max_abs_error`, `rel_error`, `within_rtol`:
    against `bound`, the artifact's own), and for a bfloat16
    configuration `f32` (`rel_error`, `passed`: the IR itself at `rtol`,
    so a wrong artifact cannot hide inside the bfloat16 bound).
    """
    from kerasbn.exporting._pipeline import compare
    from kerasbn.exporting.formats import FORMATS

    fmt = FORMATS["openvino"]
    outputs, precision = fmt.run_configured(path, signature, arrays)
    plain, plain_precision = fmt.run_at_defaults(path, signature, arrays)
    max_abs, rel = compare(reference, plain)
    extra = {"runtime_precision": precision, "defaults": {
        "precision": plain_precision, "max_abs_error": max_abs,
        "rel_error": rel, "within_rtol": rel <= bound}}
    if precision != "f32":
        exact, _ = fmt.run_with(path, signature, arrays, F32)
        max_abs, rel = compare(reference, exact)
        extra["f32"] = {"max_abs_error": max_abs, "rel_error": rel,
                        "rtol": rtol, "passed": rel <= rtol}
    return outputs, extra


def worst_at_defaults(checks):
    """The openvino check whose plain-defaults run is furthest off, or
    None without one."""
    runs = [c for c in checks if c.get("defaults")]
    return max(runs, key=lambda c: c["defaults"]["rel_error"], default=None)


def warn_at_defaults(checks):
    """One warning when OpenVINO's plain defaults change the numbers past
    the artifact's bound (what a server without the config.json serves)."""
    worst = worst_at_defaults(checks)
    if worst is None or worst["defaults"]["within_rtol"]:
        return
    defaults = worst["defaults"]
    warnings.warn(
        f"OpenVINO at its plain defaults runs this model in "
        f"{defaults['precision']} on this CPU and differs from it by "
        f"{defaults['rel_error']:.2g} of output scale (bound "
        f"{worst['rtol']:g}); serve the IR with the written config.json "
        "(its plugin_config pins the precision) or compile it with "
        f"that plugin_config ({worst['runtime_precision']} here).",
        stacklevel=5)


def also_in_openvino(fmt, path, signature, reduced, onnxruntime_outputs,
                     check):
    """`{"openvino": figures}` for an int8/float16 ONNX artifact run in
    OpenVINO too (empty for other formats or without OpenVINO), compiled
    pinned to f32 and at the plain defaults: `agreement` and `rel_rms`
    against the float model, the same against ONNX Runtime's outputs,
    `precision`, `passed` (the artifact's own bounds), and `defaults`
    (precision, agreement, rel_rms, passed). Warns when OpenVINO's answers
    are outside the bounds the artifact meets in ONNX Runtime, or when
    OpenVINO is installed but does not import (then nothing is run in
    it)."""
    if fmt not in ("onnx_int8", "onnx_fp16") or not installed():
        return {}
    try:
        import openvino  # noqa: F401 - only whether it imports
    except ImportError as error:
        warnings.warn(
            f"{fmt} was not run in OpenVINO: the openvino package is "
            f"installed but does not import ({error}).", stacklevel=5)
        return {}
    figures = _reduced_figures(path, signature, reduced,
                               onnxruntime_outputs, check, F32)
    figures["defaults"] = _reduced_figures(path, signature, reduced, None,
                                           check, {})
    for config, said in ((figures, "pinned to f32"),
                         (figures["defaults"], "at its plain defaults")):
        if check["passed"] and not config["passed"]:
            warnings.warn(
                f"{fmt} passes in ONNX Runtime but not in OpenVINO "
                f"{said} ({config['precision']}): top-1 agreement "
                f"{_share(config['agreement'])}, relative RMS "
                f"{config['rel_rms']:.3g} (bounds "
                f"{check['min_agreement']:g}, {check['max_rel_rms']:g}).",
                stacklevel=5)
    return {"openvino": figures}


def _reduced_figures(path, signature, reduced, onnxruntime_outputs, check,
                     config):
    """The artifact at `path` run in OpenVINO (compiled once with
    `config`) on the validation inputs, held to `check`'s own bounds by
    `_reduced.check`; with `onnxruntime_outputs`, also compared with
    them."""
    from kerasbn.exporting import _pipeline
    from kerasbn.exporting import _reduced
    from kerasbn.exporting.formats import openvino_compiled

    with openvino_compiled(path, config) as (run, precision):
        outputs = _pipeline.in_chunks(
            lambda flat: run(signature.output_names, signature.feeds(flat)),
            reduced["validation"])
    checked = _reduced.check(check["format"], reduced["references"],
                             outputs, check["min_agreement"],
                             check["max_rel_rms"])
    figures = {"precision": precision, "agreement": checked["agreement"],
               "rel_rms": checked["rel_rms"]}
    if onnxruntime_outputs is not None:
        figures["agreement_with_onnxruntime"] = _reduced.agreement(
            onnxruntime_outputs, outputs)
        figures["rel_rms_vs_onnxruntime"] = _reduced.relative_rms(
            onnxruntime_outputs, outputs)
    figures["passed"] = checked["passed"]
    return figures


def _share(share):
    return "-" if share is None else f"{share:.4f}"


def check_line(checks):
    """One line on the openvino checks: the IR as configured (its worst
    batch), and at the plain defaults (their worst), or None."""
    runs = [c for c in checks if c.get("defaults")]
    if not runs:
        return None
    configured = max(c["rel_error"] for c in runs)
    worst = worst_at_defaults(runs)
    defaults = worst["defaults"]
    verdict = (f"within {worst['rtol']:g}" if defaults["within_rtol"] else
               f"WARNING: past {worst['rtol']:g}; serve it with the "
               "config.json")
    line = (f"openvino with its config.json: {worst['runtime_precision']}, "
            f"rel error {configured:.3g}; at OpenVINO's plain defaults: "
            f"{defaults['precision']}, rel error {defaults['rel_error']:.3g} "
            f"({verdict})")
    exact = [c["f32"]["rel_error"] for c in runs if "f32" in c]
    if exact:
        line += f"; the IR at f32: rel error {max(exact):.3g}"
    return line


def reduced_line(check):
    """One line on an int8/float16 ONNX check's OpenVINO runs, or None."""
    figures = check.get("openvino")
    if not figures:
        return None
    defaults = figures["defaults"]
    warn = ("" if figures["passed"] and defaults["passed"] else
            " (WARNING: outside the artifact's bounds)")
    return (f"{check['format']} in OpenVINO ({figures['precision']}): "
            f"top-1 agreement {_share(figures['agreement'])}, rel RMS "
            f"{figures['rel_rms']:.3g}, vs ONNX Runtime: agreement "
            f"{_share(figures['agreement_with_onnxruntime'])}, rel RMS "
            f"{figures['rel_rms_vs_onnxruntime']:.3g}; at its plain "
            f"defaults ({defaults['precision']}): agreement "
            f"{_share(defaults['agreement'])}, rel RMS "
            f"{defaults['rel_rms']:.3g}{warn}")
