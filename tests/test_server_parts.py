"""Unit tests of the node server's parts, each on its own: real shared-memory tables, no
processes, no sockets. A part sends through a RecordingOutbox (the four methods of
adapm.node.outbox.Outbox) that passes every message through the wire format and records
(destination, decoded message); a test hands recorded messages to another node's part
itself, as the network would, and checks values and key states in the tables."""
import os
import time

import numpy as np
import pytest
import zmq

from adapm.common.config import MODES
from adapm.common.errors import FAIL_BARRIER, FAIL_ROUTING, FAIL_WORKER_DIED, ProtocolError
from adapm.node.context import NodeContext
from adapm.node.control.local_workers import LocalWorkers
from adapm.node.data.holders import ReplicaHolders
from adapm.node.data.relocation import Relocation
from adapm.node.data.replicas import ReplicaCopies
from adapm.node.data.routing import Routes
from adapm.node.data.serving import DataServing
from adapm.node.outbox import Outbox
from adapm.node.server import NodeServer
from adapm.policy.intents import IntentStore
from adapm.policy.ownership import Ownership
from adapm.table.shared_table import ABSENT, NODE_SLOT, OWNED, PENDING, REPLICA, WORKER_SLOT
from adapm.wire import protocol
from adapm.wire.protocol import (
    ALL_POSITIONS,
    HAS_DELTA,
    MOVE_FOR_ROUND,
    REPLY_CURRENT,
    REPLY_VALUE,
    SYNC_KEEP,
    SYNC_REQUEST,
    MsgType,
    node_identity,
    worker_identity,
)
from adapm.wire.spec import ClusterSpec

pytestmark = pytest.mark.timeout(60)

TOKEN = 4242
LENGTH = 2
ADDRESSES = ["tcp://127.0.0.1:9000", "tcp://127.0.0.1:9001", "tcp://127.0.0.1:9002"]


def initial(keys):
    """Key k starts as [10k, 10k + 1]: every value tells which key it came from."""
    base = np.asarray(keys, dtype=np.float64) * 10.0
    return np.stack([base, base + 1.0], axis=1).reshape(-1)


def keys_of(*keys):
    return np.array(keys, dtype=np.uint64)


def floats(values):
    return np.asarray(values, dtype=np.float32).reshape(-1)


# -- the recording outbox and the wire ----------------------------------------------------


def wire(msg):
    """`msg` as its receiver sees it: encoded to frames, then decoded (typed reader)."""
    return protocol.decode([bytes(memoryview(f)) for f in msg.encode()])


class RecordingOutbox:
    """An outbox (the four methods of adapm.node.outbox.Outbox) that records instead of
    sending: (destination, message as decoded from the wire), where destination is
    ("worker", rank), ("identity", routing identity), ("peer", node) or
    ("coordinator", None). It stamps src_node and token like the real one."""

    def __init__(self, node=0, token=TOKEN):
        self.node = node
        self.token = token
        self.sent = []

    def to_worker(self, rank, msg):
        self._record(("worker", rank), msg)

    def to_identity(self, identity, msg):
        self._record(("identity", identity), msg)

    def to_peer(self, node, msg):
        self._record(("peer", node), msg)

    def to_coordinator(self, msg):
        self._record(("coordinator", None), msg)

    def _record(self, destination, msg):
        msg.src_node, msg.token = self.node, self.token
        self.sent.append((destination, wire(msg)))

    def take(self):
        """Everything recorded since the last take."""
        sent, self.sent = self.sent, []
        return sent


def of_type(sent, mtype):
    return [(dest, msg) for dest, msg in sent if msg.type == mtype]


def only(sent, mtype):
    """The one message of `mtype` in `sent`, with its destination."""
    found = of_type(sent, mtype)
    assert len(found) == 1, [(d, m.type.name) for d, m in sent]
    return found[0]


def from_worker(mtype, rank, workers_per_node=1, request_id=1, **fields):
    """A worker's request as it arrives at a node server (through the wire)."""
    msg = protocol.BY_TYPE[mtype](request_id=request_id, **fields)
    msg.src_worker, msg.src_node, msg.token = rank, rank // workers_per_node, TOKEN
    return wire(msg)


def from_peer(node, msg):
    msg.src_node, msg.token = node, TOKEN
    return wire(msg)


# -- nodes ---------------------------------------------------------------------------------


@pytest.fixture
def cluster():
    """make(num_nodes, mode, workers_per_node) -> (spec, [NodeServer]): formed nodes with
    real tables (unique segment names: a random cluster id, under the session's tag),
    whose parts send into a RecordingOutbox each (server.outbox). Tables are unlinked
    and closed afterwards."""
    made = []

    def make(num_nodes=2, mode="adaptive", workers_per_node=1, num_keys=12):
        spec = ClusterSpec(num_keys=num_keys, value_length=LENGTH, num_nodes=num_nodes,
                           workers_per_node=workers_per_node, mode=mode, init=initial)
        servers = []
        for node in range(num_nodes):
            server = NodeServer(spec, node, "tcp://127.0.0.1:1")
            server.create_table()
            made.append(server)
            server.assemble(RecordingOutbox(node))
            server.formed(TOKEN, ADDRESSES[:num_nodes])
            servers.append(server)
        return spec, servers

    yield make
    for server in made:
        server.table.unlink()
        server.table.close()


def context(server):
    """A NodeContext of its own over the server's table (for a part built alone)."""
    return NodeContext(server.spec, server.node, server.table,
                       Ownership(server.node, server.spec.num_nodes, server.spec.num_keys),
                       IntentStore(server.spec.workers_per_node, server.spec.num_keys))


def states(server, keys):
    out = np.empty(len(keys), dtype=np.uint8)
    server.view.states_of(np.asarray(keys, dtype=np.uint64), out)
    return out.tolist()


