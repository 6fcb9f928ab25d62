"""The node server: creates and owns the node's shared-memory table, serves its workers'
control requests (hello, barrier, wait_sync, intents, goodbye) over a ZeroMQ ROUTER socket,
and keeps a heartbeat in the table so that workers notice when it is gone.

It runs as its own process (`serve`). It never touches the values a worker reads or writes
on the hot path: workers do that in shared memory, with no message."""

import logging
import signal
import time

import numpy as np
import zmq

from adapm import protocol
from adapm.errors import ProtocolError
from adapm.initializers import chunks, initial_values
from adapm.intents import IntentStore
from adapm.process import die_with_parent, set_process_name
from adapm.protocol import Message, MsgType
from adapm.table import NODE_SLOT, OWNED, WORKER_SLOT, SharedTable, segment_name

log = logging.getLogger("adapm.server")

POLL_MS = 1             # a sync round is at most this long when idle
HEARTBEAT_EVERY = 0.05  # seconds between two heartbeat writes
MAX_BATCH = 256         # messages handled per round before the round's housekeeping


def home_keys(num_keys, node, num_nodes):
    """The keys whose home (initial owner) is `node`: key % num_nodes == node."""
    return np.arange(node, num_keys, num_nodes, dtype=np.uint64)


class NodeServer:
    def __init__(self, spec, node):
        self.spec = spec
        self.node = node
        self.workers = spec.workers_per_node
        self.table = None
        self.ctx = None
        self.socket = None
        self.address = None
        self.intents = IntentStore(self.workers)
        self._identities = [None] * self.workers  # ROUTER identity per local worker
        self._left = set()                         # local workers that said goodbye
        self._barrier = {}                         # generation -> set of local workers
        self._stop = False

    # -- start ---------------------------------------------------------------------

    def start(self):
        self._create_table()
        self.ctx = zmq.Context()
        self.socket = self.ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        port = self.socket.bind_to_random_port(f"tcp://{self.spec.host}")
        self.address = f"tcp://{self.spec.host}:{port}"

    def _create_table(self):
        spec = self.spec
        name = segment_name(spec.cluster_id, self.node)
        table = SharedTable.create(
            name, spec.num_keys, spec.value_length, spec.dtype, self.workers,
            node=self.node, num_nodes=spec.num_nodes,
            cluster_id=spec.cluster_id.encode())
        self.table = table
        home = home_keys(spec.num_keys, self.node, spec.num_nodes)
        if spec.num_nodes > 1:
            everyone = np.arange(spec.num_keys, dtype=np.uint64)
            table.set_owners(everyone, (everyone % spec.num_nodes).astype(np.uint16))
        lengths = table.view.directory_array()["length"][home].astype(np.uint64)
        if spec.init == ("zeros",):
            table.install(home, OWNED)  # fresh shared memory reads as zeros
        else:
            for keys, lens in chunks(home, lengths):
                values = initial_values(spec.init, keys, lens, spec.dtype)
                table.install(keys, OWNED, values)
        table.publish()

    # -- loop ----------------------------------------------------------------------

    def request_stop(self, *_):
        self._stop = True

    def serve_forever(self):
        last_beat = 0.0
        while not self._stop:
            if self.socket.poll(POLL_MS, zmq.POLLIN):
                for _ in range(MAX_BATCH):
                    try:
                        frames = self.socket.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._dispatch(frames)
            now = time.monotonic()
            if now - last_beat >= HEARTBEAT_EVERY:
                self.table.view.heartbeat()
                self.intents.expire(self._clocks())
                last_beat = now

    def _clocks(self):
        return self.table.view.counters()[:, WORKER_SLOT["clock"]]

    def _dispatch(self, frames):
        identity, body = frames[0].bytes, frames[1:]
        try:
            msg = protocol.decode(body)
            self._check_sender(identity, msg)
        except ProtocolError as exc:
            self.table.view.node_counter_add(NODE_SLOT["malformed_messages"], 1)
            log.warning("node %d: dropped a malformed message: %s", self.node, exc)
            return
        self.table.view.node_counter_add(
            NODE_SLOT["bytes_received"], sum(len(f) for f in body))
        handler = self._handlers.get(msg.type)
        handler(self, identity, msg)

    def _check_sender(self, identity, msg):
        if msg.type not in self._handlers:
            raise ProtocolError(f"{msg.type.name} is not a request for a node server")
        if not 0 <= msg.src_worker < self.workers:
            raise ProtocolError(f"unknown worker {msg.src_worker} on node {self.node}")
        if msg.type != MsgType.HELLO and self._identities[msg.src_worker] != identity:
            raise ProtocolError(f"{msg.type.name} from worker {msg.src_worker} before HELLO")

    def _send(self, identity, msg):
        msg.src_node = self.node
        frames = msg.encode()
        try:
            self.socket.send_multipart([identity, *frames], copy=False)
        except zmq.ZMQError as exc:  # the worker is gone (ROUTER_MANDATORY)
            log.warning("node %d: could not reply to a worker: %s", self.node, exc)
            return
        self.table.view.node_counter_add(NODE_SLOT["bytes_sent"], sum(len(f) for f in frames))

    # -- handlers ------------------------------------------------------------------

    def _on_hello(self, identity, msg):
        self._identities[msg.src_worker] = identity
        self._left.discard(msg.src_worker)
        self._send(identity, Message(MsgType.WELCOME, request_id=msg.request_id))

    def _on_barrier(self, identity, msg):
        generation = msg.request_id
        arrived = self._barrier.setdefault(generation, set())
        arrived.add(msg.src_worker)
        if self._left:
            # A worker that finalized can never arrive: fail the barrier instead of hanging.
            for worker in arrived:
                self._send(self._identities[worker],
                           Message(MsgType.FAILED, request_id=generation, arg0=1,
                                   count=min(self._left)))
            del self._barrier[generation]
            return
        if len(arrived) == self.workers:
            for worker in arrived:
                self._send(self._identities[worker],
                           Message(MsgType.RELEASE, request_id=generation))
            del self._barrier[generation]

    def _on_wait_sync(self, identity, msg):
        # The node holds no replicas that could lag (every key is owned where it lives),
        # so every exchange is complete.
        self._send(identity, Message(MsgType.SYNCED, request_id=msg.request_id))

    def _on_intent(self, identity, msg):
        if msg.arg1 <= msg.arg0 or msg.arg0 < 0:
            self.table.view.node_counter_add(NODE_SLOT["malformed_messages"], 1)
            return
        self.intents.add(msg.src_worker, msg.keys.copy(), msg.arg0, msg.arg1)
        self.table.view.node_counter_add(NODE_SLOT["intents_received"], msg.keys.shape[0])

    def _on_goodbye(self, identity, msg):
        self._left.add(msg.src_worker)

    _handlers = {
        MsgType.HELLO: _on_hello,
        MsgType.BARRIER: _on_barrier,
        MsgType.WAIT_SYNC: _on_wait_sync,
        MsgType.INTENT: _on_intent,
        MsgType.GOODBYE: _on_goodbye,
    }

    # -- shutdown ------------------------------------------------------------------

    def close(self):
        """Close the socket and context, unmap and unlink the table. Idempotent."""
        if self.socket is not None:
            self.socket.close(linger=0)
            self.socket = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None
        if self.table is not None:
            self.table.unlink()
            self.table.close()
            self.table = None


def serve(spec, node, ready):
    """Entry point of a node server process. `ready` is a multiprocessing connection on
    which it reports ("ready", address) or ("error", text) once."""
    die_with_parent()
    set_process_name(f"adapm-node{node}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launching process decides
    server = NodeServer(spec, node)
    signal.signal(signal.SIGTERM, server.request_stop)
    try:
        try:
            server.start()
        except Exception as exc:
            ready.send(("error", f"node {node}: could not start: {exc!r}"))
            return 1
        ready.send(("ready", server.address))
        ready.close()
        server.serve_forever()
        return 0
    finally:
        server.close()
