"""`kerasbn-fold` on the files users already have: Keras 2 `.h5`, Keras 2
SavedModel directories, Keras 3 `model.export()` directories, frozen `.pb`.

The Keras 2 files are written by tf-keras itself in a subprocess
(`tests/keras2_files.py`), with tf-keras' own inference outputs as the
oracle; the Keras 3 export is checked against the Keras model. Every
artifact is run in its own runtime (`tf.saved_model.load`, ONNX Runtime).

Tolerance: 1e-5 of the output's largest magnitude (the issue's bar):
folding reorders a few float32 products per layer, ~1e-7 relative each;
ONNX Runtime's kernels sum in another order, ~1e-6 on these small nets. A
wrong fold or a weight loaded into the wrong variable is off by O(1).

The CLI runs in-process (`kerasbn.cli.main`), which is what the entry
point calls, so TensorFlow starts once for the module.
"""

import json
import os

import keras
import numpy as np
import onnxruntime as ort
import pytest
import tensorflow as tf

import kerasbn
from kerasbn import cli
from kerasbn.folding import tfgraph
from kerasbn.sources import saved_model as sources_saved_model
from tests.helpers import assert_close_to_scale
from tests.helpers import randomize_normalizations

RTOL = 1e-5


@pytest.fixture
def keras2(keras2_dir):
    return keras2_dir


