"""Cross-layer equalization (Nagel et al. 2019, "Data-Free Quantization").

Two linear layers joined only by positively homogeneous steps (ReLU,
LeakyReLU, a linear activation, max/average pooling, zero padding,
dropout) compute the same function when output channel `i` of the first
is divided by `s_i > 0` and input channel `i` of the second multiplied
by it, since `f(x / s) = f(x) / s` for each of those steps. Choosing
`s_i = sqrt(r1_i / r2_i)`, with `r1_i` the largest |weight| of the first
layer's channel and `r2_i` that of the second's, gives both the range
`sqrt(r1_i * r2_i)`: the channel ranges inside each kernel move towards
each other, which is what per-tensor int8 needs (one scale for the whole
kernel). In float the model is unchanged up to rounding.

The scales go through the same `registry.LinearRule` rewrites as a fold
(a backward fold of `1 / s` with no shift, a forward fold of `s`), so
every linear layer kind fold knows is covered.
"""

import dataclasses
from typing import Tuple

import keras
import numpy as np

from kerasbn import _checks
from kerasbn import _models
from kerasbn import registry
from kerasbn.folding import graph as graph_lib
from kerasbn.folding.plan import activation_name
from kerasbn.quantization import _arrays

WHERE = "kerasbn.equalize"
_HOMOGENEOUS = frozenset({None, "linear", "relu", "leaky_relu"})
_PASS_THROUGH = (
    keras.layers.Dropout, keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D, keras.layers.SpatialDropout3D,
    keras.layers.GaussianDropout, keras.layers.AlphaDropout,
    keras.layers.ZeroPadding1D, keras.layers.ZeroPadding2D,
    keras.layers.ZeroPadding3D, keras.layers.Identity,
    keras.layers.MaxPooling1D, keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D, keras.layers.AveragePooling1D,
    keras.layers.AveragePooling2D, keras.layers.AveragePooling3D,
    keras.layers.GlobalMaxPooling1D, keras.layers.GlobalMaxPooling2D,
    keras.layers.GlobalMaxPooling3D, keras.layers.GlobalAveragePooling1D,
    keras.layers.GlobalAveragePooling2D, keras.layers.GlobalAveragePooling3D,
)
# Stop when no scale moves a channel by more than this factor.
_CONVERGED = 1e-6


@dataclasses.dataclass(frozen=True)
class EqualizationResult:
    """The equalized copy and what was done; unpacks as `(model, pairs)`.

    Attributes:
        model: A new model computing the same function.
        pairs: `(first layer, second layer)` names of each equalized pair.
        sweeps: Passes over the pairs until the scales settled.
        spread_before, spread_after: `{layer: largest / smallest output
            channel range}` of each equalized layer's kernel.
    """

    model: object
    pairs: Tuple[Tuple[str, str], ...]
    sweeps: int
    spread_before: dict
    spread_after: dict

    def __iter__(self):
        return iter((self.model, self.pairs))


