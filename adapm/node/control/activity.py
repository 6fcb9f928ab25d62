"""What a node did lately, as a DEBUG line every few seconds (`--log-level debug`).

INFO says when a node starts, forms and ends; DEBUG adds each part's detail, and this is
the part that runs the whole time: per node server, every ACTIVITY_EVERY seconds while
anything happened, the counters of the last interval with their rates, read from the
node's table (its workers' counters and its own, adapm.table.shared_table), so it costs nothing per
message:

    [node 1] 14:02:17.020 DEBUG adapm.node.control.activity: last 2.0 s: 412,000 keys accessed
    (98.9% local, 206,000/s); 58 rounds (29/s), 1,204 keys relocated here, 310 replicas
    granted, 95 dropped, 12 late intents; 3.1 MB sent, 2.9 MB received; clock 118"""

import logging
import time

from adapm.table.shared_table import NODE_COUNTERS, NODE_SLOT, WORKER_SLOT
from adapm.table.stats import access_counts, local_share

log = logging.getLogger("adapm.activity")

ACTIVITY_EVERY = 2.0  # seconds between two lines
_WORKER_NAMES = ("pulls_local", "pulls_remote", "pushes_local", "pushes_remote",
                 "sets_local", "sets_remote", "bytes_sent", "bytes_received")


class ActivityLog:
    def __init__(self, view, every=ACTIVITY_EVERY, clock=time.monotonic):
        self.view = view
        self.every = every
        self.clock = clock
        self._last = self._read()
        self._at = clock()

    def maybe_log(self):
        """Log the last interval's line if one is due and DEBUG is on."""
        now = self.clock()
        if now - self._at < self.every or not log.isEnabledFor(logging.DEBUG):
            return
        numbers = self._read()
        if self._last is not None:
            line = describe({name: numbers[name] - self._last[name] for name in numbers},
                            now - self._at, numbers["clock"])
            if line:
                log.debug("%s", line)
        self._last, self._at = numbers, now

    def _read(self):
        counters = self.view.counters()
        numbers = {name: int(counters[:, WORKER_SLOT[name]].sum()) for name in _WORKER_NAMES}
        for name in NODE_COUNTERS:
            numbers[f"node_{name}"] = int(self.view.node_counter_get(NODE_SLOT[name]))
        numbers["clock"] = int(counters[:, WORKER_SLOT["clock"]].max()) if len(counters) else 0
        return numbers


def describe(delta, seconds, clock):
    """One interval's line, or '' when nothing happened in it."""
    local, remote = access_counts(delta)
    sent = delta["bytes_sent"] + delta["node_bytes_sent"]
    received = delta["bytes_received"] + delta["node_bytes_received"]
    if not (local + remote or delta["node_rounds_done"] or sent or received):
        return ""
    seconds = max(seconds, 1e-9)
    return (f"last {seconds:.1f} s: {local + remote:,} keys accessed "
            f"({local_share(local, remote):.1%} local, {(local + remote) / seconds:,.0f}/s); "
            f"{delta['node_rounds_done']:,} rounds ({delta['node_rounds_done'] / seconds:,.0f}"
            f"/s), {delta['node_relocations']:,} keys relocated here, "
            f"{delta['node_replicas_made']:,} replicas granted, "
            f"{delta['node_replicas_dropped']:,} dropped, {delta['node_late_intents']:,} late "
            f"intents, {delta['node_malformed_messages']:,} malformed messages; "
            f"{sent / 1e6:.1f} MB sent, {received / 1e6:.1f} MB received; clock {clock}")
