"""Quantization-aware training with batch normalization folded in training.

>>> import keras, kerasbn
>>> model = keras.Sequential([
...     keras.Input((8, 8, 3)),
...     keras.layers.Conv2D(4, 3, use_bias=False),
...     keras.layers.BatchNormalization(),
...     keras.layers.ReLU(),
...     keras.layers.GlobalAveragePooling2D(),
...     keras.layers.Dense(2),
... ])
>>> qat = kerasbn.quantization.prepare_qat(model)
>>> [type(layer).__name__ for layer in qat.layers]  # doctest: +ELLIPSIS
['InputLayer', 'ActivationQuantizer', 'QuantizedLinear', 'GlobalAveragePooling2D', 'ActivationQuantizer', 'QuantizedLinear']
>>> qat.summary_qat.fused, qat.summary_qat.kept
(1, 0)

`prepare_qat` makes the model (see `kerasbn.layers.quantized` for the arithmetic);
`freeze_batch_statistics` / `freeze_ranges` and the `FreezeBatchStatistics`
callback freeze it in steps, as the whitepaper does; `kerasbn.export`
writes the integer artifacts from the scales it learned.
"""

import dataclasses
import warnings

import keras

from kerasbn import _keras_internal
from kerasbn import _models
from kerasbn import registry
from kerasbn.folding import graph as graph_lib
from kerasbn.folding import plan as plan_lib
from kerasbn.folding import rebuild
from kerasbn.layers.quantized import NEVER
from kerasbn.layers.quantized import ActivationQuantizer
from kerasbn.layers.quantized import QuantizedLinear

_WHERE = "kerasbn.quantization.prepare_qat"
_LINEAR = ("Conv1D", "Conv2D", "Conv3D", "DepthwiseConv1D",
           "DepthwiseConv2D", "Dense")
_FUSED_ACTIVATIONS = ("linear", "relu", "relu6")
# Layers whose output an integer runtime keeps on its input's grid: they
# move, select or drop values (max pooling selects one; zero padding adds
# an exact zero), so they need no quantizer of their own.
_SAME_GRID = (
    keras.layers.MaxPooling1D, keras.layers.MaxPooling2D,
    keras.layers.MaxPooling3D, keras.layers.GlobalMaxPooling1D,
    keras.layers.GlobalMaxPooling2D, keras.layers.GlobalMaxPooling3D,
    keras.layers.Flatten, keras.layers.Reshape, keras.layers.Permute,
    keras.layers.Dropout, keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D, keras.layers.SpatialDropout3D,
    keras.layers.GaussianDropout, keras.layers.GaussianNoise,
    keras.layers.AlphaDropout, keras.layers.ZeroPadding1D,
    keras.layers.ZeroPadding2D, keras.layers.ZeroPadding3D,
    keras.layers.Cropping1D, keras.layers.Cropping2D,
    keras.layers.Cropping3D, keras.layers.Identity,
    keras.layers.UpSampling1D, keras.layers.RepeatVector,
    QuantizedLinear, ActivationQuantizer,
)


@dataclasses.dataclass(frozen=True)
class QATSummary:
    """What `prepare_qat` did: linear layers with a normalization folded in
    (`fused`), without one (`linear`), normalizations left to train as
    they are and stay float in the artifacts (`kept`, with `reasons`:
    layer name -> why), and activation quantizers added."""

    fused: int
    linear: int
    kept: int
    quantizers: int
    reasons: dict
    float_layers: dict = dataclasses.field(default_factory=dict)

    def __str__(self):
        lines = [f"prepare_qat: {self.fused} linear layer(s) with their "
                 f"normalization folded in, {self.linear} without one, "
                 f"{self.quantizers} activation quantizer(s); "
                 f"{self.kept} normalization(s) kept float, "
                 f"{len(self.float_layers)} weight layer(s) left float."]
        lines += [f"  kept {name}: {why}" for name, why in
                  self.reasons.items()]
        lines += [f"  float {name}: {why}" for name, why in
                  self.float_layers.items()]
        return "\n".join(lines)


def _activation_of(layer):
    """The activation name a fused layer can carry for this layer, if any:
    `layer` is an activation layer an integer runtime fuses into the
    convolution before it (ReLU, ReLU6)."""
    if isinstance(layer, keras.layers.ReLU):
        plain = (float(layer.negative_slope) == 0.0
                 and float(layer.threshold) == 0.0)
        if plain and layer.max_value is None:
            return "relu"
        if plain and layer.max_value is not None and float(
                layer.max_value) == 6.0:
            return "relu6"
        return None
    if isinstance(layer, keras.layers.Activation):
        name = getattr(layer.activation, "__name__", "")
        return name if name in ("relu", "relu6") else None
    return None


