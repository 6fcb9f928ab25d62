"""word2vec's skip-gram update written out in float64, the reference of the word2vec app's
compiled step (tests/unit/apps/test_word2vec_step.py, tests/system/apps/test_app_word2vec.py)."""
import numpy as np


def reference_train(rows, centres, contexts, negatives, alpha, alpha_end, adagrad=False,
                    eps=1e-8):
    """word2vec's skip-gram update in float64: pair p moves its output rows (the context,
    label 1; each negative other than the context, label 0) by h * rate * input and then
    its input row by its rate times the sum of h * output (taken before they moved),
    h = label - sigmoid(score). The rate falls linearly from alpha (first pair) towards
    alpha_end (after the last); with `adagrad` (row-wise AdaGrad: each row's last element
    its accumulator) a row's accumulator first grows by the mean square of its step
    before the rate, and its rate is that over sqrt(accumulator) + eps."""
    rows = rows.astype(np.float64)
    dim = rows.shape[1] - 1 if adagrad else rows.shape[1]
    loss, pairs = 0.0, len(centres)

    def rate(row, step, base):
        if not adagrad:
            return base
        rows[row, dim] += (step @ step) / dim
        return base / (np.sqrt(rows[row, dim]) + eps)

    for p in range(pairs):
        base = alpha + (alpha_end - alpha) * p / pairs
        l1 = rows[centres[p], :dim].copy()
        change = np.zeros_like(l1)
        for d, target in enumerate([contexts[p], *negatives[p]]):
            if d > 0 and target == contexts[p]:
                continue
            score = l1 @ rows[target, :dim]
            loss += np.logaddexp(0.0, -score if d == 0 else score)
            h = (1.0 if d == 0 else 0.0) - 1.0 / (1.0 + np.exp(-score))
            change += h * rows[target, :dim]
            rows[target, :dim] += h * rate(target, h * l1, base) * l1
        rows[centres[p], :dim] += rate(centres[p], change, base) * change
    return rows, loss
