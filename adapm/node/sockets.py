"""The node server's ZeroMQ context and sockets: the ROUTER it listens on (requests of
workers of any node, and messages of peers), and the DEALERs it connects to the
coordinator and to each peer (the outbox, adapm.node.outbox, sends on them). With CURVE
keys (a secure cluster) every socket authenticates, and a ZAP handler checks who
connects."""

import numpy as np
import zmq

from adapm.node.control.coordinator import bind_address
from adapm.wire import protocol
from adapm.wire.protocol import node_identity
from adapm.wire.security import connector, listener

RECEIVE_HWM = 1000       # messages queued per connection before ZeroMQ stops reading it


class NodeSockets:
    def __init__(self, spec, node):
        self.spec = spec
        self.node = node
        self.context = zmq.Context()
        self.auth = None            # ZAP handler of a secure cluster
        if spec.curve is not None:
            self.auth = spec.curve.authenticator(self.context)
        self.router = listener(self.context, spec.curve)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Bounded input: no frame larger than the largest legal message (ZeroMQ drops
        # the connection before allocating it), and a bounded queue per connection.
        self.router.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes(spec))
        self.router.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        self.router.setsockopt(zmq.SNDHWM, 0)

    def bind(self, listen):
        """Bind the router to `listen` (tcp://HOST:PORT, PORT may be 0 or LOW-HIGH);
        returns the address it is bound to."""
        return bind_address(self.router, listen)

    def dealer(self, address, identity=None):
        """A DEALER connected to `address`, with routing identity `identity` (default:
        this node's name)."""
        sock = connector(self.context, self.spec.curve)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.IDENTITY, identity or node_identity(self.node))
        sock.connect(address)
        return sock

    def close(self, linger, dealers):
        """Close the router and `dealers`, each with `linger` ms for what is queued, then
        the authenticator and the context."""
        for sock in [self.router, *dealers]:
            if sock is not None:
                sock.close(linger=linger)
        self.router = None
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        self.context.term()


def max_frame_bytes(spec):
    """The largest frame a legal message of this cluster has."""
    lengths = spec.value_length
    longest = int(lengths) if np.ndim(lengths) == 0 else int(np.max(lengths))
    return protocol.max_frame_bytes(spec.num_keys, longest, np.dtype(spec.dtype).itemsize)
