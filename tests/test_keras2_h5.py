"""kerasbn.sources.keras2.load_h5 against tf-keras itself.

`tests/keras2_files.py` writes real Keras 2 HDF5 files with tf-keras (a
subprocess with TF_USE_LEGACY_KERAS=1), and with each file the outputs
tf-keras computed for a fixed batch: the independent oracle every loaded
Keras 3 model must reproduce. Errors are checked on copies of those files
edited with h5py, never on the originals.

Tolerance: `REL` of the largest output magnitude. tf-keras and Keras 3 run
the same formulas with the same float32 weights through TensorFlow kernels
that may order sums differently, so outputs agree to a few float32 ulps per
operation (measured: under 3e-7 of the output scale over these 10-layer
models); a weight in the wrong variable, a wrong axis or statistic moves
them by a sizeable fraction of the scale.
"""

import hashlib
import importlib.util
import json
import os
import shutil

import h5py
import keras
import numpy as np
import pytest

import kerasbn
from kerasbn.sources import keras2
from kerasbn.sources.keras2 import Keras2Error
from tests.helpers import assert_close_to_scale

if importlib.util.find_spec("tf_keras") is None:
    pytest.skip("tf-keras is not installed (pip install -e '.[test]'): the "
                "Keras 2 files these tests load are written by tf-keras",
                allow_module_level=True)

REL = 1e-5
# mixed_float16: both sides round each layer's output to float16 (eps
# 2**-10 ~ 1e-3), and may do so at different points (tf-keras' BN computes
# in float32 and casts once), and the float16 pooling's sum runs in another
# order from one run to the next (TensorFlow's kernels, threads): measured
# up to 2.1e-3 of the scale (4 ulps at a 3.7 logit, a fresh-clone run where
# 2 ulps of the scale failed); four float16 ulps of the scale.
REL_FLOAT16 = 4 * 2.0**-10
FLOAT32_MAX = float(np.finfo("float32").max)
RENORM = "BatchNormalization(renorm=True) -> kerasbn.layers.BatchRenormalization"

# (layer path, text of its note) for every mapping each model needs.
EXPECTED_NOTES = {
    "model": {("bn1", RENORM), ("dw", "groups=1")},
    "zoo": {("sep", "groups=1"), ("sep", "kernel_initializer=GlorotUniform"),
            ("bn_clip", RENORM), ("up", "groups=1"), ("bn_rmax", RENORM),
            ("bn_ghost", "virtual_batch_size=2")},
    "nested": {("block/block_bn", RENORM), ("head/tail/tail_dw", "groups=1"),
               ("proj/proj_bn", RENORM)},
    "sequential": set(),
    "mixed": {("bn", RENORM)},
}


class Scale(keras.layers.Layer):
    """Keras 3 twin of the Keras 2 "demo>Scale" layer in custom.h5."""

    def build(self, input_shape):
        self.factor = self.add_weight(name="factor",
                                      shape=(input_shape[-1],))

    def call(self, inputs):
        return inputs * self.factor


def _oracle(directory, name):
    arrays = np.load(directory / f"{name}.npz")
    inputs = [arrays[f"input_{k}"] for k in range(len(arrays))
              if f"input_{k}" in arrays]
    outputs = [arrays[f"output_{k}"] for k in range(len(arrays))
               if f"output_{k}" in arrays]
    return inputs, outputs, arrays


def _outputs(model, inputs, training=False):
    result = model(inputs if len(inputs) > 1 else inputs[0],
                   training=training)
    result = result if isinstance(result, (list, tuple)) else [result]
    return [keras.ops.convert_to_numpy(y) for y in result]


def _assert_matches_oracle(model, directory, name, rel=REL):
    inputs, expected, _ = _oracle(directory, name)
    actual = _outputs(model, inputs)
    assert len(actual) == len(expected), (name, len(actual))
    for k, (got, want) in enumerate(zip(actual, expected)):
        assert got.shape == want.shape, (name, k, got.shape, want.shape)
        assert_close_to_scale(got, want, rel, f"{name} output {k}")


def _mapped(notes):
    """`[(layer path, note)]` for `notes`."""
    return [(note.split("'")[1], note) for note in notes]


def _assert_notes(name, notes):
    expected = EXPECTED_NOTES[name]
    found = _mapped(notes)
    assert {path for path, _ in found} == {path for path, _ in expected}, (
        notes)
    for path, text in expected:
        assert sum(text in note for where, note in found
                   if where == path) == 1, (path, text, notes)
    assert len(notes) == len(expected), notes
    for note in notes:
        assert "\n" not in note and note.startswith("layer '"), note