def owners(server, keys):
    out = np.empty(len(keys), dtype=np.uint16)
    server.view.owners_of(np.asarray(keys, dtype=np.uint64), out)
    return out.tolist()


def read(server, keys):
    """The node's values of keys it holds (as a worker of the node reads them)."""
    keys = np.asarray(keys, dtype=np.uint64)
    out = np.empty(server.view.total_length(keys), dtype=server.view.dtype)
    misses = np.empty(keys.shape[0], dtype=np.uint64)
    assert server.view.pull(keys, out, misses) == 0, "a key is not held here"
    return out


def write(server, keys, values, additive=True):
    """A worker of the node writes keys it holds (owned or replica), in shared memory."""
    keys = np.asarray(keys, dtype=np.uint64)
    misses = np.empty(keys.shape[0], dtype=np.uint64)
    assert server.view.update(keys, floats(values), misses, additive, False) == 0


def node_counter(server, name):
    return server.view.node_counter_get(NODE_SLOT[name])


class GateStub:
    """set_gate of DataServing: defers the sets it is told to."""

    def __init__(self, defer):
        self.defer = defer
        self.deferred = []

    def defer_set(self, identity, msg, keys):
        if self.defer:
            self.deferred.append((identity, msg, keys.copy()))
        return self.defer


def serving_alone(server, gate):
    """A DataServing part of its own over the server's table, with `gate`."""
    ctx = context(server)
    outbox = RecordingOutbox(server.node)
    routes = Routes(ctx, outbox)
    return DataServing(ctx, outbox, routes, ReplicaCopies(ctx), gate), outbox


# == DataServing ===========================================================================


def test_pull_of_keys_owned_here_is_answered_with_all_values(cluster):
    _, (node0, _node1) = cluster(2)
    serving, outbox = serving_alone(node0, GateStub(False))
    serving.on_pull(worker_identity(1), from_worker(MsgType.PULL, 1, request_id=7,
                                                    keys=keys_of(4, 0, 2)))
    sent = outbox.take()
    assert len(sent) == 1
    dest, reply = sent[0]
    assert dest == ("worker", 1)          # straight to the requester, of any node
    assert reply.type == MsgType.PULL_REPLY and reply.request_id == 7
    assert reply.flags & ALL_POSITIONS and reply.positions.shape[0] == 0
    assert reply.src_node == 0 and reply.token == TOKEN
    np.testing.assert_array_equal(np.frombuffer(reply.values, np.float32), initial([4, 0, 2]))


def test_pull_of_owned_and_remote_keys_replies_in_part_and_forwards_the_rest(cluster):
    """Node 0 of 3 owns 0, 3, 6, 9; its location cache says key 4 (home 1) is at node 2.
    The owned part is answered with its positions; the rest goes, with its positions and
    the requester, to the cached owners, which answer the worker directly."""
    _, nodes = cluster(3)
    node0 = nodes[0]
    node0.table.set_owners(keys_of(4), 2)
    # key 4 moved from node 1 to node 2 (node 0's cache knows)
    nodes[1].relocation.evict_and_move(keys_of(4), 2, 0, 0)
    nodes[2].relocation.on_move(node_identity(1),
                                only(nodes[1].outbox.take(), MsgType.MOVE)[1])
    assert states(nodes[2], [4]) == [OWNED]
    serving, outbox = serving_alone(node0, GateStub(False))
    request = from_worker(MsgType.PULL, 0, request_id=9, keys=keys_of(1, 3, 4, 0, 2))
    serving.on_pull(worker_identity(0), request)
    sent = outbox.take()
    dest, part = only(sent, MsgType.PULL_REPLY)
    assert dest == ("worker", 0) and part.request_id == 9
    assert not part.flags & ALL_POSITIONS
    assert part.positions.tolist() == [1, 3]
    np.testing.assert_array_equal(np.frombuffer(part.values, np.float32), initial([3, 0]))
    forwards = {dest[1]: msg for dest, msg in of_type(sent, MsgType.FWD_PULL)}
    assert len(sent) == 3 and sorted(forwards) == [1, 2]
    assert forwards[1].keys.tolist() == [1] and forwards[1].positions.tolist() == [0]
    assert forwards[2].keys.tolist() == [4, 2] and forwards[2].positions.tolist() == [2, 4]
    for fwd in forwards.values():
        assert fwd.requester == 0 and fwd.request_id == 9 and fwd.hops == 1
    # The owners answer the worker straight away, with the positions they were given.
    got = np.zeros((5, LENGTH), dtype=np.float32)
    got[[1, 3]] = np.frombuffer(part.values, np.float32).reshape(-1, LENGTH)
    for node, fwd in forwards.items():
        nodes[node].serving.on_fwd_pull(node_identity(0), fwd)
        dest, reply = only(nodes[node].outbox.take(), MsgType.PULL_REPLY)
        assert dest == ("worker", 0) and reply.request_id == 9
        got[reply.positions] = np.frombuffer(reply.values, np.float32).reshape(-1, LENGTH)
    np.testing.assert_array_equal(got.reshape(-1), initial([1, 3, 4, 0, 2]))


def test_push_is_applied_additively_acknowledged_and_the_rest_forwarded(cluster):
    _, (node0, node1) = cluster(2)
    serving, outbox = serving_alone(node0, GateStub(False))
    keys = keys_of(0, 1, 2)
    delta = floats([1, 2, 3, 4, 5, 6])
    for round_trip in (1, 2):
        serving.on_push(worker_identity(1), from_worker(
            MsgType.PUSH, 1, request_id=round_trip, keys=keys, values=delta))
        sent = outbox.take()
        dest, ack = only(sent, MsgType.UPDATE_ACK)
        assert dest == ("worker", 1) and ack.request_id == round_trip
        assert ack.applied == 2                # keys 0 and 2 are owned here
        dest, fwd = only(sent, MsgType.FWD_PUSH)
        assert dest == ("peer", 1) and fwd.keys.tolist() == [1] and fwd.requester == 1
        np.testing.assert_array_equal(np.frombuffer(fwd.values, np.float32), [3, 4])
        np.testing.assert_array_equal(read(node0, [0, 2]),
                                      initial([0, 2]) + round_trip * floats([1, 2, 5, 6]))
        node1.serving.on_fwd_push(node_identity(0), fwd)
        dest, ack = only(node1.outbox.take(), MsgType.UPDATE_ACK)
        assert dest == ("worker", 1) and ack.applied == 1 and ack.request_id == round_trip
    np.testing.assert_array_equal(read(node1, [1]), initial([1]) + 2 * floats([3, 4]))


