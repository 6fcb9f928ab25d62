"""Relocation, a part of the node server: keys change owner (DESIGN.md §5).

- LOCALIZE (a local worker): bring keys here; a MOVE_REQUEST goes along each key's path
  to its owner.
- MOVE_REQUEST (a peer): give the keys owned here to the requester; pass the rest on.
- MOVE: keys arrive with value, ownership counter and version in one message; any local
  copies are absorbed, the keys are installed as owned, and their homes are told
  (OWNER_UPDATE).
- A sync round's request answered by relocation is a MOVE too (MOVE_FOR_ROUND), counted
  for the round by the rounds part (`progress`).

Keys leave through the eviction part (adapm.node.data.eviction), which the rounds part
uses too; arrivals are told to the rounds part, which owns the rounds' state."""

import logging
import time

import numpy as np

from adapm.common.config import RELOCATING_MODES
from adapm.common.errors import FAIL_ROUTING, ProtocolError
from adapm.policy.ownership import home_of, split_by
from adapm.table.shared_table import OWNED
from adapm.wire import protocol
from adapm.wire.protocol import MOVE_FOR_ROUND

log = logging.getLogger("adapm.relocation")


class Relocation:
    def __init__(self, ctx, outbox, routes, replicas, eviction, rounds, timeout):
        """eviction: evict_and_move(keys, target, request_id, purpose); rounds: the
        rounds part as relocation sees it: `arrived(keys)`, `progress(n, round_id)` and
        `answer_waiters()`; timeout: seconds before a localize that never completes
        fails."""
        self.ctx = ctx
        self.view = ctx.view
        self.outbox = outbox
        self.routes = routes
        self.replicas = replicas
        self.eviction = eviction
        self.rounds = rounds
        self.timeout = timeout
        self._localizing = {}  # op -> [identity, worker request id, keys left, since, keys]
        self._next_op = 0

    # -- localize ------------------------------------------------------------------

    def on_localize(self, identity, msg):
        """A local worker asks for keys to be owned here."""
        if self.ctx.spec.mode not in RELOCATING_MODES:
            raise ProtocolError(f"localize in mode {self.ctx.spec.mode}")
        self.ctx.check_keys(msg.keys)
        keys = np.unique(msg.keys)
        wanted = keys[self.ctx.not_owned(keys)]
        log.debug("node %d: worker %d asks to localize %d keys in %d..%d, %d owned elsewhere",
                  self.ctx.node, msg.src_worker, keys.shape[0], int(keys[0]) if keys.size
                  else 0, int(keys[-1]) if keys.size else 0, wanted.shape[0])
        if wanted.shape[0] == 0:
            self.outbox.to_identity(identity, protocol.Localized(
                request_id=msg.request_id, owned=keys.shape[0]))
            return
        self._next_op += 1
        self._localizing[self._next_op] = [identity, msg.request_id, wanted.shape[0],
                                           time.monotonic(), wanted]
        self.replicas.moving_in.add(wanted)
        request = protocol.MoveRequest(request_id=self._next_op, target=self.ctx.node)
        self.routes.forward_move_request(request, wanted)

    def localizing(self):
        """How many localize requests of this node's workers wait for their keys."""
        return len(self._localizing)

    def expire(self, now):
        """A relocation that never completes (its request could not be routed) fails the
        worker's localize instead of leaving it waiting while the cluster lives."""
        for op, (identity, request_id, _, started, keys) in list(self._localizing.items()):
            if now - started > self.timeout:
                del self._localizing[op]
                self.replicas.moving_in.discard(keys)
                self.rounds.answer_waiters()
                self.outbox.to_identity(identity, protocol.Failed(
                    request_id=request_id, code=FAIL_ROUTING, detail=op))

    def fail_all(self, reply_failed):
        """The cluster failed: every localize waiting here is answered FAILED."""
        for identity, request_id, *_ in self._localizing.values():
            reply_failed(identity, request_id)
        self._localizing.clear()

    def _localized(self, op, count):
        entry = self._localizing.get(op)
        if entry is None:
            return
        entry[2] -= count
        if entry[2] <= 0:
            del self._localizing[op]
            self.outbox.to_identity(entry[0], protocol.Localized(request_id=entry[1],
                                                                owned=entry[4].shape[0]))

    # -- owner side ----------------------------------------------------------------

    def on_move_request(self, identity, msg):
        """Give the keys this node owns to node arg0; pass the rest on along their path."""
        self.ctx.check_keys(msg.keys)
        target = int(msg.target)
        if not 0 <= target < self.ctx.num_nodes:
            raise ProtocolError(f"move request for node {target}")
        keys = msg.keys
        if target == self.ctx.node:  # the path led back: these keys are owned here already
            owned = ~self.ctx.not_owned(keys)
            self._localized(msg.request_id, int(owned.sum()))
            if (~owned).any():
                self.routes.forward_move_request(msg, keys[~owned])
            return
        taken = self.eviction.evict_and_move(keys, target, msg.request_id, 0)
        if (~taken).any():
            self.routes.forward_move_request(msg, keys[~taken])

    def on_owner_update(self, identity, msg):
        """At a key's home: a newer owner of the key (counters say which news is newer)."""
        self.ctx.check_keys(msg.keys)
        owner = int(msg.owner)
        if not 0 <= owner < self.ctx.num_nodes:
            raise ProtocolError(f"owner update naming node {owner}")
        if not self.ctx.ownership.is_home(msg.keys).all():
            raise ProtocolError("owner update for keys whose home is elsewhere")
        newer = self.ctx.ownership.record(msg.keys, owner, msg.counters)
        keys = msg.keys[newer]
        keys = keys[self.ctx.not_owned(keys)]
        if keys.shape[0]:
            self.ctx.table.set_owners(keys, owner)
            self.ctx.count("owner_changes", 1)

    # -- new owner -----------------------------------------------------------------

    def on_move(self, identity, msg):
        """Keys arrive with value and ownership: install them and tell their homes."""
        keys = msg.keys
        self.ctx.check_keys(keys)
        if np.unique(keys).shape[0] != keys.shape[0]:
            raise ProtocolError("MOVE names a key twice")
        if (~self.ctx.not_owned(keys)).any():
            raise ProtocolError("MOVE of keys this node owns already")
        values = protocol.values_of(msg, self.view.dtype, self.view.total_length(keys))
        values = self.replicas.absorb(keys, values)
        keys, counters = self._install(keys, values, msg)
        self.ctx.ownership.counter[keys.astype(np.intp)] = counters
        self.rounds.arrived(keys)
        if self.replicas.moving_in:
            self.replicas.moving_in.discard(keys)
            if not self.replicas.moving_in:  # the last keys a localize waited for came
                self.rounds.answer_waiters()
        self.ctx.count("relocations", keys.shape[0])
        self.ctx.count("owner_changes", 1)
        self._tell_homes(keys, counters)
        if msg.purpose == MOVE_FOR_ROUND:
            self.rounds.progress(msg.keys.shape[0], msg.request_id)
        else:
            self._localized(msg.request_id, msg.keys.shape[0])

    def _install(self, keys, values, msg):
        lengths = self.ctx.lengths(keys)
        offsets = self.ctx.table.allocator.allocate(lengths)
        admitted = np.zeros(keys.shape[0], dtype=np.uint8)
        self.view.admit(keys, values, offsets, OWNED, self.ctx.node, admitted,
                        np.ascontiguousarray(msg.versions))
        admitted = admitted.astype(bool)
        if not admitted.all():  # their values would be lost: a broken invariant
            self.ctx.table.allocator.free(offsets[~admitted], lengths[~admitted])
            held = keys[~admitted]
            raise RuntimeError(f"MOVE of {held.shape[0]} keys in {int(held.min())}.."
                               f"{int(held.max())} that this node holds already")
        return keys[admitted], msg.counters[admitted]

    def _tell_homes(self, keys, counters):
        node = self.ctx.node
        for home, idx in split_by(home_of(keys, self.ctx.num_nodes)).items():
            if home == node:
                self.ctx.ownership.record(keys[idx], node, counters[idx])
            else:
                self.outbox.to_peer(home, protocol.OwnerUpdate(owner=node, keys=keys[idx],
                                                             counters=counters[idx]))
