"""Matrix factorisation by minibatch AdaGrad on a parameter server.

    python -m adapm.apps.mf                  # 2 nodes x 1 worker, generated data
    python -m adapm.apps.mf --data u.data    # MovieLens-100k's ratings (10% held out)
    adapm-launch --nodes 2 --num-keys 22000 --value-length 32 -m adapm.apps.mf
    python -m adapm.apps.mf --plain          # the same SGD in one process, no PS

Data: generated (rows and columns drawn Zipf(1.1): a few hot rows and columns, a long
tail; values from rank-R factors plus Gaussian noise, with `--mean` and `--bias-std` a
global mean and row and column biases), or read from files (`--data train [--test-data
test]`): MatrixMarket coordinate files, or ratings files of `user item rating` lines
(tab-, comma-, '::'- or blank-separated, with or without a header, more fields ignored:
MovieLens's u.data, ratings.dat and ratings.csv; adapm.apps.readers.read_ratings). `--save-data
DIR` writes the generated matrix as DIR/train.mtx and DIR/test.mtx, so other systems can
train on the same data. `--valid-fraction` of the training cells are held out as the
validation cells whose RMSE every epoch line reports; the test RMSE is reported at the
end only.

Model: r_hat = mean + b_row + b_col + p_row . q_col (`--biases`, the default for data
read from files or generated with a mean or biases; the mean is the training ratings'),
or p_row . q_col (`--no-biases`). Parameters: row factors are keys [0, rows), column
factors keys [rows, rows + cols). A key's value is [factor (rank) | bias (with biases) |
AdaGrad accumulators], so optimizer state moves and replicates with its row. Each worker
trains on its shard of the training cells: every minibatch pulls the rows it touches
and hands every cell's gradient to the fused AdaGrad of adapm.optim (w.apply_gradients:
the table sums duplicate keys' gradients and takes one step per key in place, where the
node holds it, else at its owner; concurrent workers' steps never overwrite each other).
`--plain` runs the same AdaGrad in numpy. Cells are partitioned among workers by row
(partition_rows), as parameter-server MF does, so a row's factor is used by one worker
only; column factors are shared. adapm.data's IntentLoader announces each minibatch's
keys ahead of its clock. The metric is the test RMSE, printed against the untrained
model's and a bias-only baseline's (mean and damped row and column biases, no factors).
`--save-factors DIR` writes the trained model (save_factors)."""

import heapq
import json
import os
import time
from typing import NamedTuple, Optional

import click
import numpy as np

from adapm.apps import readers
from adapm.apps.common import (
    AccessCounter,
    Progress,
    app_options,
    end_epoch,
    launched,
    reports,
    save_worker_result,
    start_cluster,
    sum_by_key,
    throughput_summary,
    zipf_ids,
)
from adapm.ml.data import IntentLoader
from adapm.table.initializers import initial_values
from adapm.table.optimizers import Adagrad

APP = "mf"


DEFAULTS = dict(rows=20_000, cols=2_000, train=400_000, test=40_000, rank=16, noise=0.1,
                mean=0.0, bias_std=0.0, epochs=4, batch=256, lr=0.1, reg=None, biases=None,
                valid_fraction=0.05, lookahead=None, seed=0, data=None, test_data=None,
                save_factors=None, worker_json=None)
TEST_FRACTION = 0.1      # held out of --data as test cells when there is no --test-data
BASELINE_DAMPING = 10.0  # the bias baseline's shrinkage: a bias from n cells is their
BASELINE_SWEEPS = 10     # mean residual times n / (n + 10) (Koren's damped means)
PULL_CHUNK = 65_536      # keys per pull when the whole model is read
# --reg when not given: the generated default matrix (low noise, many cells per row) wants
# little; real ratings (MovieLens) overfit with it and want about 0.1 (docs/app-mf.md).
REG_GENERATED, REG_RATINGS = 0.01, 0.1


def reg_of(opts):
    """The L2 penalty per cell: --reg, else the default for the kind of data."""
    if opts["reg"] is not None:
        return float(opts["reg"])
    return REG_RATINGS if opts["data"] else REG_GENERATED


def with_defaults(opts):
    """The options with DEFAULTS for what they leave out (scripts and benchmarks pass
    only some)."""
    return dict(DEFAULTS, **opts)


# -- data ------------------------------------------------------------------------------

