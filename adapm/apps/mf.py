"""Matrix factorisation by minibatch AdaGrad on a parameter server.

    python -m adapm.apps.mf                  # 2 nodes x 1 worker, generated data
    adapm-launch --nodes 2 --num-keys 22000 --value-length 32 -m adapm.apps.mf
    python -m adapm.apps.mf --plain          # the same SGD in one process, no PS

Data: generated (rows and columns drawn Zipf(1.1): a few hot rows and columns, a long
tail; values from rank-R factors plus Gaussian noise), or read from MatrixMarket
coordinate files (`--data train.mtx [--test-data test.mtx]`; `--save-data DIR` writes the
generated matrix as DIR/train.mtx and DIR/test.mtx, so other systems can train on the
same data).

Parameters: row factors are keys [0, rows), column factors keys [rows, rows + cols). A
key's value is [factor | AdaGrad accumulator] (2 x rank floats), so optimizer state moves
and replicates with its row. Each worker trains on its shard of the training cells:
every minibatch pulls the rows it touches and hands every cell's gradient to the fused
AdaGrad of adapm.optim (w.apply_gradients: the table sums duplicate keys' gradients and
takes one step per key in place, where the node holds it, else at its owner; concurrent
workers' steps never overwrite each other). `--plain` runs the same AdaGrad in numpy.
Cells are partitioned among workers by row (partition_rows), as parameter-server MF does, so a row's
factor is used by one worker only; column factors are shared. adapm.data's
IntentLoader announces each minibatch's keys ahead of its clock. The metric is the test
RMSE, printed against the untrained model's."""

import heapq
import json
import os
import time

import click
import numpy as np

from adapm import readers
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
from adapm.data import IntentLoader
from adapm.initializers import initial_values
from adapm.optim import Adagrad

APP = "mf"


# -- data ------------------------------------------------------------------------------

