"""The compiled intent store (src/_intents.pyx) against its reference, IntentStore: the
same random sequences of calls on both, every answer compared."""

import numpy as np
import pytest

from adapm.policy._intents import CompiledIntentStore
from adapm.policy.intents import IntentStore, new_store

NUM_KEYS = 500


def _random_calls(seed, workers, steps):
    """Both stores driven through `steps` calls; yields after each one."""
    rng = np.random.default_rng(seed)
    reference, compiled = IntentStore(workers, NUM_KEYS), CompiledIntentStore(workers, NUM_KEYS)
    clocks = np.zeros(workers, dtype=np.int64)
    next_start = np.zeros(workers, dtype=np.int64)
    for _ in range(steps):
        op = rng.random()
        worker = int(rng.integers(workers))
        if op < 0.5:
            # mostly in order of start, now and then late or early
            start = int(next_start[worker] + rng.integers(-3, 4))
            start = max(start, 0)
            next_start[worker] = max(next_start[worker], start) + int(rng.integers(0, 2))
            end = start + int(rng.integers(1, 6))
            keys = rng.integers(0, NUM_KEYS, int(rng.integers(0, 40))).astype(np.uint64)
            reference.add(worker, keys, start, end)
            compiled.add(worker, keys, start, end)
        elif op < 0.65:
            clocks[worker] += int(rng.integers(0, 4))
            reference.expire(clocks)
            compiled.expire(clocks)
        elif op < 0.9:
            horizon = int(clocks[worker] + rng.integers(0, 8))
            got = compiled.due_keys(worker, horizon)
            want = reference.due_keys(worker, horizon)
            for g, w in zip(got, want):
                assert np.array_equal(g, w)
        else:
            assert compiled.next_start(worker) == reference.next_start(worker)
        yield reference, compiled


@pytest.mark.parametrize("seed", range(12))
def test_compiled_store_answers_as_the_reference(seed):
    workers = 1 + seed % 3
    rng = np.random.default_rng(1000 + seed)
    for step, (reference, compiled) in enumerate(_random_calls(seed, workers, 4000)):
        assert len(compiled) == len(reference)
        if step % 50 == 0:
            assert np.array_equal(compiled.count, reference.count)
            probe = rng.integers(0, NUM_KEYS, 30).astype(np.uint64)
            assert np.array_equal(compiled.intended(probe), reference.intended(probe))
            for w in range(workers):
                assert compiled.next_start(w) == reference.next_start(w)


def test_the_key_buffer_is_compacted_and_keys_stay_right():
    """Thousands of intents come and go: the compiled store's key buffer is compacted
    again and again, and the keys it hands out are still each intent's own."""
    store = CompiledIntentStore(1, 1 << 20)
    for start in range(5000):
        store.add(0, np.arange(start, start + 64, dtype=np.uint64), start, start + 2)
        if start % 7 == 0:
            store.expire(np.array([start], dtype=np.int64))
        if start % 5 == 4:
            keys, starts, lengths = store.due_keys(0, start + 1)
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            for s, a, b in zip(starts, offsets[:-1], offsets[1:]):
                assert np.array_equal(keys[a:b], np.arange(s, s + 64, dtype=np.uint64))
    store.expire(np.array([10**6], dtype=np.int64))
    assert len(store) == 0 and not store.count.any()


def test_bad_calls_are_refused_as_by_the_reference():
    for store in (IntentStore(2, 10), CompiledIntentStore(2, 10)):
        with pytest.raises(ValueError, match="unknown worker"):
            store.add(2, np.array([1], np.uint64), 0, 1)
        with pytest.raises(ValueError, match="empty"):
            store.add(0, np.array([1], np.uint64), 3, 3)
        with pytest.raises(ValueError, match="key 10"):
            store.add(0, np.array([1, 10], np.uint64), 0, 1)
        assert len(store) == 0 and not store.count.any()


def test_new_store_picks_the_implementation():
    assert isinstance(new_store(1, 5), CompiledIntentStore)
    assert isinstance(new_store(1, 5, compiled=False), IntentStore)