@pytest.fixture(scope="module")
def keras3_export(tmp_path_factory):
    """A Keras 3 model with BN after a Conv2D and a Dense, exported."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((16, 16, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn_conv")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(4, name="dense")(x)
    x = keras.layers.BatchNormalization(name="bn_dense")(x)
    model = randomize_normalizations(keras.Model(inputs, x, name="k3"),
                                     seed=5)
    rng = np.random.default_rng(5)
    directory = tmp_path_factory.mktemp("keras3") / "exported"
    model.export(str(directory), verbose=False)
    x = rng.normal(size=(4, 16, 16, 3)).astype("float32")
    return directory, x, model(x, training=False).numpy()


def run(capsys, *argv):
    status = cli.main([str(a) for a in argv] + ["--latency-runs", "0"])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def check_artifacts(out, name, x, expected, signature="serving_default"):
    """SavedModel and ONNX reproduce `expected`; no BN op left."""
    saved = out / "saved_model" / name / "1"
    loaded = tf.saved_model.load(str(saved))
    function = loaded.signatures[signature]
    (key,) = function.structured_input_signature[1]
    (actual,) = function(**{key: tf.constant(x)}).values()
    assert_close_to_scale(actual.numpy(), expected, RTOL, "saved_model")
    session = ort.InferenceSession(str(out / f"{name}.onnx"),
                                   providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(None, {session.get_inputs()[0].name: x})
    assert_close_to_scale(onnx_out, expected, RTOL, "onnx")
    graph_def = sources_saved_model.load_saved_model(
        str(saved), signature).graph_def
    left = [n.op for n in graph_def.node if n.op in tfgraph.FUSED_OPS]
    assert left == [] and tfgraph.census(graph_def) == {}


@pytest.mark.slow
def test_keras2_h5_in_folded_artifacts_out(keras2, tmp_path, capsys):
    status, out, err = run(capsys, keras2 / "model.h5", "-o", tmp_path / "o",
                           "--json", tmp_path / "r.json")
    assert status == 0, err
    oracle = np.load(keras2 / "reference.npz")
    check_artifacts(tmp_path / "o", "renorm_model", oracle["input_0"],
                    oracle["output_0"])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["source"]["kind"] == "h5"
    folded = {e["layer"]: e["into"] for e in report["fold"]["entries"]}
    assert folded == {"bn1": ["conv1"], "bn2": ["dw"], "bn3": ["conv2"],
                      "bn4": ["dense"]}
    assert any("bn1" in n and "BatchRenormalization" in n
               for n in report["notes"]["source"])
    assert "note (source)" in out


def test_h5_output_names_the_artifacts_change_are_noted(keras2, tmp_path,
                                                        capsys):
    """An .h5 model's outputs named "1head_dense" (a leading digit) and
    "2head/dense" ('/': Keras 3 refuses it, so the layer loads as
    "2head_dense") are served as "output_0_1head_dense" and
    "output_1_2head_dense": a note (signature) says so for each, under
    its Keras 3 name, and a note (source) gives the '/' rename (pinned: a
    new user's trial reported such an output renamed without a note)."""
    status, out, err = run(capsys, keras2 / "heads.h5", "-o", tmp_path / "o",
                           "--format", "saved_model", "--json",
                           tmp_path / "r.json")
    assert status == 0, err
    notes = json.loads((tmp_path / "r.json").read_text())["notes"]
    said = " ".join(notes["signature"])
    assert "output '1head_dense' is named 'output_0_1head_dense'" in said
    assert "output '2head_dense' is named 'output_1_2head_dense'" in said
    assert "'2head/dense' -> '2head_dense'" in " ".join(notes["source"])
    assert "note (signature): output '1head_dense'" in out
    oracle = np.load(keras2 / "heads.npz")
    serve = tf.saved_model.load(str(tmp_path / "o" / "saved_model" / "heads"
                                    / "1")).signatures["serving_default"]
    actual = serve(features=tf.constant(oracle["input_0"]))
    assert sorted(actual) == ["output_0_1head_dense", "output_1_2head_dense"]
    # Against tf-keras' own outputs, at the module's RTOL (BN folded).
    for k, key in enumerate(sorted(actual)):
        assert_close_to_scale(actual[key].numpy(), oracle[f"output_{k}"],
                              RTOL, key)


def test_keras2_savedmodel_in_folded_artifacts_out(keras2, tmp_path,
                                                    capsys):
    status, out, err = run(capsys, keras2 / "keras2_savedmodel", "-o",
                           tmp_path / "o", "--json", tmp_path / "r.json")
    assert status == 0, err
    oracle = np.load(keras2 / "reference.npz")
    check_artifacts(tmp_path / "o", "keras2_savedmodel", oracle["input_0"],
                    oracle["output_0"])
    entries = json.loads((tmp_path / "r.json").read_text())["fold"]["entries"]
    # bn2 is fused (FusedBatchNormV3); bn1 (renorm), bn3 (fused=False) and
    # bn4 (on a rank-2 tensor) are Mul/Add chains.
    assert {e["layer"].split("/")[1]: (e["kind"], e["action"])
            for e in entries} == {
        "bn1": (tfgraph.CHAIN_KIND, "folded"),
        "bn2": ("FusedBatchNormV3", "folded"),
        "bn3": (tfgraph.CHAIN_KIND, "folded"),
        "bn4": (tfgraph.CHAIN_KIND, "folded")}


def test_keras3_export_in_folded_artifacts_out(keras3_export, tmp_path,
                                               capsys):
    directory, x, expected = keras3_export
    status, out, err = run(capsys, directory, "-o", tmp_path / "o")
    assert status == 0, err
    check_artifacts(tmp_path / "o", "exported", x, expected)
    assert "2 folded" in out


def test_sample_file_feeds_verification(keras3_export, tmp_path, capsys):
    directory, x, _ = keras3_export
    np.savez(tmp_path / "sample.npz", image=x[:3])
    status, out, err = run(capsys, directory, "-o", tmp_path / "o",
                           "--sample", tmp_path / "sample.npz", "--json",
                           tmp_path / "r.json")
    assert status == 0, err
    checks = json.loads((tmp_path / "r.json").read_text())["checks"]
    assert sorted({c["batch"] for c in checks}) == [1, 3]


def assert_refused(status, err, out_dir, *fragments):
    assert status == 2, err
    lines = [l for l in err.splitlines() if l.startswith("kerasbn-fold:")]
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not os.path.exists(out_dir)


def test_directory_that_is_not_a_savedmodel(tmp_path, capsys):
    (tmp_path / "model" / "3").mkdir(parents=True)
    (tmp_path / "model" / "3" / "saved_model.pb").write_bytes(b"")
    status, _, err = run(capsys, tmp_path / "model", "-o", tmp_path / "o")
    assert_refused(status, err, tmp_path / "o", "without saved_model.pb",
                   os.path.join(str(tmp_path / "model"), "3"))


def test_missing_signature(keras3_export, tmp_path, capsys):
    directory, _, _ = keras3_export
    status, _, err = run(capsys, directory, "-o", tmp_path / "o",
                         "--signature", "predict")
    assert_refused(status, err, tmp_path / "o", "no signature 'predict'",
                   "['serve', 'serving_default']")


def test_unknown_dimensions_without_sample(tmp_path, capsys):
    module = tf.Module()
    module.f = tf.function(lambda x: tf.nn.relu(x), input_signature=[
        tf.TensorSpec((None, None, 3), tf.float32, name="x")])
    tf.saved_model.save(module, str(tmp_path / "sm"))
    status, _, err = run(capsys, tmp_path / "sm", "-o", tmp_path / "o")
    assert_refused(status, err, tmp_path / "o", "unknown dimensions",
                   "(None, None, 3)", "--sample")


def test_weights_only_h5(keras2, tmp_path, capsys):
    status, _, err = run(capsys, keras2 / "weights.h5", "-o", tmp_path / "o")
    assert_refused(status, err, tmp_path / "o", "only weights")


@pytest.mark.parametrize("argv,fragment", [
    (("{pb}",), "not a TensorFlow GraphDef"),
    (("{sm}", "--format", "keras"), "--format keras needs a Keras model"),
    (("{pb}", "--signature", "serve"), "--signature applies to SavedModel"),
    (("{sm}", "--sample", "{missing}"), "--sample file not found"),
    (("{sm}", "--sample", "{pb}"), "is not a .npz file"),
    (("{sm}", "--sample", "{npz}"), "`sample` for input 'image' has shape"),
    (("{sm}", "--sample", "{misnamed}"), "input 'image': its key(s) "
     "['pixels'] name no input. Key the array 'image'"),
    (("{sm}", "--per-tensor", "--equalize"),
     "--per-tensor/--equalize apply to Keras models"),
])
def test_bad_graph_arguments(keras3_export, tmp_path, capsys, argv,
                             fragment):
    directory, _, _ = keras3_export
    (tmp_path / "g.pb").write_bytes(b"\x00not a graph")
    np.savez(tmp_path / "bad.npz", image=np.zeros((2, 5), "float32"))
    np.savez(tmp_path / "misnamed.npz",
             pixels=np.zeros((2, 16, 16, 3), "float32"))
    paths = {"pb": tmp_path / "g.pb", "sm": directory,
             "missing": tmp_path / "nope.npz", "npz": tmp_path / "bad.npz",
             "misnamed": tmp_path / "misnamed.npz"}
    argv = [a.format(**paths) for a in argv]
    status, _, err = run(capsys, *argv, "-o", tmp_path / "o")
    assert_refused(status, err, tmp_path / "o", fragment)


@pytest.mark.slow
def test_keras2_applications_model_from_each_file(keras2, tmp_path, capsys):
    """tf-keras' own MobileNetV2 (code nobody here wrote), from its .h5
    (layer-level fold) and from its SavedModel (graph-level fold of 52
    FusedBatchNormV3), against tf-keras' outputs."""
    oracle = np.load(keras2 / "mobilenet.npz")
    x, expected = oracle["input_0"], oracle["output_0"]
    for source, name in (("mobilenet.h5", "mobilenetv2_0.35_32"),
                         ("mobilenet_savedmodel", "mobilenet_savedmodel")):
        out = tmp_path / name
        status, _, err = run(capsys, keras2 / source, "-o", out, "--json",
                             tmp_path / f"{name}.json")
        assert status == 0, err
        check_artifacts(out, name, x, expected)
        summary = json.loads((tmp_path / f"{name}.json").read_text())[
            "fold"]["summary"]
        assert (summary["folded"], summary["kept"]) == (52, 0), summary


def test_sample_file_for_a_keras_model(tmp_path, capsys):
    """--sample works for .keras files too. A one-input model takes its
    array under the input's name, or saved unnamed (`np.savez(path, x)`
    keys it 'arr_0'); a key that names no input is refused, naming the key
    and the input (a new user's trial: 'pixels' for the input 'image' was
    fed to it silently), in the CLI and in `export(sample=...)`."""
    inputs = keras.Input((5,), name="features")
    x = keras.layers.Dense(3, name="dense")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    model = keras.Model(inputs, x, name="tiny")
    model.save(tmp_path / "tiny.keras")
    rows = np.ones((6, 5), "float32")
    np.savez(tmp_path / "unnamed.npz", rows)
    status, _, err = run(capsys, tmp_path / "tiny.keras", "-o", tmp_path / "o",
                         "--sample", tmp_path / "unnamed.npz", "--json",
                         tmp_path / "r.json", "--format", "keras")
    assert status == 0, err
    checks = json.loads((tmp_path / "r.json").read_text())["checks"]
    assert sorted({c["batch"] for c in checks}) == [1, 6]
    np.savez(tmp_path / "rows.npz", rows=rows)
    status, _, err = run(capsys, tmp_path / "tiny.keras", "-o",
                         tmp_path / "refused", "--sample",
                         tmp_path / "rows.npz")
    assert_refused(status, err, tmp_path / "refused",
                   "`sample` has no array for the model's input 'features'",
                   "key(s) ['rows'] name no input",
                   "np.savez(path, features=array)")
    with pytest.raises(ValueError, match=r"key\(s\) \['rows'\] name no"):
        kerasbn.export(model, tmp_path / "api", sample={"rows": rows})
    assert not os.path.exists(tmp_path / "api")


# -- Corrupt and misnamed files: exit 2, one line naming the file. -----------


def _copy_damaged(source, target, relpath="", keep=None):
    """`source` (file or directory) copied to `target`, with its file
    `relpath` cut to its first `keep` bytes (all but the last 100 by
    default)."""
    import shutil

    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copy(source, target)
    victim = target / relpath if relpath else target
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) - 100 if keep is None else keep])
    return target


