"""The node server: creates and owns the node's shared-memory table and serves everything
that is not a local access.

- Workers of any node send it PULL/PUSH/SET for keys their node does not hold; it answers
  from the table, and forwards what it does not own along the key's ownership path
  (its location cache), so the final owner replies straight to the worker.
- Its own workers send it control requests: hello, barrier, wait_sync, intents, localize,
  goodbye.
- Peers send it forwarded requests and relocations: MOVE_REQUEST (give me these keys),
  MOVE (value, ownership and counter in one message) and OWNER_UPDATE (to a key's home).
- It talks to the coordinator (adapm.node.control.coordinator; node 0 hosts it) for membership,
  barriers, heartbeats and failures, and writes a heartbeat into the table for its
  workers.

It runs as its own process (`serve`). It never touches values on the workers' hot path:
workers read and write held keys in shared memory, with no message."""

import logging
import multiprocessing
import os
import secrets
import signal
import time

import numpy as np
import posix_ipc
import zmq

import adapm.checkpoint as checkpoint
from adapm.common import config, failpoints
from adapm.common.errors import (
    FAIL_COLLECTIVES,
    FAIL_COORDINATOR,
    FAIL_INTERNAL,
    FAIL_REJECTED,
    FAIL_START,
    ProtocolError,
    failure_text,
)
from adapm.common.process import die_with_parent, set_process_name
from adapm.node.context import NodeContext
from adapm.node.control import metrics
from adapm.node.control.activity import ActivityLog
from adapm.node.control.checkpoint_phases import CheckpointPhases
from adapm.node.control.coordinator import Coordinator, bind_address
from adapm.node.control.local_workers import LocalWorkers
from adapm.node.data.holders import ReplicaHolders
from adapm.node.data.relocation import Relocation
from adapm.node.data.replicas import ReplicaCopies
from adapm.node.data.rounds import Rounds
from adapm.node.data.routing import Routes
from adapm.node.data.serving import DataServing
from adapm.node.outbox import Outbox
from adapm.policy.intents import IntentLog, IntentStore
from adapm.policy.manager import Manager
from adapm.policy.ownership import Ownership, home_of
from adapm.table.initializers import chunks, initial_values
from adapm.table.shared_table import (
    NODE_SLOT,
    OWNED,
    SERVER_ASLEEP,
    SERVER_AWAKE,
    SERVER_POLLING,
    WORKER_SLOT,
    SharedTable,
    segment_name,
)
from adapm.table.stats import node_numbers, node_stats
from adapm.wire import protocol
from adapm.wire.cluster_secret import ENV_CLUSTER_SECRET, NONCE_BYTES
from adapm.wire.collectives import describe_generation, is_checkpoint_generation
from adapm.wire.malformed import MalformedLog
from adapm.wire.protocol import MsgType, node_identity, worker_identity
from adapm.wire.security import connector, listener

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
                   MsgType.REFRESH, MsgType.WAKE, MsgType.APPLY, MsgType.CHECKPOINT}
LOCAL_ONLY = {MsgType.BARRIER, MsgType.WAIT_SYNC, MsgType.INTENT, MsgType.GOODBYE,
              MsgType.LOCALIZE, MsgType.REFRESH, MsgType.WAKE, MsgType.CHECKPOINT}
FORWARDED_REQUESTS = {MsgType.FWD_PULL, MsgType.FWD_PUSH, MsgType.FWD_SET,
                      MsgType.FWD_APPLY}
PEER_REQUESTS = {MsgType.FWD_PULL, MsgType.FWD_PUSH, MsgType.FWD_SET, MsgType.FWD_APPLY,
                 MsgType.MOVE_REQUEST, MsgType.MOVE, MsgType.OWNER_UPDATE, MsgType.SYNC,
                 MsgType.SYNC_REPLY}


def home_keys(num_keys, node, num_nodes):
    """The keys whose home (initial owner) is `node`: key % num_nodes == node."""
    return np.arange(node, num_keys, num_nodes, dtype=np.uint64)


