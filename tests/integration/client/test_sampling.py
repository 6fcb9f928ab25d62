"""Sampling access: uniform draws and draws from a given distribution (tested
statistically) that are local when pulled."""
import time

import numpy as np
import pytest

import adapm
from adapm.client.sampling import SAMPLE_SEED, Distribution, Sampler

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


# -- draws from a given distribution ------------------------------------------------------


def chi_square_quantile(df, z=3.719):
    """The chi-square quantile at the standard normal's z (3.719: the 99.99th percentile),
    by the Wilson-Hilferty approximation (within 1% for df >= 10)."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * np.sqrt(h)) ** 3


class RecordingWorker:
    """What Sampler needs of a worker (num_keys, rank, intent), recording the intents."""

    def __init__(self, num_keys=1000, rank=0):
        self.num_keys, self.rank, self.intents = num_keys, rank, []

    def intent(self, keys, start, end):
        if not end > start:
            raise ValueError("end must be > start")
        self.intents.append((keys.copy(), start, end))


# 60 keys of the range [200, 260): Zipf weights, with zero weights at the first position, one
# in the middle and the last (the edges of the cumulative sum's search)
WEIGHTS = 1.0 / np.arange(1, 61) ** 0.9
WEIGHTS[[0, 17, 59]] = 0.0


def test_weighted_draws_match_the_distribution():
    sampler = Sampler(RecordingWorker())
    n = 300_000
    handle = sampler.prepare(n, 3, key_range=(200, 260), distribution=WEIGHTS)
    keys = sampler.take(handle)
    assert keys.dtype == np.uint64 and keys.shape == (n,)
    assert keys.min() >= 200 and keys.max() < 260
    counts = np.bincount(keys.astype(np.int64) - 200, minlength=60)
    assert counts[[0, 17, 59]].tolist() == [0, 0, 0]  # weight 0: never drawn
    expected = n * WEIGHTS / WEIGHTS.sum()
    positive = WEIGHTS > 0
    chi2 = float(((counts[positive] - expected[positive]) ** 2 / expected[positive]).sum())
    # 57 keys of positive weight, 56 degrees of freedom: the 99.99th percentile is about 103
    assert chi2 < chi_square_quantile(positive.sum() - 1), chi2
    # and every key's frequency within 5 standard deviations of its probability
    sd = np.sqrt(expected * (1 - WEIGHTS / WEIGHTS.sum()))
    assert (np.abs(counts - expected) <= 5 * sd + 1e-9).all()
    # the draws were announced for their clocks, all of them
    (announced, start, end), = sampler.worker.intents
    np.testing.assert_array_equal(announced, keys)
    assert (start, end) == (3, 4)


def test_weights_probabilities_and_a_prepared_distribution_are_the_same_distribution():
    probabilities = WEIGHTS / WEIGHTS.sum()
    prepared = Distribution(WEIGHTS * 7)  # any scale: normalised
    np.testing.assert_allclose(prepared.probabilities, probabilities, rtol=1e-12)
    assert len(prepared) == 60 and prepared.probabilities.sum() == pytest.approx(1.0)
    with pytest.raises(ValueError):
        prepared.probabilities[0] = 1.0  # read-only: the drawn distribution cannot change
    weights_int = np.arange(5)  # integer weights (counts) are weights too
    np.testing.assert_allclose(Distribution(weights_int).probabilities, weights_int / 10)
    # the same generator state gives the same draws from weights, probabilities, prepared
    drawn = []
    for dist in (WEIGHTS, list(probabilities), prepared):
        sampler = Sampler(RecordingWorker(rank=5))
        drawn.append(sampler.take(sampler.prepare(1000, 0, key_range=(200, 260),
                                                  distribution=dist)))
    np.testing.assert_array_equal(drawn[0], drawn[2])
    assert (drawn[0] == drawn[1]).mean() > 0.999  # the last bits of the sums may differ
    # over the whole key range when no key_range is given
    sampler = Sampler(RecordingWorker(num_keys=4))
    keys = sampler.take(sampler.prepare(4000, 0, distribution=[0, 1, 0, 3]))
    assert set(np.unique(keys).tolist()) == {1, 3}
    assert 0.70 < (keys == 3).mean() < 0.80


def test_uniform_default_is_unchanged():
    """Without a distribution the draws are exactly what they always were: rng.integers of
    the worker's own stream."""
    sampler = Sampler(RecordingWorker(rank=3))
    keys = sampler.take(sampler.prepare(500, 0, key_range=(10, 90)))
    rng = np.random.default_rng([SAMPLE_SEED, 3])
    np.testing.assert_array_equal(keys, rng.integers(10, 90, size=500, dtype=np.uint64))
    np.testing.assert_array_equal(sampler.take(sampler.prepare(7, 0)),
                                  rng.integers(0, 1000, size=7, dtype=np.uint64))


