"""What every example app shares: starting (embedded or under adapm-launch), progress
lines with throughput, Zipf draws, and summing gradients of duplicate keys.

An app is one module with a `train(w, opts)` task that every worker runs and a click
`main`, whose options every app has (--nodes, --workers-per-node, --mode, --lookahead,
--seed, --json, --worker-json) come from `app_options`. `start_cluster` runs the task:
- `python -m adapm.apps.NAME --nodes N --workers-per-node W ...`: an embedded local
  cluster (adapm.run), with the app's own initial values;
- `adapm-launch ... -m adapm.apps.NAME ...`: the launcher already started the cluster;
  the app checks that its table has the shape the app needs (and says which
  --num-keys/--value-length to pass if not), and its workers write the initial values
  themselves (each its share of the keys), so `--init` must be left at zeros."""

import json
import os
import sys
import time

import click
import numpy as np

import adapm
from adapm.common.config import ENV_RANK, MODES
from adapm.table.initializers import initial_values
from adapm.table.stats import access_counts, local_share

INIT_CHUNK = 65_536  # keys written per set() when workers initialise a launched table
NODES, WORKERS_PER_NODE = 2, 1  # every app's embedded cluster by default (B5's shape)
LOOKAHEAD_HELP = "batches announced ahead (default: adapted to the step time)"


def app_options(app, seed_help="data, initial values, shuffling",
                lookahead_help=LOOKAHEAD_HELP):
    """The command-line options every app shares, with the same names, defaults and
    choices, for its click `main` (put it right below @click.command): --nodes,
    --workers-per-node, --mode (adapm.common.config.MODES), --lookahead, --seed, --json and
    --worker-json. main receives them as nodes, workers_per_node, mode, lookahead, seed,
    json_path and worker_json. Options of one app only (--plain, ...) stay in the app."""
    options = [
        click.option("--nodes", default=NODES, show_default=True, type=click.IntRange(min=1),
                     help="nodes of the embedded local cluster (ignored under adapm-launch)"),
        click.option("--workers-per-node", default=WORKERS_PER_NODE, show_default=True,
                     type=click.IntRange(min=1),
                     help="workers per node of the embedded cluster (ignored under "
                          "adapm-launch)"),
        click.option("--mode", type=click.Choice(MODES), default="adaptive", show_default=True,
                     help="management mode of the embedded cluster (under adapm-launch: "
                          "the launcher's --mode)"),
        click.option("--lookahead", type=click.IntRange(min=0), default=None,
                     help=lookahead_help),
        click.option("--seed", default=0, show_default=True, help=seed_help),
        click.option("--json", "json_path", type=click.Path(dir_okay=False),
                     help="write the results as JSON to this file"),
        click.option("--worker-json", type=click.Path(dir_okay=False), metavar="PREFIX",
                     help="every worker writes its own results to PREFIX.rankR.json "
                          f"(launched runs: combine them with adapm.apps.{app}.finish)"),
    ]

    def decorate(fn):
        for option in reversed(options):  # listed in --help in this order
            fn = option(fn)
        return fn

    return decorate


def launched():
    """Whether this process is a worker started by adapm-launch."""
    return ENV_RANK in os.environ


def reports():
    """Whether this process prints the run's header and summary: always when embedded,
    only rank 0's when adapm-launch started one process per worker."""
    return os.environ.get(ENV_RANK, "0") == "0"


def start_cluster(app, train, opts, num_keys, value_length, init, nodes, workers_per_node,
                  mode):
    """Run `train(w, opts)` in every worker; returns the workers' results by rank (all of
    them embedded; under adapm-launch only this worker's, as a one-element list, and
    None for workers other than rank 0 so that only one of them reports)."""
    if not launched():
        return adapm.run(train, args=(opts,), nodes=nodes, workers_per_node=workers_per_node,
                         num_keys=num_keys, value_length=value_length, mode=mode, init=init)
    with adapm.worker() as w:
        if w.num_keys != num_keys or w.value_length != value_length:
            sys.exit(f"[{app}] this app needs a table of --num-keys {num_keys} "
                     f"--value-length {value_length}; the cluster has {w.num_keys} keys of "
                     f"length {w.value_length}")
        initialise(w, init)
        result = train(w, opts)
        return [result] if w.rank == 0 else None


