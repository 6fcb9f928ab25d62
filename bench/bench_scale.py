"""B7 scale: 1, 2, 4, 8 nodes x 2 workers (docs/design/BENCHMARKS.md).

Every worker runs the Zipf access workload of bench_remote (batches drawn Zipf(1.1) from
100k keys x 16 float32, pull then push) through adapm.data.IntentLoader with its default
look-ahead, in mode adaptive, the same number of passes over each worker's plan at every
size; the figure is keys/s per worker, against the 1-node run of the same call.
Target: at 8 nodes at least half the 1-node rate (needs a core per process: run it where
there are 16 cores; on a 2-core machine, `--nodes 1,2 --workers-per-node 1`)."""

import argparse
import os
import sys
import time

import numpy as np
from bench_remote import zipf_keys

import adapm
from adapm.data import IntentLoader

from common import line, save, verdict


def loader_zipf_task(w, batches, batch, passes):
    """bench_remote's Zipf plan, announced by IntentLoader's default look-ahead."""
    rng = np.random.default_rng(100 + w.rank)
    plan = [zipf_keys(rng, w.num_keys, batch) for _ in range(batches)]
    ones = np.ones((batch, 16), dtype=np.float32)
    w.barrier()
    start = time.perf_counter()
    done = 0
    for keys in IntentLoader(w, [plan[i % batches] for i in range(batches * passes)],
                             keys_of=lambda keys: keys):
        w.pull(keys)
        w.push(keys, ones)
        done += 2 * batch
    elapsed = time.perf_counter() - start
    w.wait_sync()
    w.barrier()
    return done, elapsed, w.stats()


def per_worker(nodes, passes, mode, workers_per_node):
    results = adapm.run(loader_zipf_task, args=(200, 500, passes), nodes=nodes,
                        workers_per_node=workers_per_node, num_keys=100_000, value_length=16,
                        mode=mode)
    rates = [done / elapsed for done, elapsed, _ in results]
    local = sum(s["pulls_local"] + s["pushes_local"] for _, _, s in results)
    remote = sum(s["pulls_remote"] + s["pushes_remote"] for _, _, s in results)
    return sum(rates) / len(rates), local / max(local + remote, 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", default="1,2,4,8")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--mode", default="adaptive")
    parser.add_argument("--workers-per-node", type=int, default=2)
    args = parser.parse_args(argv)
    rows, base = [], None
    for nodes in (int(n) for n in args.nodes.split(",")):
        rate, local = per_worker(nodes, args.passes, args.mode, args.workers_per_node)
        base = base or rate
        rows.append({"nodes": nodes, "keys_per_s_per_worker": rate, "local_share": local,
                     "vs_one_node": rate / base})
        line("B7", f"{nodes} nodes x {args.workers_per_node} workers, {args.mode}: "
                   f"{rate / 1e6:.2f}M keys/s per worker, {local:.1%} local, "
                   f"{rate / base:.2f}x the 1-node figure (target >= 0.5x at 8 nodes)",
             verdict(rate / base, 0.5))
    path = save("scale", {"rows": rows, "cpus": os.cpu_count(), "mode": args.mode})
    print(f"    results: {path}")


if __name__ == "__main__":
    sys.exit(main())
