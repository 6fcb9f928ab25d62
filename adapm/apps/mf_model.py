"""The matrix factorisation app's model (adapm.apps.mf): the layout of a key's value, the
initial factors, the AdaGrad steps, the RMSE and the bias-only baseline, and writing the
trained factors."""

import heapq
import json
import os
from typing import NamedTuple

import numpy as np

from adapm.apps.common import sum_by_key
from adapm.table.initializers import initial_values

BASELINE_DAMPING = 10.0  # the bias baseline's shrinkage: a bias from n cells is their
BASELINE_SWEEPS = 10     # mean residual times n / (n + 10) (Koren's damped means)
PULL_CHUNK = 65_536      # keys per pull when the whole model is read


class Model(NamedTuple):
    """What predicts a cell from its row's and its column's rows of the table, u and v
    (n, dim): with biases, mean + b_row + b_col + p_row . q_col, each row [factor (rank) |
    bias]; without, p_row . q_col, each row [factor (rank)]. `mean`: the training
    ratings' (fixed, not trained, as in the field's biased MF)."""
    rank: int
    biases: bool
    mean: float = 0.0

    @property
    def dim(self):
        return self.rank + int(self.biases)

    def predict(self, u, v):
        k = self.rank
        dot = np.einsum("ij,ij->i", u[:, :k], v[:, :k])
        if not self.biases:
            return dot
        return self.mean + u[:, k] + v[:, k] + dot

    def gradients(self, u, v, err, reg):
        """Gradients of err^2/2 + reg/2 (|u|^2 + |v|^2) per cell (err: prediction minus
        value) with respect to u and v."""
        gu = err[:, None] * v + reg * u
        gv = err[:, None] * u + reg * v
        if self.biases:  # d prediction / d bias = 1
            k = self.rank
            gu[:, k] = err + reg * u[:, k]
            gv[:, k] = err + reg * v[:, k]
        return gu, gv


def uses_biases(opts):
    """--biases, or by default: with data from files (ratings have a mean and biases) or
    a generated matrix with a mean or biases."""
    if opts["biases"] is not None:
        return bool(opts["biases"])
    return bool(opts["data"] or opts["mean"] or opts["bias_std"])


def model_of(opts, matrix):
    """The Model of the options, with the mean of the matrix's training values."""
    biases = uses_biases(opts)
    y = matrix.train[2]
    mean = float(np.mean(y, dtype=np.float64)) if biases and len(y) else 0.0
    return Model(opts["rank"], biases, mean)


class FactorInit:
    """Initial parameters: factor ~ N(0, std) (seeded, as init=("normal", std, seed)),
    bias (with biases) and AdaGrad accumulators 0. Each key's value is [factor (rank) |
    bias | accumulators (rank + 1)], or without biases [factor | accumulators (rank)]."""

    def __init__(self, rank, std, seed, biases=False):
        self.rank, self.std, self.seed, self.biases = rank, std, seed, biases

    def __call__(self, keys):
        lengths = np.full(len(keys), self.rank, dtype=np.uint64)
        factors = initial_values(("normal", self.std, self.seed), keys, lengths, "float32")
        values = np.zeros((len(keys), 2 * (self.rank + int(self.biases))), dtype=np.float32)
        values[:, : self.rank] = factors.reshape(-1, self.rank)
        return values


def rmse(table, rows, model, cells, batch=10_000):
    """RMSE of `model` on cells (r, c, y); `table` has pull(keys)."""
    r, c, y = cells
    squared = 0.0
    for start in range(0, len(y), batch):
        sl = slice(start, start + batch)
        u = table.pull(r[sl])[:, :model.dim]
        v = table.pull(rows + c[sl])[:, :model.dim]
        squared += float(((model.predict(u, v) - y[sl]) ** 2).sum())
    return (squared / max(len(y), 1)) ** 0.5


def bias_baseline(train, rows, cols, damping=BASELINE_DAMPING, sweeps=BASELINE_SWEEPS):
    """The field's bias-only baseline, r_hat = mean + b_row + b_col without factors:
    column then row biases as damped mean residuals, alternated `sweeps` times. Returns
    (mean, row biases, column biases)."""
    r, c, y = train
    y = np.asarray(y, dtype=np.float64)
    mean = float(y.mean()) if len(y) else 0.0
    n_row, n_col = np.bincount(r, minlength=rows), np.bincount(c, minlength=cols)
    b_row, b_col = np.zeros(rows), np.zeros(cols)
    for _ in range(sweeps):
        b_col = np.bincount(c, y - mean - b_row[r], minlength=cols) / (damping + n_col)
        b_row = np.bincount(r, y - mean - b_col[c], minlength=rows) / (damping + n_row)
    return mean, b_row, b_col


def baseline_rmse(baseline, cells):
    mean, b_row, b_col = baseline
    r, c, y = cells
    return float(np.sqrt(np.mean((mean + b_row[r] + b_col[c] - y) ** 2))) if len(y) \
        else float("nan")


