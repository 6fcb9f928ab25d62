"""Sampling access: uniform draws (tested statistically) that are local when pulled."""
import time

import numpy as np
import pytest

import adapm

pytestmark = pytest.mark.timeout(120)


def draw_task(w, n, key_range):
    handle = w.prepare_sample(n, w.clock, key_range=key_range)
    keys, values = w.pull_sample(handle, n // 2)
    rest, rest_values = w.pull_sample(handle)
    assert handle.remaining == 0
    assert values.shape == (n // 2, 3) and rest_values.shape == (n - n // 2, 3)
    table = w.pull(np.arange(w.num_keys))
    np.testing.assert_array_equal(values, table[keys.astype(np.intp)])
    return np.concatenate([keys, rest])


def chi_square_uniform(keys, lo, hi, bins=50):
    counts = np.bincount(((keys.astype(np.int64) - lo) * bins) // (hi - lo), minlength=bins)
    expected = len(keys) / bins
    return float(((counts - expected) ** 2 / expected).sum())


def test_draws_are_uniform_reproducible_and_independent_per_worker():
    n = 40_000
    runs = [adapm.run(draw_task, args=(n, None), nodes=1, workers_per_node=2, num_keys=1000,
                      value_length=3, init=("uniform", 0, 1, 0)) for _ in range(2)]
    first, again = runs
    for keys in first:
        assert keys.min() >= 0 and keys.max() < 1000
        # 49 degrees of freedom: the 99.99th percentile of chi-square is about 97
        assert chi_square_uniform(keys, 0, 1000) < 97
        counts = np.bincount(keys.astype(np.int64), minlength=1000)
        assert (counts > 0).all()  # with replacement, every key drawn at 40 per key
    np.testing.assert_array_equal(first[0], again[0])  # seeded by rank
    assert not np.array_equal(first[0], first[1])     # and different per worker
    # independent draws: consecutive keys are uncorrelated
    keys = first[0].astype(float)
    assert abs(np.corrcoef(keys[:-1], keys[1:])[0, 1]) < 0.03


def test_key_range_is_respected_and_uniform():
    keys = adapm.run(draw_task, args=(20_000, (200, 700)), nodes=1, workers_per_node=1,
                     num_keys=1000, value_length=3)[0]
    assert keys.min() >= 200 and keys.max() < 700
    assert chi_square_uniform(keys, 200, 700) < 97


def bad_input_task(w):
    errors = []
    handle = w.prepare_sample(5, w.clock + 1)
    for call in (lambda: w.prepare_sample(-1, 0), lambda: w.prepare_sample(1.5, 0),
                 lambda: w.prepare_sample(3, 0, key_range=(5, 5)),
                 lambda: w.prepare_sample(3, 0, key_range=(0, w.num_keys + 1)),
                 lambda: w.prepare_sample(3, 0, key_range="all"),
                 lambda: w.prepare_sample(3, 5, 5),
                 lambda: w.pull_sample(handle, 6),
                 lambda: w.pull_sample("handle", 1)):
        try:
            call()
            errors.append(None)
        except (ValueError, TypeError) as exc:
            errors.append(type(exc).__name__)
    keys, _ = w.pull_sample(handle, 5)  # nothing was used up by the refused calls
    return errors, keys.shape[0]


def test_bad_input_is_refused_and_loses_nothing():
    errors, left = adapm.run(bad_input_task, nodes=1, workers_per_node=1, num_keys=50,
                             value_length=2)[0]
    assert errors == ["ValueError"] * 7 + ["TypeError"]
    assert left == 5


def negative_sampling_task(w, steps, ahead, per_step):
    handles = {}
    for clock in range(ahead):
        handles[clock] = w.prepare_sample(per_step, clock)
    w.barrier()
    before = w.stats()
    for clock in range(steps):
        handles[clock + ahead] = w.prepare_sample(per_step, clock + ahead)
        keys, values = w.pull_sample(handles.pop(clock))
        w.push(keys, np.full_like(values, 0.5))
        time.sleep(0.001)  # the step's computation: 8 clocks ahead is then ~10 ms
        w.advance_clock()
        if clock % 20 == 0:
            w.wait_sync()
    after = w.stats()
    w.wait_sync()
    w.barrier()
    local = after["pulls_local"] - before["pulls_local"]
    remote = after["pulls_remote"] - before["pulls_remote"]
    return local, remote


def test_samples_announced_ahead_are_served_locally_in_adaptive_mode():
    results = adapm.run(negative_sampling_task, args=(150, 8, 50), nodes=2,
                        workers_per_node=1, num_keys=20_000, value_length=4,
                        mode="adaptive")
    local = sum(r[0] for r in results)
    remote = sum(r[1] for r in results)
    assert local / (local + remote) >= 0.9, (local, remote)
    static = adapm.run(negative_sampling_task, args=(60, 8, 50), nodes=2, workers_per_node=1,
                       num_keys=20_000, value_length=4, mode="static")
    s_local = sum(r[0] for r in static)
    s_remote = sum(r[1] for r in static)
    assert s_local / (s_local + s_remote) < 0.6  # about 1/N without intents
