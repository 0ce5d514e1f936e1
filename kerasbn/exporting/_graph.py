"""The steps of `fold_saved_model` that differ from a Keras model's export.

Reading the source (`kerasbn.sources.saved_model`), its verification
inputs and reference outputs, and folding at graph level
(`kerasbn.folding.tfgraph`); staging, writing and verifying are
`_pipeline`'s, shared with `export`.
"""

import os

import numpy as np

from kerasbn import _batches
from kerasbn.exporting import _pipeline
from kerasbn.exporting._signature import GraphSignature

WHERE = "kerasbn.fold_saved_model"


def read_source(path, signature_key):
    """`(GraphSource, GraphSignature)` of a SavedModel dir or frozen .pb."""
    from kerasbn.sources import saved_model

    if isinstance(path, saved_model.GraphSource):
        return path, GraphSignature(path)
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{WHERE}: `source` must be a path to a SavedModel "
                        f"directory or a frozen .pb; received {path!r}")
    path = os.fspath(path)
    if os.path.isdir(path):
        source = saved_model.load_saved_model(path, signature_key)
    elif os.path.isfile(path):
        source = saved_model.load_frozen_graph(path)
    else:
        raise saved_model.SourceError(f"{path} does not exist")
    return source, GraphSignature(source)


def verification_inputs(signature, sample, batch_sizes, verify):
    """Like `_pipeline.verification_inputs`, but random inputs need every
    non-batch dimension known (a graph has no Keras model to say what an
    unknown one should be), and a fixed batch dimension is kept."""
    if sample is None and verify:
        unknown = signature.unknown_dimensions()
        if unknown:
            name, shape = next(iter(unknown.items()))
            raise ValueError(
                f"{WHERE}: input {name!r} has unknown dimensions "
                f"{_shape_text(shape)}, which random sample data cannot "
                "fill: pass real inputs (CLI: --sample FILE.npz with one "
                f"array per input name {signature.input_names}; API: "
                "sample=)")
        fixed = {s.shape[0] for s in signature.input_specs} - {None}
        if fixed:
            batch_sizes = tuple(fixed)[:1]
    return _pipeline.verification_inputs(signature, sample, batch_sizes,
                                         verify)


def _shape_text(shape):
    if shape.rank is None:
        return "(unknown rank)"
    return "(" + ", ".join("None" if d is None else str(d)
                           for d in shape) + ")"


def reference_outputs(source, arrays):
    """The source's own outputs on `arrays`, which must all be finite."""
    import tensorflow as tf

    flat = [np.asarray(a) for a in source.reference(
        *[tf.constant(a) for a in arrays])]
    bad = _batches.nonfinite_count(flat)
    if bad:
        raise ValueError(
            f"{WHERE}: the source model itself outputs {bad} NaN or infinite "
            "value(s) on finite inputs, so no artifact can be verified "
            "against it; check its weights and statistics")
    return flat


def fold(source, name, fold_on, progress):
    """`(FrozenGraph of the folded graph, FoldReport or None)`."""
    from kerasbn.folding import tfgraph
    from kerasbn.sources.saved_model import FrozenGraph

    graph_def, report = source.graph_def, None
    if fold_on:
        progress("folding batch normalization in the TensorFlow graph")
        graph_def, report = tfgraph.fold_graph_def(
            source.graph_def, source.output_tensors, name)
    model = FrozenGraph(graph_def, source.input_tensors,
                        source.output_tensors, source.input_specs, name)
    return model, report