def synthetic(rows, cols, cells, rank, noise, seed, mean=0.0, bias_std=0.0):
    """(row ids, column ids, values) of `cells` cells of a noisy rank-`rank` matrix, plus
    a global `mean` and row and column biases ~ N(0, bias_std)."""
    rng = np.random.default_rng(seed)
    scale = rank ** -0.25  # products of two such factors have unit variance
    u = rng.normal(0.0, scale, size=(rows, rank))
    v = rng.normal(0.0, scale, size=(cols, rank))
    r = zipf_ids(rng, rows, cells)
    c = zipf_ids(rng, cols, cells)
    y = np.einsum("ij,ij->i", u[r], v[c]) + rng.normal(0.0, noise, size=cells)
    if mean or bias_std:
        # their own stream: cells and factors stay those of the matrix without biases
        extra = np.random.default_rng([seed, 1])
        y += mean + extra.normal(0.0, bias_std, rows)[r] + extra.normal(0.0, bias_std, cols)[c]
    return r.astype(np.int64), c.astype(np.int64), y.astype(np.float32)


def write_matrix_market(path, rows, cols, r, c, y):
    """A MatrixMarket coordinate file (1-based indices, real values)."""
    with open(path, "w") as f:
        f.write("%%MatrixMarket matrix coordinate real general\n")
        f.write(f"{rows} {cols} {len(y)}\n")
        data = np.column_stack([r + 1, c + 1, y.astype(np.float64)])
        np.savetxt(f, data, fmt=["%d", "%d", "%.9g"])


def read_matrix_market(path, cache=False):
    """(rows, cols, row ids, column ids, values) of a MatrixMarket coordinate file of real,
    integer or pattern values (0-based ids, float32 values; adapm.apps.readers, which names
    the line of a malformed entry). cache=True: parsed once per machine, memory-mapped
    by every later read (adapm.apps.readers' cache)."""
    r, c, y, (rows, cols) = readers.read_matrix_market(path, dtype=np.float32, cache=cache)
    return rows, cols, r, c, y


def is_matrix_market(path):
    """Whether the file starts with a MatrixMarket banner (else: a ratings file)."""
    with open(path, "rb") as f:
        return f.read(14).lower() == b"%%matrixmarket"


class Matrix(NamedTuple):
    """The data: a rows x cols matrix's training, validation and test cells, each (row
    ids, column ids, values), and the names of its rows and columns (a ratings file's
    user and item ids; None: 1-based numbers, the ids of a MatrixMarket file)."""
    rows: int
    cols: int
    train: tuple
    valid: tuple
    test: tuple
    row_names: Optional[np.ndarray] = None
    col_names: Optional[np.ndarray] = None

    def names(self):
        """(row names, column names) as string arrays indexed by id."""
        if self.row_names is not None:
            return self.row_names, self.col_names
        return (np.arange(1, self.rows + 1).astype(str),
                np.arange(1, self.cols + 1).astype(str))


def hold_out(cells, fraction, seed):
    """(kept, held): each cell held out with probability `fraction`, by seed."""
    held = np.random.default_rng(seed).random(len(cells[2])) < fraction
    return tuple(a[~held] for a in cells), tuple(a[held] for a in cells)


def read_files(opts):
    """Matrix of --data (and --test-data; without it, TEST_FRACTION of --data held out by
    seed), validation cells not yet held out. Both files MatrixMarket, or both ratings
    files (numbered together: a user of the test file only gets a row too). Files are
    parsed once per machine (the first process to read one, usually the launching
    process, caches it; the workers memory-map it and train() copies their shard)."""
    paths = [opts["data"], *([opts["test_data"]] if opts["test_data"] else [])]
    formats = {is_matrix_market(path) for path in paths}
    if len(formats) > 1:
        raise ValueError("--data and --test-data must both be MatrixMarket files or both "
                         "ratings files")
    names = (None, None)
    if formats == {True}:
        parts = [read_matrix_market(path, cache=True) for path in paths]
        rows, cols = max(p[0] for p in parts), max(p[1] for p in parts)
        cells = [p[2:] for p in parts]
    else:
        cells, *names = readers.merge_ratings(
            [readers.read_ratings(path, dtype=np.float32, cache=True) for path in paths])
        rows, cols = len(names[0]), len(names[1])
    train, test = cells if len(cells) == 2 else hold_out(cells[0], TEST_FRACTION, opts["seed"])
    return Matrix(rows, cols, train, (), test, *names)


