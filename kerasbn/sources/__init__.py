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
import subprocess
import sys
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


_EXTENSIONS = {".keras": KERAS, ".h5": H5, ".hdf5": H5, ".pb": GRAPH_DEF}
# What each kind of file is, in the words of a refusal.
_WHAT = {KERAS: "a Keras 3 .keras file (a zip archive)",
         H5: "a Keras 2 HDF5 file", GRAPH_DEF: "a TensorFlow GraphDef"}
_CONTENT = {KERAS: ("a zip archive", "if it is a Keras 3 model, rename it "
                    "to .keras"),
            H5: ("an HDF5 file", "if it is a Keras 2 model, rename it to "
                 ".h5")}


def detect(path):
    """`"keras"`, `"h5"`, `"saved_model"` or `"graph_def"` for `path`.

    A file is told by its first bytes (HDF5's signature, a zip archive's
    directory) and, where it has one, by its extension: a `.keras`,
    `.h5`/`.hdf5` or `.pb` file must be what its extension says (Keras
    itself loads by extension), so a file renamed, truncated before its
    zip directory or missing its HDF5 signature is refused here. Raises
    `UnknownSource` saying what `path` is and what to pass instead.
    """
    if not os.path.exists(path):
        raise UnknownSource(f"model file not found: {path}")
    if os.path.isdir(path):
        if is_saved_model(path):
            return SAVED_MODEL
        raise UnknownSource(saved_model_hint(path))
    with open(path, "rb") as f:
        head = f.read(8)
    content = (H5 if head == _HDF5_MAGIC else
               KERAS if zipfile.is_zipfile(path) else None)
    named = _EXTENSIONS.get(os.path.splitext(path)[1].lower())
    if named is None and content is not None:
        return content
    if named is not None and named == content:
        return named
    if named == GRAPH_DEF and content is None:
        return GRAPH_DEF  # A protocol buffer has no signature to check.
    raise UnknownSource(_mismatch(path, named, content, head))


def _mismatch(path, named, content, head):
    """Why `path` (extension says `named`, bytes say `content`) is refused."""
    if named is None:
        return (f"{path} is not a model file kerasbn reads: pass a Keras 3 "
                ".keras file, a Keras 2 .h5 file, a SavedModel directory or "
                "a TF1 frozen .pb GraphDef")
    if content is not None:
        what, hint = _CONTENT[content]
        return (f"{path} is {what}, not {_WHAT[named]} as its extension "
                f"says: {hint}")
    if named == KERAS:
        return (f"{path} is not a Keras model file (a .keras file is a zip "
                "archive, and this one has no zip directory: truncated or "
                "corrupt?): save the model with model.save('model.keras')")
    return (f"{path} is not an HDF5 file (its first bytes are {head!r}: "
            "truncated or corrupt?): pass the file Keras 2's "
            "model.save('model.h5') wrote")


def saved_model_damage(path):
    """Which file of the SavedModel directory `path` is unreadable, and
    why, in a few words; None if every file reads.

    For a SavedModel TensorFlow could not load: its error rarely names
    the file ("Read less bytes than requested"). This parses
    `saved_model.pb` and reads every tensor of `variables/` (their
    checksums included). Imports TensorFlow.
    """
    import tensorflow as tf
    from tensorflow.core.protobuf import saved_model_pb2

    graph = os.path.join(path, "saved_model.pb")
    if os.path.isfile(graph):
        proto = saved_model_pb2.SavedModel()
        try:
            with open(graph, "rb") as f:
                proto.ParseFromString(f.read())
        except Exception as error:
            return _damaged("saved_model.pb", error)
        if not proto.meta_graphs:
            return ("saved_model.pb holds no MetaGraph (empty or "
                    "truncated?)")
    prefix = os.path.join(path, "variables", "variables")
    if not os.path.isfile(prefix + ".index"):
        return None
    try:
        reader = tf.train.load_checkpoint(prefix)
    except Exception as error:
        return _damaged(os.path.join("variables", "variables.index"), error)
    try:
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    except Exception as error:
        shards = sorted(f for f in os.listdir(os.path.dirname(prefix))
                        if f.startswith("variables.data-"))
        where = (os.path.join("variables", shards[0]) if len(shards) == 1
                 else "a variables/variables.data-* shard")
        return _damaged(where, error)
    return None


def _damaged(name, error):
    lines = str(error).strip().splitlines()
    reason = lines[0][:200] if lines else "no message"
    return (f"{name} is truncated or corrupt ({type(error).__name__}: "
            f"{reason})")


# Reads every attribute and dataset of an HDF5 file (hard links only, at
# most 64 groups deep: a corrupt file can link a group into itself) and
# prints the first error; run in a child process by `probe_hdf5`.
_HDF5_WALK = r"""
import sys
import h5py

first = []

def note(where, error):
    if not first:
        first.append(f"{type(error).__name__} at {where!r}: {error}")

def walk(obj, where, depth=0):
    if depth > 64:
        note(where, RecursionError("groups nested over 64 deep (a cycle?)"))
        return
    try:
        for key in obj.attrs:
            obj.attrs[key]
    except Exception as error:
        note(where, error)
    if isinstance(obj, h5py.Dataset):
        try:
            obj[()]
        except Exception as error:
            note(where, error)
        return
    try:
        keys = list(obj)
    except Exception as error:
        note(where, error)
        return
    for key in keys:
        try:
            if isinstance(obj.get(key, getlink=True), h5py.HardLink):
                walk(obj[key], f"{where.rstrip('/')}/{key}", depth + 1)
        except Exception as error:
            note(f"{where.rstrip('/')}/{key}", error)

try:
    with h5py.File(sys.argv[1], "r") as f:
        walk(f, "/")
except Exception as error:
    note("/", error)
print(" ".join(first[0].split()) if first else "", end="")
"""


def probe_hdf5(path, timeout=300):
    """Why the HDF5 file `path` cannot be read, or None if it can.

    A corrupt HDF5 file can crash the HDF5 library itself (a segmentation
    fault in h5py's attribute reading, found by the fuzz tests), which no
    Python code survives. So a child process reads every attribute and
    dataset of the file first; this returns its first error, or says that
    it crashed or did not finish in `timeout` seconds. Needs h5py, not
    TensorFlow.
    """
    try:
        child = subprocess.run(
            [sys.executable, "-c", _HDF5_WALK, os.fspath(path)],
            capture_output=True, text=True, timeout=timeout,
            errors="backslashreplace")
    except subprocess.TimeoutExpired:
        return f"reading it did not finish in {timeout} s"
    if child.returncode < 0:
        return (f"reading it crashed the HDF5 library (signal "
                f"{-child.returncode})")
    if child.returncode != 0:
        lines = (child.stderr or "").strip().splitlines()
        return ("reading it failed: " + (lines[-1][:200] if lines
                                         else f"exit {child.returncode}"))
    return child.stdout.strip()[:300] or None
