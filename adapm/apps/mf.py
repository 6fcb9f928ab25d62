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

import json
import os
import time

import click
import numpy as np

from adapm.apps.common import (
    AccessCounter,
    Progress,
    app_options,
    end_epoch,
    launched,
    reports,
    save_worker_result,
    start_cluster,
    throughput_summary,
)
from adapm.apps.mf_data import (
    DEFAULTS,
    REG_GENERATED,
    REG_RATINGS,
    load_data,
    load_matrix,
    with_defaults,
    write_matrix_market,
)
from adapm.apps.mf_model import (
    ADAGRAD_EPS,
    FactorInit,
    adagrad_step,
    baseline_rmse,
    bias_baseline,
    fused_step,
    minibatches,
    model_of,
    partition_rows,
    rmse,
    save_factors,
    uses_biases,
    valid_text,
)
from adapm.ml.data import IntentLoader
from adapm.table.optimizers import Adagrad

APP = "mf"


def reg_of(opts):
    """The L2 penalty per cell: --reg, else the default for the kind of data."""
    if opts["reg"] is not None:
        return float(opts["reg"])
    return REG_RATINGS if opts["data"] else REG_GENERATED


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