ADAGRAD_EPS = 1e-10  # torch.optim.Adagrad's


def fused_step(w, keys, y, model, opt, reg):
    """One minibatch on the parameter server: keys = [row keys | column keys] of the
    batch's cells. The rows are pulled (duplicates too: no np.unique), and the gradient of
    every cell goes to the table's fused AdaGrad (`opt`), which sums the duplicates' and
    takes one step per key in place. Returns the squared error."""
    b = len(y)
    rows = w.pull_rows(keys, opt)
    u, v = rows[:b], rows[b:]
    err = model.predict(u, v) - y
    w.apply_gradients(keys, np.concatenate(model.gradients(u, v, err, reg)), opt)
    return float((err * err).sum())


def adagrad_step(table, keys, y, model, lr, reg):
    """The plain loop's minibatch (the reference of B5), the same AdaGrad in numpy:
    `table` has pull and push (ArrayTable). Returns the squared error."""
    b, dim = len(y), model.dim
    unique, inverse = np.unique(keys, return_inverse=True)
    values = table.pull(unique)
    rows, accum = values[:, :dim], values[:, dim:]
    u, v = rows[inverse[:b]], rows[inverse[b:]]
    err = model.predict(u, v) - y
    g = sum_by_key(inverse, np.concatenate(model.gradients(u, v, err, reg)), len(unique))
    g2 = g * g
    update = np.empty_like(values)
    update[:, :dim] = -lr * g / (np.sqrt(accum + g2) + ADAGRAD_EPS)
    update[:, dim:] = g2
    table.push(unique, update)
    return float((err * err).sum())


def partition_rows(r, rows, workers):
    """The worker of each cell: every row's cells go to one worker (so its factor is
    relocated there once and stays; only column factors are shared), rows assigned
    greedily, most cells first, to the worker with the fewest cells so far (balanced
    unless one row alone holds more than 1/workers of the cells). The same in every
    worker: it depends on the data only."""
    if workers == 1:
        return np.zeros(len(r), dtype=np.int64)
    counts = np.bincount(r, minlength=rows)
    owner = np.zeros(rows, dtype=np.int64)
    loads = [(0, worker) for worker in range(workers)]
    for row in np.argsort(-counts, kind="stable")[:np.count_nonzero(counts)].tolist():
        load, worker = heapq.heappop(loads)
        owner[row] = worker
        heapq.heappush(loads, (load + int(counts[row]), worker))
    return owner[r]


def minibatches(n, batch, rng):
    order = rng.permutation(n)
    return [order[s:s + batch] for s in range(0, n, batch)]


def valid_text(table, matrix, model, valid_log):
    """The epoch line's validation figure (appended to valid_log), or ''."""
    if not len(matrix.valid[2]):
        return ""
    valid_log.append(rmse(table, matrix.rows, model, matrix.valid))
    return f", valid RMSE {valid_log[-1]:.4f}"


# -- saving the model ------------------------------------------------------------------

def pull_all(table, n):
    """The values of keys [0, n), pulled a chunk at a time."""
    return np.concatenate([table.pull(np.arange(s, min(s + PULL_CHUNK, n)))
                           for s in range(0, n, PULL_CHUNK)])


def save_factors(folder, table, matrix, model):
    """The trained model in `folder`: row_factors.npy (rows, rank) and
    column_factors.npy (cols, rank), float32; with biases row_biases.npy (rows,) and
    column_biases.npy (cols,); rows.tsv and columns.tsv, the rows' and columns' names
    one per line in id order (a ratings file's user and item ids; 1-based numbers for
    MatrixMarket files and generated data); model.json: rank, biases, mean and the
    prediction's formula."""
    os.makedirs(folder, exist_ok=True)
    values = pull_all(table, matrix.rows + matrix.cols)[:, :model.dim]
    k = model.rank
    for part, block in (("row", values[:matrix.rows]), ("column", values[matrix.rows:])):
        np.save(os.path.join(folder, f"{part}_factors.npy"), block[:, :k])
        if model.biases:
            np.save(os.path.join(folder, f"{part}_biases.npy"), block[:, k].copy())
    for part, names in zip(("rows", "columns"), matrix.names()):
        with open(os.path.join(folder, f"{part}.tsv"), "w", encoding="utf-8") as f:
            f.write("".join(f"{name}\n" for name in names))
    formula = ("mean + row_biases[i] + column_biases[j] + row_factors[i] . "
               "column_factors[j]" if model.biases else "row_factors[i] . column_factors[j]")
    with open(os.path.join(folder, "model.json"), "w") as f:
        json.dump({"rank": k, "biases": model.biases, "mean": model.mean,
                   "rows": matrix.rows, "columns": matrix.cols, "prediction": formula}, f,
                  indent=1)