@pytest.mark.parametrize("name", sorted(EXPECTED_NOTES))
def test_outputs_match_tf_keras_and_each_mapping_is_noted(keras2_dir, name):
    model, notes = keras2.load_h5(keras2_dir / f"{name}.h5")
    rel = REL_FLOAT16 if name == "mixed" else REL
    _assert_matches_oracle(model, keras2_dir, name, rel)
    _assert_notes(name, notes)


def _layer(model, path):
    layer = model
    for part in path.split("/"):
        layer = layer.get_layer(part)
    return layer


def _file_weight(path, group, weight):
    """A weight's array read straight from the file with h5py."""
    with h5py.File(path, "r") as h5:
        names = [n.decode() if isinstance(n, bytes) else n
                 for n in h5["model_weights"][group].attrs["weight_names"]]
        match = [n for n in names if n.endswith(f"/{weight}:0")]
        assert len(match) == 1, (group, weight, names)
        return np.asarray(h5["model_weights"][group][match[0]])


@pytest.mark.parametrize("name, path, group, clipping, momentum", [
    ("model", "bn1", "bn1",
     {"rmax": FLOAT32_MAX, "rmin": 0.0, "dmax": FLOAT32_MAX}, 0.99),
    ("zoo", "bn_clip", "bn_clip", {"rmax": 3.0, "rmin": 0.25, "dmax": 2.0},
     0.9),
    ("zoo", "bn_rmax", "bn_rmax",
     {"rmax": 2.0, "rmin": 0.0, "dmax": FLOAT32_MAX}, 0.99),
    ("nested", "proj/proj_bn", "proj",
     {"rmax": FLOAT32_MAX, "rmin": 0.0, "dmax": 1.5}, 0.99),
])
def test_renorm_becomes_batch_renormalization_with_constant_clipping(
        keras2_dir, name, path, group, clipping, momentum):
    model, _ = keras2.load_h5(keras2_dir / f"{name}.h5")
    layer = _layer(model, path)
    assert type(layer) is kerasbn.layers.BatchRenormalization
    assert layer.clipping() == pytest.approx(clipping, rel=1e-7)
    assert (layer.warmup_steps, layer.rmax_steps, layer.dmax_steps) == (
        0, 0, 0)
    assert layer.renorm_momentum == pytest.approx(momentum)
    assert int(keras.ops.convert_to_numpy(layer.renorm_step)) == 0
    # The weights inference does not read, compared with the file itself.
    for weight in ("moving_stddev", "renorm_mean", "renorm_stddev",
                   "moving_variance"):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(getattr(layer, weight)),
            _file_weight(keras2_dir / f"{name}.h5", group, weight),
            err_msg=f"{path}.{weight}")


def test_renorm_model_trains_as_in_tf_keras(keras2_dir):
    # Training mode reads the renorm averages through r and d (unclipped
    # here), so this checks them, and that "constant clipping at float32's
    # maximum" is Keras 2's "no clipping". Batch moments are reduced in a
    # different order than tf-keras does, hence 1e-5 as for inference.
    model, _ = keras2.load_h5(keras2_dir / "model.h5")
    inputs, _, arrays = _oracle(keras2_dir, "model")
    got = _outputs(model, inputs, training=True)[0]
    assert_close_to_scale(got, arrays["output_train_0"], REL,
                          "training-mode output")


def test_grouped_conv_and_channels_first_norm_keep_their_arguments(
        keras2_dir):
    model, _ = keras2.load_h5(keras2_dir / "zoo.h5")
    assert model.get_layer("grouped").groups == 2
    assert model.get_layer("bn_nchw").axis == 1
    # tf-keras saved axis 4, past the ghost dimension it had inserted.
    assert model.get_layer("bn_ghost").axis == 3
    assert model.get_layer("leaky").negative_slope == pytest.approx(0.2)


def test_custom_layer_needs_custom_objects(keras2_dir):
    with pytest.raises(Keras2Error, match="--custom-module") as error:
        keras2.load_h5(keras2_dir / "custom.h5")
    assert "'demo>Scale'" in str(error.value)
    assert "layer 'scale'" in str(error.value)
    _assert_one_line(error)
    for key in ("Scale", "demo>Scale"):
        model, notes = keras2.load_h5(keras2_dir / "custom.h5",
                                      custom_objects={key: Scale})
        assert notes == []
        _assert_matches_oracle(model, keras2_dir, "custom")


