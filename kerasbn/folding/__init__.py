"""Fold normalization layers into their neighbours' weights.

`kerasbn.fold(model)` returns a new inference model in which every
BatchNormalization-like layer that the algebra allows has gone into the
kernel and bias of the linear layer before it (backward) or after it
(forward), and the rest are fixed `ScaleShift` layers; the input model is
left untouched. `kerasbn.fold` is `kerasbn.folding.fold`.

>>> import keras, kerasbn
>>> model = keras.Sequential([
...     keras.Input((4,)),
...     keras.layers.Dense(3, use_bias=False),
...     keras.layers.BatchNormalization(),
... ])
>>> folded, report = kerasbn.fold(model)
>>> [type(layer).__name__ for layer in folded.layers]
['Dense']
>>> report.folded_backward, report.normalizations_after
(1, 0)

Modules: `graph` (a model's graph as a list of calls), `plan` (what
happens to each normalization call), `rebuild` (writing the new model),
`report` (`FoldResult`, `FoldReport`, the reason `CODES`), `strip` (the
benchmark's BN-free limit). The algebra is `kerasbn.rules`; which layers
are normalizations or linear layers is `kerasbn.registry`.
"""

from kerasbn import _checks
from kerasbn import _models
from kerasbn.folding import graph as _graph
from kerasbn.folding.rebuild import Folder as _Folder
from kerasbn.folding.rebuild import count_normalizations
from kerasbn.folding.rebuild import count_scale_shift
from kerasbn.folding.report import CODES
from kerasbn.folding.report import FoldEntry
from kerasbn.folding.report import FoldReport
from kerasbn.folding.report import FoldResult
from kerasbn.folding.strip import strip_normalization

__all__ = [
    "CODES",
    "FoldEntry",
    "FoldReport",
    "FoldResult",
    "count_normalizations",
    "fold",
    "strip_normalization",
]

_WHERE = "kerasbn.fold"


def fold(model, *, forward=True, keep_unfolded=False):
    """Fold every foldable normalization of `model` into its neighbours.

    Backward folds (a normalization right after a Conv*, DepthwiseConv*,
    SeparableConv*, Conv*Transpose or Dense layer with a linear activation,
    whose output feeds only that normalization) are always exact and tried
    first. Forward folds (a normalization whose output feeds only such
    layers) are done where exact: 'valid' padding, 1x1 kernels, Dense, or a
    zero shift. Nested Functional/Sequential models are folded inside;
    normalizations are not folded across a nested model's boundary.

    The new model is built from the layers' configs (same names, same dtype
    policies) with weights computed in float64 and cast to each variable's
    dtype. It is not compiled.

    Args:
        model: A built Functional or Sequential `keras.Model`, possibly
            containing nested models. Never modified.
        forward: Also fold into the layers after a normalization.
        keep_unfolded: Keep normalizations that cannot be folded as they
            are, instead of replacing each by a `kerasbn.layers.ScaleShift`
            with its inference scale and shift.

    Returns:
        `FoldResult` with `.model` (the new model) and `.report` (a
        `FoldReport`: one entry per normalization call, why it was or was not
        folded, and summary counts); it unpacks as `(model, report)`.

    Raises:
        TypeError: `model` is not a keras.Model, or is a subclassed model
            whose graph cannot be read, or a layer cannot be recreated from
            its config.
        ValueError: `model` is an unbuilt Sequential model.

    A normalization before a Dense layer folds forward into it; without
    forward folds it becomes a `ScaleShift` (or stays, with
    `keep_unfolded=True`):

    >>> import keras, kerasbn
    >>> model = keras.Sequential([
    ...     keras.Input((4,)),
    ...     keras.layers.BatchNormalization(),
    ...     keras.layers.Dense(2),
    ... ])
    >>> folded, report = kerasbn.fold(model)
    >>> [type(layer).__name__ for layer in folded.layers], report.folded_forward
    (['Dense'], 1)
    >>> folded, report = kerasbn.fold(model, forward=False)
    >>> [type(layer).__name__ for layer in folded.layers], report.replaced
    (['ScaleShift', 'Dense'], 1)
    >>> kerasbn.fold(model, forward=False, keep_unfolded=True).report.kept
    1
    """
    _graph.check_foldable(model, _WHERE)
    _checks.check_bool("forward", forward, _WHERE)
    _checks.check_bool("keep_unfolded", keep_unfolded, _WHERE)
    folder = _Folder(forward=forward, keep_unfolded=keep_unfolded)
    new_model = folder.fold_model(model)
    report = FoldReport(
        model=model.name,
        entries=tuple(folder.entries),
        normalizations_before=count_normalizations(model),
        normalizations_after=count_normalizations(new_model),
        scale_shift_layers=count_scale_shift(new_model),
        forward=forward,
        dtype_policy=_models.mixed_policy(model),
    )
    return FoldResult(new_model, report)
