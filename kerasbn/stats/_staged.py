"""Run a staged recalibration: each layer call once, activations kept.

`_plan` says which calls run in which stage. Here each stage becomes one
function of the tensors it reads that returns the tensors later stages
read and the float64 moments of the inputs it gathers. It runs the
model's layers as the backend runs them eagerly, on every backend: a
traced function per stage cost more in tracing and instantiation than it
saved (ResNet50, 49 stages, 128 images: 0.85 s tracing and 0.45 s
instantiating against 0.7 s of work), and that fixed cost grew with the
number of stages; eagerly, the cost per stage is its arithmetic, and the
fixed cost per batch is the dispatch of one forward pass (which is why
batches are made wide, `_collect.Batches.widen`).

Between stages the kept tensors wait in an `ActivationCache`, batch by
batch: in memory up to a budget, then in `.npy` files in a temporary
directory. Without a cache (`cache="none"`) each stage recomputes what it
reads from the data instead.

The moments of a concatenation are the moments of its parts side by side
(`MomentsMemo`): DenseNet's normalizations read ever wider concatenations
of the same feature maps, and each map's moments are computed once.
"""

import os
import re
import shutil
import socket
import tempfile
import time

import keras
import numpy as np

from kerasbn import _keras_internal
from kerasbn import _processes
from kerasbn.stats import _collect

_MIB = 2.0 ** 20
_WHAT = "kerasbn.recalibrate"
# Spill directories are named `kerasbn-recalibrate-<host>-<pid>-<random>`,
# so a later run can tell those of dead processes on this host.
_SPILL = "kerasbn-recalibrate-"


def _is_tensorflow():
    return keras.backend.backend() == "tensorflow"


def nbytes(value):
    """Bytes a tensor's values take (bfloat16 and friends: 2 bytes)."""
    return _collect.input_bytes(value)


def default_memory_budget():
    """Half of the memory the system has available now (Linux, macOS),
    or 2 GiB where that cannot be read."""
    available = _processes.available_memory()
    return 2 * 1024 ** 3 if available is None else available // 2


def _host():
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def remove_stale_spills(directory=None):
    """Remove the spill directories that recalibrations killed outright
    (SIGKILL, power loss) left in `directory` (default: the system's
    temporary directory), as `export` removes its staging directories.

    Only those of this host whose process is gone: a directory of a live
    run, or of another host sharing the directory, is left alone.
    Returns the paths removed.
    """
    directory = tempfile.gettempdir() if directory is None else directory
    pattern = re.compile(re.escape(_SPILL + _host()) + r"-(\d+)-")
    removed = []
    try:
        names = os.listdir(directory)
    except OSError:
        return removed
    for name in names:
        match = pattern.match(name)
        if match and not _processes.pid_alive(int(match.group(1))):
            path = os.path.join(directory, name)
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


class ActivationCache:
    """The values of tensors between stages, keyed by (name, batch).

    `mode="auto"` keeps values in memory while the total stays within
    `budget` bytes and writes the rest to `.npy` files; `mode="disk"`
    writes everything. Files go to a new directory under `directory`
    (default: the system's temporary directory), removed by `close()`
    (one a killed process left: `remove_stale_spills`).
    """

    def __init__(self, mode, budget, directory=None):
        self.mode = mode
        self.budget = budget
        self._parent = directory
        self._dir = None
        self._memory = {}
        self._files = {}
        self.in_memory = self.on_disk = 0
        self.peak_memory = self.peak_disk = 0

    def put(self, name, batch, value):
        size = nbytes(value)
        if self.mode == "auto" and self.in_memory + size <= self.budget:
            self._memory[(name, batch)] = (value, size)
            self.in_memory += size
            self.peak_memory = max(self.peak_memory, self.in_memory)
            return
        array = np.asarray(keras.ops.convert_to_numpy(value))
        dtype = keras.backend.standardize_dtype(value.dtype)
        if array.dtype.kind not in "biuf":  # bfloat16: kept exactly as fp32
            array = array.astype(np.float32)
        try:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(
                    prefix=f"{_SPILL}{_host()}-{os.getpid()}-",
                    dir=self._parent)
            path = os.path.join(self._dir, f"{name}-{batch}.npy")
            np.save(path, array)
        except OSError as error:
            where = self._dir or self._parent or tempfile.gettempdir()
            raise OSError(
                error.errno,
                f"{_WHAT}: cannot keep {size / _MIB:.1f} MiB of activations "
                f"on disk in {where!r} ({self.on_disk / _MIB:.1f} MiB "
                f"written so far): {error.strerror or error}. Pass cache_dir "
                "on a disk with room, a larger memory_budget, or "
                "cache='none' (recompute instead of keeping); the model "
                "is unchanged.") from error
        self._files[(name, batch)] = (path, dtype, size)
        self.on_disk += size
        self.peak_disk = max(self.peak_disk, self.on_disk)

    def get(self, name, batch):
        if (name, batch) in self._memory:
            return self._memory[(name, batch)][0]
        path, dtype, _ = self._files[(name, batch)]
        return keras.ops.convert_to_tensor(np.load(path), dtype=dtype)

    def __contains__(self, key):
        return key in self._memory or key in self._files

    def drop(self, name):
        """Forget every batch of `name`."""
        for key in [k for k in self._memory if k[0] == name]:
            self.in_memory -= self._memory.pop(key)[1]
        for key in [k for k in self._files if k[0] == name]:
            path, _, size = self._files.pop(key)
            os.remove(path)
            self.on_disk -= size

    def close(self):
        self._memory.clear()
        self._files.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def value_name(tensor):
    return f"t{tensor}"


