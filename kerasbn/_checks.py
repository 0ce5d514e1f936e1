"""Argument checks shared by the whole package, in one wording.

Every message reads "<where>: Argument `name` must be <what>. Received:
name=<value>. <what to do>", and each condition raises one exception type:

- a value of the wrong type (a model that is not a `keras.Model`, a flag
  that is not a bool): `TypeError`;
- a value of the right type outside its range (a negative count, a
  momentum above 1, an unbuilt model): `ValueError`.

`where` is the public function's name (e.g. "kerasbn.recalibrate") and is
left out for layer constructors, whose traceback already names them.
"""

import math
import numbers

import keras


def first_line(error, limit=None):
    """The first line of an exception's message, cut at `limit` characters
    (for one-line error messages that quote a library's error)."""
    lines = str(error).strip().splitlines()
    line = lines[0] if lines else ""
    return line if limit is None else line[:limit]


def _prefix(where):
    return f"{where}: " if where else ""


def _hint(hint):
    return f" {hint}" if hint else ""


def argument_error(name, requirement, value, where=None, hint="",
                   error=ValueError):
    """An exception in the package's one wording (returned, not raised).

    >>> str(argument_error("steps", "a positive integer", 0, "kerasbn.x"))
    'kerasbn.x: Argument `steps` must be a positive integer. Received: steps=0.'
    """
    return error(
        f"{_prefix(where)}Argument `{name}` must be {requirement}. "
        f"Received: {name}={value!r}.{_hint(hint)}"
    )


def is_integer(value):
    """A Python or NumPy integer that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_bool(name, value, where=None):
    """`value` must be True or False (TypeError otherwise)."""
    if not isinstance(value, bool):
        raise argument_error(name, "True or False", value, where,
                             error=TypeError)
    return value


def check_int(name, value, minimum=1, where=None, hint="", allow_none=False):
    """An integer `>= minimum` (or None if `allow_none`), as a Python int.

    >>> check_int("buffer_size", 16)
    16
    >>> check_int("buffer_size", 0, hint="Use 16.")
    Traceback (most recent call last):
    ...
    ValueError: Argument `buffer_size` must be a positive integer. Received: buffer_size=0. Use 16.
    """
    if value is None and allow_none:
        return None
    if not is_integer(value) or value < minimum:
        requirement = (
            "a positive integer" if minimum == 1
            else f"an integer >= {minimum}"
        )
        if allow_none:
            requirement += " or None"
        raise argument_error(name, requirement, value, where, hint)
    return int(value)


def check_number(name, value, low=None, high=None, where=None, hint="",
                 low_open=False, high_open=False):
    """A finite real number in `[low, high]` (ends open if asked), as float.

    >>> check_number("momentum", 0.99, 0.0, 1.0)
    0.99
    >>> check_number("epsilon", -1.0, 0.0, low_open=True)
    Traceback (most recent call last):
    ...
    ValueError: Argument `epsilon` must be a number > 0.0. Received: epsilon=-1.0.
    """
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    number = float(value) if ok else math.nan
    if ok and math.isfinite(number):
        ok = (
            (low is None or (number > low if low_open else number >= low))
            and (high is None
                 or (number < high if high_open else number <= high))
        )
    else:
        ok = False
    if not ok:
        if low is not None and high is not None:
            left = "(" if low_open else "["
            right = ")" if high_open else "]"
            requirement = f"a number in {left}{low}, {high}{right}"
        elif low is not None:
            requirement = f"a number {'>' if low_open else '>='} {low}"
        elif high is not None:
            requirement = f"a number {'<' if high_open else '<='} {high}"
        else:
            requirement = "a finite number"
        raise argument_error(name, requirement, value, where, hint)
    return number


def check_momentum(name, value, allow_one=True, hint=""):
    """A moving-average momentum in `[0, 1]` (`[0, 1)` if not `allow_one`).

    >>> check_momentum("momentum", 1.5, hint="Typical values are 0.9 to 0.999.")
    Traceback (most recent call last):
    ...
    ValueError: Argument `momentum` must be a number in [0.0, 1.0]. Received: momentum=1.5. Typical values are 0.9 to 0.999.
    """
    return check_number(name, value, 0.0, 1.0, hint=hint,
                        high_open=not allow_one)


def check_axis(axis):
    """The channel axis must be an int (not a bool, list or string)."""
    if not is_integer(axis):
        raise argument_error(
            "axis", "an integer, the index of the channel axis", axis,
            hint="Use -1 for channels_last and 1 for channels_first.")
    return int(axis)


def channels_of(axis, input_shape):
    """Size of the channel axis of `input_shape`, checked.

    >>> channels_of(-1, (None, 5, 3))
    3
    >>> channels_of(3, (None, 5, 3))
    Traceback (most recent call last):
    ...
    ValueError: Axis 3 is out of bounds for an input of rank 3 (shape (None, 5, 3)). Pass the channel axis, e.g. axis=-1 for channels_last or axis=1 for channels_first.
    """
    rank = len(input_shape)
    if not -rank <= axis < rank:
        raise ValueError(
            f"Axis {axis} is out of bounds for an input of rank {rank} "
            f"(shape {tuple(input_shape)}). Pass the channel axis, e.g. "
            "axis=-1 for channels_last or axis=1 for channels_first."
        )
    channels = input_shape[axis]
    if channels is None:
        raise ValueError(
            f"The channel axis {axis} of the input must have a known size. "
            f"Received input shape {tuple(input_shape)}."
        )
    return channels


def check_model(model, where, built=True):
    """`model` must be a (built) `keras.Model`.

    >>> check_model("model.keras", "kerasbn.fold")
    Traceback (most recent call last):
    ...
    TypeError: kerasbn.fold: Argument `model` must be a keras.Model. Received: model='model.keras'. Load a model file with keras.models.load_model(path), or wrap a layer in a model, e.g. keras.Sequential([keras.Input(shape), layer]).
    """
    if not isinstance(model, keras.Model):
        shown = model if isinstance(model, (str, bytes, type(None))) else (
            _Shown(model))
        raise argument_error(
            "model", "a keras.Model", shown, where, error=TypeError,
            hint="Load a model file with keras.models.load_model(path), or "
            "wrap a layer in a model, e.g. "
            "keras.Sequential([keras.Input(shape), layer]).")
    if built and not model.built:
        raise ValueError(
            f"{_prefix(where)}model '{model.name}' is not built. Call it on "
            "a batch, or call model.build(input_shape), first."
        )
    return model


class _Shown:
    """Shows an object as `<type Name: first 60 characters>` in errors."""

    def __init__(self, value):
        self.value = value

    def __repr__(self):
        text = repr(self.value)
        if len(text) > 60:
            text = text[:57] + "..."
        return f"<{type(self.value).__name__}: {text}>"