def test_set_overwrites_owned_keys_and_forwards_the_rest(cluster):
    _, (node0, node1) = cluster(2)
    serving, outbox = serving_alone(node0, GateStub(False))
    serving.on_set(worker_identity(1), from_worker(
        MsgType.SET, 1, request_id=3, keys=keys_of(2, 3), values=floats([7, 8, 9, 9])))
    sent = outbox.take()
    assert only(sent, MsgType.UPDATE_ACK)[1].applied == 1
    dest, fwd = only(sent, MsgType.FWD_SET)
    assert dest == ("peer", 1) and fwd.keys.tolist() == [3] and fwd.requester == 1
    np.testing.assert_array_equal(read(node0, [2]), [7, 8])
    node1.serving.on_fwd_set(node_identity(0), fwd)
    assert only(node1.outbox.take(), MsgType.UPDATE_ACK)[1].applied == 1
    np.testing.assert_array_equal(read(node1, [3]), [9, 9])


def test_a_set_the_gate_defers_is_not_applied_until_handed_back(cluster):
    _, (node0, _node1) = cluster(2)
    gate = GateStub(True)
    serving, outbox = serving_alone(node0, gate)
    request = from_worker(MsgType.SET, 0, keys=keys_of(2), values=floats([5, 5]))
    serving.on_set(worker_identity(0), request)
    assert outbox.take() == [] and len(gate.deferred) == 1
    np.testing.assert_array_equal(read(node0, [2]), initial([2]))
    # a remote worker's set never waits for this node's rounds
    serving.on_set(worker_identity(1), from_worker(MsgType.SET, 1, keys=keys_of(4),
                                                   values=floats([6, 6])))
    assert len(gate.deferred) == 1
    np.testing.assert_array_equal(read(node0, [4]), [6, 6])
    gate.defer = False
    identity, msg, _ = gate.deferred[0]
    serving.on_set(identity, msg)
    outbox.take()
    np.testing.assert_array_equal(read(node0, [2]), [5, 5])


def test_a_local_set_waits_for_the_round_that_carries_its_keys_delta(cluster):
    """Node 0 replicates key 1 (owned by node 1), its worker pushes +5 into the replica,
    and a round takes that delta to the owner. A set of key 1 by the same worker meanwhile
    is deferred (the round's set_gate) and goes on only once the round completed, so the
    owner applies push, then set: 7, not 12."""
    _, (here, owner) = cluster(2, mode="replicate_only")
    k = keys_of(1)
    make_replica(here, owner, k)
    write(here, k, [5, 5])
    here.rounds.refreshed_at = 0             # a full round: it syncs every replica
    here.rounds.start()
    _, sync = only(here.outbox.take(), MsgType.SYNC)
    assert here.rounds.round_deltas.tolist() == [1]
    here.serving.on_set(worker_identity(0), from_worker(MsgType.SET, 0, request_id=11,
                                                        keys=k, values=floats([7, 7])))
    assert here.outbox.take() == []          # deferred: nothing applied or forwarded
    assert len(here.rounds.deferred_sets) == 1
    # a set of a key whose delta is not in the round is not deferred
    here.serving.on_set(worker_identity(0), from_worker(MsgType.SET, 0, request_id=12,
                                                        keys=keys_of(0), values=floats([1, 1])))
    assert only(here.outbox.take(), MsgType.UPDATE_ACK)[1].request_id == 12
    owner.rounds.on_sync(node_identity(0), sync)
    np.testing.assert_array_equal(read(owner, k), initial([1]) + 5)
    _, reply = only(owner.outbox.take(), MsgType.SYNC_REPLY)
    here.rounds.on_sync_reply(node_identity(1), reply)
    assert not here.rounds.in_flight and here.rounds.deferred_sets == []
    dest, fwd = only(here.outbox.take(), MsgType.FWD_SET)   # the set goes on now
    assert dest == ("peer", 1) and fwd.request_id == 11 and fwd.requester == 0
    np.testing.assert_array_equal(read(here, k), [7, 7])   # the replica took the set
    owner.serving.on_fwd_set(node_identity(0), fwd)
    dest, ack = only(owner.outbox.take(), MsgType.UPDATE_ACK)
    assert dest == ("worker", 0) and ack.request_id == 11
    np.testing.assert_array_equal(read(owner, k), [7, 7])


@pytest.mark.parametrize("mtype", [MsgType.PULL, MsgType.PUSH, MsgType.SET,
                                   MsgType.FWD_PULL, MsgType.FWD_PUSH, MsgType.FWD_SET])
