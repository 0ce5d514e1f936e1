"""`examples/small_batch.py`: its non-i.i.d. sampler, and a smoke run.

The sampler is checked against the rule the example's docstring states
(one class per batch, every image at most once per epoch, at most
`b - 1` images per class left out). The smoke run (`--quick`) checks that
the script exits cleanly and writes `small_batch.json` in the documented
shape, with means and standard deviations recomputed here with NumPy.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import load_example

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PREFIXES = ("BN@32", "BN@2", "BatchRenormalization@2", "MABN@2",
            "GroupNorm@2")


@pytest.fixture(scope="module")
def example():
    return load_example("small_batch")


@pytest.mark.parametrize("batch_size", [1, 2, 3, 4, 32])
def test_non_iid_batches_hold_one_class_and_use_each_image_once(
        example, batch_size):
    rng = np.random.default_rng(7)
    labels = rng.integers(0, 10, size=503)
    batches = example.non_iid_batches(labels, batch_size, rng)

    assert batches.ndim == 2 and batches.shape[1] == batch_size
    for batch in batches:
        assert len(np.unique(labels[batch])) == 1
    used = batches.ravel()
    assert len(np.unique(used)) == len(used)          # at most once
    for c in range(10):
        left_out = np.sum(labels == c) - np.sum(labels[used] == c)
        assert 0 <= left_out < batch_size
    # The batches are shuffled across classes, not grouped by class.
    if batch_size <= 4:
        firsts = labels[batches[:, 0]]
        assert np.sum(firsts[1:] != firsts[:-1]) > len(batches) // 2


def test_non_iid_batches_are_reproducible_and_differ_by_seed(example):
    labels = np.repeat(np.arange(10), 21)
    one = example.training_order(labels, 2, 3, "non-iid", seed=0)
    again = example.training_order(labels, 2, 3, "non-iid", seed=0)
    other = example.training_order(labels, 2, 3, "non-iid", seed=1)
    np.testing.assert_array_equal(one, again)
    assert not np.array_equal(one, other)
    # 3 epochs of 10 classes x 10 pairs; each epoch uses 200 distinct images.
    assert one.shape == (3 * 200,)
    for epoch in one.reshape(3, 200):
        assert len(np.unique(epoch)) == 200
        assert np.all(labels[epoch[0::2]] == labels[epoch[1::2]])


def test_iid_batches_are_a_permutation_cut_into_full_batches(example):
    batches = example.iid_batches(101, 4, np.random.default_rng(0))
    assert batches.shape == (25, 4)
    assert len(np.unique(batches)) == 100
    assert batches.min() >= 0 and batches.max() < 101


def test_gap_share_of_known_runs(example):
    share = example.gap_share([0.8, 0.8], [0.6, 0.6], [1.0, 1.0])
    assert share["estimate"] == pytest.approx(0.5)
    assert share["ci95"] == pytest.approx([0.5, 0.5])
    # No gap: no share and no interval.
    assert example.gap_share([0.9], [0.9], [0.9]) == {"estimate": None,
                                                      "ci95": None}


@pytest.mark.slow
def test_quick_run_writes_results_in_the_documented_shape(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "small_batch.py"), "--quick",
         "--out-dir", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "| setting | method |" in done.stdout

    results = json.loads((out / "small_batch.json").read_text())
    assert set(results) == {"iid", "non-iid"}
    for setting, by_method in results.items():
        for prefix in PREFIXES:
            assert sum(label.startswith(prefix) for label in by_method) >= 1, (
                setting, prefix, sorted(by_method))
        for label, entry in by_method.items():
            assert set(entry) == {"mean", "std", "runs"}, label
            runs = np.asarray(entry["runs"], dtype=float)
            assert runs.shape == (1,)                 # --quick: one seed
            assert np.all((0.0 <= runs) & (runs <= 1.0))
            assert entry["mean"] == pytest.approx(np.mean(runs))
            assert entry["std"] == pytest.approx(np.std(runs))

    details = json.loads((out / "small_batch_details.json").read_text())
    assert set(details["recalibrated"]) == {"iid", "non-iid"}
    for setting in results:
        assert set(details["recalibrated"][setting]) == set(results[setting])
    assert (out / "small_batch.png").stat().st_size > 0
