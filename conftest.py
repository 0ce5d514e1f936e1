"""Session-wide test set-up, loaded by pytest before any test module.

The CPU is split into two logical devices before TensorFlow initializes its
runtime, so tests can run a real two-replica `tf.distribute.MirroredStrategy`
on this machine. Every test starts from a fresh Keras session and seed, and
every test (the doctests collected from `kerasbn/` included) leaves
`kerasbn.registry` as it found it.
"""

import os

# The one switch for the suite's Keras backend. Unset: TensorFlow, every
# test. "jax" or "torch": only the tests marked `any_backend` (the rest
# are TensorFlow-specific: tf.distribute, graph folding, TF exports of
# TF-only models...) run, and are reported as deselected otherwise.
BACKEND = os.environ.get("KERASBN_TEST_BACKEND", "tensorflow")
if BACKEND not in ("tensorflow", "jax", "torch"):
    raise SystemExit(
        f"KERASBN_TEST_BACKEND must be tensorflow, jax or torch; got "
        f"{BACKEND!r}."
    )
os.environ["KERAS_BACKEND"] = BACKEND
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if BACKEND == "jax":
    # Two host devices, so `keras.distribution.DataParallel` tests run a
    # real two-device mesh (set before JAX initializes).
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_force_host_platform_device_count=2"
    ).strip()

import keras  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0],
    [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()],
)

import kerasbn.registry  # noqa: E402  (after the devices are configured)


def pytest_collection_modifyitems(config, items):
    if BACKEND == "tensorflow":
        return
    keep, drop = [], []
    for item in items:
        (keep if item.get_closest_marker("any_backend") else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config):
    return f"kerasbn: Keras backend {keras.backend.backend()}"


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
    if BACKEND != "tensorflow":
        pytest.skip("tf.distribute needs the TensorFlow backend")
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
