"""The node server: creates and owns the node's shared-memory table and serves everything
that is not a local access.

- Workers of any node send it PULL/PUSH/SET for keys their node does not hold; it answers
  from the table, and forwards what it does not own along the key's ownership path
  (its location cache), so the final owner replies straight to the worker.
- Its own workers send it control requests: hello, barrier, wait_sync, intents, localize,
  goodbye.
- Peers send it forwarded requests and relocations: MOVE_REQUEST (give me these keys),
  MOVE (value, ownership and counter in one message) and OWNER_UPDATE (to a key's home).
- It talks to the coordinator (adapm.coordinator; node 0 hosts it) for membership,
  barriers, heartbeats and failures, and writes a heartbeat into the table for its
  workers.

It runs as its own process (`serve`). It never touches values on the workers' hot path:
workers read and write held keys in shared memory, with no message."""

import logging
import multiprocessing
import os
import signal
import time

import numpy as np
import zmq

from adapm import config, failpoints, protocol
from adapm.config import MODES, RELOCATING_MODES
from adapm.coordinator import (
    FAIL_BARRIER,
    FAIL_COORDINATOR,
    FAIL_INTERNAL,
    FAIL_REJECTED,
    FAIL_ROUTING,
    FAIL_START,
    FAIL_WORKER_DIED,
    Coordinator,
    bind_address,
    failure_text,
)
from adapm.errors import ProtocolError
from adapm.initializers import chunks, initial_values
from adapm.intents import IntentLog, IntentStore
from adapm.malformed import MalformedLog
from adapm.ownership import Ownership, home_of, route, split_by
from adapm.placement import Placement
from adapm.process import die_with_parent, set_process_name
from adapm.protocol import (
    ALL_POSITIONS,
    MOVE_FOR_ROUND,
    Message,
    MsgType,
    node_identity,
    worker_identity,
)
from adapm.security import connector, listener
from adapm.segments import Segments
from adapm.table import (
    NODE_SLOT,
    OWNED,
    SERVER_ASLEEP,
    SERVER_AWAKE,
    SERVER_POLLING,
    WORKER_SLOT,
    SharedTable,
    segment_name,
)

log = logging.getLogger("adapm.server")

CLOSE_LINGER_MS = 200     # how long queued messages may take to leave at a normal end
IDLE_POLL_MS = 50        # longest wait for a message when there is nothing else to do
BUSY_POLL_MS = 1         # ... while sync rounds are due (at most ~1000 rounds a second)
FAILED_LINGER = 1.0      # seconds a failed node keeps answering "failed" before it exits
EXIT_FAILED = 3          # exit code of a node server after the cluster failed
HOUSEKEEPING_EVERY = 0.05
MAX_BATCH = 256          # messages handled per round before the round's housekeeping
RECEIVE_HWM = 1000       # messages queued per connection before ZeroMQ stops reading it
WORKER_CHECK_EVERY = 0.5
START_REPORT_EVERY = 5.0  # seconds between "waiting for ..." lines while the cluster forms

# Who may send which message: workers (identity W<rank>) or peer servers (N<node>).
WORKER_REQUESTS = {MsgType.HELLO, MsgType.BARRIER, MsgType.WAIT_SYNC, MsgType.INTENT,
                   MsgType.GOODBYE, MsgType.PULL, MsgType.PUSH, MsgType.SET, MsgType.LOCALIZE,
                   MsgType.REFRESH, MsgType.WAKE}
LOCAL_ONLY = {MsgType.BARRIER, MsgType.WAIT_SYNC, MsgType.INTENT, MsgType.GOODBYE,
              MsgType.LOCALIZE, MsgType.REFRESH, MsgType.WAKE}
FORWARDED_REQUESTS = {MsgType.FWD_PULL, MsgType.FWD_PUSH, MsgType.FWD_SET}
PEER_REQUESTS = {MsgType.FWD_PULL, MsgType.FWD_PUSH, MsgType.FWD_SET, MsgType.MOVE_REQUEST,
                 MsgType.MOVE, MsgType.OWNER_UPDATE, MsgType.SYNC, MsgType.SYNC_REPLY}


def home_keys(num_keys, node, num_nodes):
    """The keys whose home (initial owner) is `node`: key % num_nodes == node."""
    return np.arange(node, num_keys, num_nodes, dtype=np.uint64)