def test_keys_out_of_range_raise_protocol_error(cluster, mtype):
    _, (node0, _node1) = cluster(2)
    serving, outbox = serving_alone(node0, GateStub(False))
    keys = keys_of(0, 12)                    # 12 keys: 12 is out of range
    fields = {"keys": keys}
    if mtype in (MsgType.PUSH, MsgType.SET, MsgType.FWD_PUSH, MsgType.FWD_SET):
        fields["values"] = floats([1, 1, 1, 1])
    if mtype == MsgType.FWD_PULL:
        fields["positions"] = np.arange(2, dtype=np.uint32)
    if mtype in (MsgType.FWD_PULL, MsgType.FWD_PUSH, MsgType.FWD_SET):
        msg = from_peer(1, protocol.BY_TYPE[mtype](requester=1, **fields))
    else:
        msg = from_worker(mtype, 1, **fields)
    handler = {MsgType.PULL: serving.on_pull, MsgType.PUSH: serving.on_push,
               MsgType.SET: serving.on_set, MsgType.FWD_PULL: serving.on_fwd_pull,
               MsgType.FWD_PUSH: serving.on_fwd_push, MsgType.FWD_SET: serving.on_fwd_set}
    with pytest.raises(ProtocolError, match="out of range"):
        handler[mtype](worker_identity(1), msg)
    assert outbox.take() == []
    np.testing.assert_array_equal(read(node0, [0]), initial([0]))


def test_a_push_with_values_of_the_wrong_size_raises_protocol_error(cluster):
    _, (node0, _node1) = cluster(2)
    serving, outbox = serving_alone(node0, GateStub(False))
    with pytest.raises(ProtocolError, match="values"):
        serving.on_push(worker_identity(1), from_worker(MsgType.PUSH, 1, keys=keys_of(0, 2),
                                                        values=floats([1, 2, 3])))
    assert outbox.take() == []
    np.testing.assert_array_equal(read(node0, [0, 2]), initial([0, 2]))


# == Relocation ============================================================================


def test_localize_moves_keys_here_and_tells_their_homes(cluster):
    """Node 2 of 3 localizes keys 3 (home 0), 1 (home 1) and 5 (its own). Each owner gets
    a MOVE_REQUEST and answers with a MOVE; node 2 installs the keys as OWNED with their
    values, tells their homes (OWNER_UPDATE) and answers LOCALIZED once both arrived.
    Then node 0 takes key 3 back: its home is node 0 itself, so no OWNER_UPDATE goes out."""
    _, nodes = cluster(3)
    node0, node1, node2 = nodes
    identity = worker_identity(2)
    node2.relocation.on_localize(identity, from_worker(MsgType.LOCALIZE, 2, request_id=31,
                                                       keys=keys_of(3, 1, 5)))
    sent = node2.outbox.take()
    requests = {dest[1]: msg for dest, msg in of_type(sent, MsgType.MOVE_REQUEST)}
    assert len(sent) == 2 and sorted(requests) == [0, 1]
    assert requests[0].keys.tolist() == [3] and requests[1].keys.tolist() == [1]
    assert all(r.target == 2 for r in requests.values())
    assert requests[0].request_id == requests[1].request_id
    assert node2.replicas.moving_in.keys().tolist() == [1, 3]
    moves = {}
    for node in (0, 1):
        nodes[node].relocation.on_move_request(node_identity(2), requests[node])
        dest, moves[node] = only(nodes[node].outbox.take(), MsgType.MOVE)
        assert dest == ("peer", 2)
    assert states(node0, [3]) == [ABSENT] and owners(node0, [3]) == [2]
    node2.relocation.on_move(node_identity(0), moves[0])
    sent = node2.outbox.take()
    dest, update = only(sent, MsgType.OWNER_UPDATE)
    assert dest == ("peer", 0) and update.keys.tolist() == [3] and update.owner == 2
    assert update.counters.tolist() == [1]
    assert of_type(sent, MsgType.LOCALIZED) == []       # key 1 is still on its way
    node2.relocation.on_move(node_identity(1), moves[1])
    sent = node2.outbox.take()
    dest, update = only(sent, MsgType.OWNER_UPDATE)
    assert dest == ("peer", 1) and update.keys.tolist() == [1]
    dest, done = only(sent, MsgType.LOCALIZED)
    assert dest == ("identity", identity) and done.request_id == 31
    assert states(node2, [1, 3, 5]) == [OWNED, OWNED, OWNED]
    np.testing.assert_array_equal(read(node2, [1, 3, 5]), initial([1, 3, 5]))
    assert not node2.replicas.moving_in
    assert node_counter(node2, "relocations") == 2
    # the home records the new owner (newer counter only)
    node0.relocation.on_owner_update(node_identity(2), from_peer(2, protocol.OwnerUpdate(
        owner=2, keys=keys_of(3), counters=np.array([1], np.uint32))))
    assert node0.ownership.home_owner[1] == 2 and node0.ownership.home_counter[1] == 1
    # node 0 takes key 3 back
    node0.relocation.on_localize(worker_identity(0), from_worker(
        MsgType.LOCALIZE, 0, request_id=32, keys=keys_of(3)))
    dest, request = only(node0.outbox.take(), MsgType.MOVE_REQUEST)
    assert dest == ("peer", 2)
    node2.relocation.on_move_request(node_identity(0), request)
    _, move = only(node2.outbox.take(), MsgType.MOVE)
    assert move.counters.tolist() == [2]
    node0.relocation.on_move(node_identity(2), move)
    sent = node0.outbox.take()
    assert of_type(sent, MsgType.OWNER_UPDATE) == []     # its home is here
    assert only(sent, MsgType.LOCALIZED)[1].request_id == 32
    assert node0.ownership.home_owner[1] == 0 and node0.ownership.home_counter[1] == 2
    assert states(node0, [3]) == [OWNED] and states(node2, [3]) == [ABSENT]
    np.testing.assert_array_equal(read(node0, [3]), initial([3]))


def test_localize_of_keys_owned_here_is_answered_at_once(cluster):
    _, (node0, _node1) = cluster(2)
    node0.relocation.on_localize(worker_identity(0), from_worker(
        MsgType.LOCALIZE, 0, request_id=5, keys=keys_of(2, 0, 2)))
    dest, done = only(node0.outbox.take(), MsgType.LOCALIZED)
    assert dest == ("identity", worker_identity(0)) and done.request_id == 5
    assert done.owned == 2