@pytest.mark.parametrize("weights, message", [
    (np.ones(59), "has 59 weights, but the key range \\[200, 260\\) has 60 keys"),
    (np.ones(61), "has 61 weights"),
    (np.r_[np.ones(59), -1.0], "must be >= 0, got -1.0 at position 59"),
    (np.r_[np.nan, np.ones(59)], "must be finite, got nan at position 0"),
    (np.r_[np.ones(30), np.inf, np.ones(29)], "must be finite, got inf at position 30"),
    (np.zeros(60), "sum to 0"),
    (np.ones((60, 1)), "1-D"),
    (np.ones(60, dtype=bool), "int or float"),
    (np.ones(60, dtype=complex), "int or float"),
    (["a"] * 60, "int or float"),
    ([1.0, [2.0, 3.0]], "1-D array of weights"),
    (Distribution(np.ones(10)), "has 10 weights"),
])
def test_bad_distributions_are_refused_before_anything_is_drawn(weights, message):
    worker = RecordingWorker(rank=2)
    sampler = Sampler(worker)
    with pytest.raises(ValueError, match=message):
        sampler.prepare(100, 0, key_range=(200, 260), distribution=weights)
    assert worker.intents == []  # nothing announced
    # nothing drawn: the stream goes on where it was
    fresh = Sampler(RecordingWorker(rank=2))
    np.testing.assert_array_equal(sampler.take(sampler.prepare(20, 0)),
                                  fresh.take(fresh.prepare(20, 0)))


def test_huge_finite_weights_do_not_overflow():
    dist = Distribution(np.array([1e308, 1e308, 0.0, 1e308]))
    np.testing.assert_allclose(dist.probabilities, [1 / 3, 1 / 3, 0, 1 / 3])


def weighted_task(w):
    """prepare_sample / pull_sample with a distribution through a real worker."""
    weights = np.zeros(100)
    weights[[3, 50, 99]] = [1.0, 2.0, 1.0]
    handle = w.prepare_sample(20_000, w.clock, key_range=(100, 200),
                              distribution=Distribution(weights))
    keys, values = w.pull_sample(handle)
    np.testing.assert_array_equal(values, w.pull(keys))
    errors = []
    for bad in (weights[:-1], -weights, weights * np.nan):
        try:
            w.prepare_sample(5, w.clock, key_range=(100, 200), distribution=bad)
            errors.append(None)
        except ValueError as exc:
            errors.append(str(exc))
    return np.bincount(keys.astype(np.int64), minlength=w.num_keys), errors, w.stats()


def test_worker_draws_from_a_distribution_and_refuses_bad_ones():
    counts, errors, stats = adapm.run(weighted_task, nodes=1, workers_per_node=1,
                                      num_keys=300, value_length=2,
                                      init=("uniform", 0, 1, 0))[0]
    assert set(np.flatnonzero(counts).tolist()) == {103, 150, 199}
    assert counts.sum() == 20_000
    assert counts[150] / 20_000 == pytest.approx(0.5, abs=0.02)
    assert counts[103] / 20_000 == pytest.approx(0.25, abs=0.02)
    assert "99 weights" in errors[0] and ">= 0" in errors[1] and "finite" in errors[2]
    assert stats["intents"] == 20_000  # the refused calls announced nothing
