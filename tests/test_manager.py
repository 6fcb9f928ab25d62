"""The manager as a unit: clock speeds, action windows, due intents, decisions."""
import numpy as np

from adapm.intents import IntentStore
from adapm.manager import RELOCATE, REPLICATE, ClockTracker, Manager


def test_window_follows_clock_speed():
    tracker = ClockTracker(2)
    for round_ in range(50):
        windows = tracker.update([round_ * 4, round_ // 10])  # 4 and 0.1 clocks/round
    assert 9 <= windows[0] <= 12   # about two rounds' worth of clocks, plus margin
    assert 2 <= windows[1] <= 4


def test_window_covers_the_next_clock_even_when_the_clock_stands_still():
    tracker = ClockTracker(1)
    assert tracker.update([0])[0] == 2
    assert tracker.update([0])[0] == 2


def test_intents_come_due_once_and_expire():
    store = IntentStore(1, 100)
    store.add(0, np.array([1, 2], np.uint64), 10, 12)
    store.add(0, np.array([3], np.uint64), 2, 3)
    assert [i.start for i in store.due(0, 5)] == [2]
    assert store.due(0, 5) == []                      # acted on once
    assert [i.start for i in store.due(0, 11)] == [10]
    assert store.intended(np.array([1, 3], np.uint64)).tolist() == [True, True]
    store.expire([3])
    assert store.intended(np.array([1, 3], np.uint64)).tolist() == [True, False]
    store.expire([12])
    assert len(store) == 0 and store.count.sum() == 0


def test_late_intent_added_before_acted_ones_still_comes_due():
    store = IntentStore(1, 10)
    store.add(0, np.array([1], np.uint64), 5, 6)
    store.due(0, 10)
    store.add(0, np.array([2], np.uint64), 3, 4)
    assert [i.start for i in store.due(0, 10)] == [3]


def test_plan_requests_only_missing_keys_within_the_window():
    store = IntentStore(1, 100)
    manager = Manager("adaptive", 1, store)
    store.add(0, np.array([1, 2, 3], np.uint64), 1, 2)
    store.add(0, np.array([50], np.uint64), 1000, 1001)   # far future: not yet
    held = lambda keys: keys == 2  # noqa: E731 - key 2 is local already
    plan = manager.plan(np.array([0]), held, np.empty(0, np.uint64))
    assert plan.requests.tolist() == [1, 3]
    assert plan.late == 0


def test_plan_drops_replicas_nobody_intends_and_counts_late_intents():
    store = IntentStore(1, 100)
    manager = Manager("adaptive", 1, store)
    store.add(0, np.array([7], np.uint64), 0, 5)
    store.add(0, np.array([9], np.uint64), 0, 1)
    replicas = np.array([7, 8], np.uint64)
    plan = manager.plan(np.array([2]), lambda k: k == 7, replicas)
    assert plan.keep.tolist() == [7] and plan.drop.tolist() == [8]
    assert plan.late == 1  # key 9 was due at clock 0, the worker is at 2


def test_static_and_replicate_all_do_not_act_on_intents():
    for mode in ("static", "replicate_all"):
        store = IntentStore(1, 10)
        store.add(0, np.array([1], np.uint64), 0, 1)
        plan = Manager(mode, 1, store).plan(np.array([0]), lambda k: k < 0,
                                            np.empty(0, np.uint64))
        assert plan.requests.shape[0] == 0


def test_decisions_per_mode():
    assert Manager("adaptive", 1, None).decide(False, False) == RELOCATE
    assert Manager("adaptive", 1, None).decide(True, False) == REPLICATE
    assert Manager("adaptive", 1, None).decide(False, True) == REPLICATE
    assert Manager("adaptive", 1, None).decide(False, False, 3) == REPLICATE  # just arrived
    assert Manager("adaptive", 1, None).decide(False, False, 500) == RELOCATE
    assert Manager("relocate_only", 1, None).decide(True, True) == RELOCATE
    assert Manager("replicate_only", 1, None).decide(False, False) == REPLICATE


def test_intent_counts_are_exact_by_sorting_and_by_bincount():
    """Few queued keys are counted by sorting, many by a bincount: the same counts."""
    rng = np.random.default_rng(5)
    for size in (3, 5000):  # 3 keys sort; 5000 keys of 1000 use bincount
        store = IntentStore(2, 1000)
        expected = np.zeros(1000, dtype=int)
        for clock in range(20):
            keys = rng.integers(0, 1000, size=size).astype(np.uint64)
            store.add(clock % 2, keys, clock, clock + 3)
            np.add.at(expected, keys.astype(np.intp), 1)
        np.testing.assert_array_equal(store.count, expected)
        store.expire(np.array([100, 100]))
        np.testing.assert_array_equal(store.count, np.zeros(1000))
