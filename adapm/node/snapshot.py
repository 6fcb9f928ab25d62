"""What waits in a node server's parts, in plain numbers, for another thread (the
metrics' scrape thread, adapm.node.control.metrics). The node thread holds the lock
(`guard()`) while it handles a turn of its event loop; a snapshot is taken under it, so
no part's lists or dicts are read while they change, and the numbers are of one moment."""

import threading
from typing import NamedTuple


class NodeSnapshot(NamedTuple):
    waiting: tuple          # ((kind, count), ...): workers' requests held unanswered
    intents_queued: int     # intents known and not expired
    keys_requested: int     # requested by a sync round, not answered yet
    keys_localizing: int    # asked for by a localize, not arrived yet
    replicas_held: int      # replicas held and answered


def node_snapshot(rounds, replicas, local_workers, checkpoints, relocation, intents):
    """A NodeSnapshot of the parts (on the node thread, or under the guard)."""
    synced = rounds.snapshot()
    pending = len(replicas.pending)
    return NodeSnapshot(
        waiting=(("wait_sync", synced.waiting_sync), ("refresh", synced.waiting_refresh),
                 ("barrier", len(local_workers.waiting_workers())),
                 ("save", len(checkpoints.waiting_workers())),
                 ("set", synced.deferred_sets), ("localize", relocation.localizing())),
        intents_queued=len(intents), keys_requested=pending,
        keys_localizing=len(replicas.moving_in),
        replicas_held=max(len(replicas.held) - pending, 0))


class Snapshots:
    def __init__(self, take):
        """take(): a NodeSnapshot of the parts, called under the lock."""
        self._lock = threading.Lock()
        self._take = take

    def guard(self):
        """The lock, held by the node thread while its parts change."""
        return self._lock

    def take(self):
        """A NodeSnapshot, from any thread."""
        with self._lock:
            return self._take()
