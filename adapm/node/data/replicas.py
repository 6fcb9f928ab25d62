"""This node's copies of keys it does not own (replicas, and requested keys not answered
yet), a part of the node server: their slots in the table, the value each had at its last
sync, and which keys are in which stage. State is per key in arrays (KeySets sharing the
node's KeyFlags); no sockets.

A replica's delta is its value minus its value at last sync (`synced`: a second slot per
copy); a sync round sends the delta and brings the owner's value back. A copy is freed
only under its entry lock and only when no worker wrote it since it was last read."""

import numpy as np

from adapm.table.segments import Segments
from adapm.table.shared_table import ABSENT, KEEP_OWNER, PENDING, REPLICA


class ReplicaCopies:
    def __init__(self, ctx):
        self.ctx = ctx
        self.view = ctx.view
        self.allocator = ctx.table.allocator
        num_keys = ctx.num_keys
        # The "value at last sync" slot of each copy: element offsets into the arena, 4
        # bytes per key where the arena has fewer than 2**32 elements (it never grows).
        slot_type = np.uint32 if self.allocator.capacity < 1 << 32 else np.uint64
        self.synced = np.zeros(num_keys, dtype=slot_type)
        self.seen_version = np.zeros(num_keys, dtype=np.uint32)  # owner's, at last sync
        self.held = ctx.new_key_set()      # held here as REPLICA or PENDING
        self.pending = ctx.new_key_set()   # of those, requested and not answered yet
        # Keys a localize asked to move here, not arrived yet: no delta of theirs is sent
        # after that request, so the owner applies every earlier one before it moves the
        # key (FIFO along the key's path).
        self.moving_in = ctx.new_key_set()
        # make_pending(keys) -> the keys made PENDING, or None: the compiled data plane's
        # (adapm.node.data.plane), set by the node server
        self.compiled_make_pending = None

    def _synced(self, keys):
        """The keys' "value at last sync" slots, as the kernels take them (uint64)."""
        return self.synced[keys.astype(np.intp)].astype(np.uint64)

    def __bool__(self):
        return bool(self.held)

    def to_sync(self):
        """The replicas that a round syncs (held and answered), sorted."""
        keys = self.held.keys()
        if self.pending:
            keys = keys[~self.pending.contains(keys)]
        return keys

    def held_mask(self, keys):
        """Mask: keys this node holds (owned, replica) or has requested."""
        return self.ctx.states(keys) != ABSENT

    def make_pending(self, keys):
        """Requested keys become PENDING with zeroed slots; returns those that were ABSENT.
        The location cache stays: this node's misses and requests still go to the owner."""
        if keys.shape[0] == 0:
            return keys
        made = None if self.compiled_make_pending is None else \
            self.compiled_make_pending(keys)
        if made is not None:
            return made
        keys = keys[~self.held_mask(keys)]
        if keys.shape[0] == 0:
            return keys
        lengths = self.ctx.lengths(keys)
        offsets = self.allocator.allocate(lengths)
        synced = self.allocator.allocate(lengths)
        self.view.zero_slots(synced, lengths)
        zeros = np.zeros(int(lengths.sum()), dtype=self.view.dtype)
        admitted = np.zeros(keys.shape[0], dtype=np.uint8)
        self.view.admit(keys, zeros, offsets, PENDING, KEEP_OWNER, admitted)
        self.synced[keys.astype(np.intp)] = synced
        self.held.add(keys)
        self.pending.add(keys)
        return keys

    def deltas(self, keys, segments):
        """The keys' deltas (zero where not a replica), flat. Keys moving in give none:
        their delta stays in the copy and joins the key when it arrives (absorb), since
        a delta sent after the move request could reach the owner after the key left."""
        deltas = np.empty(self.view.total_length(keys), dtype=self.view.dtype)
        moving = self.moving_in.contains(keys) if self.moving_in else None
        if moving is None or not moving.any():
            self.view.replica_deltas(keys, self._synced(keys), deltas)
            return deltas
        deltas[:] = 0
        take = np.flatnonzero(~moving)
        if take.shape[0]:
            part = np.empty(segments.size(take), dtype=self.view.dtype)
            self.view.replica_deltas(keys[take], self._synced(keys[take]), part)
            segments.put(deltas, take, part)
        return deltas

    def refreshed(self, keys, values):
        """The owner's values arrived (a PENDING copy becomes a REPLICA)."""
        self.view.replica_refresh(keys, self._synced(keys),
                                  np.ascontiguousarray(values))
        if self.pending:
            self.pending.discard(keys)

    def release_clean(self, keys):
        """Free the copies that no worker wrote since their last sync; returns the mask
        of those freed (the others keep their delta for the next round)."""
        offsets = np.zeros(keys.shape[0], dtype=np.uint64)
        released = np.zeros(keys.shape[0], dtype=np.uint8)
        synced = self._synced(keys)
        self.view.release_clean(keys, synced, offsets, released)
        gone = released.astype(bool)
        if gone.any():
            lengths = self.ctx.lengths(keys[gone])
            self.allocator.free(offsets[gone], lengths)
            self.allocator.free(synced[gone], lengths)
            self.held.discard(keys[gone])
        return gone

    def overwrite(self, keys, values):
        """A local worker sets keys held here as replicas (the set itself goes on to the
        owner): the copies take the set value and forget their pending delta, which holds
        updates made here before the set (guarantee 3: a set overwrites them). The delta
        of updates made after it follows the set to the owner on this node's path."""
        self.view.replica_overwrite(keys, self._synced(keys),
                                    np.ascontiguousarray(values, dtype=self.view.dtype))

    def absorb(self, keys, values):
        """Keys arriving as owned (a MOVE) that this node holds as REPLICA or PENDING:
        add the updates made here since the last sync to the arriving values, and free
        the copies' slots, so that the keys can be installed as owned.

        Each copy is released (made ABSENT, under its lock) before its local updates are
        read: from then on no worker writes its slot (a worker's push misses and goes to
        the owner, which forwards it here), so no update can land between the reading and
        the release and be lost."""
        states = self.ctx.states(keys)
        mine = (states == REPLICA) | (states == PENDING)
        if not mine.any():
            return values
        values = np.array(values, dtype=self.view.dtype)
        segments = Segments.of(self.view, keys)
        for state in (PENDING, REPLICA):
            idx = np.flatnonzero(states == state)
            if idx.shape[0] == 0:
                continue
            held = keys[idx]
            offsets = np.zeros(held.shape[0], dtype=np.uint64)
            released = np.zeros(held.shape[0], dtype=np.uint8)
            self.view.release(held, state, offsets, released)
            gone = released.astype(bool)
            held, idx, offsets = held[gone], idx[gone], offsets[gone]
            synced = self._synced(held)
            lengths = self.ctx.lengths(held)
            if state == REPLICA:  # a PENDING copy was never written: nothing to add
                local = self.view.read_slots(offsets, lengths) - \
                    self.view.read_slots(synced, lengths)
                segments.put(values, idx, segments.take(values, idx) + local)
            self.allocator.free(offsets, lengths)
            self.allocator.free(synced, lengths)
            self.pending.discard(held)
            self.held.discard(held)
        return values
