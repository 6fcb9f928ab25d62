"""The statistics of a node, read from its table, and the summary table printed at the end
of a run (adapm-launch, adapm.run): one row per node of the whole cluster plus a total.

**Local share** (the "local %" column, `local_share`, and the apps' "% of key accesses
local"): of the keys that workers accessed by pull, push (apply_gradients included) and
set, the share that was served from the worker's own node's table, in shared memory,
without a message: `access_counts` is the one definition, used here, by the apps
(adapm.apps.common) and by the metrics (adapm.node.control.metrics). A key that missed at first and
was found usable here on the retry counts as local; a set of a key held here only as a
replica goes through the node server (a message), so it counts as remote. The counters
are the workers' own (w.stats()); a launcher's table covers the whole run (the apps'
initialisation and evaluations included), an app's own line only its training loops."""

import textwrap

import numpy as np

from adapm.table.shared_table import NODE_COUNTERS, NODE_SLOT, WORKER_SLOT

WORKER_STATS = ("pulls_local", "pulls_remote", "pushes_local", "pushes_remote", "sets_local",
                "sets_remote", "intents", "bytes_sent", "bytes_received", "bytes_to_node",
                "samples")
ACCESS_KINDS = ("pulls", "pushes", "sets")
# What a node reports to the coordinator at the end (NODE_STATS, uint64 in this order):
# its workers' counters summed, then the node's own (bytes: the sum of both).
REPORTED = WORKER_STATS + tuple(name for name in NODE_COUNTERS if name not in WORKER_STATS) \
    + ("sample_rate_milli",)  # the node's samples/s x 1000 (its workers' rates summed)
COLUMNS = (("node", "node"), ("local", "local %"), ("pulls_remote", "pulls remote"),
           ("pushes_remote", "pushes remote"), ("relocations", "relocated"),
           ("replicas_made", "replicas"), ("replicas_dropped", "dropped"),
           ("late_intents", "late"), ("bytes_sent", "MB sent"),
           ("malformed_messages", "malformed"))
# Shown when a worker called w.count_samples: the script's own data points, and their rate.
SAMPLE_COLUMNS = (("samples", "samples"), ("sample_rate", "samples/s"))
# Not summed in the total row: a round number and an estimate of the node's own.
NOT_SUMMED = ("full_round_done", "reaction_us")
TOTAL = "all"


def access_counts(stats):
    """(local, remote): keys accessed by pull, push and set, served from the worker's own
    node's table without a message, and not (a message to a node server). `stats`: a
    worker's w.stats(), a difference of two, or node_stats()."""
    local = sum(int(stats[f"{kind}_local"]) for kind in ACCESS_KINDS)
    remote = sum(int(stats[f"{kind}_remote"]) for kind in ACCESS_KINDS)
    return local, remote


def local_share(local, remote):
    """The share of local accesses (1.0 when there was none)."""
    total = local + remote
    return local / total if total else 1.0


def node_numbers(view):
    """The node's statistics as REPORTED numbers (uint64): its workers' counters summed,
    plus the node's own."""
    counters = view.counters()
    stats = {name: int(counters[:, WORKER_SLOT[name]].sum()) for name in WORKER_STATS}
    for name in NODE_COUNTERS:
        stats[name] = stats.get(name, 0) + int(view.node_counter_get(NODE_SLOT[name]))
    stats["sample_rate_milli"] = round(1000 * sample_rate(counters))
    return np.array([stats[name] for name in REPORTED], dtype=np.uint64)


def sample_rate(counters):
    """Samples per second of a node: each worker's (samples after its first
    count_samples call, over the time from that call to its last) summed, as its workers
    run side by side. Only one machine's clock is read: no clocks are compared."""
    rate = 0.0
    for block in counters:
        span = int(block[WORKER_SLOT["samples_last_ns"]]) - int(
            block[WORKER_SLOT["samples_start_ns"]])
        counted = int(block[WORKER_SLOT["samples"]]) - int(block[WORKER_SLOT["samples_first"]])
        if span > 0 and counted > 0:
            rate += counted / (span / 1e9)
    return rate


def from_numbers(numbers):
    """The statistics dict of REPORTED numbers, with its local_share."""
    if len(numbers) != len(REPORTED):
        raise ValueError(f"{len(numbers)} statistics, expected {len(REPORTED)}")
    stats = {name: int(value) for name, value in zip(REPORTED, numbers)}
    stats["local_share"] = local_share(*access_counts(stats))
    stats["sample_rate"] = stats["sample_rate_milli"] / 1000.0
    return stats


def node_stats(view):
    """Counts of keys for a node: its workers' counters summed, plus the node's own, and
    the node's local_share (access_counts)."""
    return from_numbers(node_numbers(view))


def total(per_node):
    """The cluster's statistics: every node's summed (local_share over the sums)."""
    stats = {name: sum(s[name] for s in per_node.values()) for name in REPORTED
             if name not in NOT_SUMMED}
    stats["local_share"] = local_share(*access_counts(stats))
    stats["sample_rate"] = stats["sample_rate_milli"] / 1000.0  # the nodes run side by side
    return stats


LEGEND = (
    "local %: accesses served from the worker's own node without a message; remote: keys "
    "accessed through one; relocated: keys moved here; replicas: granted as owner; "
    "dropped: replicas given up; late: keys whose intent came after the clock passed its "
    "start; MB sent: workers' and server's; samples(/s): w.count_samples, summed. The "
    "whole run is counted (init and evaluations too): an app's 'done' line counts its "
    "training loops only.")


def format_summary(per_node, with_total=None, legend=True):
    """A text table of {node: stats}, one row per node, and a row `all` with the sums
    (default: when there is more than one node), then the columns' LEGEND."""
    columns = COLUMNS + (SAMPLE_COLUMNS if any(s["samples"] for s in per_node.values())
                         else ())
    rows = [[title for _, title in columns]]
    entries = sorted(per_node.items())
    if with_total if with_total is not None else len(per_node) > 1:
        entries.append((TOTAL, total(per_node)))
    for node, stats in entries:
        row = []
        for name, _ in columns:
            if name == "node":
                row.append(str(node))
            elif name == "local":
                row.append(f"{100 * stats['local_share']:.1f}")
            elif name == "bytes_sent":
                row.append(f"{stats['bytes_sent'] / 1e6:.1f}")
            elif name == "sample_rate":
                row.append(f"{stats['sample_rate']:,.0f}")
            else:
                row.append(str(stats[name]))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(columns))]
    table = "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)
    return f"{table}\n{textwrap.fill(LEGEND, 100)}" if legend else table


def title(nodes, mode, missing=()):
    """The line above the table: which nodes it shows."""
    text = f"statistics (keys) of node(s) {', '.join(map(str, sorted(nodes)))}, mode {mode}"
    if missing:
        text += f" (no statistics from node(s) {', '.join(map(str, sorted(missing)))})"
    return text
