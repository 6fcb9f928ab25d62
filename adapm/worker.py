"""The worker client: what a training script holds (adapm.Worker).

Reads and writes of keys the node holds go straight to the node's shared-memory table
(Cython hot path): no message, no copy through a server. Keys the node does not hold
are batched per destination (the node's location cache says where each key lives), one
message each; replies come straight back from whichever node owns the keys. Control
calls (barrier, wait_sync, intents, localize, finalize) are messages to the worker's own
node server. Every wait also watches the cluster's health, so a dead peer turns into
ClusterError within seconds instead of a hang."""

import os
import time

import numpy as np
import zmq

from adapm import config, protocol
from adapm.consistency import InFlight, Unseen
from adapm.coordinator import failure_text
from adapm.errors import ClosedError, ClusterError, ProtocolError
from adapm.keys import as_keys, as_values, pull_buffer
from adapm.ownership import route, split_by
from adapm.protocol import ALL_POSITIONS, Message, MsgType, worker_identity
from adapm.sampling import Sampler
from adapm.security import client_keys, connector
from adapm.segments import Segments
from adapm.summary import WORKER_STATS, node_stats
from adapm.table import (
    NODE_SLOT,
    PENDING,
    REPLICA,
    SERVER_ASLEEP,
    SERVER_POLLING,
    WORKER_SLOT,
    LockTimeout,
    SharedTable,
)

POLL_SLICE_MS = 100        # how often a waiting call checks that the cluster is alive
MAX_UPDATES_IN_FLIGHT = 64  # unacknowledged push/set messages before a push waits
STATE_CHANGE_TIMEOUT = 1.0  # seconds a key named here may stay unusable (a broken invariant)
URGENT_CLOCKS = 2           # an intent this close to the worker's clock wakes a polling server


class _Op:
    """An operation waiting for replies: `left` keys (or replies) still to come."""

    __slots__ = ("left", "error", "result")

    def __init__(self):
        self.left = 0
        self.error = None
        self.result = None

    @property
    def done(self):
        return self.left <= 0 or self.error is not None


class _PullOp(_Op):
    __slots__ = ("out", "segments", "parts")

    def __init__(self, out, segments):
        super().__init__()
        self.out, self.segments, self.parts = out, segments, {}
        self.result = out

    def feed(self, msg, dtype):
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


class _CountOp(_Op):
    """Update acknowledgements (count of keys applied) or one control reply."""

    __slots__ = ("reply_type", "reply", "keys")

    def __init__(self, reply_type=None):
        super().__init__()
        self.reply_type, self.reply, self.keys = reply_type, None, None

    def feed(self, msg, dtype):
        if self.reply_type is None:
            if msg.type != MsgType.UPDATE_ACK:
                raise ProtocolError(f"{msg.type.name} answering an update")
            return msg.count
        if msg.type != self.reply_type:
            raise ProtocolError(f"{msg.type.name} answering a {self.reply_type.name} request")
        self.reply = msg
        return 1


class Pending:
    """Handle of an asynchronous operation; wait() returns its result (pull: the array)."""

    __slots__ = ("_worker", "_op")

    def __init__(self, worker, op):
        self._worker, self._op = worker, op

    def done(self):
        if not self._op.done:
            self._worker._pump(0)
        return self._op.done

    def wait(self, timeout=None):
        """Block until the operation completed (or TimeoutError after `timeout` s)."""
        self._worker._wait(self._op, timeout)
        return self._op.result


