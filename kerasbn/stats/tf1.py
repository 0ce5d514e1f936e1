"""Load TF1 `batch_norm` checkpoints into Keras batch normalization layers.

TF1's `tf.contrib.layers.batch_norm` (and `tf.layers.batch_normalization`)
saved, under a variable scope such as `conv1/BatchNorm`:

    <scope>/beta, <scope>/gamma                 (gamma only with scale=True)
    <scope>/moving_mean, <scope>/moving_variance

and with `zero_debias_moving_mean=True` the two shadow variables TF's
`assign_moving_average(..., zero_debias=True)` creates next to the mean:

    <scope>/moving_mean/biased       the average started at zero, b_t
    <scope>/moving_mean/local_step   the number of updates, t

with `moving_mean = b_t / (1 - decay**t)`. kerasbn's
`BatchNormalization(zero_debias="mean")` holds the same state as the
debiased value in `moving_mean` plus the step in `debias_step`, so loading
`b_t / (1 - momentum**t)` and `t` resumes training exactly where TF left it.
"""

import os

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from kerasbn import _keras_internal
from kerasbn import _numerics
from kerasbn import registry
from kerasbn.layers.batch_normalization import BatchNormalization

_WHAT = "kerasbn.load_tf1_batch_norm"

_MEAN = "moving_mean"
_VARIANCE = "moving_variance"
_SHADOWS = ("biased", "local_step")


def _checkpoint_path(checkpoint):
    path = os.fspath(checkpoint)
    if os.path.isdir(path):
        latest = tf.train.latest_checkpoint(path)
        if latest is None:
            raise ValueError(
                f"{_WHAT}: directory {path!r} holds no TF checkpoint (no "
                "'checkpoint' index file). Pass the checkpoint prefix, e.g. "
                "'model.ckpt-1000'."
            )
        return latest
    return path


def _scopes(shapes):
    """Checkpoint scopes that hold a `moving_mean` ('' for the root)."""
    scopes = set()
    for name in shapes:
        if name == _MEAN:
            scopes.add("")
        elif name.endswith("/" + _MEAN):
            scopes.add(name[: -len(_MEAN) - 1])
    return scopes


def _join(scope, name):
    return f"{scope}/{name}" if scope else name


def _loads_tf1(layer):
    """Layers with Keras BN's variables: Keras' BN, kerasbn's, and kinds
    registered with `registry.BATCH_NORM_STATISTICS`."""
    return registry.find_statistics(layer) is registry.BATCH_NORM_STATISTICS


def _batch_norm_layers(model_or_layer):
    if _loads_tf1(model_or_layer):
        return [model_or_layer]
    if not isinstance(model_or_layer, keras.layers.Layer):
        raise TypeError(
            f"{_WHAT} expects a keras.Model or a BatchNormalization layer. "
            f"Received: {type(model_or_layer).__name__}."
        )
    return [layer for layer in _keras_internal.sublayers(model_or_layer)
            if _loads_tf1(layer)]


def _default_mapping(layers, scopes, single):
    pairs, problems = [], []
    used = set()
    for layer in layers:
        matches = sorted(s for s in scopes
                         if s == layer.name or s.endswith("/" + layer.name))
        if len(matches) == 1:
            pairs.append((layer, matches[0]))
            used.add(matches[0])
        elif single and len(scopes) == 1:
            scope = next(iter(scopes))
            pairs.append((layer, scope))
            used.add(scope)
        elif not matches:
            problems.append(
                f"layer '{layer.name}': no checkpoint scope named "
                f"'{layer.name}' or ending in '/{layer.name}'"
            )
        else:
            problems.append(
                f"layer '{layer.name}': several checkpoint scopes match "
                f"({matches})"
            )
    for scope in sorted(scopes - used):
        problems.append(
            f"checkpoint scope '{scope or '<root>'}': no layer matched it"
        )
    return pairs, problems


def _explicit_mapping(layers, scopes, mapping):
    pairs, problems = [], []
    by_name = {}
    for layer in layers:
        by_name.setdefault(layer.name, []).append(layer)
    for name, scope in mapping.items():
        if not isinstance(name, str) or not isinstance(scope, str):
            raise TypeError(
                f"{_WHAT}: argument `mapping` must map layer names to "
                f"checkpoint scopes (strings). Received the item "
                f"{name!r}: {scope!r}."
            )
        scope = scope.strip("/")
        candidates = by_name.get(name, [])
        if not candidates:
            problems.append(
                f"mapping key '{name}': no BatchNormalization layer of that "
                "name"
            )
            continue
        if len(candidates) > 1:
            problems.append(
                f"mapping key '{name}': several BatchNormalization layers "
                "have that name"
            )
            continue
        if scope not in scopes:
            problems.append(
                f"layer '{name}': checkpoint scope '{scope}' has no "
                f"'{_join(scope, _MEAN)}'"
            )
            continue
        pairs.append((candidates[0], scope))
    return pairs, problems