def mask_name(tensor):
    return f"m{tensor}"


class Clock:
    """Seconds spent in each part of a recalibration, for `verbose=2`."""

    PARTS = ("copy", "trace", "data", "layers", "moments", "cache", "write")

    def __init__(self):
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.started = time.perf_counter()

    def add(self, part, start):
        """Add the time since `start` (a `time.perf_counter()`) to `part`;
        returns now."""
        now = time.perf_counter()
        self.seconds[part] += now - start
        return now

    def line(self):
        """The parts, then `other` (checks, planning, restoring: the rest
        of the time since the clock was made) and the total."""
        total = time.perf_counter() - self.started
        other = max(total - sum(self.seconds.values()), 0.0)
        parts = ", ".join(f"{part} {seconds:.2f} s"
                          for part, seconds in self.seconds.items())
        return f"Time: {parts}, other {other:.2f} s (total {total:.2f} s)"


class MomentsMemo:
    """The moments of tensors per batch, shared by the stages.

    A normalization whose input is a `Concatenate` output along its
    channel axis gets the moments of each part (per channel, so the
    concatenation's are the parts' side by side: the same float64
    numbers) and reuses those already known. Only the moments of tensors
    a `Concatenate` reads are kept, per (tensor, batch, channel axis),
    and dropped with the cached activations (`drop`); masked inputs are
    not memoized.
    """

    def __init__(self, plan, enabled=True):
        self.enabled = enabled
        self._producer = {t: step for step in plan.steps
                          for t in step.outputs}
        self._concatenated = {
            t for step in plan.steps
            if isinstance(step.operation, keras.layers.Concatenate)
            for t in step.inputs}
        self._entries = {}

    def drop(self, tensor):
        for key in [k for k in self._entries if k[0] == tensor]:
            del self._entries[key]

    def moments(self, layer, tensor, value, mask, values, batch):
        """The `Moments` of `value` (tensor id `tensor`, one batch) as
        the input of `layer`."""
        axis = _collect.check_mask(layer, value, mask)
        if mask is not None or not self.enabled or tensor is None:
            return _moments_of(value, mask, axis)
        return self._of(tensor, lambda: value, axis, values, batch)

    def _of(self, tensor, get_value, axis, values, batch):
        key = (tensor, batch, axis)
        if key in self._entries:
            return self._entries[key]
        parts = self._parts(tensor, axis)
        if parts is None:
            result = _moments_of(get_value(), None, axis)
        else:
            pieces = []
            for part, start, stop in parts:
                if part in values:
                    getter = (lambda part=part: values[part])
                else:
                    getter = (lambda start=start, stop=stop: _channels(
                        get_value(), axis, start, stop))
                pieces.append(self._of(part, getter, axis, values, batch))
            result = _collect.Moments.side_by_side(pieces)
        if tensor in self._concatenated:
            self._entries[key] = result
        return result

    def _parts(self, tensor, axis):
        """`[(part tensor id, first channel, end)]` if `tensor` is the
        output of a Concatenate along `axis` of parts with static channel
        counts and its own dtype, else None."""
        step = self._producer.get(tensor)
        if step is None or not isinstance(step.operation,
                                          keras.layers.Concatenate):
            return None
        (output,) = step.node.outputs
        rank = len(output.shape)
        if step.operation.axis % rank != axis % rank:
            return None
        parts, start = [], 0
        for part, symbolic in zip(step.inputs, step.node.input_tensors):
            width = symbolic.shape[axis]
            if (width is None or len(symbolic.shape) != rank
                    or symbolic.dtype != output.dtype):
                return None
            parts.append((part, start, start + width))
            start += width
        return parts


def _channels(value, axis, start, stop):
    index = [slice(None)] * len(value.shape)
    index[axis] = slice(start, stop)
    return value[tuple(index)]