def load_cells(opts):
    """Matrix of the options, read or generated, validation cells not yet held out."""
    opts = with_defaults(opts)
    if opts["data"]:
        return read_files(opts)
    rows, cols, n = opts["rows"], opts["cols"], opts["train"]
    r, c, y = synthetic(rows, cols, n + opts["test"], opts["rank"], opts["noise"],
                        opts["seed"], opts["mean"], opts["bias_std"])
    return Matrix(rows, cols, (r[:n], c[:n], y[:n]), (), (r[n:], c[n:], y[n:]))


def load_matrix(opts):
    """Matrix of the options, the same in every worker: --valid-fraction of the training
    cells held out (by seed) as validation cells."""
    matrix = load_cells(opts)
    train, valid = hold_out(matrix.train, with_defaults(opts)["valid_fraction"],
                            [with_defaults(opts)["seed"], 2])
    return matrix._replace(train=train, valid=valid)


def load_data(opts):
    """(rows, cols, train (r, c, y), test (r, c, y)) of the options, the training cells
    before the validation cells are held out of them (load_matrix)."""
    matrix = load_cells(opts)
    return matrix.rows, matrix.cols, matrix.train, matrix.test


# -- the model -------------------------------------------------------------------------

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


# -- training --------------------------------------------------------------------------

def train(w, opts):
    """The task every worker runs. Returns a dict of results (see finish())."""
    opts = with_defaults(opts)
    matrix = load_matrix(opts)
    rows, (r, c, y) = matrix.rows, matrix.train
    model = model_of(opts, matrix)
    shard = np.flatnonzero(partition_rows(r, rows, w.num_workers) == w.rank)
    r, c, y = r[shard], c[shard], y[shard]
    opt = Adagrad(lr=opts["lr"], eps=ADAGRAD_EPS)  # [factor | bias | accumulators], fused
    if w.rank == 0:
        before = rmse(w, rows, model, matrix.test)
        baseline = baseline_rmse(bias_baseline(matrix.train, rows, matrix.cols), matrix.test)
    w.barrier()  # nobody trains before the untrained model is measured
    rng = np.random.default_rng(opts["seed"] + 1 + w.rank)
    progress = Progress(APP, opts["epochs"] * len(y), enabled=w.rank == 0)
    lookahead = opts.get("lookahead")
    log, valid_log, seconds, accesses = [], [], 0.0, AccessCounter()
    for epoch in range(opts["epochs"]):
        batches = minibatches(len(y), opts["batch"], rng)
        loader = IntentLoader(w, batches, keys_of=lambda idx: np.concatenate([r[idx],
                                                                              rows + c[idx]]),
                              lookahead=lookahead)
        accesses.begin(w)
        t0 = time.perf_counter()
        for idx in loader:
            fused_step(w, np.concatenate([r[idx], rows + c[idx]]), y[idx], model, opt,
                       reg_of(opts))
            progress.update(len(idx), prefix=f"epoch {epoch + 1}: ")
        elapsed = time.perf_counter() - t0
        seconds += elapsed
        end_epoch(w, accesses)
        if w.rank == 0:
            text = (f"epoch {epoch + 1}/{opts['epochs']}: {len(y) / elapsed:,.0f} data "
                    f"points/s per worker{valid_text(w, matrix, model, valid_log)}")
            print(f"[{APP}] {text}", flush=True)
            log.append(text)
        w.barrier()
    result = {"points": opts["epochs"] * len(y), "seconds": seconds, "log": log,
              "node": w.node, "accesses": accesses.as_dict()}
    if w.rank == 0:
        result.update(before=before, after=rmse(w, rows, model, matrix.test),
                      baseline=baseline, valid=valid_log)
        if opts["save_factors"]:
            save_factors(opts["save_factors"], w, matrix, model)
    return save_worker_result(opts, w, result)


class ArrayTable:
    """The parameters in one numpy array, for the plain single-process loop: pull and
    push with the worker's meaning (push adds; adagrad_step pushes unique keys only)."""

    def __init__(self, values):
        self.values = values

    def pull(self, keys):
        return self.values[keys]

    def push(self, keys, update):
        self.values[keys] += update