def _own_activation(layer):
    activation = getattr(layer, "activation", None)
    if activation is None:
        return "linear"
    return getattr(activation, "__name__", repr(activation))


def _normalization_problem(layer):
    """Why this normalization cannot train inside a fused layer, or None."""
    if not isinstance(layer, keras.layers.BatchNormalization):
        return (f"{type(layer).__name__} is not a batch normalization; it "
                "trains as it is")
    if getattr(layer, "renorm", False):
        return "batch renormalization trains with its own corrections"
    if getattr(layer, "zero_debias", False):
        return ("zero_debias statistics; give the layer zero_debias=False "
                "to fuse it")
    if getattr(layer, "synchronized", False):
        return ("synchronized=True: the fused layer takes each replica's "
                "own batch moments")
    return None


class _Plan:
    """Which calls become one fused layer."""

    def __init__(self, graph):
        self.graph = graph
        self.groups = {}  # linear call index -> (norm call, act call, act)
        self.absorbed = {}  # fused call index -> linear call index
        self.reasons = {}  # normalization name -> why kept
        self.float_layers = {}  # weight layer name -> why left float
        for call in graph.calls:
            why = self._why_float(call)
            if why is not None:
                self.float_layers[call.operation.name] = why
            elif type(call.operation).__name__ in _LINEAR:
                self._group(call)
        for call in graph.calls:
            operation = call.operation
            if (registry.find_normalization(operation) is not None
                    and call.index not in self.absorbed):
                self.reasons.setdefault(operation.name, self._why_kept(call))

    def _why_float(self, call):
        """Why a layer with kernels is not quantized, or None."""
        layer = call.operation
        if graph_lib.is_graph_model(layer):
            return ("a nested model: prepare_qat does not enter it, so its "
                    "layers train and deploy in float; build the model "
                    "flat (its layers in the outer graph) to quantize them")
        kind = type(layer).__name__
        if kind not in _LINEAR:
            if registry.find_linear(layer) is not None:
                return f"no quantization-aware rule for {kind} yet"
            if _holds_kernels(layer):
                return (f"a {kind} layer holding Conv/Dense kernels in "
                        "sublayers: prepare_qat does not enter it, so they "
                        "train and deploy in float; call them in the "
                        "model's own graph to quantize them")
            return None
        if self.graph.call_count[id(layer)] > 1:
            return (f"called {self.graph.call_count[id(layer)]} times (a "
                    "shared kernel)")
        if kind != "Dense" and getattr(
                layer, "data_format", "channels_last") != "channels_last":
            return ("data_format='channels_first'; prepare_qat quantizes "
                    "channels_last layers (the layout TFLite and ONNX "
                    "Runtime's integer kernels take)")
        return None

    def _single_consumer(self, call):
        uses = self.graph.uses.get(call.output_ids[0], [])
        if len(call.output_ids) != 1 or len(uses) != 1:
            return None
        index = uses[0]
        if index == graph_lib.OUTPUT:
            return None
        consumer = self.graph.calls[index]
        if consumer.first_input_id() != call.output_ids[0] or len(
                consumer.input_ids) != 1:
            return None
        return consumer

    def _group(self, call):
        layer = call.operation
        own = _own_activation(layer)
        norm = act = None
        tail = call
        if own == "linear":
            consumer = self._single_consumer(call)
            if consumer is not None and self._fusable_norm(consumer, call):
                norm = tail = consumer
            consumer = self._single_consumer(tail)
            if consumer is not None and _activation_of(
                    consumer.operation) is not None and (
                    self.graph.call_count[id(consumer.operation)] == 1):
                act = consumer
        activation = (_activation_of(act.operation) if act is not None
                      else own)
        if activation not in _FUSED_ACTIVATIONS:
            activation = "linear"  # Applied after, by the layer's clone.
        self.groups[call.index] = (norm, act, activation)
        for part in (norm, act):
            if part is not None:
                self.absorbed[part.index] = call.index

    def _fusable_norm(self, call, producer):
        operation = call.operation
        if registry.find_normalization(operation) is None:
            return False
        if _normalization_problem(operation) is not None:
            return False
        if self.graph.call_count[id(operation)] > 1:
            return False
        if call.kwargs.get("training") is True:
            return False
        rank = len(self.graph.tensors[call.first_input_id()].shape)
        axis = operation.axis
        return isinstance(axis, int) and axis % rank == rank - 1

    def _why_kept(self, call):
        operation = call.operation
        problem = _normalization_problem(operation)
        if problem is not None:
            return problem
        if self.graph.call_count[id(operation)] > 1:
            return "it is called more than once"
        if call.kwargs.get("training") is True:
            return "it is called with training=True"
        producer = self.graph.producer.get(call.first_input_id())
        if producer is None:
            return "its input is a model input, with no layer before it"
        layer = self.graph.calls[producer].operation
        return (f"its input comes from {type(layer).__name__} "
                f"'{layer.name}', not from a Conv/DepthwiseConv/Dense "
                "(channels last) whose output feeds only it")