def test_localized_after_moves_says_how_many_keys_are_owned_now(cluster):
    _, (node0, node1) = cluster(2)
    node0.relocation.on_localize(worker_identity(0), from_worker(
        MsgType.LOCALIZE, 0, request_id=5, keys=keys_of(1, 3)))
    _, request = only(node0.outbox.take(), MsgType.MOVE_REQUEST)
    node1.relocation.on_move_request(node_identity(0), request)
    node0.relocation.on_move(node_identity(1), only(node1.outbox.take(), MsgType.MOVE)[1])
    _, done = only(node0.outbox.take(), MsgType.LOCALIZED)
    assert done.owned == 2


def test_localize_is_refused_in_a_mode_that_does_not_relocate(cluster):
    _, (node0, _node1) = cluster(2, mode="replicate_only")
    with pytest.raises(ProtocolError, match="localize"):
        node0.relocation.on_localize(worker_identity(0), from_worker(
            MsgType.LOCALIZE, 0, keys=keys_of(1)))
    assert node0.outbox.take() == [] and states(node0, [1]) == [ABSENT]


def test_move_request_for_keys_owned_here_sends_them_with_counters_plus_one(cluster):
    """Node 0 of 3 gets node 2's request for keys 0, 6 (owned here) and 1 (owned by node
    1): 0 and 6 leave in one MOVE (values, counters + 1, versions), are ABSENT here with
    node 2 cached as owner; the request for 1 is passed on to node 1."""
    _, nodes = cluster(3)
    node0 = nodes[0]
    node0.ownership.counter[6] = 5                 # it changed owner 5 times before
    write(node0, keys_of(6), [1, 1])               # version 1
    versions = np.empty(2, np.uint32)
    node0.view.versions_of(keys_of(0, 6), versions)
    node0.relocation.on_move_request(node_identity(2), from_peer(2, protocol.MoveRequest(
        request_id=44, target=2, keys=keys_of(0, 6, 1))))
    sent = node0.outbox.take()
    assert len(sent) == 2
    dest, move = only(sent, MsgType.MOVE)
    assert dest == ("peer", 2) and move.request_id == 44 and move.purpose == 0
    assert move.keys.tolist() == [0, 6] and move.counters.tolist() == [1, 6]
    assert move.versions.tolist() == versions.tolist()
    np.testing.assert_array_equal(np.frombuffer(move.values, np.float32),
                                  initial([0, 6]) + floats([0, 0, 1, 1]))
    assert states(node0, [0, 6]) == [ABSENT, ABSENT] and owners(node0, [0, 6]) == [2, 2]
    assert node0.ctx.not_owned(keys_of(0, 6)).all()
    dest, passed = only(sent, MsgType.MOVE_REQUEST)
    assert dest == ("peer", 1) and passed.keys.tolist() == [1]
    assert passed.target == 2 and passed.request_id == 44 and passed.hops == 1
    # the new owner installs them with those counters
    nodes[2].relocation.on_move(node_identity(0), move)
    assert nodes[2].ownership.counter[[0, 6]].tolist() == [1, 6]
    np.testing.assert_array_equal(read(nodes[2], [0, 6]), initial([0, 6]) + floats([0, 0, 1, 1]))


def move_message(keys, counters=None):
    keys = np.asarray(keys, dtype=np.uint64)
    n = keys.shape[0]
    return from_peer(1, protocol.Move(
        request_id=1, keys=keys, values=floats(np.ones(n * LENGTH)),
        counters=np.ones(n, np.uint32) if counters is None else counters,
        versions=np.zeros(n, np.uint32)))


@pytest.mark.parametrize("keys, error", [([1, 3, 1], "twice"), ([1, 2], "owns already")])
def test_a_move_naming_a_key_twice_or_keys_owned_already_raises(cluster, keys, error):
    _, (node0, _node1) = cluster(2)
    before = states(node0, [1, 2, 3])
    with pytest.raises(ProtocolError, match=error):
        node0.relocation.on_move(node_identity(1), move_message(keys))
    assert states(node0, [1, 2, 3]) == before
    np.testing.assert_array_equal(read(node0, [2]), initial([2]))
    assert node0.outbox.take() == []


class RoundsClockStub:
    """The rounds part as Relocation sees it."""

    def __init__(self):
        self.round = 0
        self.answered = 0
        self.progressed = []

    def answer_waiters(self):
        self.answered += 1

    def progress(self, n, round_id=None):
        self.progressed.append((n, round_id))


def relocation_alone(server, timeout):
    ctx = context(server)
    outbox = RecordingOutbox(server.node)
    clock = RoundsClockStub()
    relocation = Relocation(ctx, outbox, Routes(ctx, outbox), ReplicaCopies(ctx),
                            ReplicaHolders(ctx.num_keys, ctx.num_nodes), clock, timeout)
    return relocation, outbox, clock


def test_a_localize_that_never_completes_fails_after_the_timeout(cluster):
    _, (node0, _node1) = cluster(2)
    relocation, outbox, clock = relocation_alone(node0, timeout=5.0)
    identity = worker_identity(0)
    relocation.on_localize(identity, from_worker(MsgType.LOCALIZE, 0, request_id=21,
                                                 keys=keys_of(1, 3)))
    assert only(outbox.take(), MsgType.MOVE_REQUEST)[0] == ("peer", 1)
    assert relocation.replicas.moving_in.keys().tolist() == [1, 3]
    relocation.expire(time.monotonic() + 1.0)      # not yet
    assert outbox.take() == []
    relocation.expire(time.monotonic() + 6.0)
    dest, failed = only(outbox.take(), MsgType.FAILED)
    assert dest == ("identity", identity) and failed.request_id == 21
    assert failed.code == FAIL_ROUTING
    assert not relocation.replicas.moving_in       # waits on rounds no longer hold back
    assert clock.answered == 1
    relocation.expire(time.monotonic() + 60.0)     # answered once
    assert outbox.take() == []