class NodeServer:
    """The event loop of a node (poll, dispatch, housekeeping, failure) and the parts it
    is composed of, each owning one concern (docs/architecture.md):

    - `outbox` (adapm.node.outbox): the only sender; a test replaces it;
    - `serving` (adapm.node.data.serving): remote pull/push/set and their forwarding;
    - `relocation` (adapm.node.data.relocation): localize, moves, owner updates;
    - `rounds` (adapm.node.data.rounds): sync rounds, with its waiters
      (adapm.node.data.waiters), the
      manager's decisions (adapm.policy.manager) and this node's copies (adapm.node.data.replicas);
    - `local_workers` (adapm.node.control.local_workers): hello, barriers, goodbye, liveness."""

    def __init__(self, spec, node, coordinator, listen=None, metrics_port=None):
        """`coordinator`: address of the coordinator; node 0 binds it. `listen`: the
        address this server binds (tcp://HOST:PORT, PORT may be 0 or LOW-HIGH).
        `metrics_port`: serve Prometheus metrics on the spec's host and this port (0: any
        free port; adapm.node.control.metrics), None: not."""
        self.spec = spec
        self.metrics_port = metrics_port
        self.metrics = None         # adapm.node.control.metrics.MetricsExporter, while it serves
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
        self.zmq_ctx = None
        self.auth = None            # ZAP handler of a secure cluster
        self.router = None
        self.coordinator = None     # Coordinator, on node 0 only
        self.address = None
        self.addresses = None       # every node's address, once the coordinator sent PEERS
        self.ownership = Ownership(node, spec.num_nodes, spec.num_keys)
        self.intents = IntentStore(self.workers, spec.num_keys)
        log_to = os.environ.get(config.ENV_INTENT_LOG)
        self.intent_log = IntentLog(log_to, node) if log_to else None
        self.on_ready = None        # called with the address once the cluster is complete
        self._failed = None
        self._failed_at = 0.0
        self.exit_code = 0
        self._stop = False
        self.token = None           # the cluster's message token, from PEERS
        self._join_nonce = None     # of this node's JOIN: PEERS's token is masked with it
        self.malformed = MalformedLog(log, f"node {node}")
        self.failpoints = failpoints.for_node(node)  # tests of the failure paths only
        raise_in = self.failpoints.argument("raise_in")
        self._raise_in = MsgType[raise_in] if raise_in else None
        self._coordinator_seen = self._started_at = self._reported_at = time.monotonic()
        self._joined = 0            # nodes that joined, as the coordinator's heartbeats say
        self._formed_at = self._attached_at = None  # for the start-up log lines only
        self.outbox = None
        self._handlers = {}
        self.activity = None        # DEBUG lines of what the node did (adapm.node.control.activity)

    # -- start ---------------------------------------------------------------------

    def start(self):
        self.create_table()
        if self.failpoints.armed("arena_full"):  # the next slot needed finds the arena full
            self.table.allocator.capacity = self.table.allocator.top
        self.assemble(Outbox(self.node, self._count))
        self.activity = ActivityLog(self.view)
        self.zmq_ctx = zmq.Context()
        if self.spec.curve is not None:
            self.auth = self.spec.curve.authenticator(self.zmq_ctx)
        self.router = listener(self.zmq_ctx, self.spec.curve)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # Bounded input: no frame larger than the largest legal message (ZeroMQ drops
        # the connection before allocating it), and a bounded queue per connection.
        self.router.setsockopt(zmq.MAXMSGSIZE, self._max_frame_bytes())
        self.router.setsockopt(zmq.RCVHWM, RECEIVE_HWM)
        self.router.setsockopt(zmq.SNDHWM, 0)
        self.address = bind_address(self.router, self.listen)
        self.outbox.router = self.router
        if self.node == 0:
            self.coordinator = Coordinator(self.zmq_ctx, self.coordinator_address,
                                           self.spec.num_nodes, self.node_timeout,
                                           self.spec.secret, self.spec.curve,
                                           describe_generation)
            self.coordinator_address = self.coordinator.address
        # A routing identity nobody can guess: a process that connects first under this
        # node's name cannot take its place at the coordinator.
        self.outbox.coordinator = self._dealer(
            self.coordinator_address, node_identity(self.node) + secrets.token_bytes(16))
        fingerprint = self.spec.fingerprint()
        proof = self.spec.secret.join_proof(self.node, fingerprint, self.address)
        self._join_nonce = proof[:NONCE_BYTES]
        self.outbox.to_coordinator(protocol.Join(fingerprint=fingerprint,
                                                 addresses=[self.address], proof=proof))
        if self.metrics_port is not None:  # Prometheus, on this node's address only
            self.metrics = metrics.start(self, self.spec.host, self.metrics_port)

    def assemble(self, outbox):
        """Build the parts around the table, sending through `outbox` (a test may pass
        one that records)."""
        self.outbox = outbox
        ctx = self.ctx = NodeContext(self.spec, self.node, self.table, self.ownership,
                                     self.intents)
        routes = Routes(ctx, outbox)
        holders = ReplicaHolders(self.spec.num_keys, self.spec.num_nodes)
        self.replicas = ReplicaCopies(ctx)
        self.local_workers = LocalWorkers(ctx, outbox, self._report_failure,
                                          lambda: self.addresses)
        self.manager = Manager(self.spec.mode, self.workers, self.intents,
                               num_keys=self.spec.num_keys)
        self.rounds = Rounds(ctx, outbox, routes, self.replicas, holders, self.manager,
                             self.local_workers.release_now)
        self.relocation = Relocation(ctx, outbox, routes, self.replicas, holders,
                                     self.rounds, self.start_timeout)
        self.serving = DataServing(ctx, outbox, routes, self.replicas, self.rounds)
        self.checkpoints = CheckpointPhases(ctx, outbox, self.rounds, self.local_workers)
        self.rounds.relocation = self.relocation
        self.rounds.resume_set = self.serving.on_set
        self._handlers = self._dispatch_table()

    def _dispatch_table(self):
        serving, relocation, rounds = self.serving, self.relocation, self.rounds
        workers = self.local_workers
        return {
            MsgType.HELLO: self._on_hello,
            MsgType.BARRIER: self._collective(workers.on_barrier),
            MsgType.CHECKPOINT: self._collective(self.checkpoints.on_checkpoint),
            MsgType.GOODBYE: self._on_goodbye,
            MsgType.WAIT_SYNC: lambda identity, msg: rounds.wait_for_round(
                identity, msg.request_id),
            MsgType.REFRESH: self._on_refresh,
            MsgType.INTENT: self._on_intent,
            MsgType.WAKE: self._on_wake,
            MsgType.PULL: serving.on_pull,
            MsgType.PUSH: serving.on_push,
            MsgType.SET: serving.on_set,
            MsgType.FWD_PULL: serving.on_fwd_pull,
            MsgType.FWD_PUSH: serving.on_fwd_push,
            MsgType.FWD_SET: serving.on_fwd_set,
            MsgType.APPLY: serving.on_apply,
            MsgType.FWD_APPLY: serving.on_fwd_apply,
            MsgType.LOCALIZE: relocation.on_localize,
            MsgType.MOVE_REQUEST: relocation.on_move_request,
            MsgType.MOVE: relocation.on_move,
            MsgType.OWNER_UPDATE: relocation.on_owner_update,
            MsgType.SYNC: rounds.on_sync,
            MsgType.SYNC_REPLY: rounds.on_sync_reply,
        }

    def _dealer(self, address, identity=None):
        sock = connector(self.zmq_ctx, self.spec.curve)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.IDENTITY, identity or node_identity(self.node))
        sock.connect(address)
        return sock

    def _max_frame_bytes(self):
        lengths = self.spec.value_length
        longest = int(lengths) if np.ndim(lengths) == 0 else int(np.max(lengths))
        return protocol.max_frame_bytes(self.spec.num_keys, longest,
                                        np.dtype(self.spec.dtype).itemsize)

    def create_table(self):
        spec = self.spec
        name = segment_name(spec.cluster_id, self.node)
        try:  # O_EXCL: never another's segment, whose name close() would unlink
            table = SharedTable.create(
                name, spec.num_keys, spec.value_length, spec.dtype, self.workers,
                node=self.node, num_nodes=spec.num_nodes,
                arena_capacity=_arena_capacity(spec), cluster_id=spec.cluster_id.encode())
        except posix_ipc.ExistentialError:
            raise FileExistsError(f"node {self.node} of cluster {spec.cluster_id} already "
                                  f"runs on this machine (its table {name} exists)") from None
        self.table, self.view = table, table.view
        home = home_keys(spec.num_keys, self.node, spec.num_nodes)
        if spec.num_nodes > 1:
            everyone = np.arange(spec.num_keys, dtype=np.uint64)
            table.set_owners(everyone, home_of(everyone, spec.num_nodes))
        lengths = table.lengths(home)
        if not callable(spec.init) and spec.init[0] == "checkpoint":
            checkpoint.restore_home_keys(table, spec.init[1], self.node, spec.num_nodes,
                                         spec.num_keys, spec.value_length, spec.dtype)
        elif spec.init == ("zeros",):
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
        poller.register(self.outbox.coordinator, zmq.POLLIN)
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
            if self.outbox.coordinator in ready:
                self._drain(self.outbox.coordinator, self._from_coordinator)
            if self.router in ready:
                self._drain(self.router, self._from_router)
            if self.coordinator is not None:
                self.coordinator.tick()
            # After the messages: an intent a worker appended before sending one of them
            # (a REFRESH, a barrier) is known to the round that answers it, as when both
            # came over the same socket.
            if self.view.intents_queued():
                self._take_queued_intents()
            self.maybe_start_round()
            self.checkpoints.poll()
            now = time.monotonic()
            if now - last_housekeeping >= HOUSEKEEPING_EVERY:
                last_housekeeping = now
                self._housekeeping(now)
            if now - last_worker_check >= WORKER_CHECK_EVERY:
                last_worker_check = now
                if self._failed is None:
                    self.local_workers.check_alive(_alive)
            if self._failed is not None and now - self._failed_at > FAILED_LINGER:
                self.exit_code = EXIT_FAILED
                return

    def maybe_start_round(self):
        """Start a sync round if one is due (and the cluster formed and did not fail)."""
        if self._failed is not None or self.addresses is None:
            return
        try:
            self.rounds.maybe_start()
        except Exception as exc:  # noqa: BLE001 - fail loud, never die silently
            self._internal_error("a sync round", exc)

    def _sleep_ms(self):
        """How long the server waits for a message: long when it has nothing to do, a
        millisecond while rounds are due. It says in the table which, so that a worker
        appending an intent to its ring wakes it (WAKE): for any intent while it sleeps,
        for an intent due soon while it polls briefly (a key wanted now must not wait a
        millisecond). An intent appended just before that is taken at once."""
        idle = not self.rounds.busy()
        self.view.set_server_idle(SERVER_ASLEEP if idle else SERVER_POLLING)
        if self.view.intents_queued():
            return 0
        return IDLE_POLL_MS if idle else BUSY_POLL_MS

    def _drain(self, sock, handle):
        for _ in range(MAX_BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handle(frames)

    def _housekeeping(self, now):
        self.activity.maybe_log()
        self.relocation.expire(now)
        self.view.heartbeat()
        self.outbox.to_coordinator(protocol.Heartbeat())
        self.intents.expire(self.view.counters()[:, WORKER_SLOT["clock"]])
        if self.malformed.due():
            self.malformed.flush()
        if self._failed is not None:
            return
        if self.addresses is None:  # not formed yet: nodes start in any order
            self._wait_for_cluster(now)
        elif now - self._coordinator_seen > self.node_timeout:
            self._fail(FAIL_COORDINATOR, 0)
        if self._attached_at is None and self._formed_at is not None:
            self._report_attaching(now)

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

    def _report_attaching(self, now):
        """Log lines only: every START_REPORT_EVERY seconds, which of this node's workers
        have not attached (said hello) yet; once all have, how long that took."""
        attached = self.local_workers.identities
        if len(attached) >= self.workers:
            self._attached_at = now
            log.info("%d worker%s attached %.1f s after the cluster formed", self.workers,
                     "s" if self.workers > 1 else "", now - self._formed_at)
        elif now - self._reported_at >= START_REPORT_EVERY:
            self._reported_at = now
            waiting = [self.first_rank + i for i in range(self.workers) if i not in attached]
            log.info("waiting for worker%s %s to attach, %.0f s after the cluster formed (a "
                     "worker attaches once its code calls adapm.worker(), after its imports: "
                     "torch alone can take 10 s or more)", "s" if len(waiting) > 1 else "",
                     ", ".join(map(str, waiting)), now - self._formed_at)

    def _start_state(self):
        if self._joined == 0:
            return (f"waiting for the coordinator at {self.coordinator_address} (is node 0 "
                    f"up, and does every machine have the same cluster secret, "
                    f"{ENV_CLUSTER_SECRET} or --secret-file?)")
        return (f"{self._joined} of {self.spec.num_nodes} nodes have joined the coordinator "
                f"at {self.coordinator_address}; waiting for the others")

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
            self._handlers[msg.type](identity, msg)
        except ProtocolError as exc:
            if msg.type not in WORKER_REQUESTS:
                # A member's message that passed authentication: dropping it could lose
                # keys or updates (a MOVE's sender has already let go of them).
                self._internal_error(self._describe(msg), exc)
                return
            # A worker's request that fails validation is rejected: counted, and the
            # worker told (it must not wait for an answer).
            self._malformed(f"{self._describe(msg)}: {exc}")
            self.outbox.to_identity(identity, protocol.Failed(
                request_id=msg.request_id, code=FAIL_REJECTED, detail=self.node,
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
            if identity != worker_identity(msg.src_worker, self.token):
                raise ProtocolError(f"{msg.type.name} with a sender that is not worker "
                                    f"{msg.src_worker}")
            if msg.type in LOCAL_ONLY and \
                    not self.local_workers.registered(msg.src_worker, identity):
                raise ProtocolError(f"{msg.type.name} from worker {msg.src_worker}, which is "
                                    f"not a registered worker of node {self.node}")
        elif msg.type in PEER_REQUESTS:
            if msg.src_node >= self.spec.num_nodes or \
                    identity != node_identity(msg.src_node, self.token):
                raise ProtocolError(f"{msg.type.name} from an unknown peer")
            if msg.src_node == self.node:
                raise ProtocolError(f"{msg.type.name} claiming to come from this node itself")
            if msg.type in FORWARDED_REQUESTS and not 0 <= msg.requester < self.spec.num_workers:
                raise ProtocolError(f"{msg.type.name} for worker {msg.requester}")
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
            self._release_barrier(msg.generation)
        elif msg.type == MsgType.SHUTDOWN:
            self._stop = True
            if self.node != 0 and self._failed is None:  # node 0's are read where it runs
                self.outbox.to_coordinator(protocol.NodeStats(stats=node_numbers(self.view)))
            (log.info if self.node == 0 else log.debug)(
                "every worker finished: shutting down (up %.1f s)",
                time.monotonic() - self._started_at)
        elif msg.type == MsgType.HEARTBEAT:
            self._joined = min(int(msg.joined), self.spec.num_nodes)
        elif msg.type == MsgType.NODE_FAILED:
            if not 0 < msg.code < 2**31 or not 0 <= msg.detail < 2**32:
                self._malformed(f"NODE_FAILED with code {msg.code}")
                return
            self._fail(msg.code, msg.detail, msg.text)

    def _count(self, name, n):
        self.view.node_counter_add(NODE_SLOT[name], n)

    def _reply_failed(self, identity, request_id):
        code, detail, reason = self._failed
        self.outbox.to_identity(identity, protocol.Failed(request_id=request_id, code=code,
                                                          detail=detail, text=reason))

    # -- control -------------------------------------------------------------------

    def _release_barrier(self, generation):
        """Every node reached the barrier: release it here once replicas fetched what
        was flushed before it. A checkpoint's phases need no round: nothing changed."""
        log.debug("node %d: every node reached %s", self.node, describe_generation(generation))
        if is_checkpoint_generation(generation):
            self.checkpoints.on_release(generation)
        else:
            self.rounds.release_after_round(generation)

    def _collective(self, handler):
        """barrier() and save()'s phases: once every local worker waits in one, they
        must all wait in the same; else none can complete (a script's mistake), and
        the cluster fails saying who waits where, instead of hanging."""
        def handle(identity, msg):
            handler(identity, msg)
            waiting = {**self.local_workers.waiting_workers(),
                       **self.checkpoints.waiting_workers()}
            if len(waiting) == self.workers and len(set(waiting.values())) > 1:
                where = "; ".join(f"worker {self.first_rank + local} in {what}"
                                  for local, what in sorted(waiting.items()))
                self._report_failure(FAIL_COLLECTIVES, self.node,
                                     f"node {self.node}: {where}")
        return handle

    def _on_goodbye(self, identity, msg):
        self.local_workers.on_goodbye(identity, msg)
        if self.checkpoints.waiting:  # others wait in a save it will never finish
            self.local_workers.cannot_complete()

    def _on_hello(self, identity, msg):
        self.local_workers.on_hello(identity, msg)
        if self._attached_at is None and self._formed_at is not None:
            self._report_attaching(time.monotonic())  # the last one: say so now

    def _on_refresh(self, identity, msg):
        self.ctx.check_keys(msg.keys)
        self.rounds.refresh_soon(identity, msg.request_id, msg.keys)

    def _on_intent(self, identity, msg):
        """An intent that did not fit into the worker's ring (or a huge one)."""
        self._record_intent(msg.src_worker - self.first_rank, msg.start, msg.end,
                            msg.keys.copy())

    def _on_wake(self, identity, msg):
        """Nothing to do: the loop takes the queued intents right after any message."""

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

    def _record_intent(self, worker, start, end, keys):
        if end <= start or start < 0:
            raise ProtocolError(f"intent window [{start}, {end})")
        self.ctx.check_keys(keys)
        self.intents.add(worker, keys, start, end)
        if self.intent_log is not None:
            self.intent_log.record(self.first_rank + worker, start, end, keys)
        self._count("intents_received", keys.shape[0])

    def _on_peers(self, msg):
        if len(msg.addresses) != self.spec.num_nodes:
            log.error("node %d: coordinator sent %d addresses", self.node, len(msg.addresses))
            return
        if self.addresses is not None:
            return
        secret = self.spec.secret
        if not secret.check_peers(msg.proof, self.node, self._join_nonce, msg.cluster_token,
                                  msg.addresses):
            self._malformed("PEERS without a valid proof of the cluster secret: ignored")
            return
        token = secret.mask_token(msg.cluster_token, self.node, self._join_nonce)
        if not 0 < token < 2**63:
            log.error("node %d: coordinator sent no cluster token", self.node)
            return
        for node, address in enumerate(msg.addresses):
            if node != self.node:
                self.outbox.peers[node] = self._dealer(address, node_identity(self.node, token))
        self.formed(token, msg.addresses)
        self._formed_at = self._reported_at = now = time.monotonic()
        if self.node == 0:
            log.info("cluster up: %d node%s x %d worker%s formed in %.1f s",
                     self.spec.num_nodes, "s" if self.spec.num_nodes > 1 else "",
                     self.workers, "s" if self.workers > 1 else "", now - self._started_at)
        else:
            log.debug("joined the cluster of %d nodes in %.1f s", self.spec.num_nodes,
                      now - self._started_at)
        if self.on_ready is not None:
            self.on_ready(self.address)

    def formed(self, token, addresses):
        """The cluster formed: its token and every node's address are known (the peers'
        connections are in the outbox)."""
        self.token = token
        self.outbox.token = token
        self.view.set_cluster_token(token)  # for this node's workers
        self.addresses = addresses
        if self.spec.mode == "replicate_all" and self.spec.num_nodes > 1:
            self.rounds.replicate_everything()

    # -- failure -------------------------------------------------------------------

    @property
    def failure(self):
        """Why the cluster failed, as this node knows it ('' while it has not)."""
        return "" if self._failed is None else failure_text(*self._failed)

    def _report_failure(self, code, detail, reason=""):
        self.outbox.to_coordinator(protocol.NodeFailed(code=code, detail=detail,
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
        self.local_workers.fail_all(self._reply_failed)
        self.checkpoints.fail_all(self._reply_failed)
        self.relocation.fail_all(self._reply_failed)

    # -- shutdown ------------------------------------------------------------------

    def close(self):
        """Close sockets and context, unmap and unlink the table. Idempotent. After a
        normal end, messages already queued get a moment to leave: a multipart message
        cut off by a closing socket can make libzmq abort in the peer (libzmq 3442)."""
        if self.metrics is not None:  # first: no scrape may read the table once unmapped
            self.metrics.stop()
            self.metrics = None
        linger = 0 if self._failed is not None else CLOSE_LINGER_MS
        outbox = self.outbox if isinstance(self.outbox, Outbox) else None
        sockets = [self.router]
        if outbox is not None:
            sockets += [outbox.coordinator, *outbox.peers.values()]
            outbox.coordinator, outbox.peers = None, {}
        if self.coordinator is not None:
            self.coordinator.close(linger)
        for sock in sockets:
            if sock is not None:
                sock.close(linger=linger)
        self.router = self.coordinator = None
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
        if self.zmq_ctx is not None:
            self.zmq_ctx.term()
            self.zmq_ctx = None
        if self.table is not None:
            self.table.unlink()
            self.table.close()
            self.table = None
        if self.intent_log is not None:
            self.intent_log.close()
            self.intent_log = None


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


def _send_quietly(connection, message):
    """Send on the launching process's pipe, which it may have closed (not an error)."""
    try:
        connection.send(message)
    except OSError:
        pass


def serve(spec, node, coordinator, ready, listen=None, metrics_port=None):
    """Entry point of a node server process. `ready` is a multiprocessing connection on
    which it reports ("coordinator", address) (node 0), then ("ready", address) once the
    cluster is complete, or ("error", text); node 0, at a normal end, ("stats", {node:
    statistics}) of every node that sent them (adapm.table.stats)."""
    die_with_parent(multiprocessing.parent_process().pid)
    set_process_name(f"adapm-node{node}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launching process decides
    server = NodeServer(spec, node, coordinator, listen, metrics_port)
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
            # CPU time, not wall time: on a busy machine a server waits for a core, and
            # that wait is not its cost.
            profile = cProfile.Profile(time.process_time)
            profile.runcall(server.serve_forever)
            profile.dump_stats(f"{profile_to}.node{node}")
        else:
            server.serve_forever()
        if server.addresses is None and server.failure:  # gave up before the cluster formed
            ready.send(("error", server.failure))
        if server.coordinator is not None and server.coordinator.ending_since is not None \
                and not server.failure:  # every node done: the summary of all of them
            _send_quietly(ready, ("stats", {**server.coordinator.stats,
                                            node: node_stats(server.view)}))
    finally:
        server.close()
        ready.close()
    raise SystemExit(server.exit_code)