class NodeServer(Placement):
    def __init__(self, spec, node, coordinator, listen=None):
        """`coordinator`: address of the coordinator; node 0 binds it. `listen`: the
        address this server binds (tcp://HOST:PORT, PORT may be 0 or LOW-HIGH)."""
        self.spec = spec
        self.node = node
        self.workers = spec.workers_per_node
        self.first_rank = node * spec.workers_per_node
        self.coordinator_address = coordinator
        self.listen = listen or f"tcp://{spec.host}:0"
        self.node_timeout = config.env_float(config.ENV_NODE_TIMEOUT,
                                             config.DEFAULT_NODE_TIMEOUT)
        self.start_timeout = config.env_float(config.ENV_START_TIMEOUT,
                                              config.DEFAULT_START_TIMEOUT)
        self.table = None
        self.view = None
        self.ctx = None
        self.auth = None            # ZAP handler of a secure cluster
        self.router = None
        self.coordinator = None     # Coordinator, on node 0 only
        self.to_coordinator = None  # DEALER
        self.peers = {}             # node -> DEALER
        self.address = None
        self.addresses = None       # every node's address, once the coordinator sent PEERS
        self.ownership = Ownership(node, spec.num_nodes, spec.num_keys)
        self.intents = IntentStore(self.workers, spec.num_keys)
        log_to = os.environ.get(config.ENV_INTENT_LOG)
        self.intent_log = IntentLog(log_to, node) if log_to else None
        self.on_ready = None        # called with the address once the cluster is complete
        self._local = {}            # local worker index -> routing identity
        self._left = set()          # local workers that said goodbye
        self._barrier = {}          # generation -> set of local workers
        self._localizing = {}       # request id -> [identity, worker request id, keys left]
        self._next_op = 0
        self._failed = None
        self._failed_at = 0.0
        self.exit_code = 0
        self._stop = False
        self.token = None           # the cluster's message token, from PEERS
        self.malformed = MalformedLog(log, f"node {node}")
        self.failpoints = failpoints.active(node)  # tests of the failure paths only
        raise_in = self.failpoints.get("raise_in")
        self._raise_in = MsgType[raise_in] if raise_in else None
        self._coordinator_seen = self._started_at = self._reported_at = time.monotonic()
        self._joined = 0            # nodes that joined, as the coordinator's heartbeats say
        self._done_sent = False
        self._init_placement()

    # -- start ---------------------------------------------------------------------

    def start(self):
        self._create_table()
        if "arena_full" in self.failpoints:  # the next slot needed finds the arena full
            self.table.allocator.capacity = self.table.allocator.top
        self.ctx = zmq.Context()
        if self.spec.curve is not None:
            self.auth = self.spec.curve.authenticator(self.ctx)
        self.router = listener(self.ctx, self.spec.curve)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Bounded input: no frame larger than the largest legal message (ZeroMQ drops
        # the connection before allocating it), and a bounded queue per connection.
        self.router.setsockopt(zmq.MAXMSGSIZE, self._max_frame_bytes())
        self.router.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        self.router.setsockopt(zmq.SNDHWM, 0)
        self.address = bind_address(self.router, self.listen)
        if self.node == 0:
            self.coordinator = Coordinator(self.ctx, self.coordinator_address,
                                           self.spec.num_nodes, self.node_timeout,
                                           self.spec.curve)
            self.coordinator_address = self.coordinator.address
        self.to_coordinator = self._dealer(self.coordinator_address)
        self._to_coordinator(Message(MsgType.JOIN, arg0=self.spec.fingerprint(),
                                     addresses=[self.address]))

    def _dealer(self, address):
        sock = connector(self.ctx, self.spec.curve)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.IDENTITY, node_identity(self.node))
        sock.connect(address)
        return sock

    def _max_frame_bytes(self):
        lengths = self.spec.value_length
        longest = int(lengths) if np.ndim(lengths) == 0 else int(np.max(lengths))
        return protocol.max_frame_bytes(self.spec.num_keys, longest,
                                        np.dtype(self.spec.dtype).itemsize)

    def _create_table(self):
        spec = self.spec
        name = segment_name(spec.cluster_id, self.node)
        table = SharedTable.create(
            name, spec.num_keys, spec.value_length, spec.dtype, self.workers,
            node=self.node, num_nodes=spec.num_nodes,
            arena_capacity=_arena_capacity(spec), cluster_id=spec.cluster_id.encode())
        self.table, self.view = table, table.view
        home = home_keys(spec.num_keys, self.node, spec.num_nodes)
        if spec.num_nodes > 1:
            everyone = np.arange(spec.num_keys, dtype=np.uint64)
            table.set_owners(everyone, home_of(everyone, spec.num_nodes))
        lengths = table.view.directory_array()["length"][home].astype(np.uint64)
        if spec.init == ("zeros",):
            # fresh shared memory reads as zeros; a strided slice avoids fancy indexing
            table.install(slice(self.node, spec.num_keys, spec.num_nodes), OWNED)
        else:
            for keys, lens in chunks(home, lengths):
                table.install(keys, OWNED, initial_values(spec.init, keys, lens, spec.dtype))
        table.publish()

    # -- loop ----------------------------------------------------------------------

    def request_stop(self, *_):
        self._stop = True

    def serve_forever(self):
        poller = zmq.Poller()
        listening = False
        poller.register(self.to_coordinator, zmq.POLLIN)
        if self.coordinator is not None:
            poller.register(self.coordinator.socket, zmq.POLLIN)
        last_housekeeping = last_worker_check = 0.0
        while not self._stop:
            if not listening and self.token is not None:
                # Peers and workers are read only once the cluster has formed: a peer that
                # heard PEERS first waits in ZeroMQ's bounded queue (RCVHWM), and nothing
                # that arrives before is read, let alone stored, without the token.
                poller.register(self.router, zmq.POLLIN)
                listening = True
            # Sleep until a message arrives or housekeeping is due: a node server that
            # wakes up needlessly takes a core from the workers.
            ready = dict(poller.poll(self._sleep_ms()))
            self.view.set_server_idle(SERVER_AWAKE)
            if self.coordinator is not None and self.coordinator.socket in ready:
                self.coordinator.handle_ready()
            if self.to_coordinator in ready:
                self._drain(self.to_coordinator, self._from_coordinator)
            if self.router in ready:
                self._drain(self.router, self._from_router)
            if self.coordinator is not None:
                self.coordinator.tick()
            # After the messages: an intent a worker appended before sending one of them
            # (a REFRESH, a barrier) is known to the round that answers it, as when both
            # came over the same socket.
            if self.view.intents_queued():
                self._take_queued_intents()
            try:
                self.maybe_start_round()
            except Exception as exc:  # noqa: BLE001 - fail loud, never die silently
                self._internal_error("a sync round", exc)
            now = time.monotonic()
            if now - last_housekeeping >= HOUSEKEEPING_EVERY:
                last_housekeeping = now
                self._housekeeping(now)
            if now - last_worker_check >= WORKER_CHECK_EVERY:
                last_worker_check = now
                self._check_local_workers()
            if self._failed is not None and now - self._failed_at > FAILED_LINGER:
                self.exit_code = EXIT_FAILED
                return

    def _sleep_ms(self):
        """How long the server waits for a message: long when it has nothing to do, a
        millisecond while rounds are due. It says in the table which, so that a worker
        appending an intent to its ring wakes it (WAKE): for any intent while it sleeps,
        for an intent due soon while it polls briefly (a key wanted now must not wait a
        millisecond). An intent appended just before that is taken at once."""
        idle = not self.placement_busy()
        self.view.set_server_idle(SERVER_ASLEEP if idle else SERVER_POLLING)
        if self.view.intents_queued():
            return 0
        return IDLE_POLL_MS if idle else BUSY_POLL_MS

    def _take_queued_intents(self):
        """Intents the local workers appended to their rings in the shared table."""
        for worker in range(self.workers):
            try:
                queued = self.view.intent_take(worker)
            except ValueError as exc:
                self._malformed(f"worker {self.first_rank + worker}'s intent ring: {exc}")
                continue
            for start, end, keys in queued:
                try:
                    self._record_intent(worker, start, end, keys)
                except ProtocolError as exc:
                    self._malformed(f"an intent of worker {self.first_rank + worker}: {exc}")

    def _drain(self, sock, handle):
        for _ in range(MAX_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handle(frames)

    def _housekeeping(self, now):
        self._expire_localize(now)
        self.view.heartbeat()
        self._to_coordinator(Message(MsgType.HEARTBEAT))
        self.intents.expire(self.view.counters()[:, WORKER_SLOT["clock"]])
        if self.malformed.due():
            self.malformed.flush()
        if self._failed is not None:
            return
        if self.addresses is None:  # not formed yet: nodes start in any order
            self._wait_for_cluster(now)
        elif now - self._coordinator_seen > self.node_timeout:
            self._fail(FAIL_COORDINATOR, 0)

    def _wait_for_cluster(self, now):
        """Until the cluster has formed, keep trying for the whole start timeout (ZeroMQ
        reconnects and delivers the JOIN once the coordinator is up), saying every few
        seconds what this node waits for; then give up, loudly."""
        waited = now - self._started_at
        if waited > self.start_timeout:
            reason = (f"node {self.node}: the cluster did not form within "
                      f"{self.start_timeout:.0f} s ({config.ENV_START_TIMEOUT}): "
                      f"{self._start_state()}")
            self._fail(FAIL_START, self.node, reason)
        elif now - self._reported_at >= START_REPORT_EVERY:
            self._reported_at = now
            log.warning("node %d: %s (%.0f s of %.0f s)", self.node, self._start_state(),
                        waited, self.start_timeout)

    def _start_state(self):
        if self._joined == 0:
            return f"waiting for the coordinator at {self.coordinator_address}"
        return (f"{self._joined} of {self.spec.num_nodes} nodes have joined the coordinator "
                f"at {self.coordinator_address}; waiting for the others")

    def _check_local_workers(self):
        """A local worker that died without saying goodbye fails the cluster."""
        if self._failed is not None:
            return
        for local in self._local:
            if local in self._left:
                continue
            pid = int(self.view.counter_get(local, WORKER_SLOT["pid"]))
            if pid and not _alive(pid):
                self._report_failure(FAIL_WORKER_DIED, self.first_rank + local)
                return

    # -- dispatch ------------------------------------------------------------------

    def _from_router(self, frames):
        identity, body = frames[0].bytes, frames[1:]
        try:
            msg = protocol.decode(body)
            self._check_sender(identity, msg)
        except ProtocolError as exc:
            self._malformed(exc)
            return
        self._count("bytes_received", protocol.frame_size(body))
        if self._failed is not None and msg.type in WORKER_REQUESTS and \
                msg.type not in (MsgType.GOODBYE, MsgType.INTENT, MsgType.WAKE):
            self._reply_failed(identity, msg.request_id)
            return
        try:
            if msg.type is self._raise_in:
                raise failpoints.InjectedFault(f"failpoint raise_in={msg.type.name}")
            self._handlers[msg.type](self, identity, msg)
        except ProtocolError as exc:
            if msg.type not in WORKER_REQUESTS:
                # A member's message that passed authentication: dropping it could lose
                # keys or updates (a MOVE's sender has already let go of them).
                self._internal_error(self._describe(msg), exc)
                return
            # A worker's request that fails validation is rejected: counted, and the
            # worker told (it must not wait for an answer).
            self._malformed(f"{self._describe(msg)}: {exc}")
            self._to_identity(identity, Message(MsgType.FAILED, request_id=msg.request_id,
                                                arg0=FAIL_REJECTED, count=self.node,
                                                text=f"node {self.node}: {exc}"))
        except Exception as exc:  # noqa: BLE001 - an internal error fails the node loudly
            self._internal_error(self._describe(msg), exc)

    def _describe(self, msg):
        """'PUSH from worker 3 (node 1) for keys 10..99': for logs and failure reasons."""
        sender = f"node {msg.src_node}" if msg.src_worker == protocol.SERVER else \
            f"worker {msg.src_worker} (node {msg.src_node})"
        text = f"{msg.type.name} from {sender}"
        if msg.keys is not None and msg.keys.shape[0]:
            text += f" for {msg.keys.shape[0]} keys in {int(msg.keys.min())}.." \
                    f"{int(msg.keys.max())}"
        return text

    def _malformed(self, reason):
        """A message that failed validation: dropped and counted (rate-limited log)."""
        self._count("malformed_messages", 1)
        self.malformed.dropped(reason)

    def _internal_error(self, what, exc):
        """A bug or an exhausted resource (a full arena): the node fails, loudly, and so
        does the cluster; never a dropped message that silently loses state."""
        reason = f"node {self.node}: internal error in {what}: {type(exc).__name__}: {exc}"
        log.error("%s", reason, exc_info=exc)
        self._report_failure(FAIL_INTERNAL, self.node, reason)

    def _check_sender(self, identity, msg):
        if msg.token != self.token:
            raise ProtocolError(f"{msg.type.name} without the cluster's token (a connection "
                                "that is not a member)")
        if msg.type in WORKER_REQUESTS:
            if msg.src_worker >= self.spec.num_workers:
                raise ProtocolError(f"{msg.type.name} from worker {msg.src_worker}, of "
                                    f"{self.spec.num_workers}")
            if identity != worker_identity(msg.src_worker):
                raise ProtocolError(f"{msg.type.name} with a sender that is not worker "
                                    f"{msg.src_worker}")
            if msg.type in LOCAL_ONLY and self._local.get(msg.src_worker - self.first_rank) \
                    != identity:
                raise ProtocolError(f"{msg.type.name} from worker {msg.src_worker}, which is "
                                    f"not a registered worker of node {self.node}")
        elif msg.type in PEER_REQUESTS:
            if identity != node_identity(msg.src_node) or msg.src_node >= self.spec.num_nodes:
                raise ProtocolError(f"{msg.type.name} from an unknown peer")
            if msg.src_node == self.node:
                raise ProtocolError(f"{msg.type.name} claiming to come from this node itself")
            if msg.type in FORWARDED_REQUESTS and not 0 <= msg.arg0 < self.spec.num_workers:
                raise ProtocolError(f"{msg.type.name} for worker {msg.arg0}")
        else:
            raise ProtocolError(f"{msg.type.name} is not a request for a node server")

    def _from_coordinator(self, frames):
        try:
            msg = protocol.decode(frames)
        except ProtocolError as exc:
            self._malformed(f"from the coordinator: {exc}")
            return
        self._coordinator_seen = time.monotonic()
        if msg.type == MsgType.PEERS:
            self._on_peers(msg)
        elif msg.type == MsgType.NODE_RELEASE:
            self._release_barrier(msg.request_id)
        elif msg.type == MsgType.SHUTDOWN:
            self._stop = True
        elif msg.type == MsgType.HEARTBEAT:
            self._joined = min(int(msg.count), self.spec.num_nodes)
        elif msg.type == MsgType.NODE_FAILED:
            if not 0 < msg.arg0 < 2**31 or not 0 <= msg.count < 2**32:
                self._malformed(f"NODE_FAILED with code {msg.arg0}")
                return
            self._fail(msg.arg0, msg.count, msg.text)

    # -- sending -------------------------------------------------------------------

    def _count(self, name, n):
        self.view.node_counter_add(NODE_SLOT[name], n)

    def _send_frames(self, sock, frames):
        self._count("bytes_sent", protocol.send(sock, frames))

    def _to_worker(self, rank, msg):
        self._to_identity(worker_identity(rank), msg)

    def _to_identity(self, identity, msg):
        msg.src_node = self.node
        msg.token = self.token or 0
        try:
            self._send_frames(self.router, [identity, *msg.encode()])
        except zmq.ZMQError as exc:  # the worker is gone (ROUTER_MANDATORY)
            log.warning("node %d: could not reply to a worker: %s", self.node, exc)

    def _to_peer(self, node, msg):
        msg.src_node = self.node
        msg.token = self.token
        self._send_frames(self.peers[node], msg.encode())

    def _to_coordinator(self, msg):
        msg.src_node = self.node
        msg.token = self.token or 0
        protocol.send(self.to_coordinator, msg.encode())

    def _reply_failed(self, identity, request_id):
        code, detail, reason = self._failed
        self._to_identity(identity, Message(MsgType.FAILED, request_id=request_id,
                                            arg0=code, count=detail, text=reason))

    # -- routing -------------------------------------------------------------------

    def _route(self, keys):
        return route(self.view, keys, self.node, self.spec.num_nodes)

    def _forward(self, msg, mtype, keys, rank, extra):
        """Forward the keys' part of a request to where `_route` says; extra(idx) gives the
        other fields of the forwarded message for the keys at indices idx."""
        for dest, idx in split_by(self._route(keys)).items():
            if dest < 0:
                log.error("node %d: keys %s.. of a %s from worker %d cannot be routed",
                          self.node, keys[idx][:4], msg.type.name, rank)
                self._to_worker(rank, Message(MsgType.FAILED, request_id=msg.request_id,
                                              arg0=FAIL_ROUTING, count=int(keys[idx][0])))
                continue
            try:
                out = protocol.forwarded(msg, mtype, keys=keys[idx], arg0=rank, **extra(idx))
            except ProtocolError:  # forwarded too often: fail the request, never loop
                self._to_worker(rank, Message(MsgType.FAILED, request_id=msg.request_id,
                                              arg0=FAIL_ROUTING, count=int(keys[idx][0])))
                continue
            self._to_peer(dest, out)

    # -- data requests -------------------------------------------------------------

    def _on_pull(self, identity, msg):
        self._serve_pull(msg, msg.src_worker, msg.keys, None)

    def _on_fwd_pull(self, identity, msg):
        self._serve_pull(msg, int(msg.arg0), msg.keys, msg.positions)

    def _serve_pull(self, msg, rank, keys, positions):
        _check_keys(keys, self.spec.num_keys)
        n = keys.shape[0]
        out = np.empty(self.view.total_length(keys), dtype=self.view.dtype)
        misses = np.empty(n, dtype=np.uint64)
        # Only keys owned here: a replica here may lag the owner (DESIGN.md §7.1).
        nmiss = self.view.pull(keys, out, misses, True)
        if nmiss == 0:
            reply = Message(MsgType.PULL_REPLY, request_id=msg.request_id, values=out)
            if positions is None:
                reply.flags = ALL_POSITIONS
            else:
                reply.positions = positions
            self._to_worker(rank, reply)
            return
        missed = misses[:nmiss].astype(np.intp)
        served = np.setdiff1d(np.arange(n), missed, assume_unique=True)
        own_positions = np.arange(n, dtype=np.uint32) if positions is None else positions
        if served.shape[0]:
            segs = Segments.of(self.view, keys)
            self._to_worker(rank, Message(MsgType.PULL_REPLY, request_id=msg.request_id,
                                          positions=own_positions[served],
                                          values=segs.take(out, served)))
        fwd_positions = own_positions[missed]
        self._forward(msg, MsgType.FWD_PULL, keys[missed], rank,
                      lambda idx: {"positions": fwd_positions[idx]})

    def _on_push(self, identity, msg):
        self._serve_update(msg, msg.src_worker, True, MsgType.FWD_PUSH)

    def _on_set(self, identity, msg):
        values = self._update_values(msg)  # checked before it may wait for a round
        if self._is_local_worker(msg.src_worker) and self.defer_set(identity, msg, msg.keys):
            return
        self._apply_update(msg, msg.src_worker, False, MsgType.FWD_SET, values)

    def _on_fwd_push(self, identity, msg):
        self._serve_update(msg, int(msg.arg0), True, MsgType.FWD_PUSH)

    def _on_fwd_set(self, identity, msg):
        self._serve_update(msg, int(msg.arg0), False, MsgType.FWD_SET)

    def _serve_update(self, msg, rank, additive, fwd_type):
        self._apply_update(msg, rank, additive, fwd_type, self._update_values(msg))

    def _update_values(self, msg):
        """The values of a push or set, checked against its keys and the table."""
        _check_keys(msg.keys, self.spec.num_keys)
        return protocol.values_of(msg, self.view.dtype, self.view.total_length(msg.keys))

    def _apply_update(self, msg, rank, additive, fwd_type, values):
        keys = msg.keys
        misses = np.empty(keys.shape[0], dtype=np.uint64)
        # Applied and acknowledged only where owned: an update acknowledged by a replica
        # would wait in that replica's delta, lost to the owner while this node stalls.
        nmiss = self.view.update(keys, values, misses, additive, True)
        applied = keys.shape[0] - nmiss
        if applied:
            self._to_worker(rank, Message(MsgType.UPDATE_ACK, request_id=msg.request_id,
                                          count=applied))
        if nmiss:
            missed = misses[:nmiss].astype(np.intp)
            segs = Segments.of(self.view, keys)
            fwd_values = segs.take(values, missed)
            if msg.type == MsgType.SET and self._is_local_worker(rank):
                self.overwrite_copies(keys[missed], fwd_values)
            fwd_segs = Segments.of(self.view, keys[missed])
            self._forward(msg, fwd_type, keys[missed], rank,
                          lambda idx: {"values": fwd_segs.take(fwd_values, idx)})

    # -- relocation ----------------------------------------------------------------

    def _is_local_worker(self, rank):
        return self.first_rank <= rank < self.first_rank + self.workers

    def _on_localize(self, identity, msg):
        """A local worker asks for keys to be owned here (relocation)."""
        if self.spec.mode not in RELOCATING_MODES:
            raise ProtocolError(f"localize in mode {self.spec.mode}")
        _check_keys(msg.keys, self.spec.num_keys)
        keys = np.unique(msg.keys)
        wanted = keys[self._not_owned(keys)]
        if wanted.shape[0] == 0:
            self._to_identity(identity, Message(MsgType.LOCALIZED, request_id=msg.request_id,
                                                count=keys.shape[0]))
            return
        self._next_op += 1
        self._localizing[self._next_op] = [identity, msg.request_id, wanted.shape[0],
                                           time.monotonic(), wanted]
        self.moving_in.update(wanted.tolist())
        request = Message(MsgType.MOVE_REQUEST, request_id=self._next_op, arg0=self.node)
        self._forward_move_request(request, wanted)

    def _not_owned(self, keys):
        directory = self.view.directory_array()
        return directory["state"][keys] != OWNED

    def _forward_move_request(self, msg, keys):
        for dest, idx in split_by(self._route(keys)).items():
            if dest < 0:
                log.error("node %d: cannot route a move request for keys %s..", self.node,
                          keys[idx][:4])
                continue
            out = protocol.forwarded(msg, MsgType.MOVE_REQUEST, keys=keys[idx], arg0=msg.arg0)
            self._to_peer(dest, out)

    def _on_move_request(self, identity, msg):
        """Give the keys this node owns to node arg0; pass the rest on along their path."""
        _check_keys(msg.keys, self.spec.num_keys)
        target = int(msg.arg0)
        if not 0 <= target < self.spec.num_nodes:
            raise ProtocolError(f"move request for node {target}")
        keys = msg.keys
        if target == self.node:  # the path led back: these keys are owned here already
            owned = ~self._not_owned(keys)
            self._localized(msg.request_id, int(owned.sum()))
            if (~owned).any():
                self._forward_move_request(msg, keys[~owned])
            return
        taken = self._evict_and_move(keys, target, msg.request_id, 0)
        if (~taken).any():
            self._forward_move_request(msg, keys[~taken])

    def _evict_and_move(self, keys, target, request_id, purpose):
        """Relocate the keys owned here to `target` (one MOVE: values, counters + 1);
        returns the mask of keys that were owned here and moved."""
        segs = Segments.of(self.view, keys)
        values = np.empty(self.view.total_length(keys), dtype=self.view.dtype)
        offsets = np.zeros(keys.shape[0], dtype=np.uint64)
        taken = np.zeros(keys.shape[0], dtype=np.uint8)
        self.view.evict(keys, target, values, offsets, taken)
        taken = taken.astype(bool)
        if taken.any():
            idx = np.flatnonzero(taken)
            moved = keys[idx]
            counters = self.ownership.counter[moved.astype(np.intp)] + np.uint32(1)
            versions = np.empty(moved.shape[0], dtype=np.uint32)
            self.view.versions_of(moved, versions)  # ABSENT now: nobody changes them
            self._to_peer(target, Message(MsgType.MOVE, request_id=request_id, arg1=purpose,
                                          keys=moved, values=segs.take(values, idx),
                                          counters=counters, versions=versions))
            lengths = self.view.directory_array()["length"][moved].astype(np.uint64)
            self.table.allocator.free(offsets[idx], lengths)
            for key in moved.tolist():
                self.replicas_of.pop(key, None)
            self._owners_changed()
        return taken

    def _on_move(self, identity, msg):
        """Keys arrive with value and ownership: install them and tell their homes."""
        keys = msg.keys
        _check_keys(keys, self.spec.num_keys)
        if np.unique(keys).shape[0] != keys.shape[0]:
            raise ProtocolError("MOVE names a key twice")
        if (~self._not_owned(keys)).any():
            raise ProtocolError("MOVE of keys this node owns already")
        values = protocol.values_of(msg, self.view.dtype, self.view.total_length(keys))
        values = self.absorb_copies(keys, values)
        lengths = self.view.directory_array()["length"][keys].astype(np.uint64)
        offsets = self.table.allocator.allocate(lengths)
        admitted = np.zeros(keys.shape[0], dtype=np.uint8)
        self.view.admit(keys, values, offsets, OWNED, self.node, admitted,
                        np.ascontiguousarray(msg.versions))
        admitted = admitted.astype(bool)
        if not admitted.all():  # their values would be lost: a broken invariant
            self.table.allocator.free(offsets[~admitted], lengths[~admitted])
            held = keys[~admitted]
            raise RuntimeError(f"MOVE of {held.shape[0]} keys in {int(held.min())}.."
                               f"{int(held.max())} that this node holds already")
        keys = keys[admitted]
        counters = msg.counters[admitted]
        self.ownership.counter[keys.astype(np.intp)] = counters
        self.arrived_round[keys.astype(np.intp)] = self.round + 1  # never 0: "arrived"
        if self.moving_in:
            self.moving_in.difference_update(keys.tolist())
            if not self.moving_in:
                self.answer_waiters()
        self._count("relocations", keys.shape[0])
        self._owners_changed()
        for home, idx in split_by(home_of(keys, self.spec.num_nodes)).items():
            update = Message(MsgType.OWNER_UPDATE, arg0=self.node, keys=keys[idx],
                             counters=counters[idx])
            if home == self.node:
                self.ownership.record(keys[idx], self.node, counters[idx])
            else:
                self._to_peer(home, update)
        if msg.arg1 == MOVE_FOR_ROUND:
            self._round_progress(msg.keys.shape[0], msg.request_id)
        else:
            self._localized(msg.request_id, msg.keys.shape[0])

    def _on_owner_update(self, identity, msg):
        _check_keys(msg.keys, self.spec.num_keys)
        owner = int(msg.arg0)
        if not 0 <= owner < self.spec.num_nodes:
            raise ProtocolError(f"owner update naming node {owner}")
        if not self.ownership.is_home(msg.keys).all():
            raise ProtocolError("owner update for keys whose home is elsewhere")
        newer = self.ownership.record(msg.keys, owner, msg.counters)
        keys = msg.keys[newer]
        keys = keys[self._not_owned(keys)]
        if keys.shape[0]:
            self.table.set_owners(keys, owner)
            self._owners_changed()

    def _expire_localize(self, now):
        """A relocation that never completes (its request could not be routed) fails the
        worker's localize instead of leaving it waiting while the cluster lives."""
        for op, (identity, request_id, _, started, keys) in list(self._localizing.items()):
            if now - started > self.start_timeout:
                del self._localizing[op]
                self.moving_in.difference_update(keys.tolist())
                self.answer_waiters()
                self._to_identity(identity, Message(MsgType.FAILED, request_id=request_id,
                                                    arg0=FAIL_ROUTING, count=op))

    def _localized(self, op, count):
        entry = self._localizing.get(op)
        if entry is None:
            return
        entry[2] -= count
        if entry[2] <= 0:
            del self._localizing[op]
            self._to_identity(entry[0], Message(MsgType.LOCALIZED, request_id=entry[1]))

    def _owners_changed(self):
        self._count("owner_changes", 1)

    # -- control -------------------------------------------------------------------

    def _on_hello(self, identity, msg):
        local = msg.src_worker - self.first_rank
        if 0 <= local < self.workers:
            self._local[local] = identity
            self._left.discard(local)
            if len(self._local) == self.workers:
                # Every worker has mapped the table: its name is no longer needed, and
                # without a name nothing can leak, however the processes end.
                self.table.unlink()
        self._to_identity(identity, Message(MsgType.WELCOME, request_id=msg.request_id,
                                            arg0=MODES.index(self.spec.mode),
                                            addresses=self.addresses))

    def _on_barrier(self, identity, msg):
        generation = msg.arg0
        arrived = self._barrier.setdefault(generation, {})
        arrived[msg.src_worker - self.first_rank] = msg.request_id
        if self._left:
            self._barrier_cannot_complete()
        elif len(arrived) == self.workers:
            self._to_coordinator(Message(MsgType.NODE_BARRIER, request_id=generation))

    def _barrier_cannot_complete(self):
        """A worker that finalized can never arrive: fail instead of hanging."""
        self._report_failure(FAIL_BARRIER, self.first_rank + min(self._left))

    def _release_barrier(self, generation):
        self.release_after_round(generation)

    def _release_now(self, generation):
        for local, request_id in self._barrier.pop(generation, {}).items():
            self._to_identity(self._local[local], Message(MsgType.RELEASE,
                                                          request_id=request_id))

    def _on_wait_sync(self, identity, msg):
        self.wait_for_round(identity, msg.request_id)

    def _on_refresh(self, identity, msg):
        _check_keys(msg.keys, self.spec.num_keys)
        self.refresh_soon(identity, msg.request_id, msg.keys)

    def _on_intent(self, identity, msg):
        """An intent that did not fit into the worker's ring (or a huge one)."""
        self._record_intent(msg.src_worker - self.first_rank, msg.arg0, msg.arg1,
                            msg.keys.copy())

    def _on_wake(self, identity, msg):
        """Nothing to do: the loop takes the queued intents right after any message."""

    def _record_intent(self, worker, start, end, keys):
        if end <= start or start < 0:
            raise ProtocolError(f"intent window [{start}, {end})")
        _check_keys(keys, self.spec.num_keys)
        self.intents.add(worker, keys, start, end)
        if self.intent_log is not None:
            self.intent_log.record(self.first_rank + worker, start, end, keys)
        self._count("intents_received", keys.shape[0])

    def _on_goodbye(self, identity, msg):
        self._left.add(msg.src_worker - self.first_rank)
        if self._barrier:  # others of this node wait for a barrier it will never join
            self._barrier_cannot_complete()
        if len(self._left) == self.workers and not self._done_sent:
            self._done_sent = True
            self._to_coordinator(Message(MsgType.NODE_DONE))

    def _on_peers(self, msg):
        if len(msg.addresses) != self.spec.num_nodes:
            log.error("node %d: coordinator sent %d addresses", self.node, len(msg.addresses))
            return
        if self.addresses is not None:
            return
        if not 0 < msg.arg0 < 2**63:
            log.error("node %d: coordinator sent no cluster token", self.node)
            return
        self.token = msg.arg0
        self.view.set_cluster_token(self.token)  # for this node's workers
        self.addresses = msg.addresses
        for node, address in enumerate(self.addresses):
            if node != self.node:
                self.peers[node] = self._dealer(address)
        if self.spec.mode == "replicate_all" and self.spec.num_nodes > 1:
            self._replicate_everything()
        if self.on_ready is not None:
            self.on_ready(self.address)

    # -- failure -------------------------------------------------------------------

    @property
    def failure(self):
        """Why the cluster failed, as this node knows it ('' while it has not)."""
        return "" if self._failed is None else failure_text(*self._failed)

    def _report_failure(self, code, detail, reason=""):
        self._to_coordinator(Message(MsgType.NODE_FAILED, arg0=code, count=detail,
                                     text=reason))
        self._fail(code, detail, reason)

    def _fail(self, code, detail, reason=""):
        """The cluster failed: every waiting and later call of every worker raises."""
        if self._failed is not None:
            return
        self._failed = (code, detail, reason)
        self._failed_at = time.monotonic()
        log.error("node %d: %s", self.node, failure_text(code, detail, reason))
        self.view.mark_failed(code, detail, reason)
        for arrived in self._barrier.values():
            for local, request_id in arrived.items():
                self._reply_failed(self._local[local], request_id)
        self._barrier.clear()
        for identity, request_id, *_ in self._localizing.values():
            self._reply_failed(identity, request_id)
        self._localizing.clear()

    _handlers = {
        MsgType.HELLO: _on_hello,
        MsgType.BARRIER: _on_barrier,
        MsgType.WAIT_SYNC: _on_wait_sync,
        MsgType.INTENT: _on_intent,
        MsgType.WAKE: _on_wake,
        MsgType.GOODBYE: _on_goodbye,
        MsgType.PULL: _on_pull,
        MsgType.PUSH: _on_push,
        MsgType.SET: _on_set,
        MsgType.LOCALIZE: _on_localize,
        MsgType.REFRESH: _on_refresh,
        MsgType.FWD_PULL: _on_fwd_pull,
        MsgType.FWD_PUSH: _on_fwd_push,
        MsgType.FWD_SET: _on_fwd_set,
        MsgType.MOVE_REQUEST: _on_move_request,
        MsgType.MOVE: _on_move,
        MsgType.OWNER_UPDATE: _on_owner_update,
        MsgType.SYNC: Placement._on_sync,
        MsgType.SYNC_REPLY: Placement._on_sync_reply,
    }

    # -- shutdown ------------------------------------------------------------------

    def close(self):
        """Close sockets and context, unmap and unlink the table. Idempotent. After a
        normal end, messages already queued get a moment to leave: a multipart message
        cut off by a closing socket can make libzmq abort in the peer (libzmq 3442)."""
        linger = 0 if self._failed is not None else CLOSE_LINGER_MS
        sockets = [self.router, self.to_coordinator, *self.peers.values()]
        if self.coordinator is not None:
            self.coordinator.close(linger)
        for sock in sockets:
            if sock is not None:
                sock.close(linger=linger)
        self.router = self.to_coordinator = self.coordinator = None
        self.peers = {}
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        if self.ctx is not None:
            self.ctx.term()
            self.ctx = None
        if self.table is not None:
            self.table.unlink()
            self.table.close()
            self.table = None
        if self.intent_log is not None:
            self.intent_log.close()
            self.intent_log = None


def _check_keys(keys, num_keys):
    if keys.shape[0] and int(keys.max()) >= num_keys:
        raise ProtocolError(f"key {int(keys.max())} out of range [0, {num_keys})")


def _arena_capacity(spec):
    """Room for every key twice: keys relocated here need a slot, replicas a second one
    for their value at last sync. The segment is sparse, so room costs memory only when
    it is used."""
    if spec.num_nodes == 1:
        return None
    total = spec.num_keys * spec.value_length if np.ndim(spec.value_length) == 0 \
        else int(np.sum(spec.value_length))
    return 2 * total


def _alive(pid):
    """True unless process `pid` is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def serve(spec, node, coordinator, ready, listen=None):
    """Entry point of a node server process. `ready` is a multiprocessing connection on
    which it reports ("coordinator", address) (node 0), then ("ready", address) once the
    cluster is complete, or ("error", text)."""
    die_with_parent(multiprocessing.parent_process().pid)
    set_process_name(f"adapm-node{node}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launching process decides
    server = NodeServer(spec, node, coordinator, listen)
    signal.signal(signal.SIGTERM, server.request_stop)
    try:
        try:
            server.start()
        except Exception as exc:
            ready.send(("error", f"node {node}: could not start: {exc}"))
            raise SystemExit(1) from None
        if node == 0:
            ready.send(("coordinator", server.coordinator_address))
        server.on_ready = lambda address: ready.send(("ready", address))
        profile_to = os.environ.get(config.ENV_PROFILE_SERVER)
        if profile_to:
            import cProfile
            cProfile.runctx("server.serve_forever()", globals(), {"server": server},
                            f"{profile_to}.node{node}")
        else:
            server.serve_forever()
        if server.addresses is None and server.failure:  # gave up before the cluster formed
            ready.send(("error", server.failure))
    finally:
        server.close()
        ready.close()
    raise SystemExit(server.exit_code)
