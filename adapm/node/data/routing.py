"""Passing requests on along their keys' ownership paths (DESIGN.md §5), a part of the
node server: where a key goes (the location cache, or its home), and the forwarded
messages that carry a request's keys there."""

import logging

from adapm.common.errors import FAIL_ROUTING, ProtocolError
from adapm.policy.ownership import route, split_by
from adapm.wire import protocol
from adapm.wire.protocol import MsgType

log = logging.getLogger("adapm.server")


class Routes:
    def __init__(self, ctx, outbox):
        self.ctx = ctx
        self.outbox = outbox

    def route(self, keys):
        """Node per key to send to (-1: nowhere, the path leads back here)."""
        return route(self.ctx.view, keys, self.ctx.node, self.ctx.num_nodes)

    def forward_request(self, msg, mtype, keys, rank, fields_of):
        """Pass the keys' part of worker `rank`'s request on as `mtype`; fields_of(idx)
        gives the other fields of the forwarded message for the keys at indices idx. A
        part that cannot go anywhere fails the worker's request (never a silent loss)."""
        for dest, idx in split_by(self.route(keys)).items():
            if dest < 0:
                log.error("node %d: keys %s.. of a %s from worker %d cannot be routed",
                          self.ctx.node, keys[idx][:4], msg.type.name, rank)
                self._unroutable(rank, msg, keys[idx])
                continue
            try:
                out = protocol.forwarded(msg, mtype, keys=keys[idx], requester=rank,
                                         **fields_of(idx))
            except ProtocolError:  # forwarded too often: fail the request, never loop
                self._unroutable(rank, msg, keys[idx])
                continue
            self.outbox.to_peer(dest, out)

    def _unroutable(self, rank, msg, keys):
        self.outbox.to_worker(rank, protocol.Failed(request_id=msg.request_id, code=FAIL_ROUTING,
                                                    detail=int(keys[0])))

    def forward_move_request(self, msg, keys):
        for dest, idx in split_by(self.route(keys)).items():
            if dest < 0:
                log.error("node %d: cannot route a move request for keys %s..",
                          self.ctx.node, keys[idx][:4])
                continue
            self.outbox.to_peer(dest, protocol.forwarded(msg, MsgType.MOVE_REQUEST,
                                                         keys=keys[idx], target=msg.target))
