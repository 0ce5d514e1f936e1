"""Cross-replica batch moments without cancellation.

Keras (and tf-keras before it) synchronizes BatchNormalization by
all-reducing the per-replica sums of `x` and of `x**2` and taking the
variance as `E[x**2] - E[x]**2` in float32. When the mean is large against
the spread, both terms are close and their difference keeps only the
rounding: with mean/std = 100 the variance is off by about 1e-2 relative,
at 1000 it is lost entirely (issue 29). One device does not have the
problem: `tf.nn.moments` subtracts the mean before squaring.

Here the replicas do the same as one device, in two all-reduces:

1. `[sum(x), count]` -> the global mean `m` (the gradient flows through it
   as through Keras' sum);
2. `[sum(x - m), sum((x - m)**2)]`, with `m` held constant -> the centred
   moments `S1`, `S2`; variance = `S2/n - (S1/n)**2`.

`x - m` is exact in float32 when `x` and `m` are within a factor of two
(Sterbenz), so nothing cancels; `S1/n` is the global mean's own rounding,
and subtracting its square makes the variance exact for *any* `m`, which
is also why holding `m` constant leaves the gradient exact (d var/dx =
2 (x - mean) / n whatever `m` is). Chosen over the alternatives issue 29
lists by measurement (tools/benchmark.py, `sync_bn` rows): shifting by the
moving mean needs one all-reduce but is no better than today at the first
steps, when the moving mean is still 0; gathering every replica's
(count, mean, M2) for Chan's merge needs one collective of replicas x
channels values and is first-order sensitive to each replica's rounded
mean unless it carries a residual as well. Two batched all-reduces are
fewer than Keras' three (sum, sum of squares and count separately).

A mask is honoured across replicas too (Keras' masked path does not
synchronize at all). With one replica (no strategy, or a strategy of one)
the moments are the local ones, as a non-synchronized layer has them.
"""

import tensorflow as tf


def synchronized_moments(inputs, mask, axes, local_moments):
    """`(mean, variance)` of `inputs` over `axes` and over every replica.

    `local_moments(inputs, mask)` gives the one-replica moments (Keras'
    own); `mask` (rank one less than `inputs`) leaves positions out.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return local_moments(inputs, mask)
    axes = [a % len(inputs.shape) for a in axes]
    if mask is None:
        weights = tf.ones_like(inputs)
    else:
        weights = tf.cast(
            tf.broadcast_to(tf.expand_dims(mask, -1), tf.shape(inputs)),
            inputs.dtype)
    local = tf.stack([tf.reduce_sum(inputs * weights, axes, keepdims=True),
                      tf.reduce_sum(weights, axes, keepdims=True)])
    total, count = tf.unstack(
        context.all_reduce(tf.distribute.ReduceOp.SUM, local))
    mean = tf.math.divide_no_nan(total, count)
    deviation = (inputs - tf.stop_gradient(mean)) * weights
    local = tf.stack([tf.reduce_sum(deviation, axes, keepdims=True),
                      tf.reduce_sum(tf.square(deviation), axes,
                                    keepdims=True)])
    first, second = tf.unstack(
        context.all_reduce(tf.distribute.ReduceOp.SUM, local))
    shift = tf.math.divide_no_nan(first, count)
    variance = tf.maximum(
        tf.math.divide_no_nan(second, count) - tf.square(shift), 0.0)
    # `shift` is the first all-reduce's rounding of the mean; added back
    # (as a constant: d mean/dx is 1/n through `mean` already) it makes the
    # mean as exact as float32 holds it.
    mean = mean + tf.stop_gradient(shift)
    return tf.squeeze(mean, axes), tf.squeeze(variance, axes)
