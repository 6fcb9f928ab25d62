"""The coordinator: rendezvous, cluster-wide barriers, liveness and failure broadcast.

It lives in node 0's server process (polled by its loop) and owns one ROUTER socket that
every node server's DEALER connects to. Node servers JOIN with their address, a
fingerprint of the cluster spec and a proof that they know the cluster secret
(adapm.wire.cluster_secret); a JOIN without a valid proof is dropped, and the node is known
from then on by the connection its valid JOIN came on (a random routing identity, so
that nobody can lock a node out by connecting first under its name). Once all have
joined, each gets the list of addresses and the token masked for it (PEERS). A
barrier is released when every node reports that all its workers arrived. A
node silent for longer than the node timeout, or a node reporting a failure, makes the
coordinator tell every node that the cluster failed; nodes then fail every call. Once
every node is done, the others are told to shut down and send their statistics
(NODE_STATS), and node 0 last, so that its launcher can print every node's."""

import logging
import secrets
import time

import zmq

from adapm.common.errors import (
    FAIL_BARRIER_NODE,
    FAIL_COLLECTIVES,
    FAIL_INTERNAL,
    FAIL_MISMATCH,
    FAIL_NODE_SILENT,
    ProtocolError,
    failure_text,
)
from adapm.common.ports import parse_listen_port
from adapm.table.stats import from_numbers
from adapm.wire import protocol
from adapm.wire.malformed import MalformedLog
from adapm.wire.protocol import MsgType
from adapm.wire.security import listener

log = logging.getLogger("adapm.coordinator")

HEARTBEAT_EVERY = 0.25  # seconds between heartbeats to every node (count: nodes joined)
REPORT_EVERY = 5.0      # seconds between progress lines while the cluster forms
MAX_FRAME_BYTES = 64 * 1024  # the coordinator's messages are small (addresses at most)
RECEIVE_HWM = 1000
MAX_BATCH = 256         # messages handled per wake-up (as the node server's loop does)
STATS_WAIT = 2.0        # seconds node 0 waits at the end for the others' statistics
# Accepted from a node before the cluster formed (no token exists for it yet).
# (JOIN is handled apart: it makes a node known.)
BEFORE_FORMED = {MsgType.HEARTBEAT, MsgType.NODE_FAILED}

