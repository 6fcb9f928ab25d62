"""DeferredSets (adapm.node.data.deferred_sets) alone: a local set of keys whose delta
the sync round in flight carries waits for that round; the rounds part hands the
waiting sets back, in arrival order, once the round completed."""
import pytest
from node_parts import floats, from_worker, keys_of

from adapm.node.data.deferred_sets import DeferredSets
from adapm.wire.protocol import MsgType, worker_identity

pytestmark = pytest.mark.timeout(60)


def set_of(rank, request_id, *keys):
    return from_worker(MsgType.SET, rank, workers_per_node=2, request_id=request_id,
                       keys=keys_of(*keys), values=floats([0.0] * (2 * len(keys))))


def test_no_set_waits_while_no_round_carries_a_delta():
    sets = DeferredSets()
    msg = set_of(0, 1, 1, 2)
    assert not sets.defer_set(worker_identity(0), msg, msg.keys)
    assert len(sets) == 0 and sets.round_done() == []


def test_a_set_waits_only_if_one_of_its_keys_delta_is_in_the_round():
    sets = DeferredSets()
    sets.carry(keys_of(3, 5, 9))
    other = set_of(0, 1, 1, 2, 4)
    assert not sets.defer_set(worker_identity(0), other, other.keys)
    assert len(sets) == 0
    overlapping = set_of(1, 2, 4, 9)               # key 9's delta is on its way
    assert sets.defer_set(worker_identity(1), overlapping, overlapping.keys)
    assert len(sets) == 1


def test_round_done_hands_the_waiting_sets_back_in_arrival_order_and_carries_nothing():
    sets = DeferredSets()
    sets.carry(keys_of(3, 5))
    first, second = set_of(1, 7, 5), set_of(0, 8, 3)
    assert sets.defer_set(worker_identity(1), first, first.keys)
    assert sets.defer_set(worker_identity(0), second, second.keys)
    handed = sets.round_done()
    assert [(identity, msg.request_id) for identity, msg in handed] == [
        (worker_identity(1), 7), (worker_identity(0), 8)]
    assert handed[0][1] is first and len(sets) == 0
    again = set_of(1, 9, 5)                        # no round in flight now: no wait
    assert not sets.defer_set(worker_identity(1), again, again.keys)
    assert sets.round_done() == []
    sets.carry(keys_of(6))                         # the next round carries other keys
    assert not sets.defer_set(worker_identity(1), again, again.keys)
