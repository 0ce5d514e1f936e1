"""Exact re-estimation of every normalization layer's inference statistics.

Moving averages only estimate the population statistics, and they go stale
whenever the weights change after training (weight averaging, pruning,
quantization, fine-tuning with frozen statistics) or the data changes.
`recalibrate` replaces them by the exact population statistics of the
layer's inputs over a dataset, as seen by the model in inference mode.
"""

import warnings

import keras
import numpy as np

from kerasbn import _checks
from kerasbn import _keras_internal
from kerasbn import _models
from kerasbn import registry
from kerasbn.stats import _collect
from kerasbn.stats._select import select_layers

_WHAT = "kerasbn.recalibrate"


def recalibrate(model, data, *, steps=None, layers=None, batch_size=None,
                inplace=False, verbose="auto", skip_nonfinite=False):
    """Set each normalization layer's statistics to their exact values on `data`.

    For every BatchNormalization-like layer, in the order a forward pass
    reaches them, the inputs the layer receives when the model runs in
    inference mode are gathered over all of `data`, and the layer's stored
    statistics become their population moments per channel:

        mean     = sum(x) / n
        variance = sum((x - mean)**2) / n      (biased, as NumPy's np.var)

    over the `n` positions of all samples (every axis but the channel
    axis), leaving out positions whose input mask is False (the mask Keras
    propagates from `Embedding(mask_zero=True)` or `Masking`). Moments are
    accumulated in float64 and merged batch by batch with Chan et al.'s
    pairwise update, so the result does not depend on the batch size, the
    batch order or the old statistics. Because layers are done one at a
    time, each layer sees the already recalibrated statistics of the layers
    before it, which is what it will see at inference.

    What is written, per layer kind:

    - Keras' and kerasbn's `BatchNormalization`: `moving_mean` and
      `moving_variance`. kerasbn's `debias_step` is left as it is (it counts
      training updates; the stored statistics are debiased values, as the
      recalibrated ones are; at 0, the next training step replaces them by
      batch statistics, as it always does).
    - With renorm (Keras' `renorm=True`, kerasbn's `BatchRenormalization`):
      also `moving_stddev = sqrt(variance + epsilon)`, and the training
      averages `renorm_mean` and `renorm_stddev` get the same mean and
      stddev, so training resumed afterwards corrects towards the
      recalibrated statistics. `renorm_step` is left as it is.
    - `MABN`: its running second moment `moving_variance = mean(x**2)`
      (`variance + mean**2`). Its step counter and ring buffers stay.

    No other weight changes. A layer called several times pools all its
    calls. Cost: one pass over `data` per normalization layer (a layer's
    inputs depend on the statistics of the layers before it), each pass
    running the model in inference mode inside a `tf.function`; limit it
    with `steps`, or recalibrate some layers only with `layers`.

    Args:
        model: A built `keras.Model` (Functional, Sequential or subclassed;
            copying a subclassed model needs get_config/from_config, else
            use `inplace=True`).
        data: NumPy arrays or tensors (with `batch_size`), a
            `tf.data.Dataset` of batches, a `keras.utils.PyDataset`, or a
            generator of batches. Batches may be `x` or `(x, y[, weights])`;
            only `x` is used. A generator is read once and its batches are
            kept in memory for the later passes.
        steps: Use at most this many batches per pass (required for an
            infinite dataset).
        layers: Layer names or layer objects to recalibrate (default: every
            normalization layer).
        batch_size: Batch size for array data (default 32); it does not
            change the result, only memory and speed.
        inplace: Update `model` itself. By default `model` is untouched and
            a copy (`keras.models.clone_model`, same weights) is returned.
        verbose: 0 (silent), 1 (a progress bar per layer), 2 (a line per
            layer) or "auto" (1).
        skip_nonfinite: Leave out the samples whose inputs hold NaN or inf
            (a warning says how many). By default such data is refused with
            a ValueError naming the batch and the input: one NaN would make
            every channel's statistics NaN.

    Returns:
        The recalibrated model: `model` itself if `inplace`, else the copy.

    Raises:
        TypeError: `model` is not a keras.Model, or cannot be copied.
        ValueError: the model is not built, `data` holds no batches or
            holds NaN/inf (without `skip_nonfinite`), or a layer in
            `layers` is not a known normalization layer.

    Example:

    >>> import numpy as np, keras, kerasbn
    >>> model = keras.Sequential([keras.Input((3,)),
    ...                           keras.layers.BatchNormalization()])
    >>> x = np.arange(12, dtype="float32").reshape(4, 3)
    >>> new = kerasbn.recalibrate(model, x, verbose=0)
    >>> new.layers[0].moving_mean.numpy().tolist()
    [4.5, 5.5, 6.5]
    >>> new.layers[0].moving_variance.numpy().tolist()
    [11.25, 11.25, 11.25]
    >>> model.layers[0].moving_mean.numpy().tolist()  # untouched
    [0.0, 0.0, 0.0]
    """
    _checks.check_model(model, _WHAT)
    verbose = _collect.resolve_verbose(verbose, _WHAT)
    _checks.check_bool("inplace", inplace, _WHAT)
    batches = _collect.Batches(data, batch_size=batch_size, steps=steps,
                               what=_WHAT, skip_nonfinite=skip_nonfinite)
    chosen = select_layers(model, layers, _WHAT)
    if inplace:
        work = model
        targets = chosen
    else:
        all_layers = _keras_internal.sublayers(model)
        work = _models.clone_with_weights(model, _WHAT)
        work_layers = _keras_internal.sublayers(work)
        position = {id(layer): i for i, layer in enumerate(all_layers)}
        targets = [work_layers[position[id(layer)]] for layer in chosen]
    if not targets:
        return work

    statistics = _collect.InputStatistics(work, targets, batches.first(),
                                          selective=True)
    order = statistics.order
    unreached = [layer.name for layer in targets
                 if not any(layer is o for o in order)]
    if unreached:
        warnings.warn(
            f"{_WHAT}: layers {unreached} are not reached by a forward pass "
            f"of model '{work.name}'; their statistics are left as they are.",
            stacklevel=2,
        )
    for number, layer in enumerate(order, start=1):
        progbar = None
        if verbose:
            print(f"Layer {number}/{len(order)}: '{layer.name}' "
                  f"({type(layer).__name__})")
            progbar = keras.utils.Progbar(batches.num_batches,
                                          verbose=verbose)
        moments = statistics.run(batches, layer, progbar)
        result = moments.get(id(layer))
        if result is None or result.count == 0:
            warnings.warn(
                f"{_WHAT}: layer '{layer.name}' saw no unmasked position in "
                "the data; its statistics are left as they are.",
                stacklevel=2,
            )
            continue
        kind = registry.find_statistics(layer)
        center, spread = kind.from_moments(result.mean, result.variance)
        kind.write(layer, center, spread)
        if verbose == 2:
            print(f"  {int(result.count)} positions, mean |mean| "
                  f"{float(np.mean(np.abs(result.mean))):.4g}, mean variance "
                  f"{float(np.mean(result.variance)):.4g}")
    if batches.skipped:
        warnings.warn(
            f"{_WHAT}: left out {batches.skipped} sample(s) per pass whose "
            "inputs hold NaN or inf (skip_nonfinite=True).", stacklevel=2)
    return work