class Worker:
    """One worker process's connection to its cluster. Create with adapm.worker()."""

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
        self._last_health_check = time.monotonic()
        self._clock = 0
        self._barriers = 0
        self._next_request = 0
        self._waiting = {}        # request id -> (op, keys or replies still expected)
        self._updates = InFlight()  # unacknowledged update ops, oldest first
        self._unseen = Unseen()     # applied remotely, but copies of these keys here show
                                    # it only once a sync round brought them a value
        self._sampler = Sampler(self)
        self._curve = client_keys(env.cluster_id)
        self._ctx = zmq.Context()
        self._socks = {}
        self._poller = zmq.Poller()
        self._closed = False
        try:
            self._token = self._cluster_token()
            self._connect(env.node, env.server)
            self._view.counter_set(self.local_rank, WORKER_SLOT["pid"], os.getpid())
            welcome = self._control(MsgType.HELLO, MsgType.WELCOME, count=os.getpid(),
                                    timeout=self._connect_timeout())
            if not 0 <= welcome.arg0 < len(config.MODES):
                raise ClusterError(f"worker {self.rank}: node server sent mode {welcome.arg0}")
            self.mode = config.MODES[welcome.arg0]
            # One node has nothing to place, and static and replicate_all ignore intents:
            # there they are checked and counted, but not handed to the server.
            self._intents_matter = self.num_nodes > 1 and self.mode in config.INTENT_MODES
            self._connect_peers(welcome.addresses)
        except BaseException:
            self._teardown()
            raise

    def _connect(self, node, address):
        sock = connector(self._ctx, self._curve)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)  # intents must never block the worker
        sock.setsockopt(zmq.RCVHWM, 0)
        sock.setsockopt(zmq.IDENTITY, worker_identity(self.rank))
        sock.connect(address)
        self._socks[node] = sock
        self._poller.register(sock, zmq.POLLIN)

    def _connect_peers(self, addresses):
        """Connect to every other node, so that any owner can reply to this worker."""
        if len(addresses) != self.num_nodes:
            raise ClusterError(f"worker {self.rank}: node {self.node} knows "
                               f"{len(addresses)} of {self.num_nodes} nodes")
        hellos = []
        for node, address in enumerate(addresses):
            if node != self.node:
                self._connect(node, address)
                op = _CountOp(MsgType.WELCOME)
                self._start(node, Message(MsgType.HELLO, count=os.getpid()), op, 1)
                hellos.append((node, op))
        timeout = self._connect_timeout()
        for node, op in hellos:
            self._wait_or_fail(op, timeout, f"hello to node {node} at {addresses[node]}")

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
        return self.pull_async(keys, out).wait()

    def pull_async(self, keys, out=None):
        self._check_open()
        keys = as_keys(keys, self._view)
        total = self._view.total_length(keys)
        out = pull_buffer(out, keys, total, self._view)
        self._keep_update_order(keys)
        misses = self._miss_buffer(keys.shape[0])
        try:
            nmiss = self._view.pull(keys, out, misses)
        except LockTimeout as exc:
            raise self._lock_error(exc, "pull") from None
        self._count("pulls_local", keys.shape[0] - nmiss)
        op = _PullOp(out, None)
        if nmiss:
            missed = misses[:nmiss].astype(np.intp)
            op.segments = Segments.of(self._view, keys)
            groups, arrived = self._split(keys, missed, "pull")
            if arrived.shape[0]:  # became local since the first look: read them here
                values = np.empty(op.segments.size(arrived), dtype=self.dtype)
                away, dests = self._local_retry(keys[arrived], values, "pull")
                done = np.setdiff1d(np.arange(arrived.shape[0]), away)
                op.segments.put(out, arrived[done],
                                Segments.of(self._view, keys[arrived]).take(values, done))
                groups += self._regroup(arrived, away, dests)
                arrived = arrived[done]
            for dest, part in self._messages(groups):
                op.parts[self._start(dest, Message(MsgType.PULL, keys=keys[part]), op,
                                     part.shape[0])] = part
            self._count("pulls_remote", nmiss - arrived.shape[0])
            self._count("pulls_local", arrived.shape[0])
        return Pending(self, op)

    def push(self, keys, values):
        """Add `values` to the keys' values (duplicate keys add up). Returns when the
        update is applied locally or on its way, in order, to the keys' owners; a later
        pull of this worker sees it, and wait_sync()/barrier() wait for it."""
        self._update(keys, values, True)

    def set(self, keys, values):
        """Overwrite the keys' values (for duplicate keys the last one wins)."""
        self._update(keys, values, False)

    def push_async(self, keys, values):
        """As push; the handle's wait() returns once every owner applied the update."""
        return Pending(self, self._update(keys, values, True))

    def set_async(self, keys, values):
        return Pending(self, self._update(keys, values, False))

    def _update(self, keys, values, additive):
        self._check_open()
        keys = as_keys(keys, self._view)
        total = self._view.total_length(keys)
        values = as_values(values, keys, total, self._view)
        self._keep_update_order(keys)
        misses = self._miss_buffer(keys.shape[0])
        op_name = "push" if additive else "set"
        try:
            # A set is applied here only to keys owned here; a replica here takes it
            # through the node server, which sends it on to the owner (guarantee 3).
            nmiss = self._view.update(keys, values, misses, additive, not additive)
        except LockTimeout as exc:
            raise self._lock_error(exc, op_name) from None
        kind = "pushes" if additive else "sets"
        self._count(f"{kind}_local", keys.shape[0] - nmiss)
        op = _CountOp()
        if nmiss:
            missed = misses[:nmiss].astype(np.intp)
            segments = Segments.of(self._view, keys)
            mtype = MsgType.PUSH if additive else MsgType.SET
            groups, arrived = self._split(keys, missed, op_name)
            if arrived.shape[0]:  # became local since the first look: update them here
                away, dests = self._local_retry(keys[arrived], segments.take(values, arrived),
                                                op_name, additive)
                groups += self._regroup(arrived, away, dests)
                arrived = np.delete(arrived, away)
            remote = []
            for dest, part in self._messages(groups):
                remote.append(keys[part])
                self._start(dest, Message(mtype, keys=keys[part],
                                          values=segments.take(values, part)), op,
                            part.shape[0])
            if groups:
                op.keys = np.concatenate(remote)
                self._updates.add(op)
            self._count(f"{kind}_remote", nmiss - arrived.shape[0])
            self._count(f"{kind}_local", arrived.shape[0])
            self._limit_updates_in_flight()
        return op

    def _split(self, keys, missed, what):
        """Where to send the keys at indices `missed` (not usable here at the first look):
        ([(node, indices)], indices of keys that became usable here in the meantime; their
        location cache already names this node)."""
        dest = self._destinations(keys[missed], what)
        arrived = missed[dest < 0]
        groups = [(node, missed[idx]) for node, idx in split_by(dest).items() if node >= 0]
        return groups, arrived

    def _local_retry(self, keys, values, what, additive=True):
        """Read (pull, into `values`) or update keys that just became usable here; a key
        whose state change is still under way is tried again. Returns (positions,
        destinations) of keys that moved on to another node meanwhile: the caller sends
        those there, like any miss. A key that stays unusable although the location
        cache names this node is a broken invariant."""
        segments = Segments.of(self._view, keys)
        live = np.arange(keys.shape[0])  # positions still to be served here
        away, dests = [], []
        deadline = time.monotonic() + STATE_CHANGE_TIMEOUT
        while True:
            sub = keys[live]
            misses = np.empty(sub.shape[0], dtype=np.uint64)
            if what == "pull":
                buf = np.empty(segments.size(live), dtype=self.dtype)
                nmiss = self._view.pull(sub, buf, misses)
            else:  # only the keys not updated yet: an update must not apply twice
                buf = segments.take(values, live)
                nmiss = self._view.update(sub, buf, misses, additive, not additive)
            missed = misses[:nmiss].astype(np.intp)
            if what == "pull":
                done = np.ones(sub.shape[0], dtype=bool)
                done[missed] = False
                segments.put(values, live[done],
                              Segments.of(self._view, sub).take(buf, np.flatnonzero(done)))
            live = live[missed]
            if live.shape[0]:
                dest = self._destinations(keys[live], what)
                moved = dest >= 0
                away.append(live[moved])
                dests.append(dest[moved])
                live = live[~moved]
            if live.shape[0] == 0:
                break
            if time.monotonic() > deadline:
                bad = keys[live]
                raise ClusterError(f"node {self.node}, worker {self.rank}: {what} of keys "
                                   f"{int(bad.min())}..{int(bad.max())}: no node holds them")
            # A state change under way completes in microseconds: give the core to the
            # node server making it instead of sleeping a scheduler tick.
            os.sched_yield()
        if not away:
            return np.empty(0, dtype=np.intp), np.empty(0, dtype=np.int32)
        return np.concatenate(away), np.concatenate(dests)

    def _chunks(self, idx):
        """`idx` in parts of at most num_keys: no message is larger than the largest legal
        one, which nodes enforce (protocol.max_frame_bytes); only calls with many
        repeated keys are split."""
        step = min(self.num_keys, protocol.MAX_KEYS_PER_MESSAGE)
        return [idx] if idx.shape[0] <= step else \
            [idx[i:i + step] for i in range(0, idx.shape[0], step)]

    def _messages(self, groups):
        """[(node, indices)] with each group split into messages of legal size."""
        return [(dest, chunk) for dest, part in groups for chunk in self._chunks(part)]

    def _destinations(self, keys, what):
        """The node each missed key is sent to (-1: usable here by now): its cached
        owner, but for a set of a key this node holds as a replica, this node's server,
        which overwrites the replica and passes the set on to the owner."""
        dest = route(self._view, keys, self.node, self.num_nodes)
        if what == "set":
            states = np.empty(keys.shape[0], dtype=np.uint8)
            self._view.states_of(keys, states)
            dest[(states == REPLICA) | (states == PENDING)] = self.node
        return dest

    @staticmethod
    def _regroup(arrived, away, dests):
        """[(node, positions in the batch)] for the keys of `arrived` (at `away`) that
        moved on to `dests` while they were retried here."""
        return [(node, arrived[away[idx]]) for node, idx in split_by(dests).items()]

    def _miss_buffer(self, n):
        if self._misses.shape[0] < n:
            self._misses = np.empty(max(n, 2 * self._misses.shape[0]), dtype=np.uint64)
        return self._misses

    def _keep_update_order(self, keys):
        """Read your own writes, and one worker's updates applied in order: a request
        for a key with an update of this worker still in flight could overtake it (keys
        move, requests are forwarded along different paths), so it waits for that update
        to be acknowledged first. Updates of other keys stay in flight."""
        if self._updates:
            self._prune_updates()
            for op in self._updates.blocking(keys):
                self._wait(op)
            self._prune_updates()
        if self._unseen:
            # Applied by their owners, but a copy here may have been fetched just before:
            # read it once a sync round that started after the acknowledgement brought it
            # a value (the node stamps each copy), else refresh it first.
            self._unseen.forget_rounds_up_to(
                self._view.node_counter_get(NODE_SLOT["full_round_done"]))
            waiting, rounds = self._unseen.among(keys)
            stale = waiting[self._stale(waiting, rounds)]
            if stale.shape[0]:
                self._control(MsgType.REFRESH, MsgType.SYNCED, keys=stale)
                self._unseen.forget(stale)

    def _stale(self, keys, rounds):
        """Mask of `keys` held here as copies (replica or requested) that no sync round
        starting at their `rounds` or later has brought up to date yet: only those may
        lack this worker's acknowledged update. Keys owned here have it, and a key not
        held is read from its owner."""
        if keys.shape[0] == 0:
            return np.zeros(0, dtype=bool)
        states = np.empty(keys.shape[0], dtype=np.uint8)
        self._view.states_of(keys, states)
        fresh = np.empty(keys.shape[0], dtype=np.uint32)
        self._view.fresh_rounds(keys, fresh)
        return ((states == REPLICA) | (states == PENDING)) & (fresh < rounds)

    def _prune_updates(self):
        for op in self._updates.take_done():
            self._raise_if_failed(op)
            self._remember_unseen(op.keys)

    def _remember_unseen(self, keys):
        """Keys updated remotely that this node holds as copies (replica or requested): a
        sync round that starts from now on brings the update here."""
        states = np.empty(keys.shape[0], dtype=np.uint8)
        self._view.states_of(keys, states)
        copies = keys[(states == REPLICA) | (states == PENDING)]
        if copies.shape[0]:
            started = self._view.node_counter_get(NODE_SLOT["rounds_started"])
            self._unseen.add(copies, started + 1, self._stale)

    def _limit_updates_in_flight(self):
        self._prune_updates()
        while len(self._updates) > MAX_UPDATES_IN_FLIGHT:
            self._wait(self._updates.ops[0])
            self._prune_updates()

    def _drain_updates(self):
        for op in list(self._updates.ops):
            self._wait(op)
        self._prune_updates()

    def _lock_error(self, exc, op):
        return ClusterError(
            f"node {self.node}, worker {self.rank}: {op} gave up on key {exc.key}: its lock "
            f"was held longer than {self._view.lock_timeout_ns / 1e9:.1f} s (a process died "
            "while writing it)")

    # -- intents, clock, placement -------------------------------------------------

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
        if self._intents_matter:
            # Into this worker's ring in the shared table: no message, unless the ring is
            # full (then as a message) or the node server sleeps, or polls for a while
            # and this intent is due soon (then a WAKE).
            appended, server = self._view.intent_append(self.local_rank, start, end, keys)
            wake = server == SERVER_ASLEEP or (server == SERVER_POLLING and
                                               start <= self._clock + URGENT_CLOCKS)
            if not appended:  # as a message, of the distinct keys (an intent names a set,
                # and no message may hold more than num_keys keys); np.unique copies, and
                # must: `keys` may be the caller's own array, refilled for the next batch
                self._send(self.node, Message(MsgType.INTENT, arg0=start, arg1=end,
                                              keys=np.unique(keys)))
            elif wake:
                self._send(self.node, Message(MsgType.WAKE))
        self._count("intents", keys.shape[0])

    def prepare_sample(self, n, start, end=None, key_range=None):
        """Draw `n` keys uniformly (with replacement) from the key range, or from
        `key_range=(lo, hi)`, to be used in clocks [start, end) (default start + 1); they
        are announced as an intent, so they are local by then. Returns a handle for
        pull_sample. See adapm.sampling for the distribution."""
        self._check_open()
        return self._sampler.prepare(n, start, end, key_range)

    def pull_sample(self, handle, count=None):
        """The next `count` (default: all remaining) keys of a prepare_sample handle and
        their values: (keys uint64 array, values array of shape (count, value_length))."""
        self._check_open()
        keys = self._sampler.take(handle, count)
        return keys, self.pull(keys)

    def reaction_time(self):
        """Seconds this worker's node currently takes from an intent to a usable key, as
        it measures it (0.0 before it has acted on any): announce keys at least this far
        ahead of their use. adapm.data.IntentLoader reads it."""
        return self._view.node_counter_get(NODE_SLOT["reaction_us"]) / 1e6

    @property
    def clock(self):
        return self._clock

    def advance_clock(self):
        """Move this worker's logical clock one step; returns the new clock."""
        self._check_open()
        self._clock += 1
        self._view.counter_set(self.local_rank, WORKER_SLOT["clock"], self._clock)
        return self._clock

    def localize(self, keys):
        """Relocate `keys` to this worker's node now (value and ownership move; updates in
        flight are applied, not lost). The adaptive manager does this by itself from
        intents; this is the manual primitive, refused in modes that keep keys in place."""
        self._check_open()
        if self.mode not in config.RELOCATING_MODES:
            modes = ", ".join(config.RELOCATING_MODES)
            raise ValueError(f"localize needs a mode that relocates keys ({modes}), "
                             f"the cluster runs {self.mode}")
        keys = as_keys(keys, self._view)
        if keys.shape[0]:
            self._drain_updates()
            self._control(MsgType.LOCALIZE, MsgType.LOCALIZED, keys=np.unique(keys))

    # -- coordination ------------------------------------------------------------------

    def barrier(self):
        """Wait until every worker of the cluster has called barrier()."""
        self._check_open()
        self._drain_updates()
        self._barriers += 1
        self._control(MsgType.BARRIER, MsgType.RELEASE, arg0=self._barriers)

    def wait_sync(self):
        """Return once this worker's updates are applied and every replica its node holds
        has exchanged its updates."""
        self._check_open()
        self._drain_updates()
        self._control(MsgType.WAIT_SYNC, MsgType.SYNCED)
        self._unseen.clear()

    def stats(self):
        """Counts of keys for this worker, and in 'node' the same summed over its node plus
        the node's own counters (relocations, replicas, ...)."""
        self._check_open()
        mine = self._view.counters()[self.local_rank]
        result = {name: int(mine[WORKER_SLOT[name]]) for name in WORKER_STATS}
        node = node_stats(self._view)  # bytes: its workers' and its server's own traffic
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
        linger = 0  # on failure: the cluster is gone, nothing to wait for or to tell
        try:
            for op, _ in list(self._waiting.values()):
                self._wait(op)
            self._send(self.node, Message(MsgType.GOODBYE))
            linger = 1000  # let the goodbye leave before the socket closes
        except ClusterError:
            pass
        finally:
            self._teardown(linger)

    def _teardown(self, linger=0):
        self._closed = True
        for sock in self._socks.values():
            sock.close(linger=linger)
        self._socks = {}
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
        """Every call: closed? failed? and, at most every POLL_SLICE_MS, is the node
        server alive? (a dead server must not go unnoticed by a worker that only
        reads and writes local keys)"""
        if self._closed:
            raise ClosedError(f"worker {self.rank} was finalized")
        now = time.monotonic()
        if self._view.failed or now - self._last_health_check > POLL_SLICE_MS / 1000:
            self._last_health_check = now
            self._check_cluster()

    def _count(self, name, n):
        if n:
            self._view.counter_add(self.local_rank, WORKER_SLOT[name], n)

    def _send(self, node, msg):
        msg.src_node = self.node
        msg.src_worker = self.rank
        msg.token = self._token
        size = protocol.send(self._socks[node], msg.encode())
        # Traffic with the worker's own node server stays on its machine: counted apart.
        self._count("bytes_sent" if node != self.node else "bytes_to_node", size)

    def _start(self, node, msg, op, expected):
        """Send `msg` to `node` as part of `op`, expecting `expected` keys/replies back."""
        self._next_request += 1
        msg.request_id = self._next_request
        self._waiting[msg.request_id] = (op, expected)
        op.left += expected
        self._send(node, msg)
        return msg.request_id

    def _control(self, mtype, reply_type, timeout=None, **fields):
        """A request to this worker's node server; returns its reply."""
        op = _CountOp(reply_type)
        self._start(self.node, Message(mtype, **fields), op, 1)
        self._wait_or_fail(op, timeout, mtype.name.lower())
        return op.reply

    def _wait_or_fail(self, op, timeout, what):
        """Wait for `op`; no answer within `timeout` seconds is a ClusterError."""
        try:
            self._wait(op, timeout)
        except TimeoutError:
            self._forget(op)
            raise ClusterError(f"node {self.node}, worker {self.rank}: no answer to "
                               f"{what} within {timeout:.0f} s") from None

    def _cluster_token(self):
        """The token every message to a node carries: this node's server writes it into
        the table once the cluster has formed (workers normally start after that)."""
        deadline = time.monotonic() + self._connect_timeout()
        while not self._view.cluster_token:
            self._check_cluster()
            if time.monotonic() > deadline:
                raise ClusterError(f"node {self.node}, worker {self.rank}: the cluster did "
                                   f"not form within {self._connect_timeout():.0f} s")
            time.sleep(0.01)
        return self._view.cluster_token

    @staticmethod
    def _connect_timeout():
        return config.env_float(config.ENV_START_TIMEOUT, config.DEFAULT_START_TIMEOUT)

    def _wait(self, op, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while not op.done:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"worker {self.rank}: operation still pending after "
                                   f"{timeout} s")
            if not self._pump(POLL_SLICE_MS):
                try:
                    self._check_cluster()
                except ClusterError:
                    self._forget(op)  # nothing will answer it any more
                    raise
        self._raise_if_failed(op)

    def _raise_if_failed(self, op):
        if op.error is not None:
            raise op.error

    def _pump(self, timeout_ms):
        """Receive and dispatch replies; returns how many arrived."""
        handled = 0
        for sock, _ in self._poller.poll(timeout_ms):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                handled += 1
                self._count("bytes_received", protocol.frame_size(frames))
                self._dispatch(frames)
        return handled

    def _dispatch(self, frames):
        try:
            msg = protocol.decode(frames)
        except ProtocolError:
            return  # never act on a malformed message
        entry = self._waiting.get(msg.request_id)
        if entry is None:
            return  # a late reply to an operation that already failed
        op, left = entry
        if msg.type == MsgType.FAILED:
            op.error = ClusterError(f"node {self.node}, worker {self.rank}: "
                                    f"{failure_text(msg.arg0, msg.count, msg.text)}")
            self._forget(op)
            return
        try:
            got = op.feed(msg, self.dtype)
        except ProtocolError as exc:
            op.error = ClusterError(f"node {self.node}, worker {self.rank}: malformed "
                                    f"reply from node {msg.src_node}: {exc}")
            self._forget(op)
            return
        op.left -= got
        left -= got
        if left <= 0:
            del self._waiting[msg.request_id]
        else:
            self._waiting[msg.request_id] = (op, left)

    def _forget(self, op):
        for request_id in [r for r, (o, _) in self._waiting.items() if o is op]:
            del self._waiting[request_id]

    def _check_cluster(self):
        code = self._view.failed
        if code:
            why = failure_text(code, self._view.failed_detail, self._view.failed_reason)
            raise ClusterError(f"node {self.node}, worker {self.rank}: the cluster failed: "
                               f"{why}")
        age = self._view.heartbeat_age()
        if age > self._heartbeat_timeout:
            raise ClusterError(
                f"node {self.node}, worker {self.rank}: node server silent for {age:.1f} s; "
                "it is presumed dead")


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
