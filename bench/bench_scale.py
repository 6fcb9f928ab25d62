"""B7 scale: 1, 2, 4, 8 nodes x 2 workers (../shared/docs/BENCHMARKS.md).

Every worker runs the Zipf access workload of bench_remote (batches drawn Zipf(1.1) from
100k keys x 16 float32, pull then push, intents LOOKAHEAD batches ahead) in mode adaptive,
the same number of passes over each worker's plan at every size; the figure is keys/s
per worker, against the 1-node run of the same call.
Target: throughput per worker holds within 20% (needs a core per process: run it where
there are 16 cores)."""

import argparse
import os
import sys

from bench_remote import LOOKAHEAD, zipf_task

import adapm

from common import line, save, verdict


def per_worker(nodes, passes, mode):
    results = adapm.run(zipf_task, args=(200, 500, passes, LOOKAHEAD), nodes=nodes,
                        workers_per_node=2, num_keys=100_000, value_length=16, mode=mode)
    rates = [done / elapsed for done, elapsed, _ in results]
    local = sum(s["pulls_local"] + s["pushes_local"] for _, _, s in results)
    remote = sum(s["pulls_remote"] + s["pushes_remote"] for _, _, s in results)
    return sum(rates) / len(rates), local / max(local + remote, 1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", default="1,2,4,8")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--mode", default="adaptive")
    args = parser.parse_args(argv)
    rows, base = [], None
    for nodes in (int(n) for n in args.nodes.split(",")):
        rate, local = per_worker(nodes, args.passes, args.mode)
        base = base or rate
        rows.append({"nodes": nodes, "keys_per_s_per_worker": rate, "local_share": local,
                     "vs_one_node": rate / base})
        line("B7", f"{nodes} nodes x 2 workers, {args.mode}: {rate / 1e6:.2f}M keys/s per "
                   f"worker, {local:.1%} local, {rate / base:.2f}x the 1-node figure "
                   "(target >= 0.8x)", verdict(rate / base, 0.8))
    path = save("scale", {"rows": rows, "cpus": os.cpu_count(), "mode": args.mode})
    print(f"    results: {path}")


if __name__ == "__main__":
    sys.exit(main())
