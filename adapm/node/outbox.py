"""The node server's outbox: the one place its parts send through.

Parts (data serving, relocation, rounds, local workers) hand a message and a destination
to the outbox; only the outbox knows sockets. A unit test gives the parts an outbox that
records instead (any object with the same four methods), so each part runs without
processes or sockets."""

import logging

import zmq

from adapm.wire import protocol
from adapm.wire.protocol import worker_identity

log = logging.getLogger("adapm.server")


class Outbox:
    def __init__(self, node, count, router=None, coordinator=None):
        """count(name, n): adds to a node counter (bytes_sent); router: the ROUTER that
        replies to workers of any node; coordinator: the DEALER to the coordinator."""
        self.node = node
        self.token = 0            # the cluster's token, once it formed
        self.router = router
        self.coordinator = coordinator
        self.peers = {}           # node -> DEALER, once the cluster formed
        self._count = count

    def to_worker(self, rank, msg):
        self.to_identity(worker_identity(rank, self.token), msg)

    def to_identity(self, identity, msg):
        """To a connection of the router (a worker); a worker that is gone is logged,
        not an error: its node fails the cluster if it died."""
        self._stamp(msg)
        frames = msg.encode()
        try:
            # the routing identity is not counted, as on receipt
            self._count("bytes_sent", protocol.send(self.router, [identity, *frames]) -
                        len(identity))
        except zmq.ZMQError as exc:  # ROUTER_MANDATORY: no such connection
            log.warning("node %d: could not reply to a worker: %s", self.node, exc)

    def to_peer(self, node, msg):
        self._stamp(msg)
        self._send(self.peers[node], msg.encode())

    def to_coordinator(self, msg):
        self._stamp(msg)
        protocol.send(self.coordinator, msg.encode())

    def _stamp(self, msg):
        msg.src_node = self.node
        msg.token = self.token

    def _send(self, sock, frames):
        self._count("bytes_sent", protocol.send(sock, frames))