class Coordinator:
    def __init__(self, ctx, address, num_nodes, node_timeout, secret, curve=None,
                 describe_barrier=str):
        """`secret`: the cluster's ClusterSecret, which every JOIN must prove.
        describe_barrier(generation): what a cluster barrier is, for the failure when
        nodes wait in different ones."""
        self.num_nodes = num_nodes
        self.secret = secret
        self.routes = [None] * num_nodes  # each node's routing identity, from its JOIN
        self.nonces = [None] * num_nodes  # the nonce of each node's valid JOIN
        self.describe_barrier = describe_barrier
        self.node_timeout = node_timeout
        self.socket = listener(ctx, curve)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES)
        self.socket.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        self.address = bind_address(self.socket, address)
        self.addresses = [None] * num_nodes
        self.fingerprint = None
        self.last_seen = {}
        self.barriers = {}
        self.done = set()
        self.failed = None
        self._last_beat = 0.0
        self._started_at = self._reported_at = time.monotonic()
        # Handed to the nodes that joined (PEERS); every later message must carry it.
        self.token = secrets.randbits(63) | 1
        self.formed = False
        self.malformed = MalformedLog(log, "coordinator")
        self.stats = {}            # node -> its final statistics (NODE_STATS), at the end
        self.ending_since = None   # when every node was done and the others told to stop
        self._node0_told = False

    # -- events ------------------------------------------------------------------

    def handle_ready(self):
        """Handle the messages waiting on the socket, at most MAX_BATCH: the rest wait
        for the next wake-up (the poll reports them again), so that a flood from a
        process that reached the port cannot starve node 0's loop (its housekeeping, its
        peers, the PEERS it must hear). Returns how many were read."""
        for count in range(MAX_BATCH):
            try:
                frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return count
            identity = frames[0].bytes
            try:
                msg = protocol.decode(frames[1:])
                node = msg.src_node
                if msg.type == MsgType.JOIN:
                    self._join(identity, msg)
                    continue
                if self._early_heartbeat(identity, msg):
                    continue
                self._check_sender(identity, msg)
            except ProtocolError as exc:
                self.malformed.dropped(exc)
                continue
            self.last_seen[node] = time.monotonic()
            try:
                self._handlers[msg.type](self, node, msg)
            except ProtocolError as exc:
                self.malformed.dropped(f"{msg.type.name} from node {node}: {exc}")
            except Exception as exc:  # noqa: BLE001 - an internal error fails the cluster
                reason = (f"coordinator: internal error handling {msg.type.name} from node "
                          f"{node}: {type(exc).__name__}: {exc}")
                log.error("%s", reason, exc_info=exc)
                self.fail(FAIL_INTERNAL, 0, reason)
        return MAX_BATCH

    def _early_heartbeat(self, identity, msg):
        """A node's heartbeat sent before it heard PEERS carries no token yet: ignored
        (it does not prove the node alive), but neither counted nor logged."""
        return self.formed and msg.type == MsgType.HEARTBEAT and msg.token == 0 and \
            self._route_of(msg.src_node) == identity

    def _route_of(self, node):
        return self.routes[node] if node < self.num_nodes else None

    def _check_sender(self, identity, msg):
        node = msg.src_node
        if self._route_of(node) != identity:  # never joined with a proof on this connection
            raise ProtocolError(f"{msg.type.name} from an unknown peer")
        if msg.type not in self._handlers:
            raise ProtocolError(f"{msg.type.name} is not a message for the coordinator")
        if self.formed and msg.token != self.token:
            raise ProtocolError(f"{msg.type.name} without the cluster's token")
        if not self.formed and msg.type not in BEFORE_FORMED:
            raise ProtocolError(f"{msg.type.name} before the cluster formed")

    def tick(self):
        """Heartbeats out; silent nodes detected. Call at least every HEARTBEAT_EVERY."""
        now = time.monotonic()
        if now - self._last_beat < HEARTBEAT_EVERY:
            return
        if self.malformed.due():
            self.malformed.flush()
        self._last_beat = now
        joined = self.joined()
        for node in list(self.last_seen):
            self._send(node, protocol.Heartbeat(joined=joined))
        if not self.formed and now - self._reported_at >= REPORT_EVERY:
            self._reported_at = now
            missing = [n for n, a in enumerate(self.addresses) if a is None]
            log.warning("coordinator at %s: %d of %d nodes joined after %.0f s; waiting for "
                        "node%s %s", self.address, joined, self.num_nodes,
                        now - self._started_at, "s" if len(missing) > 1 else "",
                        ", ".join(map(str, missing)))
        self._end_node0()
        # once the others were told to shut down, their silence is expected
        if self.failed is None and len(self.last_seen) == self.num_nodes and \
                self.ending_since is None:
            for node, seen in self.last_seen.items():
                if now - seen > self.node_timeout:
                    self.fail(FAIL_NODE_SILENT, node)
                    break

    def joined(self):
        return sum(address is not None for address in self.addresses)

    def fail(self, code, detail, reason=""):
        if self.failed is not None:
            return
        self.failed = (code, detail, reason)
        log.error("coordinator: cluster failed: %s", failure_text(code, detail, reason))
        for node in list(self.last_seen):
            self._send(node, protocol.NodeFailed(code=code, detail=detail,
                                     text=reason))

    # -- handlers ------------------------------------------------------------------

    def _join(self, identity, msg):
        """A JOIN before the cluster formed: admitted only with a proof of the cluster
        secret, and the connection it came on becomes the node's."""
        node = msg.src_node
        if self.formed:
            raise ProtocolError(f"JOIN as node {node} after the cluster formed")
        if node >= self.num_nodes or len(msg.addresses) != 1:
            raise ProtocolError(f"JOIN as node {node} of {self.num_nodes} with "
                                f"{len(msg.addresses)} addresses")
        nonce = self.secret.check_join(msg.proof, node, msg.fingerprint, msg.addresses[0])
        if nonce is None:  # neither recorded nor answered: it learns nothing
            raise ProtocolError(f"JOIN as node {node} without a valid proof of the cluster "
                                f"secret (not a member, or another ADAPM_CLUSTER_SECRET)")
        self.routes[node], self.nonces[node] = identity, nonce
        self.last_seen[node] = time.monotonic()
        self._on_join(node, msg)

    def _on_join(self, node, msg):
        if self.fingerprint is None:
            self.fingerprint = msg.fingerprint
        if msg.fingerprint != self.fingerprint:
            self.fail(FAIL_MISMATCH, node)
            return
        self.addresses[node] = msg.addresses[0]
        log.debug("coordinator: node %d joined from %s (%d of %d)", node, msg.addresses[0],
                  self.joined(), self.num_nodes)
        if all(self.addresses) and not self.formed:
            self.formed = True
            for peer in range(self.num_nodes):
                self._send(peer, self._peers_for(peer))

    def _peers_for(self, node):
        """PEERS for `node`: the token masked with its JOIN's nonce, and a MAC that
        shows it comes from a holder of the secret."""
        nonce = self.nonces[node]
        masked = self.secret.mask_token(self.token, node, nonce)
        return protocol.Peers(cluster_token=masked, addresses=self.addresses,
                              proof=self.secret.peers_proof(node, nonce, masked,
                                                            self.addresses))

    def _on_barrier(self, node, msg):
        arrived = self.barriers.setdefault(msg.generation, set())
        arrived.add(node)
        if self.done:  # a node whose workers all left can never arrive
            self.fail(FAIL_BARRIER_NODE, min(self.done))
        elif len(arrived) == self.num_nodes:
            del self.barriers[msg.generation]
            log.debug("coordinator: every node reached %s", self.describe_barrier(
                msg.generation))
            for peer in range(self.num_nodes):
                self._send(peer, protocol.NodeRelease(generation=msg.generation))
        else:
            self._check_split()

    def _check_split(self):
        """Every node waits in a barrier, but not all in the same one: a node waits in
        one barrier at a time, so none of them can ever complete."""
        waiting = {node: generation for generation, arrived in self.barriers.items()
                   for node in arrived}
        if len(self.barriers) > 1 and len(waiting) == self.num_nodes:
            where = "; ".join(f"node {node} in {self.describe_barrier(generation)}"
                              for node, generation in sorted(waiting.items()))
            self.fail(FAIL_COLLECTIVES, 0, f"the nodes' workers wait in different "
                                           f"collective calls: {where}")

    def _on_heartbeat(self, node, msg):
        pass  # last_seen is updated for every message

    def _on_done(self, node, msg):
        self.done.add(node)
        if self.barriers:
            self.fail(FAIL_BARRIER_NODE, node)
        elif len(self.done) == self.num_nodes and self.ending_since is None:
            self._end()

    def _end(self):
        """Every node is done: the others shut down first, each sending its final
        statistics (NODE_STATS) as it does; node 0, whose process hosts the coordinator
        and hands every node's statistics to its launcher, is told last: once they all
        arrived, or STATS_WAIT passed."""
        self.ending_since = time.monotonic()
        for peer in range(1, self.num_nodes):
            self._send(peer, protocol.Shutdown())
        self._end_node0()

    def _end_node0(self):
        if self.ending_since is None or self._node0_told:
            return
        others = len(self.stats.keys() - {0})
        if others >= self.num_nodes - 1 or time.monotonic() - self.ending_since > STATS_WAIT:
            self._node0_told = True
            self._send(0, protocol.Shutdown())

    def _on_stats(self, node, msg):
        try:
            self.stats[node] = from_numbers(msg.stats)
        except ValueError as exc:
            raise ProtocolError(f"NODE_STATS: {exc}") from None
        self._end_node0()

    def _on_failed(self, node, msg):
        if not 0 < msg.code < 2**31 or not 0 <= msg.detail < 2**32:
            raise ProtocolError(f"failure code {msg.code}")
        self.fail(msg.code, msg.detail, msg.text)

    _handlers = {
        MsgType.NODE_BARRIER: _on_barrier,
        MsgType.HEARTBEAT: _on_heartbeat,
        MsgType.NODE_DONE: _on_done,
        MsgType.NODE_FAILED: _on_failed,
        MsgType.NODE_STATS: _on_stats,
    }

    def _send(self, node, msg):
        if self.routes[node] is None:
            return  # never joined: nothing to send to
        try:
            protocol.send(self.socket, [self.routes[node], *msg.encode()])
        except zmq.ZMQError:
            pass  # that node is gone; silence detection reports it

    def close(self, linger=0):
        self.socket.close(linger=linger)


def bind_address(socket, address):
    """Bind tcp://HOST:PORT, where PORT is a number, 0 (any free port) or LOW-HIGH (the
    first free port of the range); return the address bound. A port in use is an error
    naming it, never a hang."""
    host, _, port = address.rpartition(":")
    try:  # checked here too: ZeroMQ would take a port modulo 65536 (adapm.common.ports)
        low, high = parse_listen_port("0" if port == "*" else port)
    except ValueError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    try:
        if high == 0:
            port = socket.bind_to_random_port(host)
        elif low < high:
            port = socket.bind_to_random_port(host, low, high + 1, max_tries=4 * (high - low + 1))
        else:
            socket.bind(f"{host}:{low}")
            port = low
    except zmq.ZMQBindError:
        raise OSError(f"cannot listen on {address}: no free port in the range") from None
    except zmq.ZMQError as exc:
        raise OSError(f"cannot listen on {address}: {exc.strerror}") from None
    return f"{host}:{port}"
