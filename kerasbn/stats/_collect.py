"""Reading data in batches, and the statistics of a layer's inputs.

Three pieces the statistics tools share:

- `Batches`: the batches of model inputs in any form Keras' `predict`
  takes (arrays, `tf.data.Dataset`, generator, `keras.utils.PyDataset`),
  readable several times (a one-shot generator is kept in memory after its
  first pass);
- `intercept`: a context manager that replaces the `call` of some layers by
  a wrapper that sees their inputs and mask before calling the original, on
  that layer object only and only inside the `with` block;
- `Moments` and `InputStatistics`: the count, mean and sum of squared
  deviations per channel, accumulated in float64 over all batches with
  Chan et al.'s pairwise merge, so the result is the population mean and
  variance whatever the batch size.
"""

import contextlib
import inspect
import math

import keras
import numpy as np
import tensorflow as tf

from kerasbn import _checks
from kerasbn import registry

DEFAULT_BATCH_SIZE = 32


def check_steps(steps, what):
    return _checks.check_int("steps", steps, 1, what, allow_none=True,
                             hint="It is the number of batches per pass over "
                             "the data.")


def resolve_verbose(verbose, what):
    if verbose == "auto":
        return 1
    if verbose in (0, 1, 2) and not isinstance(verbose, bool):
        return verbose
    raise ValueError(
        f"{what}: argument `verbose` must be 'auto', 0, 1 or 2. Received: "
        f"verbose={verbose!r}."
    )


def _inputs_of(element):
    """The model inputs `x` of one batch `x`, `(x,)`, `(x, y)` or `(x, y, w)`."""
    return keras.utils.unpack_x_y_sample_weight(element)[0]


def _is_array(value):
    return isinstance(value, np.ndarray) or tf.is_tensor(value)


