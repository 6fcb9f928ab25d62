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
import os
import secrets
import time

import numpy as np
import posix_ipc
import zmq

import adapm.checkpoint as checkpoint
from adapm.common import config, failpoints
from adapm.common.errors import FAIL_COORDINATOR, FAIL_REJECTED, ProtocolError
from adapm.node import process
from adapm.node.admission import WORKER_REQUESTS, check_sender, describe
from adapm.node.context import NodeContext
from adapm.node.control import metrics
from adapm.node.control.activity import ActivityLog
from adapm.node.control.checkpoint_phases import CheckpointPhases
from adapm.node.control.collectives import Collectives
from adapm.node.control.coordinator import Coordinator
from adapm.node.control.local_workers import LocalWorkers
from adapm.node.data.deferred_sets import DeferredSets
from adapm.node.data.eviction import Eviction
from adapm.node.data.holders import ReplicaHolders
from adapm.node.data.plane import DataPlane
from adapm.node.data.relocation import Relocation
from adapm.node.data.replicas import ReplicaCopies
from adapm.node.data.rounds import Rounds
from adapm.node.data.routing import Routes
from adapm.node.data.serving import DataServing
from adapm.node.failure import NodeFailure
from adapm.node.intake import IntentIntake
from adapm.node.outbox import Outbox
from adapm.node.snapshot import Snapshots, node_snapshot
from adapm.node.sockets import NodeSockets
from adapm.node.startup import Startup
from adapm.policy.intents import IntentLog, new_store
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
from adapm.table.stats import node_numbers
from adapm.wire import protocol
from adapm.wire.collectives import describe_generation
from adapm.wire.malformed import MalformedLog
from adapm.wire.protocol import MsgType, node_identity

log = logging.getLogger("adapm.server")

CLOSE_LINGER_MS = 200     # how long queued messages may take to leave at a normal end
IDLE_POLL_MS = 50        # longest wait for a message when there is nothing else to do
BUSY_POLL_MS = 1         # ... while sync rounds are due (at most ~1000 rounds a second)
EXIT_FAILED = 3          # exit code of a node server after the cluster failed
HOUSEKEEPING_EVERY = 0.05
MAX_BATCH = 256          # messages handled per round before the round's housekeeping
WORKER_CHECK_EVERY = 0.5


def home_keys(num_keys, node, num_nodes):
    """The keys whose home (initial owner) is `node`: key % num_nodes == node."""
    return np.arange(node, num_keys, num_nodes, dtype=np.uint64)