def initialise(w, init):
    """Each worker writes the initial values of its share of the keys, then all wait."""
    keys = np.arange(w.rank, w.num_keys, w.num_workers, dtype=np.uint64)
    for start in range(0, keys.shape[0], INIT_CHUNK):
        chunk = keys[start:start + INIT_CHUNK]
        lengths = np.full(chunk.shape[0], w.value_length, dtype=np.uint64)
        # as a node server would fill them (an optimizer's init needs the value length)
        w.set(chunk, initial_values(init, chunk, lengths, w.dtype))
    w.wait_sync()
    w.barrier()


class Progress:
    """Periodic progress lines with throughput, printed by one worker."""

    def __init__(self, app, total, unit="data points", every=2.0, enabled=True):
        self.app, self.total, self.unit, self.every = app, total, unit, every
        self.enabled = enabled
        self.start = self.last = time.perf_counter()
        self.done = 0

    def update(self, n, prefix=""):
        self.done += n
        now = time.perf_counter()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            rate = self.done / (now - self.start)
            share = f"{self.done / self.total:4.0%} " if self.total else ""
            print(f"[{self.app}] {prefix}{share}{self.done:,} {self.unit}, "
                  f"{rate:,.0f} {self.unit}/s", flush=True)

    @property
    def rate(self):
        return self.done / max(time.perf_counter() - self.start, 1e-9)


def zipf_ids(rng, n, size, exponent=1.1):
    """`size` ids in [0, n), Zipf-distributed by popularity, popular ids spread out."""
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    cdf = np.cumsum(weights)
    ranks = np.searchsorted(cdf, rng.random(size) * cdf[-1])
    return rng.permutation(n)[np.minimum(ranks, n - 1)]


def sum_by_key(inverse, grads, n_unique):
    """Sum the gradient rows of duplicate keys (rows of `grads` indexed by `inverse`,
    as np.unique(..., return_inverse=True) gives it) into n_unique rows."""
    out = np.zeros((n_unique, grads.shape[1]), dtype=grads.dtype)
    order = np.argsort(inverse, kind="stable")
    sorted_inv = inverse[order]
    starts = np.flatnonzero(np.r_[True, sorted_inv[1:] != sorted_inv[:-1]])
    out[sorted_inv[starts]] = np.add.reduceat(grads[order], starts, axis=0)
    return out


class AccessCounter:
    """Key accesses of this worker and bytes its node sent, over chosen spans only (the
    training loops, not the evaluations). Local and remote as adapm.table.stats.access_counts
    defines them (pull, push and set; local: served from the worker's own node's table
    without a message), the same as the launcher's summary table."""

    def __init__(self):
        self.local = self.remote = self.node_bytes_sent = 0
        self._at = None

    def begin(self, w):
        self._at = w.stats()

    def end(self, w):
        now, then = w.stats(), self._at
        local, remote = access_counts({k: now[k] - then[k] for k in now if k != "node"})
        self.local += local
        self.remote += remote
        self.node_bytes_sent += now["node"]["bytes_sent"] - then["node"]["bytes_sent"]

    def as_dict(self):
        return {"local": self.local, "remote": self.remote,
                "node_bytes_sent": self.node_bytes_sent}


def end_epoch(w, accesses):
    """An epoch's end in the apps: the replicas' updates exchanged, this worker's span of
    counted accesses closed (before the evaluation's), and every worker through it."""
    w.wait_sync()
    accesses.end(w)
    w.barrier()


def throughput_summary(results):
    """What every app reports, over the workers' results (each with points, seconds,
    node and accesses from an AccessCounter): data points/s of the whole cluster (every
    worker's points over the slowest worker's training time), the share of local key
    accesses and the bytes sent between nodes (every node's, when all workers' results
    are here)."""
    points = sum(res["points"] for res in results)
    seconds = max(res["seconds"] for res in results)
    local = sum(res["accesses"]["local"] for res in results)
    remote = sum(res["accesses"]["remote"] for res in results)
    node_bytes = {res["node"]: res["accesses"]["node_bytes_sent"] for res in results}
    return {"data_points_per_s": points / max(seconds, 1e-9), "points": points,
            "seconds": seconds, "local_share": local_share(local, remote),
            "bytes_sent": sum(node_bytes.values()), "workers": len(results)}


def save_worker_result(opts, w, result):
    """With opts["worker_json"] = PREFIX, every worker writes its own result to
    PREFIX.rankR.json (launched runs: the apps' finish() combines them elsewhere)."""
    if opts.get("worker_json"):
        with open(f"{opts['worker_json']}.rank{w.rank}.json", "w") as f:
            json.dump(result, f)
    return result