def prepare_qat(model, weight_bits=8, activation_bits=8, per_channel=True,
                range_momentum=0.99, warmup_steps=16, quantize_inputs=True):
    """A copy of a trained float model for quantization-aware training.

    Every Conv1D/2D/3D, DepthwiseConv1D/2D and Dense layer becomes a
    `QuantizedLinear`, with the batch normalization after it folded in
    (where `kerasbn.fold` would fold it backward: the layer's output feeds
    only it, on the channel axis) and a ReLU/ReLU6 after them fused in:
    one integer op, as the runtimes run it. Its kernel is fake-quantized
    to `weight_bits` (symmetric, per output channel, or per tensor with
    `per_channel=False`), its output to `activation_bits` with a range
    the training observes (`ActivationQuantizer`). Other layers that
    change values (additions, concatenations, average poolings, other
    activations, ...) and the model inputs get an `ActivationQuantizer`
    after them, because the runtime requantizes there; layers that only
    move values (max pooling, reshapes, padding) do not. Normalizations
    that cannot be fused train as they are and stay float in the exported
    artifacts; `model.summary_qat` lists them with the reason, and a
    warning names them.

    Args:
        model: a built Functional or Sequential Keras model (not changed).
        weight_bits: 2..8; 8 for int8, 4 for int4 weights.
        activation_bits: 2..16 (8 is what integer runtimes run).
        per_channel: per-output-channel weight scales (else one per layer).
        range_momentum: of the activation ranges' moving average.
        warmup_steps: training steps during which the activation
            quantizers only observe their range.
        quantize_inputs: fake-quantize the model inputs too (the runtime
            quantizes them on the way in).

    Returns:
        The QAT model, with a `summary_qat` attribute (`QATSummary`).
    """
    _check_arguments(model, weight_bits, activation_bits, per_channel,
                     range_momentum, warmup_steps, quantize_inputs)
    graph = graph_lib.read_graph(model, trace=False)
    plan = _Plan(graph)
    options = dict(weight_bits=int(weight_bits), per_channel=per_channel,
                   activation_bits=int(activation_bits),
                   range_momentum=range_momentum, warmup_steps=warmup_steps)
    builder = _Builder(graph, plan, options, quantize_inputs)
    new_model = builder.build()
    kept = {name: why for name, why in plan.reasons.items()}
    summary = QATSummary(
        fused=sum(1 for g in plan.groups.values() if g[0] is not None),
        linear=sum(1 for g in plan.groups.values() if g[0] is None),
        kept=len(kept), quantizers=builder.quantizers, reasons=kept,
        float_layers=dict(plan.float_layers))
    if kept:
        warnings.warn(
            f"{_WHERE}: {len(kept)} normalization(s) train as they are and "
            "stay float in the exported artifacts: " + "; ".join(
                f"'{name}' ({why})" for name, why in kept.items()),
            stacklevel=2)
    if plan.float_layers:
        warnings.warn(
            f"{_WHERE}: {len(plan.float_layers)} layer(s) with weights are "
            "not quantized and stay float in the exported artifacts: "
            + "; ".join(f"'{name}' ({why})"
                        for name, why in plan.float_layers.items()),
            stacklevel=2)
    new_model.summary_qat = summary
    return new_model


