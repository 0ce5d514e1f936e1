"""`examples/population_statistics.py`: its weight averages, and a smoke
run whose JSON is checked for shape and recomputed with NumPy."""

import json
import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.helpers import load_example

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def example():
    return load_example("population_statistics")


def test_weight_averages_follow_their_definitions(example):
    """EMA after each step and SWA over epoch ends, against NumPy on the
    weights recorded at those moments."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.1), "mse")
    averages = example.WeightAverages(swa_start=1)
    seen, ends = [], []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append([np.asarray(w) for w in model.trainable_weights])

        def on_epoch_end(self, epoch, logs=None):
            ends.append([np.asarray(w) for w in model.trainable_weights])

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(12, 3)), rng.normal(size=(12, 2))
    model.fit(x, y, batch_size=4, epochs=3, verbose=0,
              callbacks=[averages, Record()])
    d = example.EMA_DECAY
    for k, ema in enumerate(averages.ema):
        expected = seen[0][k]
        for weights in seen[1:]:
            expected = d * expected + (1 - d) * weights[k]
        np.testing.assert_allclose(ema, expected, rtol=1e-12)
        np.testing.assert_allclose(averages.swa()[k],
                                   np.mean([e[k] for e in ends[1:]], 0),
                                   rtol=1e-12)


@pytest.mark.slow
def test_quick_run_writes_results_in_the_documented_shape(tmp_path):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "population_statistics.py"),
         "--quick", "--out-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=400, cwd=ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "| weights | BN momentum |" in done.stdout
    assert (tmp_path / "population_statistics.png").exists()
    results = json.loads(
        (tmp_path / "population_statistics.json").read_text())["accuracy"]
    assert set(results) == {"final", "SWA", "EMA"}
    for by_momentum in results.values():
        assert set(by_momentum) == {"0.9", "0.99", "0.999"}
        for cell in by_momentum.values():
            for kind in ("moving averages", "recalibrated"):
                runs = cell[kind]["runs"]
                assert len(runs) == 1 and 0.0 <= runs[0] <= 1.0
                assert cell[kind]["mean"] == pytest.approx(np.mean(runs))
                assert cell[kind]["std"] == pytest.approx(np.std(runs))
