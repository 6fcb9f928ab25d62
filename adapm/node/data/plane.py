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
# The node counter each of the compiled plane's counters adds to, where the names differ.
_NODE_COUNTER = {"served": "plane_served"}


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
        self._serves_rounds = False  # the plane keeps the copies and answers rounds
        self._rounds = self._manager = None
        self._events = {}
        self._seen = None            # the compiled plane's counters, as last folded
        functions = libzmq.functions() if compiled else None
        if functions is not None:
            from adapm.node.data import _plane
            self.compiled = _plane.Plane(functions, router.underlying, ctx.view,
                                         ctx.view.kernel_handle(), ctx.node, ctx.num_nodes,
                                         ctx.spec.num_workers, ctx.spec.workers_per_node)
            self._events = _plane.EVENTS
            self._counter_names = _plane.COUNTERS
            self._seen = self.compiled.counters()
        log.debug("node %d: %s data plane", ctx.node,
                  "compiled" if self.compiled is not None else "Python")

    def serve_rounds(self, rounds, manager, ownership, allocator):
        """Let the compiled plane answer sync rounds, send them, install the keys
        they bring and make requested keys PENDING, on the node's round state: rounds
        (Rounds: its replicas, holders, arrival stamps and round; its progress(keys,
        round) takes the plane's sync_answered events, its answer_waiters the moved_in
        ones), manager (Manager: its mode, intent counts and retention decide requests,
        as relocate_mask does), ownership (its counters go with relocated keys and come
        with arriving ones; its home records), allocator (the table's slot allocator:
        the plane takes slots from it and gives them back). Only with compiled key sets
        (the plane changes them) and the compiled allocator (it shares their state)."""
        self._rounds, self._manager = rounds, manager
        replicas = rounds.replicas
        if self.compiled is None or not hasattr(replicas.pending, "handle") or \
                not hasattr(allocator, "handle"):
            return
        self.compiled.serve_rounds(rounds.holders.raw(), replicas.seen_version,
                                   replicas.synced, replicas.pending, replicas.moving_in,
                                   allocator)
        retention = manager.retention
        self.compiled.set_policy(
            manager.mode, manager.intents.count,
            None if retention is None else retention.last_used,
            None if retention is None else retention.level,
            [] if retention is None else list(retention.SECONDS), rounds.arrived_round,
            ownership.counter, SETTLE_ROUNDS)
        self.compiled.serve_arrivals(replicas.held, ownership.home_owner,
                                     ownership.home_counter)
        self.compiled.serve_drops(rounds.rejoin, rounds.refresh)
        self._serves_rounds = True

    def make_pending(self, keys):
        """ReplicaCopies.make_pending in compiled code (Plane.make_pending), or None
        where the compiled plane keeps no copies (the replicas part does it itself)."""
        if not self._serves_rounds or not self.compiled.enabled:
            return None
        return self.compiled.make_pending(keys)

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
        for kind, round_id, count in self.compiled.take_events():
            if kind == self._events["sync_answered"]:
                self._rounds.progress(count, round_id)
            elif kind == self._events["moved_in"]:  # the keys a localize waited for
                self._rounds.answer_waiters()
            elif kind == self._events["not_full"]:  # a dropped replica stays after all
                self._rounds.not_full_after_all()
            else:
                raise RuntimeError(f"node {self.ctx.node}: data plane event {kind}")

    def _fold_counters(self):
        """Add what the compiled plane counted since the last call to the node's
        counters (one call: this runs after every drain)."""
        now = self.compiled.counters()
        if now == self._seen:
            return
        for name, was, value in zip(self._counter_names, self._seen, now):
            if value == was:
                continue
            if name == "unroutable":
                log.warning("node %d: could not reply to a worker (%d replies): it is gone",
                            self.ctx.node, value - was)
            else:
                self._count(_NODE_COUNTER.get(name, name), value - was)
        self._seen = now
