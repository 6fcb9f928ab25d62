"""The node server's data plane, Python side (DESIGN.md §9): the compiled plane
(src/_plane.pyx) serves remote reads and writes of owned keys straight from the ROUTER
socket; this class builds it, tells it who the members are once the cluster formed,
turns it off when the node fails, and folds its counters into the node's.

`drain(budget, handle)` reads the router until it is empty or `budget` messages were
taken: the compiled plane serves what it can, and each message it cannot (control,
keys not owned here, relocations, requests for keys, drops, forwarded syncs, anything
malformed) goes to `handle` (the node server's Python dispatch) in arrival order. Once
`serve_rounds` gave it the rounds' per-key state, the compiled plane also answers the
steady state of sync rounds; what it did for a round comes back as events, which go to
the rounds part (`Rounds.progress`, `answer_waiters`) before any later message is
handled.

ADAPM_DATA_PLANE=python (adapm.common.config) reads every message in Python instead:
the reference the compiled plane is tested against, and a way around it."""

import logging
import time

from adapm.policy.manager import SETTLE_ROUNDS
from adapm.wire import libzmq, protocol
from adapm.wire.protocol import node_identity, worker_identity

log = logging.getLogger("adapm.server")


class DataPlane:
    def __init__(self, ctx, router, count, compiled=True):
        """ctx: the node's NodeContext; router: its ROUTER socket (pyzmq); count(name, n):
        adds to a node counter. The compiled plane is used when `compiled` (the node's
        choice, ADAPM_DATA_PLANE) and available (Linux, pyzmq's Cython backend); else
        every message goes through Python."""
        self.ctx = ctx
        self.router = router
        self._count = count
        self.compiled = None
        self._free_slots = None
        self._rounds = self._manager = None
        self._events = {}
        self._seen = {"bytes_received": 0, "bytes_sent": 0, "served": 0, "unroutable": 0,
                      "replicas_made": 0, "owner_changes": 0, "relocations": 0}
        functions = libzmq.functions() if compiled else None
        if functions is not None:
            from adapm.node.data import _plane
            self.compiled = _plane.Plane(functions, router.underlying, ctx.view,
                                         ctx.view.kernel_handle(), ctx.node, ctx.num_nodes,
                                         ctx.spec.num_workers, ctx.spec.workers_per_node)
            self._events = _plane.EVENTS
        log.debug("node %d: %s data plane", ctx.node,
                  "compiled" if self.compiled is not None else "Python")

    def serve_rounds(self, rounds, manager, ownership, free_slots):
        """Let the compiled plane answer sync rounds, send them and install the keys
        they bring, on the node's round state: rounds (Rounds: its replicas, holders,
        arrival stamps and round; its progress(keys, round) takes the plane's
        sync_answered events, its answer_waiters the moved_in ones), manager (Manager:
        its mode, intent counts and retention decide requests, as relocate_mask does),
        ownership (its counters go with relocated keys and come with arriving ones; its
        home records), free_slots(offsets, lengths) (the slot allocator's free: the
        slots the plane gave up). Only with compiled key sets (the plane changes them)."""
        self._free_slots = free_slots
        self._rounds, self._manager = rounds, manager
        replicas = rounds.replicas
        if self.compiled is None or not hasattr(replicas.pending, "handle"):
            return
        self.compiled.serve_rounds(rounds.holders.raw(), replicas.seen_version,
                                   replicas.synced, replicas.pending, replicas.moving_in)
        retention = manager.retention
        self.compiled.set_policy(
            manager.mode, manager.intents.count,
            None if retention is None else retention.last_used,
            None if retention is None else retention.level,
            [] if retention is None else list(retention.SECONDS), rounds.arrived_round,
            ownership.counter, SETTLE_ROUNDS)
        self.compiled.serve_arrivals(replicas.held, ownership.home_owner,
                                     ownership.home_counter)

    def send_round(self, round_id, keys, kinds):
        """Send a round's SYNCs from compiled code (Plane.send_round): returns (keys with a
        delta, keys sent), or None where the compiled plane cannot (then the rounds part
        sends them itself)."""
        plane = self.compiled
        if plane is None or not plane.can_send_rounds:
            return None
        try:
            return plane.send_round(round_id, keys, kinds)
        finally:
            self._fold_counters()

    def admit(self, token, peers=None):
        """The cluster formed with `token`: the plane may serve its members. peers: node
        -> this node's DEALER to it (sync answers go there)."""
        if self.compiled is None:
            return
        spec = self.ctx.spec
        self.compiled.admit(token, [worker_identity(r, token) for r in range(spec.num_workers)],
                            [node_identity(n, token) for n in range(spec.num_nodes)],
                            peers)
        self.compiled.enabled = True

    def stop(self):
        """The node failed (or a fail point wants every message in Python)."""
        if self.compiled is not None:
            self.compiled.enabled = False

    def drain(self, budget, handle, healthy):
        """Take up to `budget` messages from the router; handle(frames) gets each one the
        compiled plane leaves to Python (all of them while it is off). healthy(): False
        once the node failed; from then on every message goes to Python (which answers
        requests FAILED), also the rest of this batch."""
        plane = self.compiled
        if plane is not None and plane.enabled and not healthy():
            self.stop()
        if plane is None or not plane.enabled:
            return protocol.drain(self.router, handle, budget)
        try:
            while budget > 0:
                self._set_clock()
                taken, frames = plane.drain(budget)
                budget -= taken
                self._report_events()  # before any later message
                if frames is None:
                    if plane.events_full:  # stopped to report them: go on
                        continue
                    return
                handle(frames)
                if not healthy():  # that message failed the node: Python from here
                    self.stop()
                    return protocol.drain(self.router, handle, budget)
        finally:
            self._fold_counters()

    def _set_clock(self):
        """The clock the plane's answers to requests decide by, as now."""
        if self._rounds is None:
            return
        retention = self._manager.retention
        now = 0.0 if retention is None else retention.relative(time.monotonic())
        self.compiled.set_clock(now, self._rounds.round)

    def _report_events(self):
        if self.compiled.nfreed:
            self._free_slots(*self.compiled.take_freed())
        for kind, round_id, count in self.compiled.take_events():
            if kind == self._events["sync_answered"]:
                self._rounds.progress(count, round_id)
            elif kind == self._events["moved_in"]:  # the keys a localize waited for
                self._rounds.answer_waiters()
            else:
                raise RuntimeError(f"node {self.ctx.node}: data plane event {kind}")

    def _fold_counters(self):
        plane = self.compiled
        for name, counter in (("bytes_received", "bytes_received"),
                              ("bytes_sent", "bytes_sent"), ("served", "plane_served"),
                              ("replicas_made", "replicas_made"),
                              ("owner_changes", "owner_changes"),
                              ("relocations", "relocations")):
            now = getattr(plane, name)
            if now != self._seen[name]:
                self._count(counter, now - self._seen[name])
                self._seen[name] = now
        if plane.unroutable != self._seen["unroutable"]:
            log.warning("node %d: could not reply to a worker (%d replies): it is gone",
                        self.ctx.node, plane.unroutable - self._seen["unroutable"])
            self._seen["unroutable"] = plane.unroutable