class Stage:
    """What runs one stage on one batch.

    Input: `{name: value}` for the tensors it reads (`t<id>`) and their
    masks (`m<id>`). Output: the same for the tensors later stages read,
    plus `g<step>` -> the moments gathered from that step's inputs (a
    `Moments`, a list of them for an opaque call's inner layer, or None).
    """

    def __init__(self, number, steps, runs, reads, keeps):
        self.number = number
        self.steps = steps
        self.runs = runs
        self.reads = reads
        self.keeps = keeps
        self.order = {}  # Opaque step index -> inner layers in call order.

    def __call__(self, feed, memo, batch, clock):
        values = {}
        for tensor in self.reads:
            value = feed[value_name(tensor)]
            mask = feed.get(mask_name(tensor))
            if mask is not None:
                _keras_internal.set_keras_mask(value, mask)
            values[tensor] = value
        out = {}
        start = time.perf_counter()
        for step in self.steps:
            if step.index in self.runs:
                run_step(step, values)
            if self.number in step.gather_stages:
                _settle(values, step.inputs)
                start = clock.add("layers", start)
                out[f"g{step.index}"] = self._gather(step, values, memo,
                                                     batch)
                start = clock.add("moments", start)
        clock.add("layers", start)
        for tensor in self.keeps:
            value = values[tensor]
            out[value_name(tensor)] = value
            mask = _keras_internal.keras_mask(value)
            if mask is not None:
                out[mask_name(tensor)] = mask
        return out

    def _gather(self, step, values, memo, batch):
        if step.kind == "target":
            args, kwargs = _arguments(step, values)
            mask = kwargs.get("mask")
            if mask is None:
                mask = _keras_internal.keras_mask(args[0])
            known = dict(zip(map(id, step.node.input_tensors), step.inputs))
            tensor = known.get(id(step.node.arguments.args[0])) if (
                step.node.arguments.args) else None
            return memo.moments(step.operation, tensor, args[0], mask,
                                values, batch)
        return self._gather_inside(step, values)

    def _gather_inside(self, step, values):
        """The moments of the k-th inner normalization the opaque call
        reaches (k = this stage - its first gather stage), all its calls
        pooled; None if the call reaches fewer."""
        k = self.number - step.gather_stage
        seen, found = [], []

        def hook(layer, inputs, mask):
            if not any(layer is known for known in seen):
                seen.append(layer)
            if len(seen) > k and layer is seen[k]:
                axis = _collect.check_mask(layer, inputs, mask)
                found.append(_moments_of(inputs, mask, axis))

        with _collect.intercept(step.inner, hook):
            run_step(step, dict(values), keep=False)
        self.order[step.index] = list(seen)
        return found or None


def _settle(values, tensors):
    """Wait for the values of `tensors` (JAX dispatches asynchronously),
    so that the clock gives the layers their own time."""
    for tensor in tensors:
        wait = getattr(values.get(tensor), "block_until_ready", None)
        if callable(wait):
            wait()


def _arguments(step, values):
    known = {id(x): values[tensor]
             for x, tensor in zip(step.node.input_tensors, step.inputs)}
    return step.node.arguments.fill_in(known)


def run_step(step, values, keep=True):
    """Call `step`'s operation (in inference mode) on `values` (tensor id ->
    value); with `keep`, put its outputs into `values`."""
    args, kwargs = _arguments(step, values)
    if "training" in _keras_internal.call_context_args(step.operation):
        kwargs["training"] = False
    outputs = step.operation(*args, **kwargs)
    if keep:
        for tensor, value in zip(step.outputs, keras.tree.flatten(outputs)):
            values[tensor] = value


def _moments_of(inputs, mask, axis):
    """One batch's float64 `Moments` of `inputs` per channel."""
    if _is_tensorflow():
        count, mean, m2 = _collect.batch_moments(inputs, mask, axis)
        return _collect.Moments(count.numpy(), mean.numpy(), m2.numpy())
    return _collect.numpy_moments(
        keras.ops.convert_to_numpy(inputs),
        None if mask is None else keras.ops.convert_to_numpy(mask), axis)


def as_moments(value):
    """A gathered value (Moments, or a list of them for a layer called
    several times) as one `Moments`, or None."""
    if value is None:
        return None
    if isinstance(value, list):
        total = None
        for item in value:
            item = as_moments(item)
            total = item if total is None else total.merge(item)
        return total
    return value


def build_stages(plan, recompute):
    """One `Stage` per stage of `plan`.

    With the cache, stage n runs only the calls of stage n: it reads the
    tensors final before it (kept by earlier stages; the model's inputs
    from the data in stage 1) and keeps those of its own that later
    stages read. With `recompute`, it runs every call it needs from the
    model's inputs, and keeps nothing.
    """
    producer = {t: step for step in plan.steps for t in step.outputs}
    inputs = set(plan.inputs)
    final_in = {}  # stage -> the tensors final from it that a later reads.
    for tensor, used in plan.uses.items():
        if max(used) > plan.stage_of[tensor]:
            final_in.setdefault(plan.stage_of[tensor], []).append(tensor)
    stages = []
    for number in range(1, plan.num_stages + 1):
        keeps = [] if recompute else final_in.get(number, [])
        gathering = plan.gathered_in(number)
        pending = list(keeps) + [t for step in gathering for t in step.inputs]
        runs, reads = set(), set()
        while pending:
            tensor = pending.pop()
            readable = tensor in inputs or (
                not recompute and plan.stage_of[tensor] < number)
            if readable:
                reads.add(tensor)
                continue
            step = producer[tensor]
            if step.index not in runs:
                runs.add(step.index)
                pending.extend(step.inputs)
        steps = [step for step in plan.steps
                 if step.index in runs or number in step.gather_stages]
        stages.append(Stage(number, steps, runs, sorted(reads), keeps))
    return stages
