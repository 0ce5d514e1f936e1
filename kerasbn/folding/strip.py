"""The same architecture with every normalization layer taken out.

Not an equivalent model: it is the speed limit a folded model is measured
against (`tools/benchmark.py`), the network as if it had been built
without normalization.
"""

from kerasbn.folding import graph
from kerasbn.folding import rebuild


def strip_normalization(model, add_bias=False):
    """A copy of `model` with every normalization layer removed.

    Each normalization call is replaced by its input; every other layer is
    recreated with the same config and weights. With `add_bias=True`, a
    bias-free layer right before a removed normalization gets a zero bias,
    as a fold would give it.

    The result computes something else than `model`; it is the lower bound
    for the inference time of a folded model (benchmarks only).

    >>> import keras, kerasbn
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
    ...                           keras.layers.BatchNormalization()])
    >>> stripped = kerasbn.strip_normalization(model)
    >>> [type(layer).__name__ for layer in stripped.layers]
    ['Dense']
    """
    graph.check_foldable(model, "kerasbn.strip_normalization")
    folder = rebuild.Folder(strip=True, strip_bias=add_bias)
    return folder.fold_model(model)
