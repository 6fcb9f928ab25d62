"""A worker's requests to node servers and the replies that complete them: a part of the
worker client of its own (adapm.client.worker holds the public API, adapm.client.consistency the
read-your-writes bookkeeping).

- `Op` and its kinds: an operation waiting for replies. `PullOp` copies each part of a
  pull's answer into the caller's buffer; `CountOp` counts update acknowledgements, or
  keeps the one reply of a control request. Each checks that a reply fits its request.
- `Requests`: numbers requests, sends them, and hands every reply to the operation that
  waits for it. A FAILED reply, or one that does not fit its request, fails the operation
  with ClusterError; a reply nobody waits for (a late one) is dropped. While it waits it
  checks, through the callable it is given, that the cluster is alive: a dead peer is a
  ClusterError within seconds, never a hang.
- `Sockets`: the transport, one DEALER socket per node. `Requests` only calls its
  connect/send/receive/close, so a test hands it a stand-in and feeds replies directly.
- `ClusterHealth`: the failure flag and heartbeat the node server writes into the table.
- `Pending`: the public handle of an asynchronous operation (adapm.Pending)."""

import time

import numpy as np
import zmq

from adapm.common.errors import ClusterError, ProtocolError, failure_text
from adapm.wire import protocol
from adapm.wire.protocol import ALL_POSITIONS, MsgType
from adapm.wire.security import connector

POLL_SLICE_MS = 100  # how often a waiting call checks that the cluster is alive


class Op:
    """An operation waiting for replies: `left` keys (or replies) still to come."""

    __slots__ = ("left", "error", "result")

    def __init__(self):
        self.left = 0
        self.error = None
        self.result = None

    @property
    def done(self):
        return self.left <= 0 or self.error is not None

    def raise_if_failed(self):
        if self.error is not None:
            raise self.error


class PullOp(Op):
    """A pull's remote part: `parts[request_id]` are the positions (in the caller's
    keys) that request asked for; each reply's values go to those positions of `out`,
    laid out by `segments` (set once the pull has misses)."""

    __slots__ = ("out", "segments", "parts")

    def __init__(self, out, segments=None):
        super().__init__()
        self.out, self.segments, self.parts = out, segments, {}
        self.result = out

    def feed(self, msg, dtype):
        """Take one reply; returns how many keys it answered (ProtocolError: it does
        not fit the request)."""
        if msg.type != MsgType.PULL_REPLY:
            raise ProtocolError(f"{msg.type.name} answering a pull")
        part = self.parts[msg.request_id]
        if msg.flags & ALL_POSITIONS:
            idx = part
            if part.shape[0] == self.out.shape[0] and self.segments.uniform:
                # The whole pull answered by one node, in order: one plain copy.
                values = protocol.values_of(msg, dtype, self.out.size)
                np.copyto(self.out.reshape(-1), values)
                return part.shape[0]
        else:
            if msg.positions.shape[0] and int(msg.positions.max()) >= part.shape[0]:
                raise ProtocolError("pull reply with positions outside the request")
            idx = part[msg.positions.astype(np.intp)]
        values = protocol.values_of(msg, dtype, self.segments.size(idx))
        self.segments.put(self.out, idx, values)
        return idx.shape[0]


class CountOp(Op):
    """Update acknowledgements (count of keys applied), or one control reply of
    `reply_type`. An update op names its remotely sent keys in `keys` (for
    adapm.client.consistency)."""

    __slots__ = ("reply_type", "reply", "keys")

    def __init__(self, reply_type=None):
        super().__init__()
        self.reply_type, self.reply, self.keys = reply_type, None, None

    def feed(self, msg, dtype):
        if self.reply_type is None:
            if msg.type != MsgType.UPDATE_ACK:
                raise ProtocolError(f"{msg.type.name} answering an update")
            return msg.applied
        if msg.type != self.reply_type:
            raise ProtocolError(f"{msg.type.name} answering a {self.reply_type.name} request")
        self.reply = msg
        return 1