def test_fail_all_answers_waiting_localizes(cluster):
    _, (node0, _node1) = cluster(2, workers_per_node=2)
    relocation, outbox, _ = relocation_alone(node0, timeout=60.0)
    for rank, request_id, key in ((0, 5, 1), (1, 6, 3)):
        relocation.on_localize(worker_identity(rank), from_worker(
            MsgType.LOCALIZE, rank, workers_per_node=2, request_id=request_id,
            keys=keys_of(key)))
    outbox.take()
    failed = []
    relocation.fail_all(lambda identity, request_id: failed.append((identity, request_id)))
    assert sorted(failed) == [(worker_identity(0), 5), (worker_identity(1), 6)]
    relocation.expire(time.monotonic() + 3600.0)  # nothing left to fail
    relocation.fail_all(lambda *args: failed.append(args))
    assert len(failed) == 2 and outbox.take() == []


# == Rounds ================================================================================


def make_replica(here, owner, keys):
    """One round in which `here` asks `owner` for `keys` (an intent of here's worker 0)
    and gets replicas (the owner must answer by replicating)."""
    here.intents.add(0, keys, 0, 1000)
    here.rounds.start()
    _, sync = only(here.outbox.take(), MsgType.SYNC)
    owner.rounds.on_sync(node_identity(here.node), sync)
    _, reply = only(owner.outbox.take(), MsgType.SYNC_REPLY)
    here.rounds.on_sync_reply(node_identity(owner.node), reply)
    assert set(states(here, keys)) == {REPLICA}


def test_start_makes_due_keys_pending_and_asks_their_owner(cluster):
    _, (here, _owner) = cluster(2)
    here.intents.add(0, keys_of(1, 3, 0), 0, 10)   # key 0 is owned here already
    here.rounds.start()
    assert states(here, [1, 3, 0]) == [PENDING, PENDING, OWNED]
    dest, sync = only(here.outbox.take(), MsgType.SYNC)
    assert dest == ("peer", 1)
    assert sync.keys.tolist() == [1, 3] and sync.holder == 0 and sync.round == 1
    assert sync.counters.tolist() == [SYNC_REQUEST, SYNC_REQUEST]
    assert here.rounds.in_flight and here.rounds.round_left == 2
    assert node_counter(here, "rounds_started") == 1


@pytest.mark.parametrize("owner_intends", [True, False])
def test_the_owner_replicates_or_relocates_as_the_manager_decides(cluster, owner_intends):
    """adaptive: the owner keeps keys its own workers intend (a replica goes to the asking
    node, with the values), and relocates keys nobody else intends (a MOVE)."""
    _, (here, owner) = cluster(2, mode="adaptive")
    keys = keys_of(1, 3)
    if owner_intends:
        owner.intents.add(0, keys, 0, 10)
    here.intents.add(0, keys, 0, 10)
    here.rounds.start()
    _, sync = only(here.outbox.take(), MsgType.SYNC)
    owner.rounds.on_sync(node_identity(0), sync)
    sent = owner.outbox.take()
    if owner_intends:
        dest, reply = only(sent, MsgType.SYNC_REPLY)
        assert dest == ("peer", 0) and reply.round == 1 and len(sent) == 1
        assert reply.counters.tolist() == [REPLY_VALUE, REPLY_VALUE]
        np.testing.assert_array_equal(np.frombuffer(reply.values, np.float32),
                                      initial([1, 3]))
        assert states(owner, keys) == [OWNED, OWNED]
        assert owner.rounds.holders.others(keys, 1).all()   # node 0 holds replicas now
        assert node_counter(owner, "replicas_made") == 2
        here.rounds.on_sync_reply(node_identity(1), reply)
        assert states(here, keys) == [REPLICA, REPLICA]
    else:
        dest, move = only(sent, MsgType.MOVE)
        assert dest == ("peer", 0) and len(sent) == 1
        assert move.purpose == MOVE_FOR_ROUND and move.request_id == 1
        assert move.keys.tolist() == [1, 3]
        assert states(owner, keys) == [ABSENT, ABSENT] and owners(owner, keys) == [0, 0]
        here.relocation.on_move(node_identity(1), move)
        dest, update = only(here.outbox.take(), MsgType.OWNER_UPDATE)
        assert dest == ("peer", 1) and update.owner == 0
        assert states(here, keys) == [OWNED, OWNED]
    np.testing.assert_array_equal(read(here, keys), initial([1, 3]))
    assert here.rounds.round_done == 1 and not here.rounds.in_flight


def test_sync_reply_makes_pending_keys_replicas_and_completes_the_round(cluster):
    _, (here, owner) = cluster(2, mode="replicate_only")
    keys = keys_of(1, 5)
    here.intents.add(0, keys, 0, 10)
    here.rounds.start()
    assert states(here, keys) == [PENDING, PENDING]
    _, sync = only(here.outbox.take(), MsgType.SYNC)
    owner.rounds.on_sync(node_identity(0), sync)
    _, reply = only(owner.outbox.take(), MsgType.SYNC_REPLY)
    assert here.rounds.round_done == 0
    here.rounds.on_sync_reply(node_identity(1), reply)
    assert states(here, keys) == [REPLICA, REPLICA]
    np.testing.assert_array_equal(read(here, keys), initial([1, 5]))
    assert here.rounds.round_done == 1 and node_counter(here, "rounds_done") == 1
    assert here.replicas.to_sync().tolist() == [1, 5]