def equalize(model, *, max_sweeps=20):
    """Cross-layer equalization of `model`'s linear layers, exact in float.

    Meant for a folded model (`kerasbn.fold` first: a normalization
    between two layers stops a pair) that is going to per-tensor int8
    weights; per-channel int8 gains little from it. Pairs are found in
    the model's own graph (not inside nested models or custom layers);
    a layer that is shared, feeds more than one layer, applies an
    activation other than ReLU/LeakyReLU/linear, uses grouped or
    channels-first convolutions, or transforms its stored kernel
    (weight-centred layers) is left as it is.

    Args:
        model: A Functional or Sequential `keras.Model`; never modified.
        max_sweeps: Passes over all pairs (a layer in two pairs moves
            again when its neighbour does); stops earlier once no scale
            changes by more than 1e-6.

    Returns:
        `EqualizationResult` (`model, pairs = kerasbn.equalize(m)`).

    >>> import keras, numpy as np, kerasbn
    >>> model = keras.Sequential([keras.Input((4,)),
    ...     keras.layers.Dense(3, activation="relu", name="a"),
    ...     keras.layers.Dense(2, name="b")])
    >>> kernel = np.diag([1.0, 10.0, 100.0])[[0, 1, 2, 0]]
    >>> _ = model.layers[0].kernel.assign(kernel)  # ranges 1, 10, 100
    >>> _ = model.layers[1].kernel.assign(np.ones((3, 2)))  # ranges 1
    >>> result = kerasbn.equalize(model)
    >>> result.pairs, round(result.spread_before["a"])
    ((('a', 'b'),), 100)
    >>> round(result.spread_after["a"], 6)  # sqrt(100 * 1) / sqrt(1 * 1)
    10.0
    >>> x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    >>> bool(np.allclose(result.model(x), model(x), rtol=1e-5, atol=1e-5))
    True
    """
    graph_lib.check_foldable(model, WHERE)
    _checks.check_int("max_sweeps", max_sweeps, 1, where=WHERE)
    copy = _models.clone_with_weights(model, WHERE)
    pairs = find_pairs(graph_lib.read_graph(copy, trace=False))
    weights = {}
    for first, second in pairs:
        for layer in (first, second):
            weights.setdefault(id(layer), registry.find_linear(layer)
                               .read(layer))
    before = {first.name: _spread(first, weights) for first, _ in pairs}
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        moved = max((_equalize_pair(first, second, weights)
                     for first, second in pairs), default=0.0)
        if moved <= _CONVERGED:
            break
    for layer in {id(l): l for pair in pairs for l in pair}.values():
        _write(layer, weights[id(layer)])
    return EqualizationResult(
        model=copy, pairs=tuple((a.name, b.name) for a, b in pairs),
        sweeps=sweeps, spread_before=before,
        spread_after={first.name: _spread(first, weights)
                      for first, _ in pairs})


def _spread(layer, weights):
    rule = registry.find_linear(layer)
    return _arrays.spread(_arrays.output_ranges(rule.layout,
                                                weights[id(layer)]))


def _equalize_pair(first, second, weights):
    """Rescale one pair in `weights`; returns the largest |log s|."""
    rule1, rule2 = registry.find_linear(first), registry.find_linear(second)
    w1, w2 = weights[id(first)], weights[id(second)]
    r1 = _arrays.output_ranges(rule1.layout, w1)
    r2 = _arrays.input_ranges(rule2.layout, w2)
    live = (r1 > 0) & (r2 > 0)
    scale = np.ones_like(r1)
    scale[live] = np.sqrt(r1[live] / r2[live])
    zero = np.zeros_like(r1)
    weights[id(first)] = rule1.backward(w1, first, 1.0 / scale, zero)
    weights[id(second)] = rule2.forward(w2, second, scale, zero)
    return float(np.max(np.abs(np.log(scale)))) if scale.size else 0.0


def _write(layer, weights):
    variables = {v.name: v for v in layer.weights}
    for name, value in weights.items():
        if value is not None and name in variables:
            registry.assign(variables[name], value)


def find_pairs(graph):
    """`[(first, second)]` layers of `graph` that can be equalized."""
    pairs = []
    for call in graph.calls:
        if not _can_lead(call, graph):
            continue
        tensor = call.output_ids[0]
        while True:
            users = graph.uses.get(tensor, [])
            if len(users) != 1 or users[0] == graph_lib.OUTPUT:
                break
            nxt = graph.calls[users[0]]
            if len(nxt.input_ids) != 1 or len(nxt.output_ids) != 1:
                break
            if _usable_linear(nxt, graph):
                pairs.append((call.operation, nxt.operation))
                break
            if not _passes_through(nxt.operation):
                break
            tensor = nxt.output_ids[0]
    return pairs


def _usable_linear(call, graph):
    layer = call.operation
    rule = registry.find_linear(layer)
    return (rule is not None and rule.kernel_transform is None
            and rule.obstacle(layer) is None
            and graph.call_count[id(layer)] == 1
            and getattr(layer, "data_format", "channels_last")
            == "channels_last"
            and (getattr(layer, "groups", 1) or 1) == 1
            and len(call.output_ids) == 1)


def _can_lead(call, graph):
    return (_usable_linear(call, graph)
            and activation_name(call.operation) in _HOMOGENEOUS)


def _passes_through(layer):
    if isinstance(layer, keras.layers.ReLU):
        return (layer.max_value is None and float(layer.threshold) == 0.0)
    if isinstance(layer, keras.layers.LeakyReLU):
        return True
    if isinstance(layer, keras.layers.Activation):
        return activation_name(layer) in _HOMOGENEOUS
    if isinstance(layer, _PASS_THROUGH):
        return getattr(layer, "data_format",
                       "channels_last") == "channels_last"
    return False

