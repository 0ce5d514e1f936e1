"""Fold normalization layers into their neighbours' weights.

`kerasbn.fold(model)` returns a new inference model in which every
BatchNormalization-like layer that the algebra allows has gone into the
kernel and bias of the linear layer before it (backward) or after it
(forward), and the rest are fixed `ScaleShift` layers; the input model is
left untouched. This module is callable: `kerasbn.fold(model)` is
`kerasbn.fold.fold(model)`.

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

Modules: `rules` (the pure float64 kernel/bias rewrites), `registry` (which
normalization kinds and which linear layers fold, and the hooks to add
more), `graph` and `rewrite` (reading a model's graph, planning the folds
and building the new model), `report` (`FoldResult`, `FoldReport`).
"""

import sys
import types

import keras

from kerasbn.fold import graph as _graph
from kerasbn.fold.registry import find_normalization
from kerasbn.fold.registry import find_producer
from kerasbn.fold.registry import register_normalization
from kerasbn.fold.registry import register_producer
from kerasbn.fold.report import FoldEntry
from kerasbn.fold.report import FoldReport
from kerasbn.fold.report import FoldResult
from kerasbn.fold.rewrite import Folder as _Folder
from kerasbn.fold.rewrite import count_normalizations
from kerasbn.fold.rewrite import count_scale_shift
from kerasbn.fold.strip import strip_normalization

__all__ = [
    "fold",
    "FoldEntry",
    "FoldReport",
    "FoldResult",
    "count_normalizations",
    "find_normalization",
    "find_producer",
    "register_normalization",
    "register_producer",
    "strip_normalization",
]


def _check_model(model):
    if not isinstance(model, keras.Model):
        raise TypeError(
            "kerasbn.fold expects a keras.Model (Functional or Sequential). "
            f"Received: model of type {type(model).__name__} "
            f"({str(model)[:80]!r}). Wrap a layer in a model first, e.g. "
            "keras.Sequential([keras.Input(shape), layer])."
        )
    _graph.functional_of(model)  # Raises for subclassed or unbuilt models.


def _check_flag(name, value):
    if not isinstance(value, bool):
        raise TypeError(
            f"Argument `{name}` must be True or False. Received: "
            f"{name}={value!r}."
        )


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
    >>> folded, report = kerasbn.fold.fold(model)
    >>> [type(layer).__name__ for layer in folded.layers], report.folded_forward
    (['Dense'], 1)
    >>> folded, report = kerasbn.fold.fold(model, forward=False)
    >>> [type(layer).__name__ for layer in folded.layers], report.replaced
    (['ScaleShift', 'Dense'], 1)
    >>> kerasbn.fold.fold(model, forward=False, keep_unfolded=True).report.kept
    1
    """
    _check_model(model)
    _check_flag("forward", forward)
    _check_flag("keep_unfolded", keep_unfolded)
    folder = _Folder(forward=forward, keep_unfolded=keep_unfolded)
    new_model = folder.fold_model(model)
    report = FoldReport(
        model=model.name,
        entries=tuple(folder.entries),
        normalizations_before=count_normalizations(model),
        normalizations_after=count_normalizations(new_model),
        scale_shift_layers=count_scale_shift(new_model),
        forward=forward,
    )
    return FoldResult(new_model, report)


class _CallableModule(types.ModuleType):
    """Lets `kerasbn.fold(model)` call `kerasbn.fold.fold(model)`."""

    def __call__(self, model, **options):
        return fold(model, **options)


sys.modules[__name__].__class__ = _CallableModule