def train_plain(opts):
    """The same minibatch AdaGrad in this process on a numpy array, no parameter server:
    the reference of benchmark B5."""
    opts = with_defaults(opts)
    matrix = load_matrix(opts)
    rows, (r, c, y) = matrix.rows, matrix.train
    model = model_of(opts, matrix)
    table = ArrayTable(FactorInit(model.rank, 0.1, opts["seed"], model.biases)(
        np.arange(rows + matrix.cols)))
    before = rmse(table, rows, model, matrix.test)
    rng = np.random.default_rng(opts["seed"] + 1)
    progress = Progress(APP, opts["epochs"] * len(y))
    seconds, valid_log = 0.0, []
    for epoch in range(opts["epochs"]):
        t0 = time.perf_counter()
        for idx in minibatches(len(y), opts["batch"], rng):
            adagrad_step(table, np.concatenate([r[idx], rows + c[idx]]), y[idx], model,
                         opts["lr"], reg_of(opts))
            progress.update(len(idx), prefix=f"epoch {epoch + 1}: ")
        seconds += time.perf_counter() - t0
        print(f"[{APP}] plain epoch {epoch + 1}/{opts['epochs']}: "
              f"{len(y) / (time.perf_counter() - t0):,.0f} data points/s"
              f"{valid_text(table, matrix, model, valid_log)}", flush=True)
    if opts["save_factors"]:
        save_factors(opts["save_factors"], table, matrix, model)
    points = opts["epochs"] * len(y)
    return {"data_points_per_s": points / seconds, "points": points, "seconds": seconds,
            "rmse_before": before, "rmse_after": rmse(table, rows, model, matrix.test),
            "rmse_baseline": baseline_rmse(bias_baseline(matrix.train, rows, matrix.cols),
                                           matrix.test), "rmse_valid": valid_log}


def table_shape(opts):
    """(num_keys, value_length) the app's table needs."""
    opts = with_defaults(opts)
    if opts["data"]:
        rows, cols = load_data(opts)[:2]
    else:
        rows, cols = opts["rows"], opts["cols"]
    return rows + cols, 2 * (opts["rank"] + int(uses_biases(opts)))


def run(opts, nodes=1, workers_per_node=1, mode="adaptive"):
    """Train on a cluster (embedded, or the one adapm-launch started); returns the
    summary of finish() (None in launched workers other than rank 0)."""
    opts = with_defaults(opts)
    num_keys, value_length = table_shape(opts)
    init = FactorInit(opts["rank"], 0.1, opts["seed"], uses_biases(opts))
    results = start_cluster(APP, train, opts, num_keys, value_length, init, nodes,
                            workers_per_node, mode)
    return None if results is None else finish(results)


def finish(results):
    """Summary over the workers' results: throughput, local share and bytes
    (common.throughput_summary), the test RMSE before and after training and of the
    bias-only baseline, and the validation RMSE after every epoch."""
    first = results[0]
    return {**throughput_summary(results), "rmse_before": first["before"],
            "rmse_after": first["after"], "rmse_baseline": first["baseline"],
            "rmse_valid": first["valid"], "log": first["log"]}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@app_options(APP)
@click.option("--rows", default=DEFAULTS["rows"], show_default=True,
              type=click.IntRange(min=1), help="rows of the generated matrix")
@click.option("--cols", default=DEFAULTS["cols"], show_default=True,
              type=click.IntRange(min=1), help="columns of the generated matrix")
@click.option("--train", default=DEFAULTS["train"], show_default=True,
              type=click.IntRange(min=1),
              help="training cells of the generated matrix (validation cells included)")
@click.option("--test", default=DEFAULTS["test"], show_default=True,
              type=click.IntRange(min=0), help="test cells of the generated matrix")
@click.option("--rank", default=DEFAULTS["rank"], show_default=True,
              type=click.IntRange(min=1),
              help="rank of the factors (and of the generated matrix)")
@click.option("--noise", default=DEFAULTS["noise"], show_default=True,
              help="standard deviation of the generated values' Gaussian noise")
@click.option("--mean", default=DEFAULTS["mean"], show_default=True,
              help="global mean of the generated values")
@click.option("--bias-std", default=DEFAULTS["bias_std"], show_default=True,
              help="standard deviation of the generated row and column biases")
@click.option("--epochs", default=DEFAULTS["epochs"], show_default=True,
              type=click.IntRange(min=1), help="passes over the training cells")