class NodeServer:
    """The event loop of a node (poll, dispatch, housekeeping) and the parts it is
    composed of, each owning one concern (docs/architecture.md):

    - `outbox` (adapm.node.outbox): the only sender; a test replaces it; the sockets it
      sends on are adapm.node.sockets';
    - `serving` (adapm.node.data.serving): remote pull/push/set and their forwarding;
    - `relocation` (adapm.node.data.relocation): localize, moves, owner updates;
    - `rounds` (adapm.node.data.rounds): sync rounds, the one owner of their state, with
      its waiters (adapm.node.data.waiters), the manager's decisions
      (adapm.policy.manager) and this node's copies (adapm.node.data.replicas);
    - `local_workers` (adapm.node.control.local_workers): hello, barriers, goodbye, liveness;
    - `checkpoints` (adapm.node.control.checkpoint_phases): the phases of a save;
    - `intake` (adapm.node.intake): the workers' intents;
    - `startup` (adapm.node.startup), `failures` (adapm.node.failure): joining the
      cluster, and its failure.
    Who may send which message is adapm.node.admission's."""

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
        self.sockets = None         # adapm.node.sockets.NodeSockets, once started
        self.coordinator = None     # Coordinator, on node 0 only
        self.address = None
        self.addresses = None       # every node's address, once the coordinator sent PEERS
        self.ownership = Ownership(node, spec.num_nodes, spec.num_keys)
        # the compiled parts, or (ADAPM_DATA_PLANE=python) their Python references
        self.compiled = config.data_plane() == "compiled"
        self.intents = new_store(self.workers, spec.num_keys, compiled=self.compiled)
        log_to = os.environ.get(config.ENV_INTENT_LOG)
        self.intent_log = IntentLog(log_to, node) if log_to else None
        self.on_ready = None        # called with the address once the cluster is complete
        self.failures = None        # adapm.node.failure.NodeFailure, once assembled
        self.exit_code = 0
        self._stop = False
        self.token = None           # the cluster's message token, from PEERS
        self.malformed = MalformedLog(log, f"node {node}")
        self.failpoints = failpoints.for_node(node)  # tests of the failure paths only
        raise_in = self.failpoints.argument("raise_in")
        self._raise_in = MsgType[raise_in] if raise_in else None
        self.startup = Startup(spec, node, self.start_timeout, self._malformed)
        self._coordinator_seen = time.monotonic()
        self.outbox = None
        self.plane = None           # adapm.node.data.plane.DataPlane, once started
        self._handlers = {}
        self.activity = None        # DEBUG lines of what the node did (adapm.node.control.activity)
        self.snapshots = Snapshots(self._snapshot)

    # -- start ---------------------------------------------------------------------

    def start(self):
        self.create_table()
        if self.failpoints.armed("arena_full"):  # the next slot needed finds the arena full
            self.table.allocator.capacity = self.table.allocator.top
        self.sockets = NodeSockets(self.spec, self.node)
        self.address = self.sockets.bind(self.listen)
        if self.node == 0:
            self.coordinator = Coordinator(self.sockets.context, self.coordinator_address,
                                           self.spec.num_nodes, self.node_timeout,
                                           self.spec.secret, self.spec.curve,
                                           describe_generation)
            self.coordinator_address = self.coordinator.address
        # A routing identity nobody can guess: a process that connects first under this
        # node's name cannot take its place at the coordinator.
        to_coordinator = self.sockets.dealer(
            self.coordinator_address, node_identity(self.node) + secrets.token_bytes(16))
        self.assemble(Outbox(self.node, self._count, router=self.sockets.router,
                             coordinator=to_coordinator))
        self.activity = ActivityLog(self.view)
        self.plane = DataPlane(self.ctx, self.sockets.router, self._count, self.compiled)
        self.plane.serve_rounds(self.rounds, self.manager, self.ownership,
                                self.table.allocator)
        self.rounds.compiled_sender = self.plane.send_round
        self.replicas.compiled_make_pending = self.plane.make_pending
        self.outbox.to_coordinator(self.startup.join(self.address, self.coordinator_address))
        if self.metrics_port is not None:  # Prometheus, on this node's address only
            self.metrics = metrics.start(self, self.spec.host, self.metrics_port)

    def assemble(self, outbox):
        """Build the parts around the table, sending through `outbox` (a test may pass
        one that records). Each part gets its collaborators here, once."""
        self.outbox = outbox
        ctx = self.ctx = NodeContext(self.spec, self.node, self.table, self.ownership,
                                     self.intents, compiled=self.compiled)
        self.failures = NodeFailure(self.node, outbox, self.view, self._answer_failed)
        routes = Routes(ctx, outbox)
        holders = ReplicaHolders(self.spec.num_keys, self.spec.num_nodes)
        self.replicas = ReplicaCopies(ctx)
        self.local_workers = LocalWorkers(ctx, outbox, self.failures.report,
                                          lambda: self.addresses)
        self.manager = Manager(self.spec.mode, self.workers, self.intents,
                               num_keys=self.spec.num_keys)
        deferred_sets = DeferredSets()
        self.serving = DataServing(ctx, outbox, routes, self.replicas, deferred_sets)
        self.eviction = Eviction(ctx, outbox, holders)
        self.rounds = Rounds(ctx, outbox, routes, self.replicas, holders, self.manager,
                             eviction=self.eviction, deferred_sets=deferred_sets,
                             release_barrier=self.local_workers.release_now,
                             resume_set=self.serving.on_set)
        self.relocation = Relocation(ctx, outbox, routes, self.replicas, self.eviction,
                                     self.rounds, self.start_timeout)
        self.checkpoints = CheckpointPhases(ctx, outbox, self.rounds, self.local_workers)
        self.collectives = Collectives(ctx, self.local_workers, self.checkpoints,
                                       self.rounds, self.failures.report)
        self.intake = IntentIntake(ctx, self.intent_log, self._malformed)
        self._handlers = self._dispatch_table()

    def _dispatch_table(self):
        serving, relocation, rounds = self.serving, self.relocation, self.rounds
        return {
            MsgType.HELLO: self._on_hello,
            MsgType.BARRIER: self.collectives.on_barrier,
            MsgType.CHECKPOINT: self.collectives.on_checkpoint,
            MsgType.GOODBYE: self.collectives.on_goodbye,
            MsgType.WAIT_SYNC: lambda identity, msg: rounds.wait_for_round(
                identity, msg.request_id),
            MsgType.REFRESH: self._on_refresh,
            MsgType.INTENT: self.intake.on_intent,
            # Nothing to do: the loop takes the queued intents right after any message.
            MsgType.WAKE: lambda identity, msg: None,
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
        self._last_housekeeping = self._last_worker_check = 0.0
        while not self._stop:
            if not listening and self.token is not None:
                # Peers and workers are read only once the cluster has formed: a peer that
                # heard PEERS first waits in ZeroMQ's bounded queue (RCVHWM), and nothing
                # that arrives before is read, let alone stored, without the token.
                poller.register(self.sockets.router, zmq.POLLIN)
                listening = True
            # Sleep until a message arrives or housekeeping is due: a node server that
            # wakes up needlessly takes a core from the workers.
            ready = dict(poller.poll(self._sleep_ms()))
            with self.snapshots.guard():  # the parts change: no snapshot meanwhile
                self._turn(ready)
            if self.failures.lingered(time.monotonic()):
                self.exit_code = EXIT_FAILED
                return

    def _turn(self, ready):
        """One turn of the loop: the messages of the sockets in `ready`, then what is
        due (intents, a round, the checkpoint phases, housekeeping)."""
        self.view.set_server_idle(SERVER_AWAKE)
        if self.coordinator is not None and self.coordinator.socket in ready:
            self.coordinator.handle_ready()
        if self.outbox.coordinator in ready:
            protocol.drain(self.outbox.coordinator, self._from_coordinator, MAX_BATCH)
        if self.sockets.router in ready:
            self._drain_router()
        if self.coordinator is not None:
            self.coordinator.tick()
        # After the messages: an intent a worker appended before sending one of them
        # (a REFRESH, a barrier) is known to the round that answers it, as when both
        # came over the same socket.
        if self.view.intents_queued():
            self.intake.take_queued()
        self.maybe_start_round()
        self.checkpoints.poll()
        now = time.monotonic()
        if now - self._last_housekeeping >= HOUSEKEEPING_EVERY:
            self._last_housekeeping = now
            self._housekeeping(now)
        if now - self._last_worker_check >= WORKER_CHECK_EVERY:
            self._last_worker_check = now
            if self.failures.failed is None:
                self.local_workers.check_alive(process.alive)

    def maybe_start_round(self):
        """Start a sync round if one is due (and the cluster formed and did not fail)."""
        if self.failures.failed is not None or self.addresses is None:
            return
        try:
            self.rounds.maybe_start()
        except Exception as exc:  # noqa: BLE001 - fail loud, never die silently
            self.failures.internal_error("a sync round", exc)

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

    def _drain_router(self):
        """The router's messages: served by the compiled data plane where it can, the
        others dispatched here, in arrival order (adapm.node.data.plane)."""
        try:  # a failed node answers requests FAILED, and fail points act: in Python
            self.plane.drain(MAX_BATCH, self._from_router, healthy=lambda: (
                self.failures.failed is None and self._raise_in is None))
        except Exception as exc:  # noqa: BLE001 - a write it could not finish fails the node
            self.failures.internal_error("the data plane", exc)

    def _housekeeping(self, now):
        self.activity.maybe_log()
        self.relocation.expire(now)
        self.view.heartbeat()
        self.outbox.to_coordinator(protocol.Heartbeat())
        self.intents.expire(self.view.counters()[:, WORKER_SLOT["clock"]])
        if self.malformed.due():
            self.malformed.flush()
        if self.failures.failed is not None:
            return
        if self.addresses is None:  # not formed yet: nodes start in any order
            self.startup.waiting(now, self.failures.fail)
        elif now - self._coordinator_seen > self.node_timeout:
            self.failures.fail(FAIL_COORDINATOR, 0)
        self.startup.attaching(now, self.local_workers.identities)

    def _snapshot(self):
        return node_snapshot(self.rounds, self.replicas, self.local_workers,
                             self.checkpoints, self.relocation, self.intents)

    # -- dispatch ------------------------------------------------------------------

    def _from_router(self, frames):
        """One message of the router: frames from pyzmq, or bytes from the data plane."""
        identity, body = frames[0], frames[1:]
        identity = identity if isinstance(identity, bytes) else identity.bytes
        try:
            msg = protocol.decode(body)
            check_sender(identity, msg, token=self.token, spec=self.spec, node=self.node,
                         registered=self.local_workers.registered)
        except ProtocolError as exc:
            self._malformed(exc)
            return
        self._count("bytes_received", protocol.frame_size(body))
        if self.failures.failed is not None and msg.type in WORKER_REQUESTS and \
                msg.type not in (MsgType.GOODBYE, MsgType.INTENT, MsgType.WAKE):
            self.failures.reply_failed(identity, msg.request_id)
            return
        try:
            if msg.type is self._raise_in:
                raise failpoints.InjectedFault(f"failpoint raise_in={msg.type.name}")
            self._handlers[msg.type](identity, msg)
        except ProtocolError as exc:
            if msg.type not in WORKER_REQUESTS:
                # A member's message that passed authentication: dropping it could lose
                # keys or updates (a MOVE's sender has already let go of them).
                self.failures.internal_error(describe(msg), exc)
                return
            # A worker's request that fails validation is rejected: counted, and the
            # worker told (it must not wait for an answer).
            self._malformed(f"{describe(msg)}: {exc}")
            self.outbox.to_identity(identity, protocol.Failed(
                request_id=msg.request_id, code=FAIL_REJECTED, detail=self.node,
                text=f"node {self.node}: {exc}"))
        except Exception as exc:  # noqa: BLE001 - an internal error fails the node loudly
            self.failures.internal_error(describe(msg), exc)

    def _malformed(self, reason):
        """A message that failed validation: dropped and counted (rate-limited log)."""
        self._count("malformed_messages", 1)
        self.malformed.dropped(reason)

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
            self.collectives.release(msg.generation)
        elif msg.type == MsgType.SHUTDOWN:
            self._stop = True
            if self.node != 0 and self.failures.failed is None:  # node 0's: read where it runs
                self.outbox.to_coordinator(protocol.NodeStats(stats=node_numbers(self.view)))
            (log.info if self.node == 0 else log.debug)(
                "every worker finished: shutting down (up %.1f s)",
                time.monotonic() - self.startup.started_at)
        elif msg.type == MsgType.HEARTBEAT:
            self.startup.heard(msg.joined)
        elif msg.type == MsgType.NODE_FAILED:
            if not 0 < msg.code < 2**31 or not 0 <= msg.detail < 2**32:
                self._malformed(f"NODE_FAILED with code {msg.code}")
                return
            self.failures.fail(msg.code, msg.detail, msg.text)

    def _count(self, name, n):
        self.view.node_counter_add(NODE_SLOT[name], n)

    # -- control -------------------------------------------------------------------

    def _on_hello(self, identity, msg):
        self.local_workers.on_hello(identity, msg)
        # the last one: say so now
        self.startup.attaching(time.monotonic(), self.local_workers.identities)

    def _on_refresh(self, identity, msg):
        self.ctx.check_keys(msg.keys)
        self.rounds.refresh_soon(identity, msg.request_id, msg.keys)

    def _on_peers(self, msg):
        if self.addresses is not None and len(msg.addresses) == self.spec.num_nodes:
            return  # formed already
        token = self.startup.token_of(msg)
        if token is None:
            return
        for node, address in enumerate(msg.addresses):
            if node != self.node:
                self.outbox.peers[node] = self.sockets.dealer(
                    address, node_identity(self.node, token))
        self.formed(token, msg.addresses)
        self.startup.formed()
        if self.on_ready is not None:
            self.on_ready(self.address)

    def formed(self, token, addresses):
        """The cluster formed: its token and every node's address are known (the peers'
        connections are in the outbox)."""
        self.token = token
        self.outbox.token = token
        self.view.set_cluster_token(token)  # for this node's workers
        if self.plane is not None:
            self.plane.admit(token, self.outbox.peers)
        self.addresses = addresses
        if self.spec.mode == "replicate_all" and self.spec.num_nodes > 1:
            self.rounds.replicate_everything()

    # -- failure -------------------------------------------------------------------

    @property
    def failure(self):
        """Why the cluster failed, as this node knows it ('' while it has not)."""
        return "" if self.failures is None else self.failures.text

    def _answer_failed(self, reply_failed):
        """The cluster failed: every request waiting in a part is answered."""
        self.local_workers.fail_all(reply_failed)
        self.checkpoints.fail_all(reply_failed)
        self.relocation.fail_all(reply_failed)

    # -- shutdown ------------------------------------------------------------------

    def close(self):
        """Close sockets and context, unmap and unlink the table. Idempotent. After a
        normal end, messages already queued get a moment to leave: a multipart message
        cut off by a closing socket can make libzmq abort in the peer (libzmq 3442)."""
        if self.metrics is not None:  # first: no scrape may read the table once unmapped
            self.metrics.stop()
            self.metrics = None
        self.plane = None         # before its socket and table go
        failed = self.failures is not None and self.failures.failed is not None
        linger = 0 if failed else CLOSE_LINGER_MS
        outbox = self.outbox if isinstance(self.outbox, Outbox) else None
        dealers = []
        if outbox is not None:
            dealers = [outbox.coordinator, *outbox.peers.values()]
            outbox.coordinator, outbox.peers = None, {}
        if self.coordinator is not None:
            self.coordinator.close(linger)
            self.coordinator = None
        if self.sockets is not None:
            self.sockets.close(linger, dealers)
            self.sockets = None
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


def serve(spec, node, coordinator, ready, listen=None, metrics_port=None):
    """Entry point of a node server process (adapm.node.process). `ready` is a
    multiprocessing connection on which it reports ("coordinator", address) (node 0),
    then ("ready", address) once the cluster is complete, or ("error", text); node 0, at
    a normal end, ("stats", {node: statistics}) of every node that sent them
    (adapm.table.stats)."""
    process.run(NodeServer, spec, node, coordinator, ready, listen, metrics_port)
