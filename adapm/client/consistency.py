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
- `ReadYourWrites`: the worker's use of the two, the part of the worker client that keeps
  its promise: before a call touches keys, after it sent updates, before a barrier.

None knows anything of sockets: the worker passes in what they need (the table view, and
callables that wait for an operation or refresh copies)."""

import numpy as np

from adapm.table.shared_table import NODE_SLOT, PENDING, REPLICA

MAX_UPDATES_IN_FLIGHT = 64  # unacknowledged push/set messages before a push waits

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


class ReadYourWrites:
    """Read your own writes, and one worker's updates applied in order (DESIGN.md §7.2-3),
    for one worker. The update operations it tracks need `keys` (those sent to other
    nodes), `done` and `error` (set when the operation failed)."""

    def __init__(self, view, wait, refresh, max_in_flight=MAX_UPDATES_IN_FLIGHT):
        """view: the node's table (states_of, fresh_rounds, node_counter_get);
        wait(op): returns once `op` completed (raises its error); refresh(keys): returns
        once a sync round brought the node's copies of `keys` up to date."""
        self._view = view
        self._wait = wait
        self._refresh = refresh
        self.max_in_flight = max_in_flight
        self.in_flight = InFlight()  # unacknowledged update ops, oldest first
        self.unseen = Unseen()       # applied remotely, but copies of these keys here show
                                     # it only once a sync round brought them a value

    def before_access(self, keys):
        """Call before reading or updating `keys`. A request for a key with an update of
        this worker still in flight could overtake it (keys move, requests are forwarded
        along different paths), so it waits for that update to be acknowledged first;
        updates of other keys stay in flight."""
        if self.in_flight:
            self._prune()
            for op in self.in_flight.blocking(keys):
                self._wait(op)
            self._prune()
        if self.unseen:
            # Applied by their owners, but a copy here may have been fetched just before:
            # read it once a sync round that started after the acknowledgement brought it
            # a value (the node stamps each copy), else refresh it first.
            self.unseen.forget_rounds_up_to(
                self._view.node_counter_get(NODE_SLOT["full_round_done"]))
            waiting, rounds = self.unseen.among(keys)
            stale = waiting[self._stale(waiting, rounds)]
            if stale.shape[0]:
                self._refresh(stale)
                self.unseen.forget(stale)

    def track(self, op):
        """Call after an update call: `op` sent updates of `op.keys` to other nodes (None:
        it sent none after all). Beyond max_in_flight ops, waits for the oldest."""
        if op.keys is not None:
            self.in_flight.add(op)
        self._prune()
        while len(self.in_flight) > self.max_in_flight:
            self._wait(self.in_flight.ops[0])
            self._prune()

    def drain(self):
        """Wait until every tracked update is acknowledged (before barriers, wait_sync
        and localize: they promise what follows sees the updates)."""
        for op in list(self.in_flight.ops):
            self._wait(op)
        self._prune()

    def synced(self):
        """The node answered wait_sync: every copy it holds has seen what its owner had
        acknowledged, so nothing is unseen any more."""
        self.unseen.clear()

    def _prune(self):
        for op in self.in_flight.take_done():
            if op.error is not None:
                raise op.error
            self._remember_unseen(op.keys)

    def _remember_unseen(self, keys):
        """Keys updated remotely that this node holds as copies (replica or requested): a
        sync round that starts from now on brings the update here."""
        states = np.empty(keys.shape[0], dtype=np.uint8)
        self._view.states_of(keys, states)
        copies = keys[(states == REPLICA) | (states == PENDING)]
        if copies.shape[0]:
            started = self._view.node_counter_get(NODE_SLOT["rounds_started"])
            self.unseen.add(copies, started + 1, self._stale)

    def _stale(self, keys, rounds):
        """Mask of `keys` held here as copies (replica or requested) that no sync round
        starting at their `rounds` or later has brought up to date yet: only those may
        lack this worker's acknowledged update. Keys owned here have it, and a key not
        held is read from its owner."""
        if keys.shape[0] == 0:
            return np.zeros(0, dtype=bool)
        states = np.empty(keys.shape[0], dtype=np.uint8)
        self._view.states_of(keys, states)
        fresh = np.empty(keys.shape[0], dtype=np.uint32)
        self._view.fresh_rounds(keys, fresh)
        return ((states == REPLICA) | (states == PENDING)) & (fresh < rounds)
