"""The coordinator: rendezvous, cluster-wide barriers, liveness and failure broadcast.

It lives in node 0's server process (polled by its loop) and owns one ROUTER socket that
every node server's DEALER connects to. Node servers JOIN with their address and a
fingerprint of the cluster spec; once all have joined, each gets the list of addresses
(PEERS). A barrier is released when every node reports that all its workers arrived. A
node silent for longer than the node timeout, or a node reporting a failure, makes the
coordinator tell every node that the cluster failed; nodes then fail every call."""

import logging
import time

import zmq

from adapm import protocol
from adapm.errors import ProtocolError
from adapm.protocol import Message, MsgType, node_identity
from adapm.security import listener

log = logging.getLogger("adapm.coordinator")

HEARTBEAT_EVERY = 0.25  # seconds between heartbeats to every node

# Failure codes carried by FAILED / NODE_FAILED (arg0); count carries the detail.
FAIL_BARRIER = 1        # a barrier can never complete: worker `count` already finalized
FAIL_NODE_SILENT = 2    # node `count` stopped sending heartbeats
FAIL_WORKER_DIED = 3    # worker `count` died without finalizing
FAIL_MISMATCH = 4       # node `count` joined with a different cluster spec
FAIL_COORDINATOR = 5    # the coordinator went silent
FAIL_ROUTING = 6        # a request could not be routed (forwarded too often)
FAIL_REJECTED = 7       # a request was malformed or not allowed; count: the node
FAIL_BARRIER_NODE = 8   # a barrier can never complete: every worker of node `count` left
FAIL_STOPPED = 9        # the launching process stops the cluster: worker `count` failed
FAIL_INTERNAL = 10      # node `count` hit an internal error (its log has the traceback)

FAILURE_TEXT = {
    FAIL_BARRIER: "a barrier can never complete: worker {} has already finalized",
    FAIL_NODE_SILENT: "node {} stopped responding (dead or unreachable)",
    FAIL_WORKER_DIED: "worker {} died without finalizing",
    FAIL_MISMATCH: "node {} joined with different cluster options",
    FAIL_COORDINATOR: "the coordinator (node 0) stopped responding",
    FAIL_ROUTING: "a request for keys could not be routed (detail {})",
    FAIL_REJECTED: "node {} rejected the request as malformed",
    FAIL_BARRIER_NODE: "a barrier can never complete: every worker of node {} has finalized",
    FAIL_STOPPED: "the cluster is being stopped because worker {} failed",
    FAIL_INTERNAL: "node {} hit an internal error (its log has the traceback)",
}


def failure_text(code, detail):
    return FAILURE_TEXT.get(code, "unknown failure {}").format(detail)