def _expect(shapes, reader, name, shape, problems):
    """The checkpoint value `name` as float64, checking its shape."""
    if name not in shapes:
        problems.append(f"'{name}': missing from the checkpoint")
        return None
    if tuple(shapes[name]) != tuple(shape):
        problems.append(
            f"'{name}': shape {tuple(shapes[name])} in the checkpoint, the "
            f"layer needs {tuple(shape)}"
        )
        return None
    return np.asarray(reader.get_tensor(name), np.float64)


def _plan_layer(layer, scope, shapes, reader, problems):
    """`[(variable, value)]` for one layer; problems go to `problems`."""
    label = f"layer '{layer.name}' <- scope '{scope or '<root>'}'"
    local, plan = [], []
    if not layer.built:
        local.append("the layer is not built; call the model on a batch or "
                     "build it first")
    elif layer.renorm:
        local.append("renorm=True layers are not supported (TF1 renorm kept "
                     "other variables)")
    else:
        context = _Context(layer, scope, shapes, reader, local)
        plan = context.affine() + context.statistics()
    problems.extend(f"{label}: {text}" for text in local)
    return plan


class _Context:
    """One layer matched to one checkpoint scope, problems noted in `notes`."""

    def __init__(self, layer, scope, shapes, reader, notes):
        self.layer = layer
        self.scope = scope
        self.shapes = shapes
        self.reader = reader
        self.notes = notes
        self.channels = tuple(layer.moving_mean.shape)

    def expect(self, name, shape):
        return _expect(self.shapes, self.reader, name, shape, self.notes)

    def affine(self):
        """`beta` (if `center`) and `gamma` (if `scale`)."""
        plan = []
        for name, present in (("beta", self.layer.center),
                              ("gamma", self.layer.scale)):
            full = _join(self.scope, name)
            if present:
                value = self.expect(full, self.channels)
                if value is not None:
                    plan.append((getattr(self.layer, name), value))
            elif full in self.shapes:
                flag = "center" if name == "beta" else "scale"
                self.notes.append(
                    f"'{full}' is in the checkpoint but the layer has "
                    f"{flag}=False; build it with {flag}=True")
        return plan

    def debiased(self):
        """`{stat: (biased name, step name)}` of the zero-debiased stats,
        checked against the layer's `zero_debias`; and the wanted set."""
        debiased = {}
        for stat in (_MEAN, _VARIANCE):
            shadows = [_join(self.scope, f"{stat}/{s}") for s in _SHADOWS]
            present = [s in self.shapes for s in shadows]
            if all(present):
                debiased[stat] = shadows
            elif any(present):
                self.notes.append(
                    f"the checkpoint has only one of {shadows}")
        zero_debias = getattr(self.layer, "zero_debias", False) or False
        wanted = {False: set(), "mean": {_MEAN},
                  "mean_and_variance": {_MEAN, _VARIANCE}}[zero_debias]
        if set(debiased) != wanted:
            self.notes.append(self._mode_mismatch(debiased, zero_debias))
        return debiased, wanted

    def _mode_mismatch(self, debiased, zero_debias):
        have = sorted(debiased) or "none"
        if isinstance(self.layer, BatchNormalization):
            modes = {(): "False", (_MEAN,): "'mean'",
                     (_MEAN, _VARIANCE): "'mean_and_variance'"}
            hint = (f"build the layer with zero_debias="
                    f"{modes[tuple(sorted(debiased))]}")
        else:
            hint = ("load it into kerasbn.layers.BatchNormalization("
                    "zero_debias='mean'), which keeps the debias state")
        return (f"the checkpoint's zero-debiased statistics ({have}) do not "
                f"match the layer's zero_debias={zero_debias!r}; {hint}")

    def statistics(self):
        """`moving_mean`, `moving_variance` and `debias_step`."""
        debiased, wanted = self.debiased()
        plan, steps = [], set()
        for stat in (_MEAN, _VARIANCE):
            variable = getattr(self.layer, stat)
            stored = self.expect(_join(self.scope, stat), self.channels)
            if stat in debiased and stat in wanted:
                value = self._debiased_value(stat, debiased[stat], stored,
                                             steps)
            else:
                value = stored
            if value is not None:
                plan.append((variable, value))
        if len(steps) > 1:
            self.notes.append(
                f"the mean and variance local steps differ ({sorted(steps)}"
                "); one debias_step cannot hold both")
        elif steps:
            plan.append((self.layer.debias_step, np.int64(steps.pop())))
        return plan

    def _debiased_value(self, stat, shadows, stored, steps):
        biased = self.expect(shadows[0], self.channels)
        step = self.expect(shadows[1], ())
        if biased is None or step is None or stored is None:
            return None
        step = float(step)
        if step < 0 or step != round(step):
            self.notes.append(f"'{shadows[1]}' is {step}, not a step count")
            return None
        step = int(round(step))
        steps.add(step)
        if step == 0:
            return stored
        # The debiased value from TF's own definition, in float64.
        decay = float(self.layer.momentum)
        factor, _ = _numerics.decay_power(decay, step, "float64")
        value = biased / ops.convert_to_numpy(factor)
        scale = max(float(np.max(np.abs(stored))), 1e-12)
        if not np.allclose(value, stored, rtol=1e-3, atol=1e-6 * scale):
            self.notes.append(
                f"'{_join(self.scope, stat)}' is not '{shadows[0]}' / "
                f"(1 - momentum**{step}) with the layer's momentum {decay}; "
                "build the layer with TF's decay as momentum")
            return None
        return value


