"""Matrix factorisation by minibatch AdaGrad on a parameter server.

    python -m adapm.apps.mf --workers-per-node 2 --epochs 4

Synthetic data: rows and columns drawn Zipf(1.1) (a few hot rows and columns, a long
tail), values from rank-R factors plus Gaussian noise. Row factors are keys [0, rows),
column factors keys [rows, rows + cols). A key's value is [factor | AdaGrad accumulator]
(2 x rank floats), so optimizer state travels with its row. Each worker trains on its
shard of the training cells: every minibatch pulls the keys it touches, sums the
gradients of duplicate keys and pushes the update (additive, so workers never overwrite
each other). Each batch's keys are signalled as an intent a few clocks ahead, and the
clock advances once per batch. The metric is the test RMSE, printed against the RMSE of
the untrained model."""

import time

import click
import numpy as np

import adapm
from adapm.initializers import initial_values


def zipf_ids(rng, n, size, exponent=1.1):
    """`size` ids in [0, n), Zipf-distributed by popularity, popular ids spread out."""
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    cdf = np.cumsum(weights)
    ranks = np.searchsorted(cdf, rng.random(size) * cdf[-1])
    return rng.permutation(n)[np.minimum(ranks, n - 1)]


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


def rmse(w, rows, rank, r, c, y, batch=10_000):
    squared = 0.0
    for start in range(0, len(y), batch):
        sl = slice(start, start + batch)
        u = w.pull(r[sl])[:, :rank]
        v = w.pull(rows + c[sl])[:, :rank]
        squared += float(((np.einsum("ij,ij->i", u, v) - y[sl]) ** 2).sum())
    return (squared / max(len(y), 1)) ** 0.5


def sum_by_key(inverse, grads, n_unique):
    """Sum the gradient rows of duplicate keys (rows of `grads` indexed by `inverse`)."""
    order = np.argsort(inverse, kind="stable")
    sorted_inv = inverse[order]
    starts = np.flatnonzero(np.r_[True, sorted_inv[1:] != sorted_inv[:-1]])
    assert len(starts) == n_unique
    return np.add.reduceat(grads[order], starts, axis=0)


def adagrad_step(w, keys, y, rank, lr, reg):
    """One minibatch: keys = [row keys | column keys] of the batch's cells."""
    b = len(y)
    unique, inverse = np.unique(keys, return_inverse=True)
    values = w.pull(unique)
    factors, accum = values[:, :rank], values[:, rank:]
    u, v = factors[inverse[:b]], factors[inverse[b:]]
    err = np.einsum("ij,ij->i", u, v) - y
    grads = np.concatenate([err[:, None] * v + reg * u, err[:, None] * u + reg * v])
    g = sum_by_key(inverse, grads, len(unique))
    g2 = g * g
    update = np.empty_like(values)
    update[:, :rank] = -lr * g / np.sqrt(accum + g2 + 1e-8)
    update[:, rank:] = g2
    w.push(unique, update)
    return float((err * err).sum())


def train(w, opts):
    """The task every worker runs. Returns (epoch lines, initial RMSE, final RMSE, stats)."""
    rows, cols, rank = opts["rows"], opts["cols"], opts["rank"]
    r, c, y = synthetic(rows, cols, opts["train"] + opts["test"], rank,
                        opts["noise"], opts["seed"])
    tr, tc, ty = r[opts["train"]:], c[opts["train"]:], y[opts["train"]:]
    shard = np.arange(w.rank, opts["train"], w.num_workers)
    r, c, y = r[shard], c[shard], y[shard]
    batch, lookahead = opts["batch"], opts["lookahead"]
    before = rmse(w, rows, rank, tr, tc, ty) if w.rank == 0 else None
    w.barrier()  # nobody trains before the untrained model is measured
    rng = np.random.default_rng(opts["seed"] + 1 + w.rank)
    log = []
    for epoch in range(opts["epochs"]):
        order = rng.permutation(len(y))
        batches = [order[s:s + batch] for s in range(0, len(order), batch)]
        keys = [np.concatenate([r[idx], rows + c[idx]]) for idx in batches]
        for j in range(min(lookahead, len(keys))):  # the epoch's first batches
            w.intent(keys[j], w.clock + j)
        t0 = time.perf_counter()
        for i, idx in enumerate(batches):
            if i + lookahead < len(batches):
                w.intent(keys[i + lookahead], w.clock + lookahead)
            adagrad_step(w, keys[i], y[idx], rank, opts["lr"], opts["reg"])
            w.advance_clock()
        elapsed = time.perf_counter() - t0
        w.wait_sync()
        w.barrier()
        if w.rank == 0:
            test = rmse(w, rows, rank, tr, tc, ty)
            text = (f"epoch {epoch + 1}/{opts['epochs']}: {len(y) / elapsed:,.0f} data points/s "
                    f"per worker, test RMSE {test:.4f}")
            print(f"[mf] {text}", flush=True)
            log.append(text)
        w.barrier()
    after = rmse(w, rows, rank, tr, tc, ty) if w.rank == 0 else None
    return log, before, after, w.stats()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--nodes", default=1, show_default=True, help="nodes of the local cluster")
@click.option("--workers-per-node", default=2, show_default=True)
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
@click.option("--lookahead", default=32, show_default=True,
              help="batches ahead for which intents are signalled")
@click.option("--mode", default="adaptive", show_default=True)
@click.option("--seed", default=0, show_default=True)
def main(nodes, workers_per_node, rows, cols, train_cells, test_cells, rank, noise, epochs,
         batch, lr, reg, lookahead, mode, seed):
    """Train a matrix factorisation on generated data and report test RMSE."""
    opts = dict(rows=rows, cols=cols, train=train_cells, test=test_cells, rank=rank,
                noise=noise, epochs=epochs, batch=batch, lr=lr, reg=reg,
                lookahead=lookahead, seed=seed)
    print(f"[mf] {rows}x{cols} matrix, {train_cells:,} training cells, rank {rank}; "
          f"{nodes} node(s) x {workers_per_node} worker(s), mode {mode}", flush=True)
    start = time.perf_counter()
    results = adapm.run(train, args=(opts,), nodes=nodes, workers_per_node=workers_per_node,
                        num_keys=rows + cols, value_length=2 * rank, mode=mode,
                        init=FactorInit(rank, 0.1, seed))
    _, before, after, stats = results[0]
    node = stats["node"]
    local = node["pulls_local"] + node["pushes_local"]
    remote = node["pulls_remote"] + node["pushes_remote"]
    print(f"[mf] done in {time.perf_counter() - start:.1f} s: test RMSE {before:.4f} "
          f"untrained -> {after:.4f} trained (noise floor {noise}); "
          f"{local / max(local + remote, 1):.1%} of key accesses local", flush=True)
    if not after < before:
        raise SystemExit("[mf] training did not improve the test RMSE")


if __name__ == "__main__":
    main()