def test_the_users_file_is_untouched(keras2_dir):
    path = keras2_dir / "model.h5"
    before = (hashlib.sha256(path.read_bytes()).hexdigest(),
              os.stat(path).st_mtime_ns)
    keras2.load_h5(path)
    after = (hashlib.sha256(path.read_bytes()).hexdigest(),
             os.stat(path).st_mtime_ns)
    assert after == before


def test_loaded_model_folds_and_keeps_the_outputs(keras2_dir):
    model, _ = keras2.load_h5(keras2_dir / "model.h5")
    folded, report = kerasbn.fold(model)
    entries = {entry.layer: entry for entry in report.entries}
    assert entries["bn1"].kind == "BatchRenormalization"
    assert entries["bn1"].action == "folded", entries["bn1"]
    assert report.folded == 4, str(report)
    # The folded weights are computed in float64 and rounded once; outputs
    # move by float32 rounding only (same tolerance as loading).
    _assert_matches_oracle(folded, keras2_dir, "model")


# --------------------------------------------------------------------------
# Errors: one line each, naming what is wrong, the value and what to do.


def _assert_one_line(error):
    message = str(error.value)
    assert "\n" not in message and message, message


def _edited_copy(source, target, edit_config=None, edit_file=None):
    """A copy of `source` with its model config (a dict) or h5 edited."""
    shutil.copyfile(source, target)
    with h5py.File(target, "r+") as h5:
        if edit_config is not None:
            config = json.loads(h5.attrs["model_config"])
            edit_config(config)
            h5.attrs["model_config"] = json.dumps(config)
        if edit_file is not None:
            edit_file(h5)
    return target


def _layer_config(config, name):
    return next(layer["config"] for layer in config["config"]["layers"]
                if layer["config"]["name"] == name)


def test_weights_only_file_says_so(keras2_dir):
    with pytest.raises(Keras2Error, match="only weights") as error:
        keras2.load_h5(keras2_dir / "weights.h5")
    assert "load_weights" in str(error.value)
    assert "model.keras" in str(error.value)
    _assert_one_line(error)


def test_non_hdf5_file_is_refused(tmp_path):
    path = tmp_path / "model.h5"
    path.write_text("not a model\n")
    with pytest.raises(Keras2Error, match="not an HDF5 file") as error:
        keras2.load_h5(path)
    assert str(path) in str(error.value)
    _assert_one_line(error)


@pytest.mark.parametrize("layer, key, value, expected", [
    ("dw", "groups", 2, "groups=2"),
    ("bn2", "axis", [1, 3], "axis=[1, 3]"),
    ("bn2", "adjustment", "scale_it", "adjustment='scale_it'"),
    ("bn1", "renorm_clipping", {"rmax": 0.5}, "rmax=0.5"),
])
def test_argument_without_equivalent_is_named(keras2_dir, tmp_path, layer,
                                              key, value, expected):
    def edit(config):
        _layer_config(config, layer)[key] = value

    path = _edited_copy(keras2_dir / "model.h5", tmp_path / "edited.h5",
                        edit)
    with pytest.raises(Keras2Error) as error:
        keras2.load_h5(path)
    message = str(error.value)
    assert f"layer '{layer}'" in message and expected in message, message
    _assert_one_line(error)


def test_unknown_keras2_argument_is_named(keras2_dir, tmp_path):
    def edit(config):
        _layer_config(config, "conv2")["weight_standardize"] = True

    path = _edited_copy(keras2_dir / "model.h5", tmp_path / "edited.h5",
                        edit)
    with pytest.raises(Keras2Error) as error:
        keras2.load_h5(path)
    message = str(error.value)
    assert "layer 'conv2'" in message, message
    assert "weight_standardize=True of Conv2D" in message, message
    _assert_one_line(error)


def test_lambda_layer_is_refused(keras2_dir, tmp_path):
    # Its function is Python bytecode: not loaded (unsafe, version-bound).
    def edit(config):
        entry = config["config"]["layers"][3]
        assert entry["config"]["name"] == "relu1"
        entry["class_name"] = "Lambda"
        entry["config"] = {"name": "relu1", "function": ["e30=", None, None]}

    path = _edited_copy(keras2_dir / "model.h5", tmp_path / "edited.h5",
                        edit)
    with pytest.raises(Keras2Error, match="layer 'relu1' is a Lambda"):
        keras2.load_h5(path)


