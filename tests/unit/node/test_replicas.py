"""ReplicaCopies (adapm.node.data.replicas) on its own over a real table: requested keys
become PENDING, the owner's values make them replicas, deltas are taken against the value
at last sync, and only clean copies are released."""
import numpy as np
import pytest
from node_parts import (
    cluster_fixture,  # noqa: F401 (the fixture `cluster`)
    context,
    floats,
    keys_of,
    states,
    write,
)

from adapm.node.data.replicas import ReplicaCopies
from adapm.table.segments import Segments
from adapm.table.shared_table import ABSENT, OWNED, PENDING, REPLICA

pytestmark = pytest.mark.timeout(60)


def test_requested_keys_become_pending_then_replicas_with_the_owners_values(cluster):
    _, (node0, _node1) = cluster(2)
    copies = ReplicaCopies(context(node0))
    made = copies.make_pending(keys_of(1, 3, 0))   # key 0 is owned here
    assert made.tolist() == [1, 3] and states(node0, [1, 3, 0]) == [PENDING, PENDING, OWNED]
    assert copies.to_sync().tolist() == [] and len(copies.pending) == 2
    copies.refreshed(keys_of(1, 3), floats([1, 1, 3, 3]))
    assert states(node0, [1, 3]) == [REPLICA, REPLICA] and not copies.pending
    assert copies.to_sync().tolist() == [1, 3]
    assert copies.make_pending(keys_of(1)).tolist() == []   # held already


def test_a_delta_is_the_update_since_the_last_sync_and_only_clean_copies_go(cluster):
    _, (node0, _node1) = cluster(2)
    copies = ReplicaCopies(context(node0))
    keys = keys_of(1, 3)
    copies.make_pending(keys)
    copies.refreshed(keys, floats([1, 1, 3, 3]))
    write(node0, keys_of(3), [5, 6])               # a worker of node 0 updates key 3
    gone = copies.release_clean(keys)
    assert gone.tolist() == [True, False]          # key 3 keeps its delta
    assert states(node0, [1, 3]) == [ABSENT, REPLICA]
    assert copies.held.keys().tolist() == [3]
    deltas = copies.deltas(keys_of(3), Segments.of(node0.view, keys_of(3)))
    np.testing.assert_array_equal(deltas, [5, 6])
