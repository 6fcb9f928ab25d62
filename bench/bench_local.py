"""B1 local pull, B2 local push, B3 concurrent local (docs/design/BENCHMARKS.md).

B1/B2 run inside one worker process of a one-node cluster, against numpy on a plain array
of the same shape in the same process. B3 runs W worker processes on hot keys."""

import argparse
import os
import sys
import time

import numpy as np

import adapm

from common import line, rate, save, verdict

D = 64
BATCH = 1000


def local_task(w, batches, seed):
    """B1 and B2 figures from inside a worker process."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, w.num_keys, size=(batches, BATCH))
    dup = keys.copy()
    dup[:, : BATCH // 10] = dup[:, BATCH // 10: 2 * (BATCH // 10)]  # 10% duplicates
    plain = rng.random((w.num_keys, D), dtype=np.float32)
    values = rng.random((BATCH, D), dtype=np.float32)
    out = np.empty((BATCH, D), dtype=np.float32)
    buf = np.empty((BATCH, D), dtype=np.float32)
    n = batches * BATCH

    def pulls():
        for k in keys:
            w.pull(k, out=out)

    def takes():
        for k in keys:
            np.take(plain, k, axis=0, out=buf)

    def pushes():
        for k in dup:
            w.push(k, values)

    def add_ats():
        for k in dup:
            np.add.at(plain, k, values)

    def fancy_adds():
        for k in dup:
            plain[k] += values

    pulls(), takes()  # warm both (page tables, caches)
    figures = {}
    for _ in range(3):  # interleave, so both see the same machine noise
        for name, fn in (("pull", pulls), ("take", takes), ("push", pushes),
                         ("add_at", add_ats), ("fancy_add", fancy_adds)):
            figures[name] = max(figures.get(name, 0.0), rate(n, fn, repeat=1))
    return figures


def concurrent_task(w, seconds, hot_keys):
    """B3: every worker pulls and pushes batches of 100 of the same hot keys for `seconds`.
    Returns (keys accessed, seconds, rows pushed, final table sum or None)."""
    rng = np.random.default_rng(w.rank)
    keys = rng.integers(0, hot_keys, size=(1000, 100))
    ones = np.ones((100, D), dtype=np.float32)
    w.barrier()
    start = time.perf_counter()
    deadline = start + seconds
    rounds = 0
    while time.perf_counter() < deadline:
        for k in keys[:100]:
            w.pull(k)
            w.push(k, ones)
        rounds += 100
        keys = np.roll(keys, 100, axis=0)
    elapsed = time.perf_counter() - start
    w.barrier()
    total = float(w.pull(np.arange(hot_keys)).sum(dtype=np.float64)) if w.rank == 0 else None
    return 2 * rounds * 100, elapsed, rounds * 100, total


def bench_b1_b2(num_keys, batches):
    [fig] = adapm.run(local_task, args=(batches, 1), num_keys=num_keys, value_length=D,
                      init=("uniform", 0.0, 1.0, 1))
    r1 = fig["pull"] / fig["take"]
    line("B1", f"local pull {fig['pull'] / 1e6:.2f}M keys/s vs np.take "
               f"{fig['take'] / 1e6:.2f}M keys/s: {r1:.2f}x (target >= 0.8x, floor 0.5x)",
         verdict(r1, 0.8, floor=0.5))
    r2a = fig["push"] / fig["add_at"]
    r2b = fig["push"] / fig["fancy_add"]
    line("B2", f"local push {fig['push'] / 1e6:.2f}M keys/s vs np.add.at "
               f"{fig['add_at'] / 1e6:.2f}M: {r2a:.1f}x (target >= 10x)",
         verdict(r2a, 10.0))
    line("B2", f"local push vs a[k] += v {fig['fancy_add'] / 1e6:.2f}M: {r2b:.2f}x "
               "(target >= 1x; a[k] += v loses duplicates)", verdict(r2b, 1.0))
    return {"figures": fig, "b1_ratio": r1, "b2_ratio_add_at": r2a, "b2_ratio_fancy": r2b}


def bench_b3(worker_counts, seconds, hot_keys=1000):
    rows = []
    base = None
    for workers in worker_counts:
        results = adapm.run(concurrent_task, args=(seconds, hot_keys),
                            workers_per_node=workers, num_keys=hot_keys, value_length=D)
        keys = sum(r[0] for r in results)
        elapsed = max(r[1] for r in results)
        expected = sum(r[2] for r in results) * D  # every push adds ones
        lost = expected - results[0][3]
        aggregate = keys / elapsed
        base = base or aggregate
        rows.append({"workers": workers, "keys_per_s": aggregate, "lost_updates": lost,
                     "speedup": aggregate / base})
        grows = workers == 1 or workers > os.cpu_count() or aggregate > rows[-2]["keys_per_s"]
        line("B3", f"{workers} workers on {hot_keys} hot keys: {aggregate / 1e6:.2f}M keys/s, "
                   f"{aggregate / base:.2f}x one worker, lost updates {lost:.0f} "
                   "(target: none lost, grows with workers up to the cores)",
             "PASS" if lost == 0 and grows else "MISS")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true", help="longer runs, more workers")
    args = parser.parse_args(argv)
    batches = 1000 if args.full else 200
    b12 = bench_b1_b2(1_000_000, batches)
    b3 = bench_b3((1, 2, 4) if args.full else (1, 2), seconds=3.0 if args.full else 1.0)
    path = save("local", {"B1_B2": b12, "B3": b3, "full": args.full})
    print(f"    results: {path}")


if __name__ == "__main__":
    sys.exit(main())
