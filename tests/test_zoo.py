"""The sweep: fold and export every model family users actually have.

Every BN-bearing keras.applications family and the keras-hub CNN
backbones (`tests/zoo.py`: their own constructors, small inputs, random BN
statistics). For each:

- the folded model matches the original within 2e-5 of the output scale
  (float64 fold, float32 weights: about 1e-6 is expected; see
  `assert_same_outputs`);
- no BatchNormalization layer is left, and a ScaleShift only where no
  exact algebra exists (its BN sits between nonlinear layers: after an
  Add/Concatenate/ReLU, before a ReLU), as its report entry says;
- the ONNX export passes verification, which runs it in ONNX Runtime at
  the default optimization level (what users deploy) against Keras'
  output, and holds no BatchNormalization node and no Mul/Add by a constant
  straight after a Conv/ConvTranspose/Gemm/MatMul.
"""

import onnx
import pytest

import kerasbn
from kerasbn.exporting import _onnx_graph
from tests import zoo
from tests.helpers import assert_same_outputs
from tests.helpers import count_batch_norms
from tests.helpers import count_scale_shift
from tests.helpers import inputs_for
from tests.helpers import randomize_normalizations

# Why a normalization may stay as a ScaleShift: nothing linear on either
# side (backward code, forward code).
NO_EXACT_ALGEBRA = {
    ("after_nonlinear_layer", "before_nonlinear_layer"),
    ("after_nonlinear_layer", "model_output"),
    ("producer_activation", "before_nonlinear_layer"),
}


# Folded and checked in Keras, not exported: tf2onnx alone took 65 s on
# its graph (54M weights), over a twentieth of the suite's budget. Its
# building blocks (InceptionV3's branches, residual adds) export in the
# other entries.
FOLD_ONLY = {"InceptionResNetV2"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_fold_and_export(name, tmp_path):
    build, _ = zoo.ZOO[name]
    model = randomize_normalizations(build(), seed=3)
    before = count_batch_norms(model)
    if name in FOLD_ONLY:
        result = kerasbn.fold(model)
    else:
        result = kerasbn.export(model, tmp_path, formats=["onnx"])
    folded = result.model
    report = result.report if name in FOLD_ONLY else result.fold_report
    assert_same_outputs(model, folded, inputs_for(model, batch=2), rtol=2e-5)
    assert report.normalizations_before == before
    assert count_batch_norms(folded) == 0
    replaced = [e for e in report.entries if e.action != "folded"]
    assert {e.action for e in replaced} <= {"replaced"}
    assert {e.codes for e in replaced} <= NO_EXACT_ALGEBRA, replaced
    assert count_scale_shift(folded) == len(replaced)
    if name in FOLD_ONLY:
        return
    census = _onnx_graph.normalization_census(
        onnx.load(result.artifacts["onnx"]))
    assert census == {"BatchNormalization": 0, "affine_after_linear": 0}
