"""The same architecture with every normalization layer taken out.

Not an equivalent model: it is the speed limit a folded model is measured
against (`tools/benchmark.py`), the network as if it had been built
without normalization.
"""

import numpy as np

from kerasbn.fold import registry
from kerasbn.fold import report as report_lib
from kerasbn.fold import rewrite


class _StripPlanner(rewrite._Planner):
    """Marks every normalization call as removed; weights are kept."""

    add_bias = False

    def run(self, keep_unfolded):
        del keep_unfolded
        for index in sorted(self.rules):
            call = self.graph.calls[index]
            self.outcomes[index] = rewrite._Outcome(report_lib.FOLDED)
            input_id = self.resolve(call.first_input_id())
            self.alias[call.output_ids[0]] = input_id
            producer_index = self.graph.producer.get(input_id)
            if not self.add_bias or producer_index is None:
                continue
            producer = self.graph.calls[producer_index].operation
            rule = registry.find_producer(producer)
            if rule is None or producer.use_bias:
                continue
            scale, _ = self.affine(call.operation)
            self.weights[id(producer)] = rule.backward(
                self.current_weights(producer, rule),
                producer,
                np.ones_like(scale),
                np.zeros_like(scale),
            )
        return self


class _StripWithBiasPlanner(_StripPlanner):
    add_bias = True


def strip_normalization(model, add_bias=False):
    """A copy of `model` with every normalization layer removed.

    Each normalization call is replaced by its input; every other layer is
    recreated with the same config and weights. With `add_bias=True`, a
    bias-free layer right before a removed normalization gets a zero bias,
    as a fold would give it.

    The result computes something else than `model`; it is the lower bound
    for the inference time of a folded model (benchmarks only).

    >>> import keras
    >>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3),
    ...                           keras.layers.BatchNormalization()])
    >>> [type(layer).__name__ for layer in strip_normalization(model).layers]
    ['Dense']
    """
    from kerasbn.fold import _check_model

    _check_model(model)
    planner = _StripWithBiasPlanner if add_bias else _StripPlanner
    return rewrite.Folder(planner=planner).fold_model(model)
