"""The worker's read-your-writes bookkeeping (adapm.consistency), without processes."""
import numpy as np
import pytest

from adapm.consistency import InFlight, Unseen

pytestmark = pytest.mark.timeout(30)


class Op:
    def __init__(self, keys):
        self.keys = np.asarray(keys, dtype=np.uint64)
        self.done = False


def test_in_flight_finds_exactly_the_updates_of_the_keys_asked():
    rng = np.random.default_rng(0)
    tracked = InFlight()
    ops = [Op(rng.integers(0, 10**9, 100)) for _ in range(64)]
    for op in ops:
        tracked.add(op)
    for op in ops[::7]:
        op.done = True
    assert len(tracked.take_done()) == len(ops[::7]) and len(tracked) == 64 - 10
    for _ in range(200):
        keys = rng.integers(0, 10**9, 50).astype(np.uint64)
        if rng.random() < 0.5:
            keys[3] = rng.choice(ops[1].keys)
        want = [op for op in ops if not op.done and np.isin(keys, op.keys).any()]
        assert tracked.blocking(keys) == want
    for op in ops:
        op.done = True
    tracked.take_done()
    assert not tracked._counts.any() and tracked.blocking(ops[1].keys) == []


def test_unseen_keeps_the_latest_round_per_key_and_finds_keys_among_a_call():
    unseen = Unseen()
    never_fresh = lambda keys, rounds: np.ones(keys.shape[0], dtype=bool)  # noqa: E731
    unseen.add(np.array([5, 3, 9, 3], np.uint64), 4, never_fresh)
    unseen.add(np.array([9, 11], np.uint64), 6, never_fresh)
    assert unseen.keys.tolist() == [3, 5, 9, 11] and unseen.rounds.tolist() == [4, 4, 6, 6]
    keys, rounds = unseen.among(np.array([100, 9, 3, 3, 2], np.uint64))
    assert keys.tolist() == [3, 9] and rounds.tolist() == [4, 6]
    unseen.forget(np.array([3], np.uint64))
    unseen.forget_rounds_up_to(4)
    assert unseen.keys.tolist() == [9, 11]
    unseen.clear()
    assert len(unseen) == 0 and unseen.among(np.array([9], np.uint64))[0].size == 0


def test_unseen_stays_bounded_by_dropping_what_became_fresh():
    unseen = Unseen()
    fresh_if_even = lambda keys, rounds: keys % 2 == 1  # noqa: E731
    for start in range(0, 3 * Unseen.PRUNE_ABOVE, 1000):
        unseen.add(np.arange(start, start + 1000, dtype=np.uint64), 1, fresh_if_even)
    added = np.arange(0, 3 * Unseen.PRUNE_ABOVE, 1000).shape[0] * 1000
    stale = int((unseen.keys % 2 == 1).sum())
    assert stale == added // 2  # every stale (odd) key is still remembered
    # what is kept beyond the keys still stale is bounded: the fresh ones get dropped
    assert len(unseen) - stale <= Unseen.PRUNE_ABOVE