def test_truncated_h5_is_refused_naming_it(keras2, tmp_path, capsys):
    path = _copy_damaged(keras2 / "model.h5", tmp_path / "model.h5")
    status, _, err = run(capsys, path, "-o", tmp_path / "o")
    assert_refused(status, err, tmp_path / "o", str(path),
                   "Keras 2 HDF5 model", "truncated file")


@pytest.mark.parametrize("relpath,keep,fragment", [
    ("saved_model.pb", 0, "saved_model.pb holds no MetaGraph"),
    ("saved_model.pb", 5000, "saved_model.pb is truncated or corrupt"),
    (os.path.join("variables", "variables.data-00000-of-00001"), None,
     os.path.join("variables", "variables.data-00000-of-00001")
     + " is truncated or corrupt"),
    (os.path.join("variables", "variables.index"), None,
     os.path.join("variables", "variables.index")
     + " is truncated or corrupt"),
])
def test_truncated_savedmodel_file_is_named(keras2, tmp_path, capsys,
                                            relpath, keep, fragment):
    path = _copy_damaged(keras2 / "keras2_savedmodel", tmp_path / "sm",
                         relpath, keep)
    status, _, err = run(capsys, path, "-o", tmp_path / "o")
    assert_refused(status, err, tmp_path / "o", str(path), fragment)


