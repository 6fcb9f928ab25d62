"""Giving keys owned here to another node, a part of the node server: one MOVE carries
their values, ownership counters (+ 1) and versions. Both a move request
(adapm.node.data.relocation) and a sync round's request answered by relocation
(adapm.node.data.rounds) end here, so it belongs to neither of them."""

import numpy as np

from adapm.table.segments import Segments
from adapm.wire import protocol


class Eviction:
    def __init__(self, ctx, outbox, holders):
        """holders: the replica holders of the keys owned here (forgotten once a key
        leaves: its new owner learns of them anew)."""
        self.ctx = ctx
        self.view = ctx.view
        self.outbox = outbox
        self.holders = holders

    def evict_and_move(self, keys, target, request_id, purpose):
        """Relocate the keys owned here to `target` (one MOVE: values, counters + 1);
        returns the mask of keys that were owned here and moved."""
        segs = Segments.of(self.view, keys)
        values = np.empty(self.view.total_length(keys), dtype=self.view.dtype)
        offsets = np.zeros(keys.shape[0], dtype=np.uint64)
        taken = np.zeros(keys.shape[0], dtype=np.uint8)
        self.view.evict(keys, target, values, offsets, taken)
        taken = taken.astype(bool)
        if taken.any():
            idx = np.flatnonzero(taken)
            moved = keys[idx]
            counters = self.ctx.ownership.counter[moved.astype(np.intp)] + np.uint32(1)
            versions = np.empty(moved.shape[0], dtype=np.uint32)
            self.view.versions_of(moved, versions)  # ABSENT now: nobody changes them
            self.outbox.to_peer(target, protocol.Move(
                request_id=request_id, purpose=purpose, keys=moved,
                values=segs.take(values, idx), counters=counters, versions=versions))
            self.ctx.table.allocator.free(offsets[idx], self.ctx.lengths(moved))
            self.holders.forget(moved)
            self.ctx.count("owner_changes", 1)
        return taken
