"""A worker's read-your-writes bookkeeping (DESIGN.md §7.2), at a cost that grows with
the keys of a call, not with the updates in flight.

- `InFlight`: this worker's updates that their owners have not acknowledged yet. A request
  for a key with such an update waits for it (requests take different paths and could
  overtake it). A counting filter over hashed keys answers "none of these keys" in
  O(keys in the call); only a hit looks at the updates themselves.
- `Unseen`: keys whose update the owner acknowledged while this node held a copy (replica
  or requested) whose value may predate it. Each key remembers the first sync round that
  brings it the update; a read of it waits for that round unless the node has stamped the
  copy with it already (TableView.fresh_rounds).

Neither knows anything of sockets: the worker passes in what they need."""

import numpy as np

FILTER_BITS = 16
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # multiplicative hashing: keys spread over slots
_SHIFT = np.uint64(64 - FILTER_BITS)


def _slots(keys):
    with np.errstate(over="ignore"):
        return ((keys.astype(np.uint64, copy=False) * _GOLDEN) >> _SHIFT).astype(np.intp)


class InFlight:
    """Unacknowledged update operations (each with `.keys` and `.done`), oldest first."""

    def __init__(self):
        self.ops = []
        self._counts = np.zeros(1 << FILTER_BITS, dtype=np.uint32)

    def __len__(self):
        return len(self.ops)

    def add(self, op):
        self.ops.append(op)
        np.add.at(self._counts, _slots(op.keys), 1)

    def take_done(self):
        """Remove and return the operations that have completed."""
        done = [op for op in self.ops if op.done]
        if done:
            self.ops = [op for op in self.ops if not op.done]
            for op in done:
                np.subtract.at(self._counts, _slots(op.keys), 1)
        return done

    def blocking(self, keys):
        """The operations still in flight that update any of `keys`."""
        if not self.ops or not self._counts[_slots(keys)].any():
            return []
        return [op for op in self.ops if not op.done and np.isin(keys, op.keys).any()]


class Unseen:
    """Keys (sorted, distinct) and the sync round each one must see."""

    PRUNE_ABOVE = 4096  # keys remembered before the fresh ones are dropped

    def __init__(self):
        self.keys = np.empty(0, dtype=np.uint64)
        self.rounds = np.empty(0, dtype=np.uint32)

    def __len__(self):
        return self.keys.shape[0]

    def add(self, keys, round_needed, still_stale):
        """Remember `keys` until round `round_needed`; `still_stale(keys, rounds)` gives
        the mask of those that still need it (used to keep the memory bounded)."""
        keys = np.unique(keys)
        rounds = np.full(keys.shape[0], round_needed, dtype=np.uint32)
        merged_keys = np.concatenate([self.keys, keys])
        merged_rounds = np.concatenate([self.rounds, rounds])
        order = np.lexsort((merged_rounds, merged_keys))  # by key, then round
        merged_keys, merged_rounds = merged_keys[order], merged_rounds[order]
        last = np.r_[merged_keys[1:] != merged_keys[:-1], True]  # the latest round per key
        self.keys, self.rounds = merged_keys[last], merged_rounds[last]
        if self.keys.shape[0] > self.PRUNE_ABOVE:
            keep = still_stale(self.keys, self.rounds)
            self.keys, self.rounds = self.keys[keep], self.rounds[keep]

    def among(self, keys):
        """(keys, rounds) of the remembered keys that occur in `keys`: O(k log n)."""
        if self.keys.shape[0] == 0 or keys.shape[0] == 0:
            return self.keys[:0], self.rounds[:0]
        at = np.searchsorted(self.keys, keys)
        inside = at < self.keys.shape[0]
        at, asked = at[inside], keys[inside]
        hit = np.unique(at[self.keys[at] == asked])
        return self.keys[hit], self.rounds[hit]

    def forget(self, keys):
        keep = ~np.isin(self.keys, keys)
        self.keys, self.rounds = self.keys[keep], self.rounds[keep]

    def forget_rounds_up_to(self, done):
        """A round that synced every replica completed: keys waiting for it or an earlier
        one have seen their update."""
        if self.keys.shape[0]:
            keep = self.rounds > done
            self.keys, self.rounds = self.keys[keep], self.rounds[keep]

    def clear(self):
        self.keys, self.rounds = self.keys[:0], self.rounds[:0]