def _check_arguments(model, weight_bits, activation_bits, per_channel,
                     range_momentum, warmup_steps, quantize_inputs):
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        raise TypeError(
            f"{_WHERE} needs a Keras model object; got the path {model!r}. "
            "Load it first: keras.saving.load_model(path).")
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"{_WHERE} needs a Functional or Sequential Keras model; got "
            f"{type(model).__name__}. Put the layer in a "
            "keras.Model(inputs, outputs) first.")
    if not _keras_internal.is_graph_model(model):
        raise TypeError(
            f"{_WHERE} needs a Functional or Sequential Keras model; got "
            f"the subclassed model {type(model).__name__}. Build its layers "
            "in a keras.Model(inputs, outputs) graph first.")
    if is_qat_model(model):
        raise ValueError(
            f"{_WHERE}: '{model.name}' is already a QAT model (it holds "
            "QuantizedLinear layers). Train it further as it is, or prepare "
            "the float model it was made from.")
    for name, value in (("per_channel", per_channel),
                        ("quantize_inputs", quantize_inputs)):
        if not isinstance(value, bool):
            raise TypeError(f"{_WHERE}: {name} must be True or False; got "
                            f"{value!r}.")
    _check_steps(warmup_steps, "warmup_steps", _WHERE)
    if isinstance(range_momentum, bool) or not isinstance(
            range_momentum, (int, float)) or not 0 <= range_momentum < 1:
        raise ValueError(f"{_WHERE}: range_momentum must be in [0, 1); got "
                         f"{range_momentum!r}.")
    if not model.built or not model.inputs:
        raise ValueError(f"{_WHERE}: the model '{model.name}' is not built; "
                         "call it on data or give it a keras.Input first.")
    if not (isinstance(weight_bits, int) and 2 <= weight_bits <= 8):
        raise ValueError(f"{_WHERE}: weight_bits must be an int in 2..8; got "
                         f"{weight_bits!r}.")
    if not (isinstance(activation_bits, int) and 2 <= activation_bits <= 16):
        raise ValueError(f"{_WHERE}: activation_bits must be an int in "
                         f"2..16; got {activation_bits!r}.")
    if model.dtype_policy.compute_dtype != "float32" or any(
            layer.dtype_policy.compute_dtype != "float32"
            for layer in _keras_internal.sublayers(model)
            if hasattr(layer, "dtype_policy")):
        raise ValueError(
            f"{_WHERE}: the model computes in reduced precision (a mixed "
            "dtype policy); quantization-aware training simulates integer "
            "arithmetic from float32. Build the model under float32 with the "
            "same weights (kerasbn.export does this as its float32 twin) and "
            "prepare that.")


class _Builder:
    def __init__(self, graph, plan, options, quantize_inputs):
        self.graph = graph
        self.plan = plan
        self.options = options
        self.quantize_inputs = quantize_inputs
        self.quantizers = 0
        self.names = {layer.name for layer in
                      _keras_internal.sublayers(graph.model)}
        self.pending = []

    def unique(self, name):
        candidate, number = name, 1
        while candidate in self.names:
            number += 1
            candidate = f"{name}_{number}"
        self.names.add(candidate)
        return candidate

    def quantizer(self, tensor, name):
        dtype = keras.backend.standardize_dtype(tensor.dtype)
        if "float" not in dtype:
            return tensor
        self.quantizers += 1
        return ActivationQuantizer(
            bits=self.options["activation_bits"],
            momentum=self.options["range_momentum"],
            warmup_steps=self.options["warmup_steps"],
            name=self.unique(f"{name}_quantizer"))(tensor)

    def fused_layer(self, call):
        layer = call.operation
        norm, act, activation = self.plan.groups[call.index]
        normalization = None
        if norm is not None:
            bn = norm.operation
            # Corrupt statistics (NaN, inf, variance + epsilon <= 0) would
            # make NaN kernels from the first step: refused, named.
            plan_lib.inference_affine(bn)
            normalization = dict(axis=-1, epsilon=float(bn.epsilon),
                                 momentum=float(bn.momentum),
                                 center=bool(bn.center), scale=bool(bn.scale))
        config = layer.get_config()
        config = {k: v for k, v in config.items()
                  if k not in ("kernel_initializer", "bias_initializer",
                               "kernel_regularizer", "bias_regularizer",
                               "activity_regularizer", "kernel_constraint",
                               "bias_constraint", "dtype", "trainable",
                               "name", "lora_rank", "lora_alpha",
                               "quantization_config")}
        new = QuantizedLinear(
            linear={"class_name": type(layer).__name__, "config": config},
            normalization=normalization, activation=activation,
            name=layer.name, **self.options)
        self.pending.append((new, layer, None if norm is None
                             else norm.operation))
        return new

    def build(self):
        functional = self.graph.functional
        input_layers, new_inputs = rebuild.new_input_layers(functional)
        tensors = {}
        for x, layer, new in zip(functional.inputs, input_layers, new_inputs):
            value = new.output
            if self.quantize_inputs:
                value = self.quantizer(value, layer.name)
            tensors[id(x)] = value
        for call in self.graph.calls:
            if call.index in self.plan.absorbed:
                head = self.plan.absorbed[call.index]
                head_output = self.graph.calls[head].output_ids[0]
                tensors[call.output_ids[0]] = tensors[head_output]
                continue
            args, kwargs = call.node.arguments.fill_in(tensors)
            if call.index in self.plan.groups:
                outputs = self.fused_layer(call)(*args, **kwargs)
                activation = _own_activation(call.operation)
                if activation not in _FUSED_ACTIVATIONS:
                    outputs = keras.layers.Activation(
                        activation, name=self.unique(
                            f"{call.operation.name}_activation"))(outputs)
                    outputs = self.quantizer(outputs, call.operation.name)
            else:
                operation = call.operation
                new = rebuild._clone_layer(operation)
                if new is not operation and isinstance(
                        operation, keras.layers.Layer):
                    self.pending.append((new, operation, "copy"))
                outputs = new(*args, **kwargs)
                if not isinstance(operation, _SAME_GRID) and not (
                        graph_lib.is_graph_model(operation)):
                    outputs = keras.tree.map_structure(
                        lambda t: self.quantizer(t, operation.name)
                        if isinstance(t, keras.KerasTensor) else t, outputs)
            for x, y in zip(call.node.outputs, keras.tree.flatten(outputs)):
                tensors[id(x)] = y
        new_model = rebuild.functional_model(
            functional, new_inputs,
            [tensors[graph_lib.resolve(self.graph.alias, id(x))]
             for x in functional.outputs], self.graph.model.name + "_qat")
        for new, source, extra in self.pending:
            if extra == "copy":
                _models.copy_weights(source, new, _WHERE)
            else:
                _write_fused(new, source, extra)
        return new_model


