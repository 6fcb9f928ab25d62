"""The worker client: what a training script holds (adapm.Worker).

Reads and writes of keys the node holds go straight to the node's shared-memory table
(adapm.table, Cython hot path): no message, no copy through a server. Control calls
(barrier, wait_sync, intents, finalize) are ZeroMQ messages to the node server. Every
wait also watches the server's heartbeat in the table, so a dead server turns into
ClusterError within the heartbeat timeout instead of a hang."""

import os

import numpy as np
import zmq

from adapm import config, protocol
from adapm.errors import ClosedError, ClusterError, ProtocolError
from adapm.keys import as_keys, as_values, pull_buffer
from adapm.protocol import Message, MsgType
from adapm.table import NODE_COUNTERS, NODE_SLOT, WORKER_SLOT, LockTimeout, SharedTable

POLL_SLICE_MS = 100  # how often a waiting call checks that the cluster is alive
STAT_NAMES = ("pulls_local", "pulls_remote", "pushes_local", "pushes_remote",
              "sets_local", "sets_remote", "intents", "bytes_sent", "bytes_received")


class Pending:
    """Handle of an asynchronous operation; wait() returns its result (pull: the array)."""

    __slots__ = ("_result",)

    def __init__(self, result=None):
        self._result = result

    def done(self):
        return True

    def wait(self, timeout=None):
        return self._result


