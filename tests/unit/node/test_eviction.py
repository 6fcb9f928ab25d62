"""Eviction (adapm.node.data.eviction) built alone over a formed node's table (the MOVE
a move request causes is in test_relocation.py): only keys owned here leave, in one MOVE
to the target; their slots are freed, their replica holders forgotten, the change
counted; with no key owned here nothing happens."""
import numpy as np
import pytest
from node_parts import (
    LENGTH,
    RecordingOutbox,
    cluster_fixture,  # noqa: F401 (the fixture `cluster`)
    context,
    initial,
    keys_of,
    node_counter,
    only,
    owners,
    states,
)

from adapm.node.data.eviction import Eviction
from adapm.node.data.holders import ReplicaHolders
from adapm.table.shared_table import ABSENT, OWNED
from adapm.wire.protocol import MsgType

pytestmark = pytest.mark.timeout(60)


class EvictionHarness:
    """Eviction of node 0 (of 3; it owns keys 0, 3, 6, 9) with holders of its own."""

    def __init__(self, server):
        self.server = server
        self.ctx = context(server)
        self.outbox = RecordingOutbox(server.node)
        self.holders = ReplicaHolders(self.ctx.num_keys, self.ctx.num_nodes)
        self.part = Eviction(self.ctx, self.outbox, self.holders)


@pytest.fixture
def eviction(cluster):
    _, nodes = cluster(3)
    return EvictionHarness(nodes[0])


def test_owned_keys_leave_in_one_move_and_their_holders_are_forgotten(eviction):
    server, holders = eviction.server, eviction.holders
    holders.add(keys_of(3, 6, 9), 1)               # node 1 holds replicas of 3, 6, 9
    eviction.ctx.ownership.counter[6] = 4
    top = server.table.allocator.top
    taken = eviction.part.evict_and_move(keys_of(6, 1, 3), 2, 77, 1)
    assert taken.tolist() == [True, False, True]   # key 1 is node 1's
    dest, move = only(eviction.outbox.take(), MsgType.MOVE)
    assert dest == ("peer", 2)
    assert (move.request_id, move.purpose) == (77, 1)
    assert move.keys.tolist() == [6, 3] and move.counters.tolist() == [5, 1]
    assert move.versions.tolist() == [0, 0]
    np.testing.assert_array_equal(np.frombuffer(move.values, np.float32), initial([6, 3]))
    assert states(server, [6, 3, 0, 9]) == [ABSENT, ABSENT, OWNED, OWNED]
    assert owners(server, [6, 3]) == [2, 2]
    assert holders.others(keys_of(3, 6, 9), 0).tolist() == [False, False, True]
    assert node_counter(server, "owner_changes") == 1
    # their two slots were freed: the next two of that length take them, not new room
    server.table.allocator.allocate(np.full(2, LENGTH, dtype=np.uint64))
    assert server.table.allocator.top == top


def test_no_move_when_no_key_is_owned_here(eviction):
    server = eviction.server
    eviction.holders.add(keys_of(1, 2), 2)
    taken = eviction.part.evict_and_move(keys_of(1, 2, 4), 1, 5, 0)
    assert taken.tolist() == [False, False, False]
    assert eviction.outbox.take() == []
    assert eviction.holders.others(keys_of(1, 2), 0).all()
    assert node_counter(server, "owner_changes") == 0
    assert states(server, [0, 3]) == [OWNED, OWNED]
    eviction.part.evict_and_move(keys_of(0), 1, 6, 0)   # gone once
    assert eviction.part.evict_and_move(keys_of(0), 2, 7, 0).tolist() == [False]
    assert len(eviction.outbox.take()) == 1