def _write_fused(new, linear, norm):
    new.kernel.assign(_models.value_copy(linear.kernel))
    if new.bias is not None:
        new.bias.assign(_models.value_copy(linear.bias))
    if norm is None:
        return
    if new.gamma is not None:
        new.gamma.assign(_models.value_copy(norm.gamma))
    if new.beta is not None:
        new.beta.assign(_models.value_copy(norm.beta))
    new.moving_mean.assign(_models.value_copy(norm.moving_mean))
    new.moving_variance.assign(_models.value_copy(norm.moving_variance))


def qat_layers(model):
    """The `QuantizedLinear` and `ActivationQuantizer` layers of a model."""
    return [layer for layer in _keras_internal.sublayers(model)
            if isinstance(layer, (QuantizedLinear, ActivationQuantizer))]


def _steps_of(layer):
    return float(keras.ops.convert_to_numpy(layer.steps))


def _check_steps(value, name, where):
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where}: {name} must be an int >= 0; got "
                         f"{value!r}.")


def _check_freeze(model, after_steps, where):
    _check_steps(after_steps, "after_steps", where)
    if not is_qat_model(model):
        raise ValueError(
            f"{where}: '{getattr(model, 'name', model)}' has no "
            "QuantizedLinear layer; make it with "
            "kerasbn.quantization.prepare_qat.")


def freeze_batch_statistics(model, after_steps=0):
    """Stop the batch statistics of every fused layer of `model`, now or
    `after_steps` training steps from now: from then on the layers train
    with the moving statistics (the frozen fold the runtime runs), and the
    moving statistics stop changing. Returns the number of layers."""
    _check_freeze(model, after_steps, "freeze_batch_statistics")
    count = 0
    for layer in qat_layers(model):
        if isinstance(layer, QuantizedLinear) and layer.normalization:
            layer.statistics_frozen_at.assign(_steps_of(layer) + after_steps)
            count += 1
    return count


def freeze_ranges(model, after_steps=0):
    """Stop the activation ranges of `model` moving (now or after
    `after_steps` training steps). Returns the number of quantizers."""
    _check_freeze(model, after_steps, "freeze_ranges")
    count = 0
    for layer in qat_layers(model):
        if isinstance(layer, ActivationQuantizer):
            layer.range_frozen_at.assign(_steps_of(layer) + after_steps)
            count += 1
    return count


def _holds_kernels(layer):
    """Whether a layer is, or holds in its sublayers, a Conv/Dense-like
    kernel (`registry.find_linear`)."""
    return any(registry.find_linear(inner) is not None
               for inner in [layer] + _keras_internal.sublayers(layer))