def test_files_that_are_not_what_their_extension_says(keras2, tmp_path,
                                                      capsys):
    import shutil

    h5 = keras2 / "model.h5"
    inputs = keras.Input((3,), name="x")
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(
        tmp_path / "real.keras")
    cases = {  # name: (source, what the line says)
        "model.keras": (h5, "is an HDF5 file, not a Keras 3 .keras file"),
        "graph.pb": (h5, "is an HDF5 file, not a TensorFlow GraphDef"),
        "model.h5": (tmp_path / "real.keras",
                     "is a zip archive, not a Keras 2 HDF5 file"),
    }
    for name, (source, fragment) in cases.items():
        path = tmp_path / "misnamed" / name
        path.parent.mkdir(exist_ok=True)
        shutil.copy(source, path)
        status, _, err = run(capsys, path, "-o", tmp_path / "o")
        assert_refused(status, err, tmp_path / "o", str(path), fragment,
                       "as its extension says")
    cut = tmp_path / "cut.keras"
    cut.write_bytes((tmp_path / "real.keras").read_bytes()[:-30])
    status, _, err = run(capsys, cut, "-o", tmp_path / "o")
    assert_refused(status, err, tmp_path / "o", str(cut),
                   "no zip directory: truncated or corrupt?")


def test_a_crash_of_the_hdf5_library_is_refused(keras2, tmp_path, capsys,
                                                monkeypatch):
    """A corrupt HDF5 file can make h5py crash the process (SIGSEGV, seen
    in the fuzz); the file is first read in a child process, whose crash
    (simulated here) is an exit 2 naming the file."""
    from kerasbn import sources

    monkeypatch.setattr(sources, "_HDF5_WALK",
                        "import os, signal; os.kill(os.getpid(), "
                        "signal.SIGSEGV)")
    status, _, err = run(capsys, keras2 / "model.h5", "-o", tmp_path / "o")
    assert_refused(status, err, tmp_path / "o", str(keras2 / "model.h5"),
                   "crashed the HDF5 library (signal 11)")