def synthetic(rows, cols, cells, rank, noise, seed):
    """(row ids, column ids, values) of `cells` cells of a noisy rank-`rank` matrix."""
    rng = np.random.default_rng(seed)
    scale = rank ** -0.25  # products of two such factors have unit variance
    u = rng.normal(0.0, scale, size=(rows, rank))
    v = rng.normal(0.0, scale, size=(cols, rank))
    r = zipf_ids(rng, rows, cells)
    c = zipf_ids(rng, cols, cells)
    y = np.einsum("ij,ij->i", u[r], v[c]) + rng.normal(0.0, noise, size=cells)
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
    integer or pattern values (0-based ids, float32 values; adapm.readers, which names
    the line of a malformed entry). cache=True: parsed once per machine, memory-mapped
    by every later read (adapm.readers' cache)."""
    r, c, y, (rows, cols) = readers.read_matrix_market(path, dtype=np.float32, cache=cache)
    return rows, cols, r, c, y


def load_data(opts):
    """(rows, cols, train (r, c, y), test (r, c, y)), the same in every worker. Files are
    parsed once per machine (the first process to read one, usually the launching
    process, caches it; the workers memory-map it and train() copies their shard)."""
    if opts.get("data"):
        rows, cols, r, c, y = read_matrix_market(opts["data"], cache=True)
        if opts.get("test_data"):
            trows, tcols, tr, tc, ty = read_matrix_market(opts["test_data"], cache=True)
            rows, cols = max(rows, trows), max(cols, tcols)
            return rows, cols, (r, c, y), (tr, tc, ty)
        held = np.random.default_rng(opts["seed"]).random(len(y)) < 0.1
        return rows, cols, (r[~held], c[~held], y[~held]), (r[held], c[held], y[held])
    rows, cols = opts["rows"], opts["cols"]
    r, c, y = synthetic(rows, cols, opts["train"] + opts["test"], opts["rank"],
                        opts["noise"], opts["seed"])
    n = opts["train"]
    return rows, cols, (r[:n], c[:n], y[:n]), (r[n:], c[n:], y[n:])


# -- the model -------------------------------------------------------------------------

class FactorInit:
    """Initial parameters: factor ~ N(0, std) (seeded, as init=("normal", std, seed)),
    AdaGrad accumulator 0. Each key's value is [factor (rank) | accumulator (rank)]."""

    def __init__(self, rank, std, seed):
        self.rank, self.std, self.seed = rank, std, seed

    def __call__(self, keys):
        lengths = np.full(len(keys), self.rank, dtype=np.uint64)
        factors = initial_values(("normal", self.std, self.seed), keys, lengths, "float32")
        values = np.zeros((len(keys), 2 * self.rank), dtype=np.float32)
        values[:, : self.rank] = factors.reshape(-1, self.rank)
        return values


def rmse(table, rows, rank, test, batch=10_000):
    """Test RMSE; `table` has pull(keys)."""
    r, c, y = test
    squared = 0.0
    for start in range(0, len(y), batch):
        sl = slice(start, start + batch)
        u = table.pull(r[sl])[:, :rank]
        v = table.pull(rows + c[sl])[:, :rank]
        squared += float(((np.einsum("ij,ij->i", u, v) - y[sl]) ** 2).sum())
    return (squared / max(len(y), 1)) ** 0.5


ADAGRAD_EPS = 1e-10  # torch.optim.Adagrad's


def fused_step(w, keys, y, rank, opt, reg):
    """One minibatch on the parameter server: keys = [row keys | column keys] of the
    batch's cells. The rows are pulled (duplicates too: no np.unique), and the gradient of
    every cell goes to the table's fused AdaGrad (`opt`), which sums the duplicates' and
    takes one step per key in place. Returns the squared error."""
    b = len(y)
    rows = w.pull_rows(keys, opt)
    u, v = rows[:b], rows[b:]
    err = np.einsum("ij,ij->i", u, v) - y
    w.apply_gradients(keys, np.concatenate([err[:, None] * v + reg * u,
                                            err[:, None] * u + reg * v]), opt)
    return float((err * err).sum())


def adagrad_step(table, keys, y, rank, lr, reg):
    """The plain loop's minibatch (the reference of B5), the same AdaGrad in numpy:
    `table` has pull and push (ArrayTable). Returns the squared error."""
    b = len(y)
    unique, inverse = np.unique(keys, return_inverse=True)
    values = table.pull(unique)
    factors, accum = values[:, :rank], values[:, rank:]
    u, v = factors[inverse[:b]], factors[inverse[b:]]
    err = np.einsum("ij,ij->i", u, v) - y
    grads = np.concatenate([err[:, None] * v + reg * u, err[:, None] * u + reg * v])
    g = sum_by_key(inverse, grads, len(unique))
    g2 = g * g
    update = np.empty_like(values)
    update[:, :rank] = -lr * g / (np.sqrt(accum + g2) + ADAGRAD_EPS)
    update[:, rank:] = g2
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


# -- training --------------------------------------------------------------------------

def train(w, opts):
    """The task every worker runs. Returns a dict of results (see finish())."""
    rows, _, (r, c, y), test = load_data(opts)
    shard = np.flatnonzero(partition_rows(r, rows, w.num_workers) == w.rank)
    r, c, y = r[shard], c[shard], y[shard]
    rank = opts["rank"]
    opt = Adagrad(lr=opts["lr"], eps=ADAGRAD_EPS)  # [factor | accumulators], fused
    before = rmse(w, rows, rank, test) if w.rank == 0 else None
    w.barrier()  # nobody trains before the untrained model is measured
    rng = np.random.default_rng(opts["seed"] + 1 + w.rank)
    progress = Progress(APP, opts["epochs"] * len(y), enabled=w.rank == 0)
    lookahead = opts.get("lookahead")
    log, seconds, accesses = [], 0.0, AccessCounter()
    for epoch in range(opts["epochs"]):
        batches = minibatches(len(y), opts["batch"], rng)
        loader = IntentLoader(w, batches, keys_of=lambda idx: np.concatenate([r[idx],
                                                                              rows + c[idx]]),
                              lookahead=lookahead)
        accesses.begin(w)
        t0 = time.perf_counter()
        for idx in loader:
            fused_step(w, np.concatenate([r[idx], rows + c[idx]]), y[idx], rank, opt,
                       opts["reg"])
            progress.update(len(idx), prefix=f"epoch {epoch + 1}: ")
        elapsed = time.perf_counter() - t0
        seconds += elapsed
        end_epoch(w, accesses)
        if w.rank == 0:
            text = (f"epoch {epoch + 1}/{opts['epochs']}: {len(y) / elapsed:,.0f} data "
                    f"points/s per worker, test RMSE {rmse(w, rows, rank, test):.4f}")
            print(f"[{APP}] {text}", flush=True)
            log.append(text)
        w.barrier()
    after = rmse(w, rows, rank, test) if w.rank == 0 else None
    result = {"points": opts["epochs"] * len(y), "seconds": seconds, "before": before,
              "after": after, "log": log, "node": w.node, "accesses": accesses.as_dict()}
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
    rows, cols, (r, c, y), test = load_data(opts)
    rank = opts["rank"]
    table = ArrayTable(FactorInit(rank, 0.1, opts["seed"])(np.arange(rows + cols)))
    before = rmse(table, rows, rank, test)
    rng = np.random.default_rng(opts["seed"] + 1)
    progress = Progress(APP, opts["epochs"] * len(y))
    seconds = 0.0
    for epoch in range(opts["epochs"]):
        t0 = time.perf_counter()
        for idx in minibatches(len(y), opts["batch"], rng):
            adagrad_step(table, np.concatenate([r[idx], rows + c[idx]]), y[idx], rank,
                         opts["lr"], opts["reg"])
            progress.update(len(idx), prefix=f"epoch {epoch + 1}: ")
        seconds += time.perf_counter() - t0
        print(f"[{APP}] plain epoch {epoch + 1}/{opts['epochs']}: "
              f"{len(y) / (time.perf_counter() - t0):,.0f} data points/s, "
              f"test RMSE {rmse(table, rows, rank, test):.4f}", flush=True)
    points = opts["epochs"] * len(y)
    return {"data_points_per_s": points / seconds, "points": points, "seconds": seconds,
            "rmse_before": before, "rmse_after": rmse(table, rows, rank, test)}


def table_shape(opts):
    """(num_keys, value_length) the app's table needs."""
    if opts.get("data"):
        rows, cols = load_data(opts)[:2]
    else:
        rows, cols = opts["rows"], opts["cols"]
    return rows + cols, 2 * opts["rank"]


def run(opts, nodes=1, workers_per_node=1, mode="adaptive"):
    """Train on a cluster (embedded, or the one adapm-launch started); returns the
    summary of finish() (None in launched workers other than rank 0)."""
    num_keys, value_length = table_shape(opts)
    results = start_cluster(APP, train, opts, num_keys, value_length,
                            FactorInit(opts["rank"], 0.1, opts["seed"]), nodes,
                            workers_per_node, mode)
    return None if results is None else finish(results)


def finish(results):
    """Summary over the workers' results: throughput, local share and bytes
    (common.throughput_summary) and the test RMSE before and after training."""
    first = results[0]
    return {**throughput_summary(results), "rmse_before": first["before"],
            "rmse_after": first["after"], "log": first["log"]}


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@app_options(APP)
@click.option("--rows", default=20_000, show_default=True)
@click.option("--cols", default=2_000, show_default=True)
@click.option("--train", "train_cells", default=400_000, show_default=True,
              help="training cells")
@click.option("--test", "test_cells", default=40_000, show_default=True, help="test cells")
@click.option("--rank", default=16, show_default=True)
@click.option("--noise", default=0.1, show_default=True)
@click.option("--epochs", default=4, show_default=True)
@click.option("--batch", default=256, show_default=True)
@click.option("--lr", default=0.1, show_default=True)
@click.option("--reg", default=0.01, show_default=True)
@click.option("--data", type=click.Path(exists=True, dir_okay=False),
              help="training cells from a MatrixMarket coordinate file")
@click.option("--test-data", type=click.Path(exists=True, dir_okay=False),
              help="test cells from a MatrixMarket file (default: 10% of --data held out)")
@click.option("--save-data", type=click.Path(file_okay=False),
              help="write the generated matrix to DIR/train.mtx and DIR/test.mtx")
@click.option("--plain", is_flag=True, help="the same SGD in this process, no parameter server")
def main(nodes, workers_per_node, rows, cols, train_cells, test_cells, rank, noise, epochs,
         batch, lr, reg, lookahead, mode, seed, data, test_data, save_data, plain, json_path,
         worker_json):
    """Train a matrix factorisation and report test RMSE."""
    opts = dict(rows=rows, cols=cols, train=train_cells, test=test_cells, rank=rank,
                noise=noise, epochs=epochs, batch=batch, lr=lr, reg=reg,
                lookahead=lookahead, seed=seed, data=data, test_data=test_data,
                worker_json=worker_json)
    if save_data and reports():
        save(opts, save_data)
    if plain:
        where = "one process, no parameter server"
    elif launched():  # shape and mode are the launcher's options, not these
        where = "the cluster adapm-launch started"
    else:
        where = f"{nodes} node(s) x {workers_per_node} worker(s), mode {mode}"
    if reports():
        print(f"[{APP}] {data or f'{rows}x{cols} generated matrix'}, rank {rank}; {where}",
              flush=True)
    start = time.perf_counter()
    summary = train_plain(opts) if plain else run(opts, nodes, workers_per_node, mode)
    if summary is None:
        return  # a launched worker other than rank 0: rank 0 reports
    print(f"[{APP}] done in {time.perf_counter() - start:.1f} s: "
          f"{summary['data_points_per_s']:,.0f} data points/s; test RMSE "
          f"{summary['rmse_before']:.4f} untrained -> {summary['rmse_after']:.4f} trained"
          + ("" if plain else f"; {summary['local_share']:.1%} of key accesses local, "
                          f"{summary['bytes_sent'] / 1e6:.1f} MB sent between nodes"),
          flush=True)
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
