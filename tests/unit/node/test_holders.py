"""ReplicaHolders: the owner's record of replica holders (no processes)."""
import numpy as np
import pytest

from adapm.node.data.holders import ReplicaHolders

pytestmark = pytest.mark.timeout(60)


def k(*keys):
    return np.array(keys, dtype=np.uint64)


@pytest.mark.parametrize("nodes", [2, 8, 9, 16, 17, 32, 33, 64, 65, 130])
def test_others_sees_every_holder_but_the_asking_node(nodes):
    h = ReplicaHolders(10, nodes)
    far = nodes - 1
    h.add(k(1, 2), 0)
    h.add(k(2, 3), far)
    assert h.others(k(1, 2, 3, 4), 0).tolist() == [False, True, True, False]
    assert h.others(k(1, 2, 3, 4), far).tolist() == [True, True, False, False]
    h.discard(k(2), far)
    assert h.others(k(2), 0).tolist() == [False]
    h.forget(k(1))
    assert h.others(k(1), far).tolist() == [False]


def test_repeated_keys_in_one_call():
    h = ReplicaHolders(5, 2)
    h.add(k(3, 3), 1)
    assert h.others(k(3, 3), 0).tolist() == [True, True]
