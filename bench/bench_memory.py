"""M1 memory: a table of 10M keys x 16 float32 on one node (docs/design/BENCHMARKS.md).

Creation is timed as the node server does it (segment, directory, slots, zero init);
the overhead is the memory the segment really uses once every value is written, minus the
values' own bytes, per key. The node server's own per-key state (ownership records, replica
slots, key sets, holders, arrival rounds, retention, intent counts) is counted beside it,
as a node server of a 1-node and of a 2-node cluster allocates it (adapm.node.memory),
and the two together are M1's second target."""

import argparse
import os
import sys
import time

import numpy as np

from adapm.common.config import new_cluster_id
from adapm.node.memory import private_bytes
from adapm.node.server import NodeServer
from adapm.table.shared_table import OWNED, SharedTable, segment_name
from adapm.wire.spec import ClusterSpec

from common import line, save, verdict


def write_every_value(view, num_keys, d, step=1 << 20):
    """Set every key's value to ones, a chunk of keys at a time (through the kernels)."""
    ones = np.ones(step * d, dtype=np.float32)
    misses = np.empty(step, dtype=np.uint64)
    for start in range(0, num_keys, step):
        keys = np.arange(start, min(start + step, num_keys), dtype=np.uint64)
        view.update(keys, ones[:keys.shape[0] * d], misses, False)


class _NoSends:
    """The outbox of a node server that only assembles its parts: nothing is sent."""

    def _refuse(self, *_):
        raise AssertionError("M1 assembles a node server: it sends nothing")

    to_worker = to_identity = to_peer = to_coordinator = _refuse


def node_state_per_key(num_keys, d, num_nodes):
    """Bytes per key of node 0's own state, its parts built as the node server builds
    them (its table created too, and removed)."""
    spec = ClusterSpec(num_keys=num_keys, value_length=d, num_nodes=num_nodes,
                       workers_per_node=2, cluster_id=new_cluster_id())
    server = NodeServer(spec, 0, "tcp://127.0.0.1:1")
    server.create_table()
    try:
        server.assemble(_NoSends())
        return private_bytes(server) / num_keys
    finally:
        server.table.unlink()
        server.table.close()


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
    node = {n: node_state_per_key(num_keys, d, n) for n in (1, 2)}
    for n, state in node.items():
        line("M1", f"node server state {state:.1f} bytes per key on a node of a {n}-node "
                   f"cluster; with the table's {per_key:.1f}: {per_key + state:.1f} "
                   "(target <= 64)", verdict(per_key + state, 64.0, higher_is_better=False))
    path = save("memory", {"num_keys": num_keys, "value_length": d, "create_s": created,
                           "allocated_bytes": used, "overhead_per_key": per_key,
                           "node_state_per_key": node})
    print(f"    results: {path}")


if __name__ == "__main__":
    sys.exit(main())
