"""A round's plan in one compiled call (CompiledIntentStore.plan_round, through
Manager.plan with `states`) against the reference plan (Manager.plan over the reference
IntentStore and Retention's numpy code): the same random intents, clocks, key states,
replicas and times on both, and every round's plan, every retention array and what is
left in the stores compared."""

import numpy as np
import pytest

from adapm.policy._intents import CompiledIntentStore
from adapm.policy.intents import IntentStore
from adapm.policy.manager import RETAIN_UNIT, Manager

NUM_KEYS = 400
MODES = ("adaptive", "replicate_only", "relocate_only", "replicate_all", "static")


class Side:
    """A manager over one kind of store, planning with (compiled) or without states."""

    def __init__(self, mode, workers, compiled):
        store = CompiledIntentStore(workers, NUM_KEYS) if compiled else \
            IntentStore(workers, NUM_KEYS)
        self.store, self.compiled = store, compiled
        self.manager = Manager(mode, workers, store, num_keys=NUM_KEYS)

    def plan(self, clocks, states, replicas, now):
        held = lambda keys: states[keys.astype(np.intp)] != 0  # noqa: E731
        return self.manager.plan(clocks, held, replicas, now=now,
                                 states=states if self.compiled else None)


def _random_rounds(seed, mode, workers, rounds):
    rng = np.random.default_rng(seed)
    reference, compiled = Side(mode, workers, False), Side(mode, workers, True)
    clocks = np.zeros(workers, dtype=np.int64)
    # a strided view of states, as the table's directory gives them
    table = np.zeros((NUM_KEYS, 3), dtype=np.uint8)
    states = table[:, 1]
    now = 100.0
    for _ in range(rounds):
        for _ in range(int(rng.integers(0, 6))):
            worker = int(rng.integers(workers))
            start = int(clocks[worker] + rng.integers(-2, 10))
            keys = rng.integers(0, NUM_KEYS, int(rng.integers(0, 30))).astype(np.uint64)
            end = start + int(rng.integers(1, 5))
            for side in (reference, compiled):
                side.store.add(worker, keys, start, end)
        clocks += rng.integers(0, 3, workers)
        for side in (reference, compiled):
            side.store.expire(clocks)
        # keys come and go as rounds would make them; a few replicas stay
        flip = rng.integers(0, NUM_KEYS, int(rng.integers(0, 40)))
        states[flip] = rng.integers(0, 4, flip.shape[0])
        replicas = np.flatnonzero(states == 2).astype(np.uint64)
        # gaps around every retention level: from a unit's fraction to past the longest
        now += float(RETAIN_UNIT * 2.0 ** rng.uniform(-4, 9))
        want = reference.plan(clocks, states.copy(), replicas, now)
        got = compiled.plan(clocks, states, replicas, now)
        yield reference, compiled, want, got


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(4))
def test_compiled_plan_is_the_reference_plan(mode, seed):
    workers = 1 + seed % 3
    planned = retained = 0
    for reference, compiled, want, got in _random_rounds(seed, mode, workers, 300):
        for field in ("requests", "keep", "drop", "windows"):
            assert np.array_equal(getattr(got, field), getattr(want, field)), field
        assert (got.late, got.due_keys, got.retained) == \
            (want.late, want.due_keys, want.retained)
        planned += want.requests.shape[0] + want.keep.shape[0] + want.drop.shape[0]
        if reference.manager.retention is None:
            continue
        retained += want.retained
        ref, com = reference.manager.retention, compiled.manager.retention
        assert np.array_equal(com.level, ref.level)
        assert np.array_equal(com.let_go, ref.let_go)
        assert np.array_equal(com.last_used, ref.last_used)
    assert len(compiled.store) == len(reference.store)
    for w in range(workers):
        assert compiled.store.next_start(w) == reference.store.next_start(w)
    assert planned > 0  # the rounds planned something
    if mode in ("adaptive", "replicate_only"):
        assert retained > 0  # and kept replicas for their retention


def test_retention_levels_are_learned_the_same_way():
    """Both sides learn every level, growing and shrinking (the seeds above reach a few)."""
    levels = {}
    for compiled in (False, True):
        side = Side("adaptive", 1, compiled)
        states = np.zeros(NUM_KEYS, dtype=np.uint8)
        key = np.array([7], dtype=np.uint64)
        seen, now, clock = [], 0.0, 0
        for gap in [0.01, 0.03, 0.1, 0.3, 1.0, 2.0, 0.5, 40.0, 0.02, 1e4, 0.05]:
            # requested (not held), then held as a replica nobody intends: let go
            side.store.add(0, key, clock, clock + 1)
            side.plan(np.array([clock]), states, np.empty(0, np.uint64), now)
            states[7] = 2
            clock += 2
            side.store.expire(np.array([clock]))
            side.plan(np.array([clock]), states, key, now + 1e-3)
            states[7] = 0
            now += gap
            seen.append(int(side.manager.retention.level[7]))
        levels[compiled] = seen
    assert levels[True] == levels[False]
    assert len(set(levels[True])) >= 3, levels


def test_bad_arguments_are_refused_and_nothing_is_acted_on():
    store = CompiledIntentStore(1, NUM_KEYS)
    store.add(0, np.array([1, 2], np.uint64), 0, 3)
    states = np.zeros(NUM_KEYS, np.uint8)
    none = np.empty(0, np.uint64)
    with pytest.raises(ValueError, match="state byte per key"):
        store.plan_round([0], [5], states[:-1], none, None, 0.0, True, False)
    with pytest.raises(ValueError, match="a clock and a horizon"):
        store.plan_round([], [], states, none, None, 0.0, True, False)
    with pytest.raises(IndexError, match="replica key 400"):
        store.plan_round([0], [5], states, np.array([400], np.uint64), None, 0.0, True, False)
    bad = (np.zeros(NUM_KEYS, np.float64), np.zeros(NUM_KEYS, bool),
           np.zeros(NUM_KEYS, np.uint8), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="retention"):
        store.plan_round([0], [5], states, none, bad, 0.0, True, False)
    requests, *_ = store.plan_round([0], [5], states, none, None, 0.0, True, False)
    assert requests.tolist() == [1, 2]  # the refused calls acted on nothing