@click.option("--batch", default=DEFAULTS["batch"], show_default=True,
              type=click.IntRange(min=1), help="training cells per minibatch")
@click.option("--lr", default=DEFAULTS["lr"], show_default=True, help="AdaGrad step size")
@click.option("--reg", type=float, default=None,
              help=f"L2 penalty on the factors and biases of each cell (default: "
                   f"{REG_RATINGS} with --data, whose ratings such as MovieLens's overfit "
                   f"with less; {REG_GENERATED} for the generated matrix: docs/app-mf.md)")
@click.option("--biases/--no-biases", default=None,
              help="model a global mean and row (user) and column (item) biases: mean + "
                   "b_row + b_col + p_row . q_col (default: with --data, or a generated "
                   "matrix with --mean or --bias-std)")
@click.option("--valid-fraction", default=DEFAULTS["valid_fraction"], show_default=True,
              type=click.FloatRange(0, 1, max_open=True),
              help="share of the training cells held out for the validation RMSE of "
                   "every epoch (0: none)")
@click.option("--data", type=click.Path(exists=True, dir_okay=False),
              help="training cells: a MatrixMarket coordinate file, or ratings, one "
                   "'user item rating' per line (tab, comma, '::' or blanks between; "
                   "header and more fields allowed: MovieLens's u.data, ratings.csv)")
@click.option("--test-data", type=click.Path(exists=True, dir_okay=False),
              help="test cells, in the format of --data (default: 10% of --data held out)")
@click.option("--save-data", type=click.Path(file_okay=False),
              help="write the generated matrix to DIR/train.mtx and DIR/test.mtx")
@click.option("--save-factors", type=click.Path(file_okay=False),
              help="write the trained model to DIR: factors and biases (.npy), row and "
                   "column names (.tsv), model.json")
@click.option("--plain", is_flag=True, help="the same SGD in this process, no parameter server")
def main(nodes, workers_per_node, mode, save_data, plain, json_path, **options):
    """Train a matrix factorisation and report validation and test RMSE."""
    opts = with_defaults(options)
    if opts["test_data"] and not opts["data"]:
        raise click.UsageError("--test-data needs --data")
    try:
        if opts["data"]:
            load_data(opts)  # a malformed file stops here, with its line
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if save_data and reports():
        save(opts, save_data)
    if plain:
        where = "one process, no parameter server"
    elif launched():  # shape and mode are the launcher's options, not these
        where = "the cluster adapm-launch started"
    else:
        where = f"{nodes} node(s) x {workers_per_node} worker(s), mode {mode}"
    if reports():
        source = opts["data"] or f"{opts['rows']}x{opts['cols']} generated matrix"
        model = " with mean and biases" if uses_biases(opts) else ""
        print(f"[{APP}] {source}, rank {opts['rank']}{model}; {where}", flush=True)
    start = time.perf_counter()
    summary = train_plain(opts) if plain else run(opts, nodes, workers_per_node, mode)
    if summary is None:
        return  # a launched worker other than rank 0: rank 0 reports
    print(f"[{APP}] done in {time.perf_counter() - start:.1f} s: "
          f"{summary['data_points_per_s']:,.0f} data points/s; test RMSE "
          f"{summary['rmse_before']:.4f} untrained -> {summary['rmse_after']:.4f} trained "
          f"(bias-only baseline {summary['rmse_baseline']:.4f})"
          + ("" if plain else f"; {summary['local_share']:.1%} of key accesses local in training, "
                          f"{summary['bytes_sent'] / 1e6:.1f} MB sent between nodes"),
          flush=True)
    if opts["save_factors"]:
        print(f"[{APP}] wrote the model to {opts['save_factors']}", flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(summary, f, indent=1)
    if not summary["rmse_after"] < summary["rmse_before"]:
        raise SystemExit(f"[{APP}] training did not improve the test RMSE")


def save(opts, folder):
    os.makedirs(folder, exist_ok=True)
    rows, cols, train_cells, test_cells = load_data(opts)
    write_matrix_market(os.path.join(folder, "train.mtx"), rows, cols, *train_cells)
    write_matrix_market(os.path.join(folder, "test.mtx"), rows, cols, *test_cells)
    print(f"[{APP}] wrote {folder}/train.mtx and {folder}/test.mtx", flush=True)


if __name__ == "__main__":
    main()
