"""Argument checks shared by kerasbn's layers (one wording everywhere)."""


def check_axis_argument(axis):
    """The channel axis must be an int (not a bool, list or string)."""
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise ValueError(
            "Argument `axis` must be an integer, the index of the channel "
            f"axis. Received: axis={axis!r}. Use -1 for channels_last and 1 "
            "for channels_first."
        )
    return axis


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