class Pending:
    """Handle of an asynchronous operation; wait() returns its result (pull: the array)."""

    __slots__ = ("_requests", "_op")

    def __init__(self, requests, op):
        self._requests, self._op = requests, op

    def done(self):
        if not self._op.done:
            self._requests.pump(0)
        return self._op.done

    def wait(self, timeout=None):
        """Block until the operation completed (or TimeoutError after `timeout` s)."""
        self._requests.wait(self._op, timeout)
        return self._op.result


class Requests:
    """Requests of one worker in flight, by request id, and the operations they serve."""

    def __init__(self, transport, node, rank, token, dtype, check_cluster,
                 count=lambda name, n: None):
        """transport: connect(node, address), send(node, frames) -> bytes,
        receive(timeout_ms) -> iterable of frame lists, close(linger);
        node, rank: this worker's node and global rank (stamped on every message);
        token: the cluster's message token; dtype: the table's (replies' values);
        check_cluster(): raises ClusterError once the cluster failed;
        count(name, n): adds n to this worker's statistic `name` (bytes)."""
        self._transport = transport
        self.node, self.rank, self.token, self.dtype = node, rank, token, dtype
        self._check_cluster = check_cluster
        self._count = count
        self._who = f"node {node}, worker {rank}"
        self._next_request = 0
        self._waiting = {}  # request id -> (op, keys or replies still expected)

    @property
    def waiting(self):
        """How many requests still wait for replies."""
        return len(self._waiting)

    def connect(self, node, address):
        self._transport.connect(node, address)

    def close(self, linger=0):
        self._transport.close(linger)

    # -- sending -------------------------------------------------------------------

    def send(self, node, msg):
        """Send `msg` to `node`'s server, expecting no reply."""
        msg.src_node = self.node
        msg.src_worker = self.rank
        msg.token = self.token
        size = self._transport.send(node, msg.encode())
        # Traffic with the worker's own node server stays on its machine: counted apart.
        self._count("bytes_sent" if node != self.node else "bytes_to_node", size)

    @property
    def next_id(self):
        """The id the next request will carry (the compiled miss path numbers its own
        requests from it, then claims them)."""
        return self._next_request + 1

    def claim_ids(self, n):
        """Request ids next_id .. next_id + n - 1 were used (by the compiled miss path)."""
        self._next_request += n

    def adopt(self, request_id, op, expected):
        """Wait for `expected` more keys of a request sent elsewhere (the compiled miss
        path hands a call over) as part of `op`."""
        self._waiting[request_id] = (op, expected)
        op.left += expected

    def check_cluster(self):
        """ClusterError once the cluster failed (what a waiting call checks)."""
        self._check_cluster()

    def start(self, node, msg, op, expected):
        """Send `msg` to `node` as part of `op`, expecting `expected` keys/replies back;
        returns the request id it carries."""
        self._next_request += 1
        msg.request_id = self._next_request
        self._waiting[msg.request_id] = (op, expected)
        op.left += expected
        self.send(node, msg)
        return msg.request_id

    def ask(self, node, msg, reply_type, timeout=None):
        """Send `msg` to `node` and return its reply of `reply_type`; no reply within
        `timeout` seconds is a ClusterError."""
        op = CountOp(reply_type)
        self.start(node, msg, op, 1)
        self.wait_or_fail(op, timeout, msg.type.name.lower())
        return op.reply

    # -- waiting -------------------------------------------------------------------

    def wait(self, op, timeout=None):
        """Receive replies until `op` is done; raises its error, TimeoutError after
        `timeout` seconds (the operation stays pending), or ClusterError once the
        cluster failed (the operation is given up)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not op.done:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"worker {self.rank}: operation still pending after "
                                   f"{timeout} s")
            if not self.pump(POLL_SLICE_MS):
                try:
                    self._check_cluster()
                except ClusterError:
                    self.forget(op)  # nothing will answer it any more
                    raise
        op.raise_if_failed()

    def wait_or_fail(self, op, timeout, what):
        """Wait for `op`; no answer within `timeout` seconds is a ClusterError."""
        try:
            self.wait(op, timeout)
        except TimeoutError:
            self.forget(op)
            raise ClusterError(f"{self._who}: no answer to {what} within {timeout:.0f} s") \
                from None

    def wait_all(self):
        """Wait for every operation still waiting for replies."""
        for op, _ in list(self._waiting.values()):
            self.wait(op)

    def forget(self, op):
        """Stop waiting for `op`'s replies: late ones are dropped."""
        for request_id in [r for r, (o, _) in self._waiting.items() if o is op]:
            del self._waiting[request_id]

    # -- receiving -----------------------------------------------------------------

    def pump(self, timeout_ms):
        """Receive and dispatch the replies that arrive within `timeout_ms`; returns how
        many arrived."""
        handled = 0
        for frames in self._transport.receive(timeout_ms):
            handled += 1
            self._count("bytes_received", protocol.frame_size(frames))
            self.dispatch(frames)
        return handled

    def dispatch(self, frames):
        """Hand one received message to the operation that waits for it."""
        try:
            msg = protocol.decode(frames)
        except ProtocolError:
            return  # never act on a malformed message
        entry = self._waiting.get(msg.request_id)
        if entry is None:
            return  # a late reply to an operation that already failed
        op, left = entry
        if msg.type == MsgType.FAILED:
            self._fail(op, failure_text(msg.code, msg.detail, msg.text))
            return
        try:
            got = op.feed(msg, self.dtype)
        except ProtocolError as exc:
            self._fail(op, f"malformed reply from node {msg.src_node}: {exc}")
            return
        if got > left:  # would complete the op while other keys' replies are missing
            self._fail(op, f"malformed reply from node {msg.src_node}: {msg.type.name} "
                           f"answers {got} keys of a request waiting for {left}")
            return
        op.left -= got
        left -= got
        if left <= 0:
            del self._waiting[msg.request_id]
        else:
            self._waiting[msg.request_id] = (op, left)

    def _fail(self, op, why):
        op.error = ClusterError(f"{self._who}: {why}")
        self.forget(op)