class Coordinator:
    def __init__(self, ctx, address, num_nodes, node_timeout, curve=None):
        self.num_nodes = num_nodes
        self.node_timeout = node_timeout
        self.socket = listener(ctx, curve)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.address = bind_address(self.socket, address)
        self.addresses = [None] * num_nodes
        self.fingerprint = None
        self.last_seen = {}
        self.barriers = {}
        self.done = set()
        self.failed = None
        self._last_beat = 0.0
        self.malformed = 0

    # -- events ------------------------------------------------------------------

    def handle_ready(self):
        """Handle every message waiting on the socket."""
        while True:
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                msg = protocol.decode(frames[1:])
                node = msg.src_node
                if frames[0].bytes != node_identity(node) or node >= self.num_nodes:
                    raise ProtocolError(f"{msg.type.name} from an unknown peer")
            except ProtocolError as exc:
                self.malformed += 1
                log.warning("coordinator: dropped a malformed message: %s", exc)
                continue
            self.last_seen[node] = time.monotonic()
            handler = self._handlers.get(msg.type)
            if handler is None:
                self.malformed += 1
                continue
            try:
                handler(self, node, msg)
            except Exception:  # noqa: BLE001 - one message never takes the coordinator down
                self.malformed += 1
                log.exception("coordinator: %s from node %d failed", msg.type.name, node)

    def tick(self):
        """Heartbeats out; silent nodes detected. Call at least every HEARTBEAT_EVERY."""
        now = time.monotonic()
        if now - self._last_beat < HEARTBEAT_EVERY:
            return
        self._last_beat = now
        for node in list(self.last_seen):
            self._send(node, Message(MsgType.HEARTBEAT))
        if self.failed is None and len(self.last_seen) == self.num_nodes:
            for node, seen in self.last_seen.items():
                if now - seen > self.node_timeout:
                    self.fail(FAIL_NODE_SILENT, node)
                    break

    def fail(self, code, detail):
        if self.failed is not None:
            return
        self.failed = (code, detail)
        log.error("coordinator: cluster failed: %s", failure_text(code, detail))
        for node in list(self.last_seen):
            self._send(node, Message(MsgType.NODE_FAILED, arg0=code, count=detail))

    # -- handlers ------------------------------------------------------------------

    def _on_join(self, node, msg):
        if self.fingerprint is None:
            self.fingerprint = msg.arg0
        if msg.arg0 != self.fingerprint or len(msg.addresses) != 1:
            self.fail(FAIL_MISMATCH, node)
            return
        self.addresses[node] = msg.addresses[0]
        if all(self.addresses):
            for peer in range(self.num_nodes):
                self._send(peer, Message(MsgType.PEERS, addresses=self.addresses))

    def _on_barrier(self, node, msg):
        arrived = self.barriers.setdefault(msg.request_id, set())
        arrived.add(node)
        if self.done:  # a node whose workers all left can never arrive
            self.fail(FAIL_BARRIER_NODE, min(self.done))
        elif len(arrived) == self.num_nodes:
            del self.barriers[msg.request_id]
            for peer in range(self.num_nodes):
                self._send(peer, Message(MsgType.NODE_RELEASE, request_id=msg.request_id))

    def _on_heartbeat(self, node, msg):
        pass  # last_seen is updated for every message

    def _on_done(self, node, msg):
        self.done.add(node)
        if self.barriers:
            self.fail(FAIL_BARRIER_NODE, node)
        elif len(self.done) == self.num_nodes:
            for peer in range(self.num_nodes):
                self._send(peer, Message(MsgType.SHUTDOWN))

    def _on_failed(self, node, msg):
        if not 0 < msg.arg0 < 2**31 or not 0 <= msg.count < 2**32:
            raise ProtocolError(f"failure code {msg.arg0}")
        self.fail(msg.arg0, msg.count)

    _handlers = {
        MsgType.JOIN: _on_join,
        MsgType.NODE_BARRIER: _on_barrier,
        MsgType.HEARTBEAT: _on_heartbeat,
        MsgType.NODE_DONE: _on_done,
        MsgType.NODE_FAILED: _on_failed,
    }

    def _send(self, node, msg):
        try:
            protocol.send(self.socket, [node_identity(node), *msg.encode()])
        except zmq.ZMQError:
            pass  # that node is gone; silence detection reports it

    def close(self, linger=0):
        self.socket.close(linger=linger)


def bind_address(socket, address):
    """Bind tcp://HOST:PORT, where PORT is a number, 0 (any free port) or LOW-HIGH (the
    first free port of the range); return the address bound. A port in use is an error
    naming it, never a hang."""
    host, _, port = address.rpartition(":")
    try:
        if port in ("0", "*"):
            port = socket.bind_to_random_port(host)
        elif "-" in port:
            low, high = (int(p) for p in port.split("-", 1))
            port = socket.bind_to_random_port(host, low, high + 1, max_tries=4 * (high - low + 1))
        else:
            socket.bind(address)
    except zmq.ZMQBindError:
        raise OSError(f"cannot listen on {address}: no free port in the range") from None
    except zmq.ZMQError as exc:
        raise OSError(f"cannot listen on {address}: {exc.strerror}") from None
    except ValueError:
        raise OSError(f"cannot listen on {address}: malformed port") from None
    return f"{host}:{port}"
