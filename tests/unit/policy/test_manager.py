"""The manager as a unit: clock speeds, action windows, due intents, decisions,
retention."""
import tracemalloc
import warnings

import numpy as np

from adapm.policy.intents import IntentStore
from adapm.policy.manager import (
    RETAIN_MAX_LEVEL,
    ClockTracker,
    Manager,
    Retention,
)


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


def relocates(mode, owner_intends, others_hold, rounds_since_arrival=-1):
    """The owner's answer to one request (Manager.relocate_mask for one key)."""
    return bool(Manager(mode, 1, None).relocate_mask(
        np.array([owner_intends]), np.array([others_hold]),
        np.array([rounds_since_arrival]))[0])


def test_decisions_per_mode():
    assert relocates("adaptive", False, False)
    assert not relocates("adaptive", True, False)
    assert not relocates("adaptive", False, True)
    assert not relocates("adaptive", False, False, 3)   # just arrived
    assert relocates("adaptive", False, False, 500)
    assert relocates("relocate_only", True, True)
    assert not relocates("replicate_only", False, False)


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


# -- Retention: replicas of keys used in turns stay --------------------------------------

def simulate(manager, store, key, uses, dt=0.005, ahead=3, rounds=None):
    """One node using `key` in the clock windows `uses` ([start, end), one clock and `dt`
    seconds per round, each intent announced `ahead` clocks before its start), with a
    node server reduced to what the plan asks: requested keys are replicas by the next
    round, dropped ones are gone. Returns (round, 'request' | 'drop') events."""
    replicas, events = set(), []
    announce = {start - ahead: (start, end) for start, end in uses}
    rounds = rounds if rounds is not None else uses[-1][1] + 600
    for clock in range(rounds):
        if clock in announce:
            store.add(0, np.array([key], np.uint64), *announce[clock])
        clocks = np.array([clock])
        store.expire(clocks)
        held = np.fromiter(sorted(replicas), dtype=np.uint64)
        plan = manager.plan(clocks, lambda keys: np.isin(keys, held), held, now=clock * dt)  # noqa: B023
        for k in plan.requests.tolist():
            replicas.add(k)
            events.append((clock, "request"))
        for k in plan.drop.tolist():
            replicas.discard(k)
            events.append((clock, "drop"))
    return events


def turns(count, ours, theirs):
    """Windows of a key this node uses for `ours` clocks, then the other node for
    theirs[i] clocks, `count` times."""
    uses, start = [], 10
    for i in range(count):
        uses.append((start, start + ours))
        start += ours + theirs[i % len(theirs)]
    return uses


def test_a_key_used_in_turns_by_two_nodes_stops_being_dropped():
    """Each node sees the other's turns as gaps in its own use of the key (12 clocks of
    its own, then 40 to 200 ms of the other's). Without retention: a drop and a request
    every turn, 30 of each. With it: a few, while it learns the longest gap."""
    rng = np.random.default_rng(3)
    theirs = rng.integers(8, 40, size=30).tolist()
    for node in range(2):
        store = IntentStore(1, 100)
        manager = Manager("adaptive", 1, store, num_keys=100)
        uses = turns(30, ours=12, theirs=theirs[node:] + theirs[:node])
        events = simulate(manager, store, 7, uses, rounds=uses[-1][1])
        drops = [c for c, e in events if e == "drop"]
        requests = [c for c, e in events if e == "request"]
        assert 1 <= len(drops) <= 2
        assert len(requests) == len(drops) + 1    # each drop cost a request, no other
        assert manager.retention.seconds(np.array([7]))[0] >= max(theirs) * 0.005


def test_a_key_used_in_turns_with_a_steady_gap_bounces_once():
    store = IntentStore(1, 100)
    manager = Manager("adaptive", 1, store, num_keys=100)
    uses = turns(20, ours=10, theirs=[30])
    events = simulate(manager, store, 7, uses, rounds=uses[-1][1])
    first_end, second_start = uses[0][1], uses[1][0]
    assert events == [(uses[0][0] - 3, "request"), (first_end, "drop"),
                      (second_start - 3, "request")]


