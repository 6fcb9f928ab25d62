"""The fused optimizers' update rules (adapm.optim's docstring) in float64 numpy: the
reference the tests of the optimizer kernels compare with."""
import numpy as np

from adapm import optim


def reference_step(optimizer, values, keys, grads, dim, t):
    """One step of `optimizer` (its t-th) for each distinct key of `keys`, with the
    gradients of its occurrences summed and the weight decay added to them, on the rows
    of `values` ([row | state] per key, float64, changed in place). Returns (the distinct
    keys, their gradients as the step used them)."""
    distinct = np.unique(keys)
    summed = np.zeros((distinct.shape[0], dim))
    np.add.at(summed, np.searchsorted(distinct, keys), grads)
    for key, g in zip(distinct.astype(np.intp), summed):
        w = values[key]
        g += optimizer.weight_decay * w[:dim]
        if isinstance(optimizer, optim.RowWiseAdagrad):
            w[dim] += np.mean(g * g)
            w[:dim] -= optimizer.lr * g / (np.sqrt(w[dim]) + optimizer.eps)
        elif isinstance(optimizer, optim.Adagrad):
            w[dim:] += g * g
            w[:dim] -= optimizer.lr * g / (np.sqrt(w[dim:]) + optimizer.eps)
        elif isinstance(optimizer, optim.Adam):
            m, v = w[dim:2 * dim], w[2 * dim:]
            m += (1 - optimizer.beta1) * (g - m)
            v += (1 - optimizer.beta2) * (g * g - v)
            size = optimizer.lr * np.sqrt(1 - optimizer.beta2 ** t) / \
                (1 - optimizer.beta1 ** t)
            w[:dim] -= size * m / (np.sqrt(v) + optimizer.eps)
        else:
            w[:dim] -= optimizer.lr * g
    return distinct, summed
