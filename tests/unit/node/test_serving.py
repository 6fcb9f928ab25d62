"""DataServing (adapm.node.data.serving) on its own: remote pull, push and set of
workers of any node, answered from the table or forwarded along the keys' paths."""

import numpy as np
import pytest
from node_parts import (
    LENGTH,
    TOKEN,
    RecordingOutbox,
    cluster_fixture,  # noqa: F401 (the fixture `cluster`)
    context,
    floats,
    from_peer,
    from_worker,
    initial,
    keys_of,
    of_type,
    only,
    read,
    states,
)

from adapm.common.errors import ProtocolError
from adapm.node.data.replicas import ReplicaCopies
from adapm.node.data.routing import Routes
from adapm.node.data.serving import DataServing
from adapm.table.shared_table import OWNED
from adapm.wire import protocol
from adapm.wire.protocol import (
    ALL_POSITIONS,
    MsgType,
    node_identity,
    worker_identity,
)

pytestmark = pytest.mark.timeout(60)


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
    nodes[1].eviction.evict_and_move(keys_of(4), 2, 0, 0)
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


