"""User data as flat input batches, checked: one reader for every tool.

`export` (calibration and validation data) and `quantization_report`
accept the same things: arrays (one, a list in the model's input order,
or a dict by input name), or an iterable of such batches (a
`tf.data.Dataset`, a generator; `(x, y[, w])` elements give their `x`).
This module turns them into lists of NumPy arrays in input order and
refuses what cannot be used, naming the argument. NumPy and Keras' tree
utilities only: no TensorFlow.
"""

import collections

import keras
import numpy as np

BATCH = 32

# What a model's flat inputs must look like: names, shapes (batch axis
# first, None = any) and NumPy dtypes; `aliases`, the name the model
# itself gives each input where the artifacts change it ("1 in" served as
# "input_0_1_in"), or None.
Inputs = collections.namedtuple("Inputs",
                                ["names", "shapes", "dtypes", "aliases"],
                                defaults=(None,))
# The keys a dict (or .npz) may give the one input of a one-input model
# under, whatever the input is called, when it is the only key: NumPy's
# name for an array saved without one (`np.savez(path, array)`, read back
# by `dict(np.load(path))`) and Keras' name for a model's inputs
# (`model.predict(x)`). Any other key must name an input: a misnamed one
# is refused, not fed to whichever input there is.
ONE_INPUT_KEYS = ("arr_0", "x")


def model_inputs(model):
    """The `Inputs` of a built Keras model, named as Keras names them."""
    tensors = list(getattr(model, "inputs", None) or [])
    return Inputs(
        names=[t.name for t in tensors],
        shapes=[(None,) + tuple(t.shape[1:]) for t in tensors],
        dtypes=[np.dtype(keras.backend.standardize_dtype(t.dtype))
                for t in tensors])


def nonfinite_count(arrays):
    """How many NaN/inf values the floating arrays among `arrays` hold."""
    return sum(int(a.size - np.count_nonzero(np.isfinite(a))) for a in arrays
               if np.issubdtype(a.dtype, np.inexact))


def flatten(inputs, sample, what="sample"):
    """User sample (array, list, tuple or dict) -> flat list of arrays cast
    to `inputs.dtypes`; a `ValueError` names `what` on a mismatch.

    A dict gives each input under its name (or its alias); other keys are
    not read. A one-input model also takes a dict of one array under a key
    of `ONE_INPUT_KEYS`."""
    if isinstance(sample, dict):
        flat = _by_name(inputs, sample, what)
    elif isinstance(sample, (list, tuple)):
        flat = list(sample)
    else:
        flat = [sample]
    if len(flat) != len(inputs.names):
        raise ValueError(
            f"`{what}` gives {len(flat)} input(s) but the model has "
            f"{len(inputs.names)}: {inputs.names}.")
    arrays = []
    for value, name, shape, dtype in zip(flat, inputs.names, inputs.shapes,
                                         inputs.dtypes):
        with np.errstate(over="ignore", invalid="ignore"):
            # Out-of-range values become inf; the callers report them.
            value = np.asarray(value, dtype=dtype)
        if value.ndim != len(shape) or any(
                d is not None and d != v
                for d, v in zip(shape[1:], value.shape[1:])):
            raise ValueError(
                f"`{what}` for input {name!r} has shape {value.shape}; the "
                f"model expects {tuple(shape)} (None = any).")
        arrays.append(value)
    return arrays


def _by_name(inputs, sample, what):
    """The arrays of dict `sample` in input order (see `flatten`)."""
    aliases = inputs.aliases or inputs.names
    flat, missing = [], []
    for name, alias in zip(inputs.names, aliases):
        key = name if name in sample else alias
        if key in sample:
            flat.append(sample[key])
        else:
            missing.append(name)
    if not missing:
        return flat
    keys = [str(k) for k in sample]
    if len(inputs.names) > 1:
        raise ValueError(
            f"`{what}` is missing inputs {missing} (its keys: {keys}); the "
            f"model's inputs are {inputs.names}: key each array by the name "
            "of its input.")
    if len(keys) == 1 and keys[0] in ONE_INPUT_KEYS:
        return list(sample.values())
    name = aliases[0]  # The model's own name for it, which users know.
    served = (f" (served as {inputs.names[0]!r})"
              if name != inputs.names[0] else "")
    saved = (f"np.savez(path, {name}=array)" if name.isidentifier() else
             f"np.savez(path, **{{{name!r}: array}})")
    raise ValueError(
        f"`{what}` has no array for the model's input {name!r}{served}: "
        f"its key(s) {keys} name no input. Key the array {name!r} (a .npz: "
        f"{saved}) or pass it unnamed (np.savez(path, array), whose key is "
        "'arr_0').")


def read_batches(inputs, data, what, where, cli_flag=None):
    """`data` as a list of flat input batches, checked.

    Arrays are cut into batches of `BATCH`. Every batch must fit `inputs`
    and hold only finite values; there must be at least one sample.
    Errors name `what` (the argument) and `where` (the function).
    """
    if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__"):
        also = f" or use the CLI's {cli_flag}" if cli_flag else ""
        raise TypeError(
            f"{where}: argument `{what}` must be arrays (NumPy, a list or a "
            "dict by input name), a tf.data.Dataset or a generator of "
            f"batches, not a path ({data!r}); load the file first (e.g. "
            f"dict(np.load(path))){also}.")
    if _is_arrays(data):
        flat = _checked(inputs, data, what, where, 0)
        total = flat[0].shape[0]
        batches = [[a[i:i + BATCH] for a in flat]
                   for i in range(0, total, BATCH)]
    else:
        try:
            iterator = iter(data)
        except TypeError:
            raise TypeError(
                f"{where}: argument `{what}` must be arrays (NumPy, a list "
                "or a dict by input name), a tf.data.Dataset or a generator "
                f"of batches. Received: {type(data).__name__}.") from None
        batches = [_checked(
            inputs, keras.utils.unpack_x_y_sample_weight(element)[0],
            what, where, i) for i, element in enumerate(iterator)]
    batches = [b for b in batches if b[0].shape[0] > 0]
    if not batches:
        raise ValueError(
            f"{where}: argument `{what}` holds no samples. Pass a few "
            "hundred representative inputs (e.g. training images).")
    return batches


def joined(batches, limit=None):
    """The batches as one flat batch (at most `limit` samples)."""
    flat = [np.concatenate(parts, axis=0) for parts in zip(*batches)]
    return flat if limit is None else [a[:limit] for a in flat]


def _is_arrays(data):
    if isinstance(data, dict):
        return True
    if isinstance(data, (list, tuple)):
        return all(hasattr(v, "shape") for v in data)
    return hasattr(data, "shape") and hasattr(data, "dtype")


def _checked(inputs, batch, what, where, index):
    try:
        flat = flatten(inputs, _to_numpy(batch), what=what)
    except ValueError as error:
        raise ValueError(f"{where}: batch {index} of {error}") from None
    for name, array in zip(inputs.names, flat):
        bad = nonfinite_count([array])
        if bad:
            raise ValueError(
                f"{where}: argument `{what}` must hold finite values; "
                f"batch {index}, input {name!r} has {bad} NaN or infinite "
                f"value(s) out of {array.size}. Quantization ranges taken "
                "from them would be meaningless: clean the data (e.g. "
                "drop those samples).")
    return flat


def _to_numpy(value):
    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_numpy(v) for v in value]
    if hasattr(value, "numpy"):
        return value.numpy()
    return value
