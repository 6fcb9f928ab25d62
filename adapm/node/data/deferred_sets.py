"""Local sets that wait for the sync round in flight, a part of the node server.

A local worker's set of replicas whose delta (updates made here before the set) is on
its way in the round in flight waits for that round, so that the owner applies the
delta first (the two could take different paths). The rounds part says which keys'
deltas a round carries and hands the waiting sets back once it completed; the serving
part asks here whether a set must wait."""

import numpy as np

_NO_KEYS = np.empty(0, dtype=np.uint64)


class DeferredSets:
    def __init__(self):
        self.carried = _NO_KEYS  # keys whose delta the round in flight carries
        self.waiting = []        # (identity, SET) of local workers, in arrival order

    def __len__(self):
        return len(self.waiting)

    def carry(self, keys):
        """The round now in flight carries these keys' deltas (distinct keys)."""
        self.carried = keys

    def defer_set(self, identity, msg, keys):
        """True when the set must wait (it is kept, and handed back by round_done)."""
        if self.carried.shape[0] == 0 or not np.isin(keys, self.carried).any():
            return False
        self.waiting.append((identity, msg))
        return True

    def round_done(self):
        """The round in flight completed: no delta is carried any more. Returns the sets
        that waited for it, in arrival order (their keys' earlier deltas are applied)."""
        self.carried = _NO_KEYS
        waiting, self.waiting = self.waiting, []
        return waiting