def test_wait_sync_is_answered_only_after_a_round_that_started_later(cluster):
    _, (here, owner) = cluster(2, mode="replicate_only")
    identity = worker_identity(0)
    here.intents.add(0, keys_of(1), 0, 10)
    here.rounds.start()                            # round 1 in flight
    _, sync = only(here.outbox.take(), MsgType.SYNC)
    here.rounds.wait_for_round(identity, 77)       # needs round 2
    owner.rounds.on_sync(node_identity(0), sync)
    here.rounds.on_sync_reply(node_identity(1), only(owner.outbox.take(),
                                                     MsgType.SYNC_REPLY)[1])
    assert here.rounds.round_done == 1
    assert of_type(here.outbox.take(), MsgType.SYNCED) == []
    here.rounds.start()                            # round 2: syncs the replica
    _, sync = only(here.outbox.take(), MsgType.SYNC)
    assert sync.round == 2 and sync.counters.tolist() == [SYNC_KEEP]
    owner.rounds.on_sync(node_identity(0), sync)
    assert here.rounds.in_flight
    here.rounds.on_sync_reply(node_identity(1), only(owner.outbox.take(),
                                                     MsgType.SYNC_REPLY)[1])
    dest, synced = only(here.outbox.take(), MsgType.SYNCED)
    assert dest == ("identity", identity) and synced.request_id == 77


@pytest.mark.parametrize("owner_wrote", [False, True])
def test_a_replicas_delta_goes_with_has_delta_and_is_added_at_the_owner(cluster, owner_wrote):
    """The replica's delta travels flagged HAS_DELTA and the owner adds it. A replica
    that is behind then (the owner's worker wrote too) gets the owner's value back; one
    that is not gets REPLY_CURRENT and no value."""
    _, (here, owner) = cluster(2, mode="replicate_only")
    k = keys_of(1)
    make_replica(here, owner, k)
    write(here, k, [1, 2])
    if owner_wrote:
        write(owner, k, [100, 100])
    here.rounds.refreshed_at = 0
    here.rounds.start()
    dest, sync = only(here.outbox.take(), MsgType.SYNC)
    assert dest == ("peer", 1)
    assert sync.counters.tolist() == [SYNC_KEEP | HAS_DELTA]
    np.testing.assert_array_equal(np.frombuffer(sync.values, np.float32), [1, 2])
    owner.rounds.on_sync(node_identity(0), sync)
    expected = initial([1]) + floats([1, 2]) + (100 if owner_wrote else 0)
    np.testing.assert_array_equal(read(owner, k), expected)
    _, reply = only(owner.outbox.take(), MsgType.SYNC_REPLY)
    if owner_wrote:
        assert reply.counters.tolist() == [REPLY_VALUE]
        np.testing.assert_array_equal(np.frombuffer(reply.values, np.float32), expected)
    else:
        assert reply.counters.tolist() == [REPLY_CURRENT]
        assert len(reply.values) == 0
    here.rounds.on_sync_reply(node_identity(1), reply)
    np.testing.assert_array_equal(read(here, k), expected)
    # the delta was sent once: the next round carries none
    here.rounds.refreshed_at = 0
    here.rounds.start()
    _, sync = only(here.outbox.take(), MsgType.SYNC)
    assert sync.counters.tolist() == [SYNC_KEEP]
    owner.rounds.on_sync(node_identity(0), sync)
    np.testing.assert_array_equal(read(owner, k), expected)


def test_sync_for_keys_out_of_range_or_with_unknown_flags_raises(cluster):
    _, (_here, owner) = cluster(2)
    for counters, keys, error in (([SYNC_KEEP], keys_of(12), "out of range"),
                                  ([8], keys_of(1), "flag")):
        msg = from_peer(0, protocol.Sync(round=1, holder=0, keys=keys,
                                         values=np.empty(0, np.float32),
                                         counters=np.array(counters, np.uint32),
                                         versions=np.zeros(1, np.uint32)))
        with pytest.raises(ProtocolError, match=error):
            owner.rounds.on_sync(node_identity(0), msg)
    assert owner.outbox.take() == []


# == LocalWorkers ==========================================================================


class LocalWorkersHarness:
    """LocalWorkers of node 1 (2 workers: ranks 2 and 3) built alone, its callables
    recorded."""

    def __init__(self, server):
        self.ctx = context(server)
        self.outbox = RecordingOutbox(server.node)
        self.failures = []
        self.part = LocalWorkers(self.ctx, self.outbox,
                                 lambda code, detail: self.failures.append((code, detail)),
                                 lambda: list(ADDRESSES[:2]))

    def say(self, mtype, rank, request_id=1, **fields):
        handler = {MsgType.HELLO: self.part.on_hello, MsgType.BARRIER: self.part.on_barrier,
                   MsgType.GOODBYE: self.part.on_goodbye}[mtype]
        handler(worker_identity(rank), from_worker(mtype, rank, workers_per_node=2,
                                                   request_id=request_id, **fields))

    def hello_all(self):
        for rank in (2, 3):
            self.say(MsgType.HELLO, rank)
        self.outbox.take()


@pytest.fixture
def workers(cluster):
    _, (_node0, node1) = cluster(2, mode="relocate_only", workers_per_node=2)
    return LocalWorkersHarness(node1)


def test_hello_registers_the_worker_and_answers_welcome(workers):
    segment = "/dev/shm" + workers.ctx.table.name
    workers.say(MsgType.HELLO, 2, request_id=8)
    dest, welcome = only(workers.outbox.take(), MsgType.WELCOME)
    assert dest == ("identity", worker_identity(2)) and welcome.request_id == 8
    assert welcome.mode == MODES.index("relocate_only")
    assert welcome.addresses == ADDRESSES[:2]
    assert workers.part.registered(2, worker_identity(2))
    assert not workers.part.registered(3, worker_identity(3))
    assert not workers.part.registered(2, worker_identity(3))
    assert os.path.exists(segment)                 # worker 3 has not mapped it yet
    workers.say(MsgType.HELLO, 3)
    assert workers.part.registered(3, worker_identity(3))
    assert not os.path.exists(segment)             # every worker mapped it: unlinked


