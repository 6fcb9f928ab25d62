"""The node server's waits on sync rounds (adapm.node.data.waiters), without processes."""
import pytest

from adapm.node.data.waiters import RoundWaiters

pytestmark = pytest.mark.timeout(30)


def make():
    replies, releases = [], []
    waiters = RoundWaiters(lambda identity, rid: replies.append((identity, rid)),
                           releases.append)
    return waiters, replies, releases


def test_each_wait_is_answered_by_the_round_it_names_or_a_later_one():
    waiters, replies, releases = make()
    assert not waiters and not waiters.want_full_round
    waiters.wait_sync(b"w0", 1, next_round=5)
    waiters.wait_refresh(b"w1", 2, next_round=4)
    waiters.wait_release(7, next_round=6)
    assert waiters and waiters.want_full_round
    waiters.answer(3)
    assert replies == [] and releases == []
    waiters.answer(4)
    assert replies == [(b"w1", 2)] and releases == []
    waiters.answer(6)
    assert replies == [(b"w1", 2), (b"w0", 1)] and releases == [7]
    assert not waiters


def test_keys_moving_in_hold_wait_sync_and_barriers_but_not_refreshes():
    waiters, replies, releases = make()
    waiters.wait_sync(b"w0", 1, next_round=2)
    waiters.wait_refresh(b"w1", 2, next_round=2)
    waiters.wait_release(3, next_round=2)
    waiters.answer(2, keys_moving_in=True)
    assert replies == [(b"w1", 2)] and releases == []
    waiters.answer(2)  # the keys arrived: the same rounds now suffice
    assert replies == [(b"w1", 2), (b"w0", 1)] and releases == [3]


def test_a_round_that_was_not_full_after_all_moves_the_full_waits_on():
    waiters, replies, releases = make()
    waiters.wait_sync(b"w0", 1, next_round=3)
    waiters.wait_refresh(b"w1", 2, next_round=3)
    waiters.wait_release(9, next_round=3)
    waiters.not_before(4)  # round 3 left a replica without a value
    waiters.answer(3)
    assert replies == [(b"w1", 2)] and releases == []  # a refresh needs no full round
    waiters.answer(4)
    assert replies == [(b"w1", 2), (b"w0", 1)] and releases == [9]
