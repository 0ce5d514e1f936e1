"""Exact moments across the workers of a `tf.distribute` strategy.

Under a strategy that spans several workers (MultiWorkerMirroredStrategy
with more than one task), each worker reduces its own share of the data
to `(count, mean, m2)` per channel in float64. Two all-reduce sums merge
them exactly, the k-part form of Chan et al.'s pairwise update:

    n    = sum_i n_i
    mean = sum_i n_i * mean_i / n
    m2   = sum_i (m2_i + n_i * (mean_i - mean)**2)

Every worker receives the same sums, so every worker ends with the same
statistics, equal to those of one process holding all the data. Within
one worker (MirroredStrategy, JAX's DataParallel) the process holds all
its data already and nothing is exchanged.
"""

import keras
import numpy as np

from kerasbn.stats import _collect


def worker_strategy():
    """The active strategy if it spans several workers, else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    if not tf.distribute.has_strategy():
        return None
    strategy = tf.distribute.get_strategy()
    local = len(strategy.extended.worker_devices)
    if strategy.num_replicas_in_sync <= local:
        return None
    return strategy


def _sum_over_workers(strategy, vector):
    """The sum of one float64 vector per worker, on every worker."""
    import tensorflow as tf

    vector = np.ascontiguousarray(vector, np.float64)
    given = []

    def value_fn(context):
        # One value per worker: the first local replica carries it.
        del context
        value = vector if not given else np.zeros_like(vector)
        given.append(True)
        return tf.constant(value)

    values = strategy.experimental_distribute_values_from_function(value_fn)
    total = strategy.reduce(tf.distribute.ReduceOp.SUM, values, axis=None)
    return np.asarray(total.numpy(), np.float64)


def merge_over_workers(strategy, moments):
    """`moments` (a list of `Moments`, this worker's) merged with every
    other worker's, in the same order on all of them."""
    if strategy is None or not moments:
        return moments
    sizes = [m.mean.size for m in moments]
    first = np.concatenate(
        [[m.count for m in moments]]
        + [m.count * m.mean.ravel() for m in moments])
    first = _sum_over_workers(strategy, first)
    counts = first[:len(moments)]
    means, offset = [], len(moments)
    for count, size in zip(counts, sizes):
        total = first[offset:offset + size]
        means.append(total / count if count else np.zeros(size))
        offset += size
    second = np.concatenate([
        m.m2.ravel() + m.count * (m.mean.ravel() - mean) ** 2
        for m, mean in zip(moments, means)])
    second = _sum_over_workers(strategy, second)
    merged, offset = [], 0
    for count, mean, size, m in zip(counts, means, sizes, moments):
        m2 = second[offset:offset + size]
        offset += size
        merged.append(_collect.Moments(count, mean.reshape(m.mean.shape),
                                       m2.reshape(m.m2.shape)))
    return merged
