"""The statistics of a node, read from its table, and the summary table adapm-launch
prints at the end of a run."""

from adapm.table import NODE_COUNTERS, NODE_SLOT, WORKER_SLOT

WORKER_STATS = ("pulls_local", "pulls_remote", "pushes_local", "pushes_remote", "sets_local",
                "sets_remote", "intents", "bytes_sent", "bytes_received", "bytes_to_node")
COLUMNS = (("node", "node"), ("local", "local %"), ("pulls_remote", "pulls remote"),
           ("pushes_remote", "pushes remote"), ("relocations", "relocated"),
           ("replicas_made", "replicas"), ("replicas_dropped", "dropped"),
           ("late_intents", "late"), ("bytes_sent", "MB sent"),
           ("malformed_messages", "malformed"))


def node_stats(view):
    """Counts of keys for a node: its workers' counters summed, plus the node's own."""
    counters = view.counters()
    stats = {name: int(counters[:, WORKER_SLOT[name]].sum()) for name in WORKER_STATS}
    for name in NODE_COUNTERS:
        stats[name] = stats.get(name, 0) + int(view.node_counter_get(NODE_SLOT[name]))
    accesses = sum(stats[f"{kind}_{where}"] for kind in ("pulls", "pushes", "sets")
                   for where in ("local", "remote"))
    local = stats["pulls_local"] + stats["pushes_local"] + stats["sets_local"]
    stats["local_share"] = local / accesses if accesses else 1.0
    return stats


def format_summary(per_node):
    """A text table of {node: stats}, one row per node."""
    rows = [[title for _, title in COLUMNS]]
    for node, stats in sorted(per_node.items()):
        row = []
        for name, _ in COLUMNS:
            if name == "node":
                row.append(str(node))
            elif name == "local":
                row.append(f"{100 * stats['local_share']:.1f}")
            elif name == "bytes_sent":
                row.append(f"{stats['bytes_sent'] / 1e6:.1f}")
            else:
                row.append(str(stats[name]))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)
