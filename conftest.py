"""Session-wide test set-up, loaded by pytest before any test module.

The CPU is split into two logical devices before TensorFlow initializes its
runtime, so tests can run a real two-replica `tf.distribute.MirroredStrategy`
on this machine. Every test starts from a fresh Keras session and seed, and
every test (the doctests collected from `kerasbn/` included) leaves
`kerasbn.registry` as it found it.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
)

import kerasbn.registry  # noqa: E402  (after the devices are configured)


@pytest.fixture(autouse=True)
def _fresh_keras_session():
    keras.backend.clear_session()
    keras.utils.set_random_seed(1234)
    policy = keras.config.dtype_policy()
    yield
    keras.config.set_dtype_policy(policy)


@pytest.fixture(autouse=True)
def _restore_registry():
    """Registrations a test makes end with it: no manual unregister, and
    no test can depend on another's classes."""
    state = kerasbn.registry.snapshot()
    yield
    kerasbn.registry.restore(state)


@pytest.fixture(scope="session")
def two_replica_strategy():
    """One `MirroredStrategy` over the two logical CPUs, shared by all tests.

    TensorFlow caches collective ops by (group, instance) key per process,
    and every new strategy numbers its keys from the start again: a second
    strategy whose all-reduce has another shape then fails with "Shape
    mismatch in the collective instance". Tests share this one instead.
    """
    devices = [d.name for d in tf.config.list_logical_devices("CPU")][:2]
    if len(devices) < 2:
        pytest.skip("needs two logical CPU devices")
    strategy = tf.distribute.MirroredStrategy(devices)
    assert strategy.num_replicas_in_sync == 2
    return strategy


@pytest.fixture(scope="session")
def keras2_dir(tmp_path_factory):
    """Every Keras 2 file of tests/keras2_files.py (tf-keras, in a
    subprocess), written once per session; skipped without tf-keras."""
    import importlib.util
    import pathlib

    if importlib.util.find_spec("tf_keras") is None:
        pytest.skip("tf-keras is not installed (pip install 'kerasbn[test]')")
    from tests.keras2_files import make_keras2_files

    return pathlib.Path(make_keras2_files(tmp_path_factory.mktemp("keras2")))
