"""Reading the model files users already have.

- `.keras`: Keras 3's own format (`keras.models.load_model`).
- `.h5` / `.hdf5`: Keras 2 (tf.keras) HDF5 models, translated to Keras 3
  (`kerasbn.sources.keras2`).
- SavedModel directories (Keras 2 `model.save(dir)`, Keras 3
  `model.export(dir)`, `tf.saved_model.save`) and TF1 frozen GraphDefs
  (`.pb`): read as TensorFlow graphs, folded at graph level
  (`kerasbn.sources.saved_model`, `kerasbn.folding.tfgraph`).

`detect(path)` tells which, from the file's first bytes and the
directory's contents; it imports nothing heavy, so `kerasbn-fold` refuses
a wrong path before TensorFlow loads.
"""

import os
import zipfile

KERAS, H5, SAVED_MODEL, GRAPH_DEF = "keras", "h5", "saved_model", "graph_def"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


def is_saved_model(path):
    """Whether `path` is a directory holding a SavedModel."""
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, f))
        for f in ("saved_model.pb", "saved_model.pbtxt"))


def saved_model_hint(path):
    """Why directory `path` is not a SavedModel, with what to pass instead."""
    versions = sorted(
        (d for d in os.listdir(path) if is_saved_model(os.path.join(path, d))),
        key=lambda d: (not d.isdigit(), int(d) if d.isdigit() else 0, d))
    found = (f"; it holds SavedModel(s) in {versions}: pass "
             f"{os.path.join(path, versions[-1])}" if versions else
             "; pass a SavedModel directory (model.save(dir) in Keras 2, "
             "model.export(dir) in Keras 3) or a .keras/.h5 file")
    return f"{path} is a directory without saved_model.pb{found}"


class UnknownSource(ValueError):
    """`path` is none of the model files kerasbn reads; one-line message."""


def detect(path):
    """`"keras"`, `"h5"`, `"saved_model"` or `"graph_def"` for `path`.

    Raises `UnknownSource` saying what `path` is and what to pass instead.
    """
    if not os.path.exists(path):
        raise UnknownSource(f"model file not found: {path}")
    if os.path.isdir(path):
        if is_saved_model(path):
            return SAVED_MODEL
        raise UnknownSource(saved_model_hint(path))
    with open(path, "rb") as f:
        head = f.read(8)
    if head == _HDF5_MAGIC:
        return H5
    if zipfile.is_zipfile(path):
        return KERAS
    if path.endswith(".pb"):
        return GRAPH_DEF
    if path.endswith(".keras"):
        raise UnknownSource(
            f"{path} is not a Keras model file (a .keras file is a zip "
            "archive): save the model with model.save('model.keras')")
    if path.endswith((".h5", ".hdf5")):
        raise UnknownSource(
            f"{path} is not an HDF5 file (its first bytes are {head!r}): "
            "pass the file Keras 2's model.save('model.h5') wrote")
    raise UnknownSource(
        f"{path} is not a model file kerasbn reads: pass a Keras 3 .keras "
        "file, a Keras 2 .h5 file, a SavedModel directory or a TF1 frozen "
        ".pb GraphDef")