def test_a_barrier_of_all_local_workers_goes_to_the_coordinator_and_is_released(workers):
    workers.hello_all()
    workers.say(MsgType.BARRIER, 2, request_id=10, generation=1)
    assert workers.outbox.take() == []
    workers.say(MsgType.BARRIER, 3, request_id=11, generation=1)
    dest, node_barrier = only(workers.outbox.take(), MsgType.NODE_BARRIER)
    assert dest == ("coordinator", None) and node_barrier.generation == 1
    workers.part.release_now(1)
    releases = {dest[1]: msg.request_id for dest, msg in
                of_type(workers.outbox.take(), MsgType.RELEASE)}
    assert releases == {worker_identity(2): 10, worker_identity(3): 11}
    workers.part.release_now(1)                    # released once
    assert workers.outbox.take() == [] and workers.failures == []


def test_a_goodbye_while_others_wait_in_a_barrier_fails_the_barrier(workers):
    workers.hello_all()
    workers.say(MsgType.BARRIER, 2, request_id=10, generation=1)
    workers.say(MsgType.GOODBYE, 3)
    assert workers.failures == [(FAIL_BARRIER, 3)]
    assert of_type(workers.outbox.take(), MsgType.NODE_BARRIER) == []
    failed = []
    workers.part.fail_all(lambda identity, request_id: failed.append((identity, request_id)))
    assert failed == [(worker_identity(2), 10)]


def test_a_barrier_after_a_goodbye_fails(workers):
    workers.hello_all()
    workers.say(MsgType.GOODBYE, 2)
    workers.say(MsgType.BARRIER, 3, request_id=10, generation=1)
    assert workers.failures == [(FAIL_BARRIER, 2)]
    assert of_type(workers.outbox.take(), MsgType.NODE_BARRIER) == []


def test_all_goodbyes_send_node_done_once(workers):
    workers.hello_all()
    workers.say(MsgType.GOODBYE, 2)
    assert workers.outbox.take() == []
    workers.say(MsgType.GOODBYE, 3)
    dest, _ = only(workers.outbox.take(), MsgType.NODE_DONE)
    assert dest == ("coordinator", None)
    workers.say(MsgType.GOODBYE, 3)
    assert workers.outbox.take() == [] and workers.failures == []


def test_check_alive_reports_a_dead_worker(workers):
    workers.hello_all()
    view = workers.ctx.view
    view.counter_set(0, WORKER_SLOT["pid"], 1111)
    view.counter_set(1, WORKER_SLOT["pid"], 2222)
    asked = []

    def alive(pid):
        asked.append(pid)
        return pid != 2222

    workers.part.check_alive(alive)
    assert workers.failures == [(FAIL_WORKER_DIED, 3)]
    assert 1111 in asked
    # a worker that said goodbye may be gone
    workers.failures.clear()
    workers.say(MsgType.GOODBYE, 3)
    workers.part.check_alive(alive)
    assert workers.failures == []


def test_check_alive_skips_workers_without_a_pid(workers):
    workers.hello_all()
    workers.part.check_alive(lambda pid: False)
    assert workers.failures == []


# == Outbox ================================================================================


class FakeSocket:
    def __init__(self, fail=False):
        self.frames = []
        self.fail = fail

    def send_multipart(self, frames, copy=True):
        if self.fail:
            raise zmq.ZMQError(zmq.EHOSTUNREACH)
        self.frames.append([bytes(memoryview(f)) for f in frames])


def counting_outbox(node=3):
    counted = []
    outbox = Outbox(node, lambda name, n: counted.append((name, n)))
    outbox.token = TOKEN
    return outbox, counted


def test_outbox_to_peer_stamps_sender_and_token_and_counts_bytes():
    outbox, counted = counting_outbox()
    outbox.peers = {1: FakeSocket(), 2: FakeSocket()}
    msg = protocol.MoveRequest(request_id=5, target=3, keys=keys_of(1, 4))
    msg.src_node = 9                               # whatever it said: the outbox stamps it
    outbox.to_peer(2, msg)
    assert outbox.peers[1].frames == []
    (frames,) = outbox.peers[2].frames
    got = protocol.decode(frames)
    assert got.type == MsgType.MOVE_REQUEST and got.src_node == 3 and got.token == TOKEN
    assert got.keys.tolist() == [1, 4] and got.target == 3 and got.request_id == 5
    assert counted == [("bytes_sent", sum(len(f) for f in frames))]


def test_outbox_to_identity_and_to_worker_go_through_the_router():
    outbox, counted = counting_outbox()
    outbox.router = FakeSocket()
    outbox.to_identity(b"Wxyz", protocol.Synced(request_id=3))
    outbox.to_worker(7, protocol.UpdateAck(request_id=4, applied=2))
    (first, second) = outbox.router.frames
    assert first[0] == b"Wxyz" and second[0] == worker_identity(7, TOKEN)
    synced, ack = protocol.decode(first[1:]), protocol.decode(second[1:])
    assert synced.type == MsgType.SYNCED and synced.request_id == 3
    assert ack.type == MsgType.UPDATE_ACK and ack.applied == 2
    assert all(m.src_node == 3 and m.token == TOKEN for m in (synced, ack))
    # the routing identity is not counted (nor is it in bytes_received)
    assert counted == [("bytes_sent", sum(len(f) for f in first[1:])),
                       ("bytes_sent", sum(len(f) for f in second[1:]))]


def test_outbox_a_worker_that_is_gone_is_not_an_error():
    outbox, counted = counting_outbox()
    outbox.router = FakeSocket(fail=True)
    outbox.to_worker(1, protocol.Synced(request_id=1))   # logged, not raised
    assert counted == []


def test_outbox_to_coordinator_stamps_sender_and_token():
    outbox, _ = counting_outbox()
    outbox.coordinator = FakeSocket()
    outbox.to_coordinator(protocol.NodeBarrier(generation=4))
    (frames,) = outbox.coordinator.frames
    got = protocol.decode(frames)
    assert got.type == MsgType.NODE_BARRIER and got.generation == 4
    assert got.src_node == 3 and got.token == TOKEN