def test_a_key_not_seen_bouncing_is_dropped_when_its_intent_ends():
    """Level 0 (every key at first): no retention, dropped in the first round no intent
    names it, as without retention."""
    store = IntentStore(1, 100)
    manager = Manager("adaptive", 1, store, num_keys=100)
    uses = [(10, 20)]
    events = simulate(manager, store, 5, uses, rounds=40)
    assert events == [(10 - 3, "request"), (20, "drop")]  # due once announced; at its end


def test_a_key_used_once_is_dropped_at_once_and_gets_no_retention():
    store = IntentStore(1, 100)
    manager = Manager("adaptive", 1, store, num_keys=100)
    events = simulate(manager, store, 9, [(10, 13)], rounds=300)
    assert [e for _, e in events] == ["request", "drop"]
    assert events[1][0] == 13                  # the first round after its intent ended
    assert manager.retention.level[9] == 0
    # used again only after longer than any retention: it did not bounce, nothing learned
    store2 = IntentStore(1, 100)
    manager2 = Manager("adaptive", 1, store2, num_keys=100)
    simulate(manager2, store2, 9, [(10, 13), (1000, 1003)], dt=0.01, rounds=1010)
    assert manager2.retention.level[9] == 0


def test_a_kept_replica_is_dropped_once_its_retention_has_passed():
    store = IntentStore(1, 100)
    manager = Manager("adaptive", 1, store, num_keys=100)
    events = simulate(manager, store, 4, turns(6, ours=5, theirs=[10]), rounds=200)
    retention = manager.retention.seconds(np.array([4]))[0]
    assert retention > 0
    last_end = turns(6, ours=5, theirs=[10])[-1][1]
    last_drop = max(c for c, e in events if e == "drop")
    # last intended in round last_end - 1; kept while less than `retention` has passed
    # (within one round of 5 ms; last uses are float32, so a hair more than exactly one)
    assert abs((last_drop - (last_end - 1)) * 0.005 - retention) <= 0.005 + 1e-9


def split(retention, candidates, now):
    """Retention.keeps as arrays of keys: (kept, dropped)."""
    keep = retention.keeps(candidates, now)
    return candidates[keep], candidates[~keep]


def test_retention_grows_to_cover_the_gap_and_decays_after_long_ones():
    r = Retention(10)
    key = np.array([3], np.uint64)
    r.requested(key, 0.0)                       # first use: nothing to learn
    assert r.level[3] == 0
    r.used(key, 1.0)
    split(r, key, 1.0)                           # its intent ended: dropped at once
    r.requested(key, 1.1)                       # back after 100 ms: bounced
    assert 0.2 <= r.seconds(key)[0] < 0.4       # twice the gap, as a power of two
    level = int(r.level[3])
    r.used(key, 1.2)
    keep, drop = split(r, key, 1.25)             # within its retention: kept
    assert keep.tolist() == [3] and drop.tolist() == []
    retention = r.seconds(key)[0]
    split(r, key, 1.2 + retention)               # let go; back a bit later than that:
    r.requested(key, 1.2 + retention + 0.001)   # the retention at least doubles
    assert r.level[3] > level
    for _ in range(20):                         # bouncing all the time: bounded
        split(r, key, 10.0)
        r.requested(key, 10.0 + Retention.LONGEST)
    assert r.level[3] == RETAIN_MAX_LEVEL
    assert r.seconds(key)[0] == Retention.LONGEST
    last = float(r.last_used[3])                # back just under 4x later than the
    r.requested(key, last + 4 * Retention.LONGEST - 1e-3)   # bound: two halvings
    assert r.level[3] == RETAIN_MAX_LEVEL - 2
    r.requested(key, r.last_used[3] + 1000.0)   # much longer: no retention left
    assert r.level[3] == 0


