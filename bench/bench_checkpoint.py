"""B12 checkpoint: w.save of a 10M x 16 float32 table on one node, and of the same table on
2 nodes, against a dd-style sequential write (with fsync) of the same bytes to the same
disk in the same run (docs/design/BENCHMARKS.md). Target: >= 0.5x its bandwidth.

The save's bandwidth counts only the values' bytes (the keys and manifests it writes
besides are its overhead) over the whole of w.save: the phases, the sync, every node's
part and the commit. The disk's speed varies a lot from one write to the next (a virtual
disk flushing what came before), so saves and sequential writes alternate, REPEAT times
each in the same cluster (worker 0 writes the reference while the others wait at a
barrier), and the best of each is compared (the medians are printed too). Restoring is
timed for information."""

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

import adapm

from common import line, save, verdict

DIM = 16


def sequential_write(folder, nbytes, chunk=32 << 20):
    """Seconds to write `nbytes` sequentially into a new file and fsync it (dd conv=fsync)."""
    buffer = np.ones(chunk // 4, dtype=np.float32)
    filename = os.path.join(folder, "dd.bin")
    start = time.perf_counter()
    with open(filename, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            view = memoryview(buffer).cast("B")[:min(left, chunk)]
            f.write(view)
            left -= view.nbytes
        os.fsync(f.fileno())
    seconds = time.perf_counter() - start
    os.unlink(filename)
    return seconds


REPEAT = 5
SETTLE = 1.0  # seconds after os.sync() before each timed write: a clean start


def _settled(step, *args):
    os.sync()
    time.sleep(SETTLE)
    return step(*args)


def _timed_saves(w, path, folder, nbytes):
    """[(save seconds, sequential write seconds)] * REPEAT, alternating."""
    # every value written once, so that the table's pages are real (as after training)
    start, end = w.rank * w.num_keys // w.num_workers, (w.rank + 1) * w.num_keys // w.num_workers
    step = 1 << 20
    for first in range(start, end, step):
        keys = np.arange(first, min(first + step, end))
        w.set(keys, np.full((keys.shape[0], DIM), 0.5, dtype=np.float32))
    times = []
    for _ in range(REPEAT):
        w.barrier()
        reference = _settled(sequential_write, folder, nbytes) if w.rank == 0 else 0.0
        _settled(w.barrier)
        begin = time.perf_counter()
        w.save(path)
        times.append((time.perf_counter() - begin, reference))
    return times


def _count(w):
    return w.stats()["clock"]


def measure(folder, num_keys, nodes, nbytes):
    """(save seconds per repetition: the slowest worker's, sequential write seconds per
    repetition, restore seconds)."""
    path = os.path.join(folder, f"ck{nodes}")
    per_worker = adapm.run(_timed_saves, args=(path, folder, nbytes), nodes=nodes,
                           num_keys=num_keys, value_length=DIM, summary=False)
    saves = [max(times[i][0] for times in per_worker) for i in range(REPEAT)]
    references = [per_worker[0][i][1] for i in range(REPEAT)]
    start = time.perf_counter()
    adapm.run(_count, nodes=nodes, restore=path, summary=False)
    restored = time.perf_counter() - start
    shutil.rmtree(path)
    return saves, references, restored


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--keys", type=int, default=10_000_000)
    parser.add_argument("--dir", default=None,
                        help="folder on the disk to measure (default: a temporary folder)")
    args = parser.parse_args(argv)
    nbytes = args.keys * DIM * 4
    results = {"num_keys": args.keys, "value_length": DIM, "bytes": nbytes, "runs": {}}
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="adapm-b12-") as folder:
        for nodes in (1, 2):
            saves, references, restored = measure(folder, args.keys, nodes, nbytes)
            saved, written = min(saves), min(references)
            ratio = written / saved
            median = float(np.median(references)) / float(np.median(saves))
            results["runs"][nodes] = {"save_s": saves, "sequential_s": references,
                                      "restore_s": restored, "ratio_best": ratio,
                                      "ratio_median": median}
            line("B12", f"{nodes} node(s): save of {args.keys / 1e6:.0f}M x {DIM} float32 "
                        f"({nbytes / 1e6:.0f} MB) best {saved:.2f} s = "
                        f"{nbytes / saved / 1e6:.0f} MB/s vs sequential write "
                        f"{nbytes / written / 1e6:.0f} MB/s: {ratio:.2f}x (medians: "
                        f"{median:.2f}x; target >= 0.5x)", verdict(ratio, 0.5))
            line("B12", f"{nodes} node(s): restore (start a cluster from it, verify, "
                        f"install) in {restored:.2f} s", "info")
    path = save("checkpoint", results)
    print(f"    results: {path}")


if __name__ == "__main__":
    sys.exit(main())
