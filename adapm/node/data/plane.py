"""The node server's data plane, Python side (DESIGN.md §9): the compiled plane
(src/_plane.pyx) serves remote reads and writes of owned keys straight from the ROUTER
socket; this class builds it, tells it who the members are once the cluster formed,
turns it off when the node fails, and folds its counters into the node's.

`drain(budget, handle)` reads the router until it is empty or `budget` messages were
taken: the compiled plane serves what it can, and each message it cannot (control,
keys not owned here, relocations, sync rounds, anything malformed) goes to `handle`
(the node server's Python dispatch) in arrival order.

ADAPM_DATA_PLANE=python (adapm.common.config) reads every message in Python instead:
the reference the compiled plane is tested against, and a way around it."""

import logging
import sys

from adapm.node.data import libzmq
from adapm.wire import protocol
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
        self._seen = {"bytes_received": 0, "bytes_sent": 0, "served": 0, "unroutable": 0}
        functions = libzmq.functions() if compiled and sys.byteorder == "little" and \
            sys.platform.startswith("linux") else None
        if functions is not None:
            from adapm.node.data import _plane
            self.compiled = _plane.Plane(functions, router.underlying, ctx.view,
                                         ctx.view.kernel_handle(), ctx.node, ctx.num_nodes,
                                         ctx.spec.num_workers, ctx.spec.workers_per_node)
        log.debug("node %d: %s data plane", ctx.node,
                  "compiled" if self.compiled is not None else "Python")

    def admit(self, token):
        """The cluster formed with `token`: the plane may serve its members."""
        if self.compiled is None:
            return
        spec = self.ctx.spec
        self.compiled.admit(token, [worker_identity(r, token) for r in range(spec.num_workers)],
                            [node_identity(n, token) for n in range(spec.num_nodes)])
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
                taken, frames = plane.drain(budget)
                budget -= taken
                if frames is None:
                    return
                handle(frames)
                if not healthy():  # that message failed the node: Python from here
                    self.stop()
                    return protocol.drain(self.router, handle, budget)
        finally:
            self._fold_counters()

    def _fold_counters(self):
        plane = self.compiled
        for name, counter in (("bytes_received", "bytes_received"),
                              ("bytes_sent", "bytes_sent"), ("served", "plane_served")):
            now = getattr(plane, name)
            if now != self._seen[name]:
                self._count(counter, now - self._seen[name])
                self._seen[name] = now
        if plane.unroutable != self._seen["unroutable"]:
            log.warning("node %d: could not reply to a worker (%d replies): it is gone",
                        self.ctx.node, plane.unroutable - self._seen["unroutable"])
            self._seen["unroutable"] = plane.unroutable