def test_a_dropped_replica_intended_again_before_it_went_counts_as_a_bounce():
    """A drop is only acknowledged a round later: a replica let go and intended again
    in between is never requested (the node server re-requests it), yet it bounced."""
    store = IntentStore(1, 100)
    manager = Manager("replicate_only", 1, store, num_keys=100)
    key = np.array([6], np.uint64)
    store.add(0, key, 0, 2)
    manager.plan(np.array([0]), lambda k: k < 0, _none(), now=0.0)          # requested
    plan = manager.plan(np.array([1]), lambda k: k == 6, key, now=0.005)
    assert plan.keep.tolist() == [6]
    store.expire([2])
    plan = manager.plan(np.array([2]), lambda k: k == 6, key, now=0.010)
    assert plan.drop.tolist() == [6]
    store.add(0, key, 5, 6)                     # intended again, the replica still here
    plan = manager.plan(np.array([3]), lambda k: k == 6, key, now=0.015)
    assert plan.keep.tolist() == [6] and manager.retention.level[6] > 0


def test_kept_replicas_are_in_keep_and_counted():
    store = IntentStore(1, 100)
    manager = Manager("adaptive", 1, store, num_keys=100)
    manager.retention.level[[2, 5]] = 3         # learned: 80 ms
    manager.retention.last_used[[2, 5, 8]] = 1.0
    store.add(0, np.array([8], np.uint64), 0, 10)
    replicas = np.array([2, 5, 8, 9], np.uint64)
    plan = manager.plan(np.array([0]), lambda k: k >= 0, replicas, now=1.05)
    assert plan.keep.tolist() == [2, 5, 8] and plan.drop.tolist() == [9]
    assert plan.retained == 2
    plan = manager.plan(np.array([1]), lambda k: k >= 0, replicas[:3], now=1.2)
    assert plan.keep.tolist() == [8] and plan.drop.tolist() == [2, 5]


def test_the_owner_keeps_a_key_it_will_soon_want_back():
    store = IntentStore(1, 10)
    manager = Manager("adaptive", 1, store, num_keys=10)
    manager.retention.level[[1, 2]] = 4         # 160 ms
    manager.retention.last_used[[1, 2, 3]] = [10.0, 9.0, 10.0]
    keys = np.array([1, 2, 3, 4], np.uint64)
    no = np.zeros(4, dtype=bool)
    relocate = manager.relocate_mask(no, no, np.full(4, -1), keys=keys, now=10.1)
    assert relocate.tolist() == [False, True, True, True]  # 1: used 100 ms ago, bounces
    assert manager.relocate_mask(no, no, np.full(4, -1)).all()  # without keys: as before


def test_retention_only_in_modes_that_drop_replicas_by_intent():
    for mode, retains in (("adaptive", True), ("replicate_only", True),
                          ("relocate_only", False), ("static", False),
                          ("replicate_all", False)):
        assert (Manager(mode, 1, IntentStore(1, 10)).retention is not None) == retains
    manager = Manager("replicate_all", 1, IntentStore(1, 10))
    replicas = np.array([1, 2], np.uint64)
    plan = manager.plan(np.array([0]), lambda k: k >= 0, replicas, now=0.0)
    assert plan.keep.tolist() == [1, 2] and plan.drop.shape[0] == 0


