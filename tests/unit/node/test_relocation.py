"""Relocation (adapm.node.data.relocation): localize, move requests, moves and owner
updates, between formed nodes whose parts send into recording outboxes."""
import time

import numpy as np
import pytest
from node_parts import (
    LENGTH,
    RecordingOutbox,
    cluster_fixture,  # noqa: F401 (the fixture `cluster`)
    context,
    floats,
    from_peer,
    from_worker,
    initial,
    keys_of,
    node_counter,
    of_type,
    only,
    owners,
    read,
    states,
    write,
)

from adapm.common.errors import FAIL_ROUTING, ProtocolError
from adapm.node.data.eviction import Eviction
from adapm.node.data.holders import ReplicaHolders
from adapm.node.data.relocation import Relocation
from adapm.node.data.replicas import ReplicaCopies
from adapm.node.data.routing import Routes
from adapm.table.shared_table import ABSENT, OWNED
from adapm.wire import protocol
from adapm.wire.protocol import (
    MsgType,
    node_identity,
    worker_identity,
)

pytestmark = pytest.mark.timeout(60)


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


class RoundsAsRelocationSeesIt:
    """A fake of the rounds part with the three methods Relocation calls, recording."""

    def __init__(self):
        self.arrivals = []
        self.answered = 0
        self.progressed = []

    def arrived(self, keys):
        self.arrivals.append(keys.tolist())

    def answer_waiters(self):
        self.answered += 1

    def progress(self, n, round_id=None):
        self.progressed.append((n, round_id))


def relocation_alone(server, timeout):
    ctx = context(server)
    outbox = RecordingOutbox(server.node)
    rounds = RoundsAsRelocationSeesIt()
    holders = ReplicaHolders(ctx.num_keys, ctx.num_nodes)
    relocation = Relocation(ctx, outbox, Routes(ctx, outbox), ReplicaCopies(ctx),
                            eviction=Eviction(ctx, outbox, holders), rounds=rounds,
                            timeout=timeout)
    return relocation, outbox, rounds


def test_a_localize_that_never_completes_fails_after_the_timeout(cluster):
    _, (node0, _node1) = cluster(2)
    relocation, outbox, rounds = relocation_alone(node0, timeout=5.0)
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
    assert rounds.answered == 1
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