def _is_array_structure(value):
    if _is_array(value):
        return True
    if isinstance(value, dict):
        return bool(value) and all(_is_array(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return bool(value) and all(
            v is None or _is_array_structure(v) for v in value
        )
    return False


def _to_tensors(x):
    return keras.tree.map_structure(
        lambda v: v if tf.is_tensor(v) else tf.convert_to_tensor(v), x
    )


def itemsize(value):
    """Bytes per element of an array or tensor (bfloat16 and other types
    NumPy does not know: 2)."""
    try:
        return np.dtype(keras.backend.standardize_dtype(value.dtype)).itemsize
    except TypeError:
        return 2


def num_inputs(model):
    """The number of (flat) inputs of `model`, None if it has no graph."""
    try:
        return len(keras.tree.flatten(model.inputs))
    except (AttributeError, ValueError, TypeError):
        return None


def _check_cardinality(data, inputs, num_inputs, what):
    """Refuse a list or tuple whose arrays hold different numbers of
    samples: read as `(x, y[, sample_weight])` (or a model's inputs), it
    would otherwise use the first array's samples alone, silently."""
    sizes = [leading_size(v) for v in keras.tree.flatten(data)
             if v is not None]
    if len(set(sizes)) <= 1:
        return
    how = ("the model's inputs" if inputs else "(x, y[, sample_weight])")
    also = (f" (or, being {num_inputs} arrays, as the model's "
            f"{num_inputs} inputs)" if num_inputs and num_inputs > 1
            and not inputs else "")
    raise ValueError(
        f"{what}: the arrays of `data` hold different numbers of samples "
        f"({sizes}); a {type(data).__name__} of arrays is read as {how}"
        f"{also}, whose arrays must all hold one sample per row. Pass one "
        "array (or one per model input, as a list or a dict by input "
        "name), or x and y of one length.")


def input_bytes(x):
    """Bytes the values of a structure of arrays or tensors take."""
    return sum(int(np.prod(v.shape, dtype=np.int64)) * itemsize(v)
               for v in keras.tree.flatten(x) if v is not None)


def _joinable(a, b):
    """Whether batches `a` and `b` concatenate along the batch axis."""
    try:
        keras.tree.assert_same_structure(a, b)
    except (ValueError, TypeError):
        return False
    return all((u is None and v is None) or (
        u is not None and v is not None and u.dtype == v.dtype
        and tuple(u.shape[1:]) == tuple(v.shape[1:]))
        for u, v in zip(keras.tree.flatten(a), keras.tree.flatten(b)))


def _concatenated(batches):
    if len(batches) == 1:
        return batches[0]
    return keras.tree.map_structure(
        lambda *t: None if t[0] is None else tf.concat(t, axis=0), *batches)


def leading_size(x):
    """The batch dimension of the first array in `x`."""
    first = keras.tree.flatten(x)[0]
    size = first.shape[0]
    return None if size is None else int(size)


class Batches:
    """The model inputs of `data`, batch by batch, for several passes.

    Args:
        data: NumPy arrays or tensors (a structure of them; a tuple is read
            as `(x, y[, sample_weight])` as in `Model.fit`), a
            `tf.data.Dataset` of batches, a `keras.utils.PyDataset`, or an
            iterable/generator of batches. Batches may be `x` or
            `(x, y[, sample_weight])`; only `x` is used.
        batch_size: Batch size for array data (default 32); must be None
            for the other forms, which come batched.
        steps: At most this many batches per pass (None: all).
        what: The calling function's name, for error messages.
        num_inputs: The model's number of inputs, if known: a list or
            tuple of exactly that many arrays (more than one) is the
            model's inputs, as `Model.predict` reads it, not `(x, y)`.
    """

    def __init__(self, data, batch_size=None, steps=None, what="",
                 skip_nonfinite=False, num_inputs=None):
        self.what = what
        self.skip_nonfinite = _checks.check_bool(
            "skip_nonfinite", skip_nonfinite, what)
        self.skipped = 0  # Samples left out by the last full pass.
        self.steps = check_steps(steps, what)
        _checks.check_int("batch_size", batch_size, 1, what, allow_none=True)
        self._cache = None
        self._one_shot = False
        self._numbers = []  # The data's batch number of each batch read.
        self._join = None  # Join batched data up to this many bytes.
        self._groups = []  # Joined: (first, last) batch read, per batch.
        self._num_inputs = num_inputs
        self.batch_size = None
        if _is_array_structure(data):
            x = data
            if isinstance(data, (list, tuple)):
                x = self._inputs_of(data)
                _check_cardinality(data, self._one_per_input(data),
                                   num_inputs, what)
            self._kind = "arrays"
            self._x = x
            self._size = leading_size(x)
            self._chosen = batch_size is not None
            self.batch_size = int(batch_size or DEFAULT_BATCH_SIZE)
            self.num_batches = math.ceil(self._size / self.batch_size)
        else:
            if batch_size is not None:
                raise ValueError(
                    f"{what}: argument `batch_size` applies to array data "
                    f"only; a {type(data).__name__} comes batched. Received: "
                    f"batch_size={batch_size!r}."
                )
            if isinstance(data, tf.data.Dataset):
                self._kind = "dataset"
                cardinality = int(data.cardinality())
                if cardinality == tf.data.INFINITE_CARDINALITY:
                    if self.steps is None:
                        raise ValueError(
                            f"{what}: the tf.data.Dataset is infinite "
                            "(e.g. it repeats); pass `steps`, the number of "
                            "batches to read."
                        )
                    self.num_batches = None
                elif cardinality >= 0:
                    self.num_batches = cardinality
                else:
                    self.num_batches = None
            elif isinstance(data, keras.utils.PyDataset):
                self._kind = "pydataset"
                self.num_batches = data.num_batches
                if self.num_batches is None and self.steps is None:
                    raise ValueError(
                        f"{what}: the PyDataset has no length "
                        "(num_batches is None); pass `steps`."
                    )
            elif hasattr(data, "__next__") or hasattr(data, "__iter__"):
                self._kind = "iterable"
                self._one_shot = hasattr(data, "__next__") and (
                    iter(data) is data
                )
                self.num_batches = None
                if hasattr(data, "__len__"):
                    self.num_batches = len(data)
            else:
                raise TypeError(
                    f"{what}: cannot read batches from data of type "
                    f"{type(data).__name__}. Pass NumPy arrays, a "
                    "tf.data.Dataset, a keras.utils.PyDataset or a "
                    "generator of batches."
                )
            self._data = data
        if self.num_batches is not None and self.steps is not None:
            self.num_batches = min(self.num_batches, self.steps)
        elif self.steps is not None:
            self.num_batches = self.steps

    def widen(self, max_bytes):
        """Cut array data into batches of up to `max_bytes` of input
        (a multiple of the default size, at least one default batch),
        unless the caller chose `batch_size` or `steps`; join consecutive
        batches of data that comes batched up to `max_bytes` (those of the
        same structure, dtypes and shapes but the first; one larger batch
        stays as it is). Returns the batch size now used for arrays (None
        for data that comes batched)."""
        if self._kind != "arrays":
            self._join = max_bytes
            return None
        if self._chosen or self.steps is not None:
            return self.batch_size
        per_sample = sum(
            int(np.prod(np.shape(v)[1:], dtype=np.int64))
            * itemsize(v)
            for v in keras.tree.flatten(self._x))
        fits = max_bytes // max(per_sample, 1)
        size = max(DEFAULT_BATCH_SIZE,
                   fits // DEFAULT_BATCH_SIZE * DEFAULT_BATCH_SIZE)
        self.batch_size = int(min(size, max(self._size, 1)))
        self.num_batches = math.ceil(self._size / self.batch_size)
        return self.batch_size

    def _raw(self):
        if self._kind == "arrays":
            for start in range(0, self._size, self.batch_size):
                stop = start + self.batch_size
                yield keras.tree.map_structure(
                    lambda v: v[start:stop], self._x
                )
        elif self._kind == "pydataset":
            index = 0
            limit = self._data.num_batches
            while limit is None or index < limit:
                yield self._inputs_of(self._data[index])
                index += 1
        else:
            for element in self._data:
                yield self._inputs_of(element)

    def _one_per_input(self, element):
        """Whether `element` is a list or tuple of exactly one array per
        input of a model with several (its inputs, as `predict` reads
        them), rather than `(x, y[, w])`."""
        return (self._num_inputs is not None and self._num_inputs > 1
                and isinstance(element, (list, tuple))
                and len(element) == self._num_inputs
                and all(_is_array(v) for v in element))

    def _inputs_of(self, element):
        """The model inputs of one batch or of array data: its inputs if
        `_one_per_input`, else those of `x`, `(x,)`, `(x, y)`,
        `(x, y, w)`."""
        if self._one_per_input(element):
            return list(element)
        return _inputs_of(element)

    def _read(self):
        count = skipped = kept = 0
        for x in self._raw():
            if self.steps is not None and count >= self.steps:
                break
            x, dropped = self._finite(_to_tensors(x), count)
            count += 1
            skipped += dropped
            if x is not None:
                if kept == len(self._numbers):
                    self._numbers.append(count - 1)
                kept += 1
                yield x
        self.skipped = skipped

    def describe(self, index):
        """'batch N of the data' for the batch a pass yields as its
        `index`-th (N differs once `skip_nonfinite` has left out a whole
        batch; 'batches N to M' for joined ones), with its samples for
        array data, as errors name it."""
        if self._join is not None and index < len(self._groups):
            first, last = (self._number(i) for i in self._groups[index])
            if first != last:
                return f"batches {first} to {last} of the data"
            index = self._groups[index][0]
        number = self._number(index)
        text = f"batch {number} of the data"
        if self._kind == "arrays":
            start = number * self.batch_size
            stop = min(start + self.batch_size, self._size)
            text += f" (samples {start} to {stop - 1})"
        return text

    def _number(self, index):
        return (self._numbers[index] if index < len(self._numbers)
                else index)

    def nth(self, index):
        """The `index`-th batch a pass yields (read again: for error
        reports, not in a loop)."""
        for i, x in enumerate(self):
            if i == index:
                return x
        raise IndexError(f"{self.what}: the data holds no batch {index}.")

    def _finite(self, x, index):
        """`(x, 0)` if every float value is finite; else the batch without
        its non-finite samples and their count (`skip_nonfinite`), or a
        ValueError naming the batch and the input."""
        flat = keras.tree.flatten(x)
        names = (sorted(x) if isinstance(x, dict) and len(x) == len(flat)
                 else [f"input {i}" for i in range(len(flat))])
        keep = None
        for name, tensor in zip(names, flat):
            if not tensor.dtype.is_floating:
                continue
            finite = tf.math.is_finite(tensor)
            rows = tf.reduce_all(tf.reshape(finite, [tf.shape(tensor)[0], -1]),
                                 axis=1)
            if bool(tf.reduce_all(rows)):
                continue  # The usual case: one check, nothing to count.
            if not self.skip_nonfinite:
                bad = int(tf.reduce_sum(tf.cast(tf.logical_not(finite),
                                                tf.int64)))
                raise ValueError(
                    f"{self.what}: batch {index} of the data holds {bad} "
                    f"non-finite value(s) (NaN or inf) in {name}; statistics "
                    "computed from it would be NaN or inf for every channel. "
                    "Clean the data, or pass skip_nonfinite=True to leave "
                    "those samples out."
                )
            keep = rows if keep is None else tf.logical_and(keep, rows)
        if keep is None or bool(tf.reduce_all(keep)):
            return x, 0
        dropped = int(tf.reduce_sum(tf.cast(tf.logical_not(keep), tf.int32)))
        if dropped == int(tf.shape(keep)[0]):
            return None, dropped
        return keras.tree.map_structure(
            lambda t: tf.boolean_mask(t, keep), x), dropped

    def __iter__(self):
        if self._one_shot and self._cache is None:
            # A generator can be read once: keep its batches for later passes.
            self._cache = list(self._read())
            self.num_batches = len(self._cache)
        source = (iter(self._cache) if self._cache is not None
                  else self._read())
        return source if self._join is None else self._joined(source)

    def _joined(self, source):
        """The batches of `source`, consecutive ones concatenated up to
        `_join` bytes; `_groups` records which (for `describe`)."""
        groups = self._groups = []
        pending, size, first, index = [], 0, 0, -1
        for index, x in enumerate(source):
            bytes_ = input_bytes(x)
            if pending and (size + bytes_ > self._join
                            or not _joinable(pending[0], x)):
                groups.append((first, index - 1))
                yield _concatenated(pending)
                pending, size = [], 0
            if not pending:
                first = index
            pending.append(x)
            size += bytes_
        if pending:
            groups.append((first, index))
            yield _concatenated(pending)

    def first(self):
        """The first batch, or a clear error if there is none."""
        for x in self:
            return x
        raise ValueError(
            f"{self.what}: the data holds no batches (nothing to compute "
            "statistics from)."
        )


# -- Intercepting a layer's inputs. ------------------------------------------


@contextlib.contextmanager
def intercept(layers, hook=None, training=None, after=None):
    """Wrap the `call` of each layer in `layers` while the block runs.

    Args:
        layers: Layers to wrap (each once).
        hook: Optional `(layer, inputs, mask) -> None`, called with the
            layer's first input and its mask (or None) before the original
            `call`.
        training: If not None, the value of `training` the original `call`
            receives, whatever the model passed.
        after: Optional `(layer, outputs) -> None`, called with what the
            original `call` returned.

    The wrapper is set on the layer object only (an instance attribute that
    shadows the class's method, as Keras looks `call` up on the instance)
    and removed on exit, even on error.
    """
    installed = []
    try:
        for layer in layers:
            original = layer.call
            signature = inspect.signature(original)

            def wrapper(*args, _layer=layer, _original=original,
                        _signature=signature, **kwargs):
                bound = _signature.bind(*args, **kwargs)
                names = list(_signature.parameters)
                if hook is not None:
                    hook(_layer, bound.arguments[names[0]],
                         bound.arguments.get("mask"))
                if training is not None and "training" in _signature.parameters:
                    bound.arguments["training"] = training
                outputs = _original(*bound.args, **bound.kwargs)
                if after is not None:
                    after(_layer, outputs)
                return outputs

            wrapper.__signature__ = signature
            previous = layer.__dict__.get("call", None)
            object.__setattr__(layer, "call", wrapper)
            installed.append((layer, previous))
        yield
    finally:
        for layer, previous in reversed(installed):
            if previous is None:
                object.__delattr__(layer, "call")
            else:
                object.__setattr__(layer, "call", previous)


# -- Moments. ----------------------------------------------------------------


class Moments:
    """Count, mean and sum of squared deviations per channel (float64).

    `merge` combines two sets exactly (Chan, Golub and LeVeque's pairwise
    update), so the population mean and variance of a union of batches do
    not depend on how it was batched, and no catastrophic cancellation
    occurs as with sums of x and x**2.
    """

    __slots__ = ("count", "mean", "m2")

    def __init__(self, count, mean, m2):
        self.count = float(count)
        self.mean = np.asarray(mean, np.float64)
        self.m2 = np.asarray(m2, np.float64)

    def merge(self, other):
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        total = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / total)
        m2 = self.m2 + other.m2 + delta * delta * (
            self.count * other.count / total
        )
        return Moments(total, mean, m2)

    @classmethod
    def side_by_side(cls, parts):
        """The moments of a concatenation along the channel axis, from
        those of its parts (same positions, so the same count)."""
        counts = {part.count for part in parts}
        if len(counts) != 1:
            raise ValueError(f"parts of one tensor with positions {counts}")
        return cls(counts.pop(), np.concatenate([p.mean for p in parts]),
                   np.concatenate([p.m2 for p in parts]))

    @property
    def variance(self):
        """The biased (population) variance."""
        return self.m2 / self.count

    @property
    def finite(self):
        """Whether mean and m2 are finite: False when an input was NaN or
        inf (float64 sums of float32 or narrower values cannot overflow)."""
        return bool(np.isfinite(self.mean).all()
                    and np.isfinite(self.m2).all())


# Positions summed in float32 before the float64 sums (`_column_moments`).
_CHUNK = 32
# A variance below this is computed again in float64: squares below
# float32's smallest normal number (1.2e-38), flushed to zero, then lose
# at most 1.2e-38 / variance = 1e-8 of it.
_SMALLEST_FLOAT32_VARIANCE = 1.2e-30


@tf.function(autograph=False, reduce_retracing=True)
def _column_moments(x):
    """`batch_moments` of a `[positions, channels]` matrix, no mask.

    One function, called inside the graphs that gather moments: it is
    traced once per channel count and dtype rather than its ops once per
    layer (a share of a staged recalibration's cost on deep models).

    Float32 (and narrower, upcast) activations are summed in float32 over
    runs of `_CHUNK` consecutive positions and those partial sums in
    float64: half the memory traffic of casting the whole matrix to
    float64 first, and the moments' cost is a third of a recalibration's
    on ResNet50. Both sums are of values shifted close to the mean (the
    mean pass by the first position's values, the squares by the float32
    mean), so neither cancels; a partial sum of 32 float32 values has a
    relative rounding error of at most 31 * 2**-24 = 1.8e-6 of the sum of
    their magnitudes, and these errors, of random sign, mostly cancel over
    the float64 sum: measured 1e-9 to 1e-7 of the standard deviation
    (means) and relative (variances) against NumPy's float64 moments.
    A result that is not finite (float32 squares of deviations past
    1.8e19, which float64 holds) is computed again in float64, so only a
    non-finite input gives non-finite moments; so is a channel whose
    variance is below `_SMALLEST_FLOAT32_VARIANCE` (zero included):
    TensorFlow flushes float32 results below 1.2e-38 to zero on CPU, so
    squares of deviations below 1.1e-19 would vanish (a spread of 1e-19
    measured 24% low, of 1e-20 as -0.0).
    """
    if x.dtype == tf.float64:
        return _column_moments_float64(x)
    x = tf.cast(x, tf.float32)
    count = tf.cast(tf.shape(x)[0], tf.float64)
    first = tf.reduce_sum(x[:1], axis=0)  # Zeros for no positions.
    rough = tf.cast(first, tf.float64) + tf.math.divide_no_nan(
        _chunked_sums(x - first), count)
    shift = tf.cast(rough, tf.float32)
    deviations = x - shift
    total = _chunked_sums(deviations)
    squares = _chunked_sums(deviations * deviations)
    offset = tf.math.divide_no_nan(total, count)
    mean = tf.cast(shift, tf.float64) + offset
    m2 = squares - total * offset
    trusted = (tf.reduce_all(tf.math.is_finite(mean))
               & tf.reduce_all(tf.math.is_finite(m2))
               & tf.reduce_all(m2 >= count * _SMALLEST_FLOAT32_VARIANCE))
    return tf.cond(trusted, lambda: (count, mean, m2),
                   lambda: _column_moments_float64(x))


def _chunked_sums(x):
    """Column sums of a float32 `[positions, channels]` matrix, as float64:
    float32 sums of `_CHUNK` rows, then float64 sums of those."""
    rows = tf.shape(x)[0]
    whole = rows // _CHUNK * _CHUNK
    chunks = tf.reshape(x[:whole], [-1, _CHUNK, tf.shape(x)[1]])
    partial = tf.cast(tf.reduce_sum(chunks, axis=1), tf.float64)
    rest = tf.cast(x[whole:], tf.float64)
    return tf.reduce_sum(partial, axis=0) + tf.reduce_sum(rest, axis=0)


def _column_moments_float64(x):
    """Float64 two-pass moments; column sums are products with a column of
    ones: the same float64 sums, faster on CPU than a column reduction for
    wide layers."""
    x = tf.cast(x, tf.float64)
    ones = tf.ones_like(x[:, :1])
    count = tf.reduce_sum(ones)
    mean = tf.math.divide_no_nan(tf.matmul(ones, x, transpose_a=True)[0],
                                 count)
    m2 = tf.matmul(ones, tf.math.squared_difference(x, mean),
                   transpose_a=True)[0]
    return count, mean, m2


def no_gradients():
    """A context in which the layers run without recording for autograd:
    PyTorch records every op on trainable weights unless told not to (as
    Keras' `predict` does); the other backends record nothing eagerly."""
    if keras.backend.backend() == "torch":
        import torch

        return torch.no_grad()
    return contextlib.nullcontext()


def batch_moments(inputs, mask, axis):
    """`(count, mean, m2)` of one batch per channel, float64 tensors.

    `mask` (or None) follows Keras' BatchNormalization: its shape is the
    input's without the last (channel) axis, and False positions are left
    out.
    """
    rank = inputs.shape.rank
    channels = inputs.shape[axis]
    x = inputs
    if axis != rank - 1:
        perm = [a for a in range(rank) if a != axis] + [axis]
        x = tf.transpose(x, perm)
    x = tf.reshape(x, [-1, channels])
    if mask is None:
        return _column_moments(x)
    x = tf.cast(x, tf.float64)
    weights = tf.cast(mask, tf.float64)
    weights = tf.reshape(
        tf.broadcast_to(weights[..., None], tf.shape(inputs)),
        [-1, channels],
    )[:, 0:1]
    count = tf.reduce_sum(weights)
    mean = tf.math.divide_no_nan(tf.reduce_sum(x * weights, axis=0), count)
    m2 = tf.reduce_sum(weights * tf.square(x - mean), axis=0)
    return count, mean, m2


def check_mask(layer, inputs, mask):
    rank = len(inputs.shape)
    axis = registry.channel_axis(layer, rank)
    if mask is not None and axis != rank - 1:
        raise ValueError(
            f"Layer '{layer.name}' receives a mask but normalizes axis "
            f"{layer.axis} of a rank-{rank} input; masked statistics follow "
            "Keras' BatchNormalization, which supports masks only with the "
            "channels on the last axis."
        )
    return axis


def statistics_state(layers):
    """The values of every non-trainable variable of `layers`."""
    return [
        (variable, np.array(keras.ops.convert_to_numpy(variable)))
        for layer in layers
        for variable in layer.non_trainable_variables
    ]


def restore_state(state):
    for variable, value in state:
        variable.assign(value)


def _spec_of(x):
    return keras.tree.map_structure(
        lambda t: tf.TensorSpec([None, *t.shape[1:]], t.dtype), x
    )


class InputStatistics:
    """The per-channel moments of some layers' inputs, batch after batch.

    The model's inference pass `model(x, training=False)` is traced once,
    with `layers` wrapped so that each call also returns the float64
    moments of the layer's inputs (`batch_moments`); later runs reuse that
    graph. With `selective=True` only one layer's moments are computed per
    run (chosen by `run(..., layer=...)` through a `tf.cond`), for
    recalibrating layer after layer with a single trace.

    Attributes:
        order: The layers the pass reaches, in the order it first calls
            them (a topological order of the model's graph).
    """

    def __init__(self, model, layers, example, selective=False):
        self.layers = list(layers)
        self._index = {id(layer): i for i, layer in enumerate(self.layers)}
        self._active = None
        self.nonfinite = {}
        self._model = model
        if keras.backend.backend() != "tensorflow":
            self._eager_order(example)
            return
        if selective:
            self._active = tf.Variable(-1, dtype=tf.int32, trainable=False)
        trace_ids = []
        captured = []

        def hook(layer, inputs, mask):
            axis = check_mask(layer, inputs, mask)
            trace_ids.append(id(layer))
            if self._active is None:
                captured.append(batch_moments(inputs, mask, axis))
                return
            channels = inputs.shape[axis]

            def nothing():
                zeros = tf.zeros([channels], tf.float64)
                return tf.zeros((), tf.float64), zeros, zeros

            captured.append(tf.cond(
                tf.equal(self._active, self._index[id(layer)]),
                lambda: batch_moments(inputs, mask, axis),
                nothing,
            ))

        def inference_pass(x):
            trace_ids.clear()
            captured.clear()
            model(x, training=False)
            return list(captured)

        # The wrappers are only needed while tracing: the concrete function
        # keeps the graph they built.
        with intercept(self.layers, hook):
            self._function = tf.function(inference_pass).get_concrete_function(
                _spec_of(example)
            )
        self._ids = list(trace_ids)
        self.order = []
        for layer_id in self._ids:
            layer = self.layers[self._index[layer_id]]
            if not any(layer is seen for seen in self.order):
                self.order.append(layer)

    @property
    def called_again(self):
        """Whether the pass calls a layer more than once."""
        return len(self._ids) != len(set(self._ids))

    def _eager_order(self, example):
        """JAX, PyTorch: the model runs as its backend runs it (eagerly,
        one op after another); one call on `example` finds the order."""
        self._function = None
        seen = []

        def hook(layer, inputs, mask):
            check_mask(layer, inputs, mask)
            seen.append(id(layer))

        state = statistics_state(self.layers)
        try:
            with intercept(self.layers, hook):
                self._model(to_numpy(example), training=False)
        finally:
            restore_state(state)
        self._ids = list(seen)
        self.order = []
        for layer_id in self._ids:
            layer = self.layers[self._index[layer_id]]
            if not any(layer is known for known in self.order):
                self.order.append(layer)

    def _eager_moments(self, x, layer):
        """Each call's `(count, mean, m2)` in NumPy float64, as
        `batch_moments` computes them (None for layers not wanted)."""
        found = []

        def hook(called, inputs, mask):
            if layer is not None and called is not layer:
                found.append(None)
                return
            axis = check_mask(called, inputs, mask)
            found.append(numpy_moments(
                keras.ops.convert_to_numpy(inputs),
                None if mask is None else keras.ops.convert_to_numpy(mask),
                axis))

        with intercept(self.layers, hook):
            self._model(to_numpy(x), training=False)
        return found

    def run(self, batches, layer=None, progbar=None):
        """Population moments over all `batches`: `{id(layer): Moments}`.

        A layer called several times pools the positions of all its calls.
        The non-trainable state of the layers is restored afterwards, so a
        layer the model calls with `training=True` leaves no trace.
        `nonfinite` then maps `id(layer)` to the index of the first batch
        (as `batches` yields them) on which the layer's inputs held NaN or
        inf, for the layers where that happened.
        """
        self.nonfinite = {}
        if self._function is None:
            per_batch = self._eager_moments
        else:
            if self._active is not None:
                self._active.assign(self._index[id(layer)])
            per_batch = self._traced_moments
        state = statistics_state(self.layers)
        totals = {}
        try:
            for number, x in enumerate(batches, start=1):
                for layer_id, moments in zip(self._ids, per_batch(x, layer)):
                    if moments is None:
                        continue
                    if not moments.finite:
                        self.nonfinite.setdefault(layer_id, number - 1)
                    totals[layer_id] = _pooled(totals.get(layer_id), moments,
                                               layer_id in self.nonfinite)
                if progbar is not None:
                    progbar.update(number)
        finally:
            restore_state(state)
        return totals

    def _traced_moments(self, x, layer):
        """Each call's `Moments` from the traced pass (None for the
        layers a selective pass did not compute)."""
        return [
            None if self._active is not None and layer_id != id(layer)
            else Moments(count.numpy(), mean.numpy(), m2.numpy())
            for layer_id, (count, mean, m2) in zip(self._ids,
                                                   self._function(x))
        ]


def _pooled(previous, moments, nonfinite):
    """`previous` merged with `moments` (None: `moments`); quietly where
    NaN or inf are known to be there (inf - inf gives NaN)."""
    if previous is None:
        return moments
    if not nonfinite:
        return previous.merge(moments)
    with np.errstate(invalid="ignore", over="ignore"):
        return previous.merge(moments)


def to_numpy(x):
    return keras.tree.map_structure(
        lambda t: t if t is None else np.asarray(t), x)


def numpy_moments(inputs, mask, axis):
    """`batch_moments` in NumPy float64: a `Moments` (not finite, quietly,
    for inputs holding NaN or inf: `Moments.finite` tells)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _numpy_moments(inputs, mask, axis)


def _numpy_moments(inputs, mask, axis):
    if mask is None:
        # A float64 copy of our own, changed in place; column sums as
        # products with a column of ones (BLAS: several times faster than
        # NumPy's reductions over the first axis, the same float64 sums).
        x = np.moveaxis(np.array(inputs, np.float64), axis, -1)
        channels = x.shape[-1]
        x = x.reshape(-1, channels)
        count = x.shape[0]
        if not count:
            return Moments(0, np.zeros(channels), np.zeros(channels))
        ones = np.ones(count)
        mean = (ones @ x) / count
        x -= mean
        np.square(x, out=x)
        return Moments(count, mean, ones @ x)
    x = np.moveaxis(np.asarray(inputs, np.float64), axis, -1)
    channels = x.shape[-1]
    x = x.reshape(-1, channels)
    weights = np.broadcast_to(np.asarray(mask, np.float64)[..., None],
                              inputs.shape).reshape(-1, channels)[:, :1]
    count = float(weights.sum())
    mean = ((x * weights).sum(axis=0) / count if count
            else np.zeros(channels))
    return Moments(count, mean, (weights * (x - mean) ** 2).sum(axis=0))