class Sockets:
    """One DEALER socket per node (secured when `curve` is given), all with this
    worker's identity, and a poller over them."""

    def __init__(self, identity, curve=None):
        self._identity, self._curve = identity, curve
        self._ctx = zmq.Context()
        self._socks = {}
        self._poller = zmq.Poller()

    def connect(self, node, address):
        sock = connector(self._ctx, self._curve)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # intents must never block the worker
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.IDENTITY, self._identity)
        sock.connect(address)
        self._socks[node] = sock
        self._poller.register(sock, zmq.POLLIN)

    def send(self, node, frames):
        return protocol.send(self._socks[node], frames)

    def handles(self):
        """node -> its socket (pyzmq), for compiled code that sends and receives on them."""
        return dict(self._socks)

    def receive(self, timeout_ms):
        """Every message waiting once one arrived within `timeout_ms` (frame lists)."""
        for sock, _ in self._poller.poll(timeout_ms):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                yield frames

    def close(self, linger=0):
        for sock in self._socks.values():
            sock.close(linger=linger)
        self._socks = {}
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None


class ClusterHealth:
    """Whether the cluster is alive, as the node's table says: the failure flag a node
    server sets (its own failure or one it was told of), and its heartbeat."""

    def __init__(self, view, heartbeat_timeout, who):
        self._view = view
        self._heartbeat_timeout = heartbeat_timeout
        self._who = who
        self._last_check = time.monotonic()

    def check(self):
        """Raise ClusterError if the cluster failed or the node server fell silent."""
        code = self._view.failed
        if code:
            why = failure_text(code, self._view.failed_detail, self._view.failed_reason)
            raise ClusterError(f"{self._who}: the cluster failed: {why}")
        age = self._view.heartbeat_age()
        if age > self._heartbeat_timeout:
            raise ClusterError(f"{self._who}: node server silent for {age:.1f} s; it is "
                               "presumed dead")

    def check_if_due(self):
        """check() when the failure flag is set or POLL_SLICE_MS passed since the last
        one: a dead server must not go unnoticed by a worker that only reads and writes
        local keys, but reading the heartbeat's clock on every call would cost."""
        now = time.monotonic()
        if self._view.failed or now - self._last_check > POLL_SLICE_MS / 1000:
            self._last_check = now
            self.check()