def load_tf1_batch_norm(model_or_layer, checkpoint, mapping=None):
    """Load TF1 batch-norm variables from a checkpoint into BN layers.

    For each `keras.layers.BatchNormalization` (kerasbn's included) matched
    to a checkpoint scope, loads `beta` (if `center`), `gamma` (if
    `scale`), `moving_mean` and `moving_variance`. For a zero-debiased
    moving mean (the scope has `moving_mean/biased` and
    `moving_mean/local_step`, as written by TF1's
    `batch_norm(zero_debias_moving_mean=True)`) the layer must be
    `kerasbn.layers.BatchNormalization(zero_debias="mean")` with TF's decay
    as `momentum`: it gets `moving_mean = biased / (1 - momentum**t)`
    (computed in float64) and `debias_step = t`, so further training gives
    the numbers TF's op would. A checkpoint that debiased the variance as
    well (`moving_variance/biased`, `.../local_step`) loads into
    `zero_debias="mean_and_variance"`.

    Nothing is assigned unless everything matches: every problem (a
    missing variable, a wrong shape, a layer without a scope, a scope
    without a layer, a debias mode or momentum that does not fit) is listed
    in one error.

    Args:
        model_or_layer: A built `keras.Model` or one built batch
            normalization layer.
        checkpoint: A TF checkpoint prefix (`.../model.ckpt-1000`) or a
            directory holding one (the latest is used).
        mapping: Optional `{layer name: checkpoint scope}`, e.g.
            `{"batch_normalization": "conv1/BatchNorm"}`; only these layers
            are loaded. By default every batch normalization layer is
            matched to the scope equal to its name or ending in
            `/<its name>`, and every scope of the checkpoint must be
            matched; a layer passed on its own (not in a model) takes the
            checkpoint's only scope whatever its name.

    Returns:
        The mapping used, `{layer name: scope}`.

    Raises:
        ValueError: listing every variable or layer that did not match.
        TypeError: `model_or_layer` or `mapping` has the wrong type.

    A checkpoint with TF1's names, written here with `tf.raw_ops.SaveV2`:

    >>> import keras, kerasbn, os, tempfile, tensorflow as tf
    >>> prefix = os.path.join(tempfile.mkdtemp(), "model.ckpt")
    >>> names = ["conv1/BatchNorm/" + name for name in
    ...          ("beta", "gamma", "moving_mean", "moving_variance")]
    >>> values = [[0.0, 1.0], [1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]
    >>> _ = tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names,
    ...                       shape_and_slices=[""] * 4,
    ...                       tensors=[tf.constant(v) for v in values])
    >>> bn = keras.layers.BatchNormalization(name="bn")
    >>> bn.build((None, 2))
    >>> kerasbn.load_tf1_batch_norm(bn, prefix)  # one layer: the only scope
    {'bn': 'conv1/BatchNorm'}
    >>> bn.moving_mean.numpy().tolist(), bn.moving_variance.numpy().tolist()
    ([3.0, 4.0], [5.0, 6.0])
    """
    path = _checkpoint_path(checkpoint)
    try:
        reader = tf.train.load_checkpoint(path)
    except (tf.errors.NotFoundError, ValueError) as error:
        raise ValueError(
            f"{_WHAT}: cannot read a TF checkpoint at {path!r}: {error}"
        ) from error
    shapes = dict(tf.train.list_variables(path))
    scopes = _scopes(shapes)
    layers = _batch_norm_layers(model_or_layer)
    if not layers:
        raise ValueError(
            f"{_WHAT}: '{model_or_layer.name}' has no BatchNormalization "
            "layer to load into."
        )
    if mapping is None:
        single = not isinstance(model_or_layer, keras.Model)
        pairs, problems = _default_mapping(layers, scopes, single)
    elif isinstance(mapping, dict):
        pairs, problems = _explicit_mapping(layers, scopes, mapping)
    else:
        raise TypeError(
            f"{_WHAT}: argument `mapping` must be a dict {{layer name: "
            f"checkpoint scope}} or None. Received: {mapping!r}."
        )
    plan = []
    for layer, scope in pairs:
        plan.extend(_plan_layer(layer, scope, shapes, reader, problems))
    if problems:
        available = sorted(s or "<root>" for s in scopes)
        raise ValueError(
            f"{_WHAT}: the checkpoint {path!r} does not fit "
            f"'{model_or_layer.name}':\n  - " + "\n  - ".join(problems)
            + f"\nCheckpoint batch-norm scopes: {available}. Pass "
            "mapping={layer name: scope} to choose which layer gets which "
            "scope."
        )
    for variable, value in plan:
        variable.assign(np.asarray(value).astype(variable.dtype))
    return {layer.name: scope for layer, scope in pairs}