class Worker:
    """One worker process's connection to its node. Create with adapm.worker()."""

    def __init__(self, env):
        self._closed = True
        self.rank = env.rank
        self.local_rank = env.local_rank
        self.node = env.node
        self.num_nodes = env.num_nodes
        self.workers_per_node = env.workers_per_node
        self.num_workers = env.num_nodes * env.workers_per_node
        self._heartbeat_timeout = config.env_float(
            config.ENV_HEARTBEAT_TIMEOUT, config.DEFAULT_HEARTBEAT_TIMEOUT)
        self._table = SharedTable.attach(env.table)
        self._view = self._table.view
        self._view.lock_timeout_ns = int(
            config.env_float(config.ENV_LOCK_TIMEOUT, config.DEFAULT_LOCK_TIMEOUT) * 1e9)
        self.num_keys = self._view.num_keys
        self.dtype = self._view.dtype
        self._misses = np.empty(1024, dtype=np.uint64)
        self._clock = 0
        self._barriers = 0
        self._requests = 0
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)  # intents must never block the worker
        self._sock.connect(env.server)
        self._closed = False
        try:
            self._view.counter_set(self.local_rank, WORKER_SLOT["pid"], os.getpid())
            self._request(MsgType.HELLO, MsgType.WELCOME, count=os.getpid())
        except BaseException:
            self._teardown()
            raise

    # -- who and where -------------------------------------------------------------

    @property
    def value_length(self):
        """The uniform value length, or 0 when lengths are per key."""
        return self._view.uniform_length

    def __repr__(self):
        state = "closed" if self._closed else f"clock={self._clock}"
        return (f"<adapm.Worker rank={self.rank}/{self.num_workers} node={self.node}/"
                f"{self.num_nodes} {state}>")

    # -- data ----------------------------------------------------------------------

    def pull(self, keys, out=None):
        """Current values of `keys`: shape (len(keys), D), or flat for per-key lengths."""
        self._check_open()
        keys = as_keys(keys, self._view)
        total = self._view.total_length(keys)
        out = pull_buffer(out, keys, total, self._view)
        misses = self._miss_buffer(keys.shape[0])
        try:
            nmiss = self._view.pull(keys, out, misses)
        except LockTimeout as exc:
            raise self._lock_error(exc, "pull") from None
        self._serve_misses(keys, misses, nmiss, "pull")
        self._count("pulls_local", keys.shape[0] - nmiss)
        return out

    def push(self, keys, values):
        """Add `values` to the keys' values (duplicate keys add up)."""
        self._update(keys, values, additive=True)

    def set(self, keys, values):
        """Overwrite the keys' values (for duplicate keys the last one wins)."""
        self._update(keys, values, additive=False)

    def pull_async(self, keys, out=None):
        return Pending(self.pull(keys, out))

    def push_async(self, keys, values):
        self.push(keys, values)
        return Pending()

    def set_async(self, keys, values):
        self.set(keys, values)
        return Pending()

    def _update(self, keys, values, additive):
        self._check_open()
        keys = as_keys(keys, self._view)
        total = self._view.total_length(keys)
        values = as_values(values, keys, total, self._view)
        misses = self._miss_buffer(keys.shape[0])
        op = "push" if additive else "set"
        try:
            nmiss = self._view.update(keys, values, misses, additive)
        except LockTimeout as exc:
            raise self._lock_error(exc, op) from None
        self._serve_misses(keys, misses, nmiss, op)
        self._count("pushes_local" if additive else "sets_local", keys.shape[0] - nmiss)

    def _miss_buffer(self, n):
        if self._misses.shape[0] < n:
            self._misses = np.empty(max(n, 2 * self._misses.shape[0]), dtype=np.uint64)
        return self._misses

    def _serve_misses(self, keys, misses, nmiss, op):
        if nmiss == 0:
            return
        # On a single node every key is owned locally from creation on, so a miss means
        # the table was changed behind the server's back: refuse rather than lose data.
        missed = keys[misses[:nmiss].astype(np.intp)]
        raise ClusterError(
            f"node {self.node}, worker {self.rank}: {op} of {nmiss} keys not held by this "
            f"node (keys {int(missed.min())}..{int(missed.max())}); nothing was lost, "
            "but the table's state is inconsistent")

    def _lock_error(self, exc, op):
        return ClusterError(
            f"node {self.node}, worker {self.rank}: {op} gave up on key {exc.key}: its lock "
            f"was held longer than {self._view.lock_timeout_ns / 1e9:.1f} s (a process died "
            "while writing it)")

    # -- intents and clock ---------------------------------------------------------

    def intent(self, keys, start, end=None):
        """Signal that this worker will access `keys` from clock `start` (inclusive) to `end`
        (exclusive; default start + 1). Never blocks."""
        self._check_open()
        keys = as_keys(keys, self._view)
        start = _clock_value("start", start)
        end = start + 1 if end is None else _clock_value("end", end)
        if end <= start:
            raise ValueError(f"intent needs end > start, got start={start}, end={end}")
        if keys.shape[0] == 0:
            return
        self._send(Message(MsgType.INTENT, arg0=start, arg1=end, keys=keys))
        self._count("intents", keys.shape[0])

    @property
    def clock(self):
        return self._clock

    def advance_clock(self):
        """Move this worker's logical clock one step; returns the new clock."""
        self._check_open()
        self._clock += 1
        self._view.counter_set(self.local_rank, WORKER_SLOT["clock"], self._clock)
        return self._clock

    # -- coordination ------------------------------------------------------------------

    def barrier(self):
        """Wait until every worker of the cluster has called barrier()."""
        self._check_open()
        self._barriers += 1
        self._request(MsgType.BARRIER, MsgType.RELEASE, request_id=self._barriers)

    def wait_sync(self):
        """Return once every replica this worker's node holds has exchanged its updates."""
        self._check_open()
        self._request(MsgType.WAIT_SYNC, MsgType.SYNCED)

    def stats(self):
        """Counts of keys for this worker, and in 'node' the same summed over its node plus
        the node's own counters (relocations, replicas, ...)."""
        self._check_open()
        counters = self._view.counters()
        mine = counters[self.local_rank]
        result = {name: int(mine[WORKER_SLOT[name]]) for name in STAT_NAMES}
        node = {name: int(counters[:, WORKER_SLOT[name]].sum()) for name in STAT_NAMES}
        for name in NODE_COUNTERS:
            # bytes_* of the node are its workers' plus its server's own traffic
            node[name] = node.get(name, 0) + int(self._view.node_counter_get(NODE_SLOT[name]))
        result["relocations"] = node["relocations"]
        result["replicas"] = node["replicas_made"]
        result["clock"] = self._clock
        result["node"] = node
        return result

    # -- leaving -------------------------------------------------------------------

    def finalize(self):
        """Wait for this worker's pending operations, then leave. Idempotent."""
        if self._closed:
            return
        try:
            self._send(Message(MsgType.GOODBYE))
        finally:
            self._teardown()

    def _teardown(self):
        self._closed = True
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        if self._ctx is not None:
            self._ctx.term()
            self._ctx = None
        self._table.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.finalize()
        return False

    def __del__(self):
        if not getattr(self, "_closed", True):
            self._teardown()

    # -- messaging -----------------------------------------------------------------

    def _check_open(self):
        if self._closed:
            raise ClosedError(f"worker {self.rank} was finalized")

    def _count(self, name, n):
        if n:
            self._view.counter_add(self.local_rank, WORKER_SLOT[name], n)

    def _send(self, msg):
        msg.src_node = self.node
        msg.src_worker = self.local_rank
        frames = msg.encode()
        self._sock.send_multipart(frames, copy=False)
        self._count("bytes_sent", sum(memoryview(f).nbytes for f in frames))

    def _request(self, mtype, reply_type, request_id=None, **fields):
        """Send a request and wait for its reply, watching the cluster's health."""
        if request_id is None:
            self._requests += 1
            request_id = self._requests
        self._send(Message(mtype, request_id=request_id, **fields))
        while True:
            if self._sock.poll(POLL_SLICE_MS, zmq.POLLIN):
                frames = self._sock.recv_multipart(copy=False)
                self._count("bytes_received", sum(len(f) for f in frames))
                try:
                    reply = protocol.decode(frames)
                except ProtocolError:
                    continue  # never act on a malformed message
                if reply.type == MsgType.FAILED:
                    raise self._failure(mtype, reply)
                if reply.type == reply_type and reply.request_id == request_id:
                    return reply
                continue
            self._check_cluster(mtype)

    def _failure(self, mtype, reply):
        if mtype == MsgType.BARRIER and reply.arg0 == 1:
            return ClusterError(
                f"node {self.node}, worker {self.rank}: barrier can never complete, worker "
                f"{self.node * self.workers_per_node + reply.count} has already finalized")
        return ClusterError(f"node {self.node}, worker {self.rank}: the cluster failed "
                            f"(code {reply.arg0}) during {mtype.name.lower()}")

    def _check_cluster(self, mtype):
        what = mtype.name.lower()
        if self._view.failed:
            raise ClusterError(f"node {self.node}, worker {self.rank}: the cluster failed "
                               f"during {what}")
        age = self._view.heartbeat_age()
        if age > self._heartbeat_timeout:
            raise ClusterError(
                f"node {self.node}, worker {self.rank}: node server silent for {age:.1f} s "
                f"during {what}; it is presumed dead")


def _clock_value(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"intent {name} must be an integer clock, got {value!r}")
    value = int(value)
    if value < 0 or value >= 2**62:
        raise ValueError(f"intent {name} must be a clock in [0, 2**62), got {value}")
    return value


def worker(environ=None):
    """Attach to the node this process was started for (by adapm-launch or adapm.run)."""
    return Worker(config.WorkerEnv.from_environ(environ))