def test_a_round_costs_what_its_keys_cost_not_the_key_range():
    """1e6 keys: the retention's arrays are allocated once, and a plan over 100 replicas
    allocates nothing near the key range (a bool per key would be 1 MB)."""
    num_keys = 10**6
    store = IntentStore(1, num_keys)
    manager = Manager("adaptive", 1, store, num_keys=num_keys)
    retention = manager.retention
    assert retention.last_used.shape == retention.level.shape == (num_keys,)
    arrays = (retention.last_used, retention.level, retention.let_go)
    replicas = np.arange(0, num_keys, num_keys // 100, dtype=np.uint64)
    retention.level[replicas[::2].astype(np.intp)] = 5
    held = lambda keys: np.isin(keys, replicas)  # noqa: E731
    for clock in range(3):  # warm up: the first plans make the estimates
        store.add(0, replicas[:50], clock, clock + 1)
        store.expire([clock])
        manager.plan(np.array([clock]), held, replicas, now=clock * 0.01)
    store.add(0, replicas[:50] + np.uint64(1), 3, 4)  # 50 new keys to request
    store.expire([3])
    tracemalloc.start()
    plan = manager.plan(np.array([3]), held, replicas, now=0.03)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert plan.requests.shape[0] == 50 and plan.keep.shape[0] + plan.drop.shape[0] == 100
    assert peak < 100_000, peak
    assert all(a is b for a, b in zip(arrays, (retention.last_used, retention.level,
                                               retention.let_go)))


def _none():
    return np.empty(0, np.uint64)


def test_intent_store_matches_a_plain_model_under_random_windows():
    """Intents with windows of any length, out of order: counts, due intents and
    expiry agree with a list-scanning model (expire pops ended intents from a heap)."""
    from adapm.policy.intents import IntentStore

    rng = np.random.default_rng(11)
    store, model = IntentStore(2, 50), []  # model: [worker, start, end, keys, acted]
    clocks = np.zeros(2, dtype=np.int64)
    for _ in range(400):
        worker = int(rng.integers(0, 2))
        action = rng.integers(0, 3)
        if action == 0:
            start = int(clocks[worker] + rng.integers(-2, 20))
            start = max(start, 0)
            end = start + int(rng.integers(1, 6))
            keys = rng.integers(0, 50, 4).astype(np.uint64)
            store.add(worker, keys, start, end)
            model.append([worker, start, end, keys, False])
        elif action == 1:
            clocks[worker] += int(rng.integers(0, 3))
            store.expire(clocks)
            model = [m for m in model if m[2] > clocks[m[0]]]
        else:
            horizon = int(clocks[worker] + rng.integers(0, 8))
            got = sorted((i.start, i.end) for i in store.due(worker, horizon))
            want = []
            for m in model:
                if m[0] == worker and not m[4] and m[1] < horizon:
                    m[4] = True
                    want.append((m[1], m[2]))
            assert got == sorted(want)
        assert len(store) == len(model)
        counts = np.zeros(50, dtype=np.int32)
        for m in model:
            np.add.at(counts, m[3].astype(np.intp), 1)
        assert (store.count == counts).all()


def test_retention_keeps_its_precision_over_days_of_uptime():
    """last_used is float32 (4 bytes per key): times are kept relative to a base that
    moves up, so gaps of a few milliseconds still count right after days of uptime."""
    r = Retention(4)
    key = np.array([1], dtype=np.uint64)
    start = 3 * 86400.0 + 0.123456                 # time.monotonic() after three days
    r.requested(key, start)
    for day in range(6):                           # a key used in turns, 30 ms apart,
        now = start + day * 86400.0                # over six days
        r.used(key, now)
        r.keeps(key, now)                          # ... let go in between
        r.requested(key, now + 0.030)
        assert r.seconds(key)[0] >= 0.06, day      # covers twice its 30 ms gaps
        assert r.retained(key, now + 0.031) and not r.retained(key, now + 30.0)
    assert np.isinf(r.last_used[0]) and r.last_used[0] < 0   # never used: still never


def test_a_replica_never_used_here_learns_no_retention_and_warns_nothing():
    """A replica let go that this node never used (last use -inf) comes back with an
    infinite gap: its retention goes back to none, computed, not left to a float-to-int
    cast of infinity (undefined; numpy warns about it)."""
    retention = Retention(4)
    retention.level[1] = 3
    assert not retention.keeps(np.array([1], np.uint64), 10.0).any()  # let go, never used
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        retention.used(np.array([1], np.uint64), 11.0)
    assert retention.level[1] == 0
