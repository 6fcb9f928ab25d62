"""The worker's read-your-writes bookkeeping (adapm.client.consistency), without processes."""
import numpy as np
import pytest

from adapm.client.consistency import InFlight, ReadYourWrites, Unseen
from adapm.common.errors import ClusterError
from adapm.table.shared_table import NODE_SLOT, OWNED, PENDING, REPLICA

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


# -- ReadYourWrites: the worker's use of the two, with a stand-in table and requests ------

class View:
    """The table as ReadYourWrites reads it: keys' states, their copies' fresh rounds
    (the round that last brought a value), and the node's round counters."""

    def __init__(self, num_keys=100):
        self.states = np.full(num_keys, OWNED, dtype=np.uint8)
        self.fresh = np.zeros(num_keys, dtype=np.uint32)
        self.counters = np.zeros(len(NODE_SLOT), dtype=np.uint64)

    def states_of(self, keys, out):
        out[:] = self.states[keys]

    def fresh_rounds(self, keys, out):
        out[:] = self.fresh[keys]

    def node_counter_get(self, slot):
        return int(self.counters[slot])

    def set_counter(self, name, value):
        self.counters[NODE_SLOT[name]] = value


class Update(Op):
    """An update operation as the worker tracks it."""

    def __init__(self, keys):
        super().__init__([] if keys is None else keys)
        self.keys = None if keys is None else self.keys
        self.error = None


def make(max_in_flight=64):
    view, waited, refreshed = View(), [], []

    def wait(op):  # as Requests.wait: the operation completes (or raises its error)
        if not op.done:
            waited.append(op)
        op.done = True
        if op.error is not None:
            raise op.error

    def refresh(keys):
        refreshed.append(keys.tolist())

    ryw = ReadYourWrites(view, wait, refresh, max_in_flight)
    return ryw, view, waited, refreshed


def keys(*ks):
    return np.array(ks, dtype=np.uint64)


def test_a_call_waits_only_for_updates_in_flight_of_its_own_keys():
    ryw, _, waited, refreshed = make()
    a, b = Update([1, 2]), Update([5])
    ryw.track(a)
    ryw.track(b)
    ryw.before_access(keys(7, 8))
    assert waited == []
    ryw.before_access(keys(9, 2))
    assert waited == [a] and len(ryw.in_flight) == 1  # a acknowledged and pruned
    b.done = True  # acknowledged meanwhile: no wait
    ryw.before_access(keys(5))
    assert waited == [a] and len(ryw.in_flight) == 0 and refreshed == []


def test_beyond_the_limit_of_updates_in_flight_a_push_waits_for_the_oldest():
    ryw, _, waited, _ = make(max_in_flight=2)
    ops = [Update([k]) for k in range(3)]
    ryw.track(ops[0])
    ryw.track(ops[1])
    assert waited == []
    ryw.track(ops[2])
    assert waited == [ops[0]] and len(ryw.in_flight) == 2
    ryw.track(Update(None))  # an update that sent nothing: not tracked
    assert len(ryw.in_flight) == 2


def test_drain_waits_for_every_update_oldest_first():
    ryw, _, waited, _ = make()
    ops = [Update([k]) for k in range(4)]
    for op in ops:
        ryw.track(op)
    ops[2].done = True
    ryw.drain()
    assert waited == [ops[0], ops[1], ops[3]] and len(ryw.in_flight) == 0


def test_a_failed_update_raises_its_error_at_the_next_call():
    ryw, _, _, _ = make()
    op = Update([3])
    ryw.track(op)
    op.error, op.done = ClusterError("node 1 rejected it"), True
    with pytest.raises(ClusterError, match="rejected"):
        ryw.before_access(keys(50))
    assert len(ryw.in_flight) == 0


def test_an_acknowledged_update_of_a_copy_here_is_read_after_a_round_brought_it():
    ryw, view, _, refreshed = make()
    view.states[[1, 2]] = REPLICA
    view.states[3] = PENDING
    view.set_counter("rounds_started", 7)  # round 7 may have fetched the old value
    op = Update([1, 2, 3, 4])              # key 4 is owned here: it has the update
    ryw.track(op)
    op.done = True
    ryw.before_access(keys(60))            # prunes: the copies now wait for round 8
    assert ryw.unseen.keys.tolist() == [1, 2, 3] and ryw.unseen.rounds.tolist() == [8] * 3
    view.fresh[2] = 8                      # round 8 already stamped key 2's copy
    ryw.before_access(keys(1, 2, 4))
    assert refreshed == [[1]]              # only the copy no round brought up to date
    assert ryw.unseen.keys.tolist() == [2, 3]
    view.set_counter("full_round_done", 8)  # a full round synced every replica
    ryw.before_access(keys(3))
    assert refreshed == [[1]] and len(ryw.unseen) == 0


def test_wait_sync_means_nothing_is_unseen_any_more():
    ryw, view, _, refreshed = make()
    view.states[1] = REPLICA
    op = Update([1])
    ryw.track(op)
    ryw.drain()
    assert ryw.unseen.keys.tolist() == [1]
    ryw.synced()
    ryw.before_access(keys(1))
    assert refreshed == [] and len(ryw.unseen) == 0