def test_fused_is_dropped_with_a_note(keras2_dir, tmp_path):
    # tf-keras does not save `fused`; older tf.keras files may.
    def edit(config):
        _layer_config(config, "bn2")["fused"] = True

    path = _edited_copy(keras2_dir / "model.h5", tmp_path / "fused.h5", edit)
    model, notes = keras2.load_h5(path)
    assert [n for n in notes if n.startswith("layer 'bn2'")] == [
        "layer 'bn2': dropped Keras 2 argument fused=True (it chose "
        "TensorFlow's kernel, not the computation)"]
    _assert_matches_oracle(model, keras2_dir, "model")


def _rewrite_weight(group, name, array):
    del group[name]
    group.create_dataset(name, data=array)


def test_misshapen_weight_is_refused(keras2_dir, tmp_path):
    def edit(h5):
        _rewrite_weight(h5["model_weights/conv2"], "conv2/kernel:0",
                        np.zeros((1, 1, 8, 7), "float32"))

    path = _edited_copy(keras2_dir / "model.h5", tmp_path / "bad.h5",
                        edit_file=edit)
    with pytest.raises(Keras2Error, match=r"\(1, 1, 8, 7\)") as error:
        keras2.load_h5(path)
    assert "layer 'conv2'" in str(error.value)
    _assert_one_line(error)


def test_missing_renorm_weight_is_refused(keras2_dir, tmp_path):
    def edit(h5):
        group = h5["model_weights/bn1"]
        names = [n for n in group.attrs["weight_names"]
                 if "renorm_stddev" not in str(n)]
        group.attrs["weight_names"] = names

    path = _edited_copy(keras2_dir / "model.h5", tmp_path / "bad.h5",
                        edit_file=edit)
    with pytest.raises(Keras2Error, match="renorm_stddev") as error:
        keras2.load_h5(path)
    assert "layer 'bn1'" in str(error.value)
    _assert_one_line(error)


# --------------------------------------------------------------------------
# File layouts other Keras 2 versions wrote.


def test_weight_names_split_in_chunks_are_read(keras2_dir, tmp_path):
    # Keras splits an attribute over 64 kB (a large nested model's weight
    # names) into weight_names0, weight_names1, ...
    def edit(h5):
        group = h5["model_weights/head"]
        names = list(group.attrs["weight_names"])
        del group.attrs["weight_names"]
        group.attrs["weight_names0"] = names[:3]
        group.attrs["weight_names1"] = names[3:]

    path = _edited_copy(keras2_dir / "nested.h5", tmp_path / "chunked.h5",
                        edit_file=edit)
    model, _ = keras2.load_h5(path)
    _assert_matches_oracle(model, keras2_dir, "nested")


def test_sequential_without_input_layer_gets_one(keras2_dir, tmp_path):
    # Older tf.keras kept a Sequential model's input shape on its first
    # layer only (batch_input_shape), with no InputLayer in the config.
    def edit(config):
        layers = config["config"]["layers"]
        assert layers[0]["class_name"] == "InputLayer"
        del layers[0]

    path = _edited_copy(keras2_dir / "sequential.h5", tmp_path / "old.h5",
                        edit)
    model, notes = keras2.load_h5(path)
    assert notes == []
    assert model.layers[0].name == "first"
    _assert_matches_oracle(model, keras2_dir, "sequential")


def test_keras_own_classes_in_custom_objects_are_still_translated(
        keras2_dir):
    # A --custom-module that imports Keras' BatchNormalization by name.
    custom = {"BatchNormalization": keras.layers.BatchNormalization,
              "DepthwiseConv2D": keras.layers.DepthwiseConv2D}
    model, notes = keras2.load_h5(keras2_dir / "model.h5", custom)
    _assert_notes("model", notes)
    _assert_matches_oracle(model, keras2_dir, "model")


def test_truncated_file_is_refused_in_one_line(keras2_dir, tmp_path):
    data = (keras2_dir / "model.h5").read_bytes()
    path = tmp_path / "truncated.h5"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(Keras2Error, match="truncated or corrupt") as error:
        keras2.load_h5(path)
    assert str(path) in str(error.value)
    _assert_one_line(error)


def test_notes_say_a_dropped_argument_once():
    notes = keras2._Notes()
    why = ("dropped Keras 2 argument groups=1 (DepthwiseConv2D has no "
           "groups in Keras 3)")
    notes.extend([f"layer 'dw{i}': {why}" for i in range(5)]
                 + ["layer 'bn': dropped Keras 2 argument fused=True (x)",
                    "something else"])
    notes.summarize()
    assert notes == [f"5 layers ('dw0', 'dw1', 'dw2', ...): {why}",
                     "layer 'bn': dropped Keras 2 argument fused=True (x)",
                     "something else"]
