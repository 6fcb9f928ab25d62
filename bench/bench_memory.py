"""M1 memory: a table of 10M keys x 16 float32 on one node (docs/design/BENCHMARKS.md).

Creation is timed as the node server does it (segment, directory, slots, zero init);
the overhead is the memory the segment really uses once every value is written, minus the
values' own bytes, per key."""

import argparse
import os
import sys
import time

import numpy as np

from adapm.table.shared_table import OWNED, SharedTable, segment_name

from common import line, save, verdict


def write_every_value(view, num_keys, d, step=1 << 20):
    """Set every key's value to ones, a chunk of keys at a time (through the kernels)."""
    ones = np.ones(step * d, dtype=np.float32)
    misses = np.empty(step, dtype=np.uint64)
    for start in range(0, num_keys, step):
        keys = np.arange(start, min(start + step, num_keys), dtype=np.uint64)
        view.update(keys, ones[:keys.shape[0] * d], misses, False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--keys", type=int, default=10_000_000)
    args = parser.parse_args(argv)
    num_keys, d = args.keys, 16
    name = segment_name(f"m1-{os.getpid()}", 0)
    start = time.perf_counter()
    table = SharedTable.create(name, num_keys, d, "float32", num_workers=2)
    try:
        table.install(slice(0, num_keys), OWNED)  # as the node server does
        table.publish()
        created = time.perf_counter() - start
        write_every_value(table.view, num_keys, d)  # all pages are real
        used = table.allocated_bytes()
        values = num_keys * d * 4
        per_key = (used - values) / num_keys
    finally:
        table.unlink()
        table.close()
    line("M1", f"{num_keys / 1e6:.0f}M keys x {d} float32: created in {created:.2f} s "
               "(target <= 2 s)", verdict(created, 2.0, higher_is_better=False))
    line("M1", f"overhead {per_key:.1f} bytes per key beyond the values' own bytes "
               "(target <= 32)", verdict(per_key, 32.0, higher_is_better=False))
    path = save("memory", {"num_keys": num_keys, "value_length": d, "create_s": created,
                           "allocated_bytes": used, "overhead_per_key": per_key})
    print(f"    results: {path}")


if __name__ == "__main__":
    sys.exit(main())