def float_weight_layers(model):
    """Names of the layers of a QAT model that hold kernels `prepare_qat`
    did not quantize (nested models, custom layers with kernels inside,
    channels_first or shared or unsupported kernels): float while
    training, the same test as `summary_qat.float_layers`."""
    return [layer.name for layer in model.layers
            if not isinstance(layer, (QuantizedLinear, ActivationQuantizer))
            and (graph_lib.is_graph_model(layer) or _holds_kernels(layer))]


def weight_bits(model):
    """The sorted weight bit widths of a QAT model's fused layers."""
    return sorted({layer.weight_bits for layer in qat_layers(model)
                   if isinstance(layer, QuantizedLinear)})


def is_qat_model(model):
    return any(isinstance(layer, QuantizedLinear)
               for layer in _keras_internal.sublayers(model))


class FreezeBatchStatistics(keras.callbacks.Callback):
    """Freeze the batch statistics (and, with `ranges_after_steps`, the
    activation ranges) of a QAT model a number of training steps into
    `fit`, as Krishnamoorthi 2018 (section 3.2) does.

    The step is set when training begins and the layers freeze themselves
    inside the compiled train step (on JAX the trainer holds the
    variables while it runs, so a change made from a callback mid-fit
    would be lost).
    """

    def __init__(self, after_steps, ranges_after_steps=None):
        super().__init__()
        _check_steps(after_steps, "after_steps", "FreezeBatchStatistics")
        if ranges_after_steps is not None:
            _check_steps(ranges_after_steps, "ranges_after_steps",
                         "FreezeBatchStatistics")
        self.after_steps = after_steps
        self.ranges_after_steps = ranges_after_steps

    def on_train_begin(self, logs=None):
        _check_freeze(self.model, self.after_steps, "FreezeBatchStatistics")
        freeze_batch_statistics(self.model, self.after_steps)
        if self.ranges_after_steps is not None:
            freeze_ranges(self.model, self.ranges_after_steps)


def deployment_model(model):
    """The QAT model as its integer runtime computes it, for the exporter.

    Each fused layer becomes a `QuantizedLinear` without normalization,
    holding the frozen fold (`W gamma / sigma` before quantization, and
    `beta + (b - mu) gamma / sigma`); each quantizer fake-quantizes with
    its learned range, always. On TensorFlow the graph is then the
    fake-quant pattern the TFLite converter and kerasbn's ONNX handlers
    turn into integer ops. Refused while a quantizer has seen no data.
    """
    untrained = [layer.name for layer in qat_layers(model)
                 if isinstance(layer, ActivationQuantizer)
                 and _steps_of(layer) == 0]
    if untrained:
        raise ValueError(
            f"{len(untrained)} activation quantizer(s) of '{model.name}' "
            f"have no range yet (first: '{untrained[0]}'): train the QAT "
            "model (fit, or a training=True call on data) before exporting "
            "it as integers.")
    writes = []

    def clone(layer):
        if isinstance(layer, QuantizedLinear):
            config = layer.get_config()
            linear = dict(config["linear"])
            linear["config"] = dict(linear["config"], use_bias=True)
            config.update(linear=linear, normalization=None)
            new = QuantizedLinear.from_config(config)
            writes.append((new, layer))
            return new
        if isinstance(layer, ActivationQuantizer):
            new = ActivationQuantizer.from_config(layer.get_config())
            writes.append((new, layer))
            return new
        return rebuild._clone_layer(layer)

    deployed = keras.models.clone_model(model, clone_function=clone)
    sources = {id(new): old for new, old in writes}
    for new_layer, old_layer in zip(_keras_internal.sublayers(deployed),
                                    _keras_internal.sublayers(model)):
        old = sources.get(id(new_layer))
        if isinstance(new_layer, QuantizedLinear):
            kernel, shift = old.folded_float()
            new_layer.kernel.assign(kernel)
            new_layer.bias.assign(shift)
            new_layer.exporting = (kernel, shift)
            _copy_quantizer(new_layer.output_quantizer, old.output_quantizer)
        elif isinstance(new_layer, ActivationQuantizer):
            if old is not None:  # Else a fused layer's own, done above.
                _copy_quantizer(new_layer, old)
        elif new_layer.weights:
            _models.copy_weights(old_layer, new_layer, "kerasbn.export")
    return deployed


def _copy_quantizer(new, old):
    if new is None:
        return
    for name in ("range_min", "range_max", "steps", "range_frozen_at"):
        getattr(new, name).assign(_models.value_copy(getattr(old, name)))
    new.exporting = new.export_range()
