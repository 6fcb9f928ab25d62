"""Sampling access: uniform draws of keys (negative sampling) that cost no remote access.

    handle = w.prepare_sample(n, start, end)      # draws n keys now, announces them
    keys, values = w.pull_sample(handle, count)   # the next `count` of them, with values

The distribution: `prepare_sample` draws `n` keys independently and uniformly, with
replacement, from the key range (or `key_range=(lo, hi)`), from a random stream of its
own per worker, seeded by the worker's rank (so a run is reproducible). The draws are
fixed when the handle is made; `pull_sample` only hands them out in order. Nothing about
placement changes which keys are drawn.

Where the locality comes from: the draws are announced as an intent for the clocks
[start, end) the moment they are made, so by the time the worker's clock reaches
`start` the node holds them (relocated or replicated by the manager, like any intended
key) and `pull_sample` reads them from shared memory. A draw that is not local yet when
pulled (an intent acted on late) is fetched remotely like any pull, and counted so in the
statistics. In modes static and replicate_all intents do nothing; replicate_all holds
every key anyway.

This module knows nothing of sockets: it uses the worker's public calls."""

import numpy as np

SAMPLE_SEED = 0x5A4D504C  # mixed with the worker's rank: independent streams per worker


class SampleHandle:
    """Keys drawn for one prepare_sample call; handed out in order by pull_sample."""

    __slots__ = ("keys", "start", "end", "used")

    def __init__(self, keys, start, end):
        self.keys = keys
        self.start = start
        self.end = end
        self.used = 0

    @property
    def remaining(self):
        return self.keys.shape[0] - self.used

    def __len__(self):
        return self.keys.shape[0]

    def __repr__(self):
        return (f"SampleHandle({self.keys.shape[0]} keys, clocks [{self.start}, {self.end}), "
                f"{self.remaining} left)")


class Sampler:
    """One worker's draws. `worker` needs num_keys, rank and intent()."""

    def __init__(self, worker):
        self.worker = worker
        self.rng = np.random.default_rng([SAMPLE_SEED, worker.rank])

    def prepare(self, n, start, end=None, key_range=None):
        n = _count("n", n)
        lo, hi = self._range(key_range)
        end = start + 1 if end is None else end
        if n and hi - lo < 1:
            raise ValueError(f"key_range {key_range} is empty")
        keys = self.rng.integers(lo, hi, size=n, dtype=np.uint64) if n else \
            np.empty(0, dtype=np.uint64)
        self.worker.intent(keys, start, end)  # validates start and end
        return SampleHandle(keys, start, end)

    def take(self, handle, count=None):
        if not isinstance(handle, SampleHandle):
            raise TypeError(f"pull_sample needs a handle from prepare_sample, got "
                            f"{type(handle).__name__}")
        count = handle.remaining if count is None else _count("count", count)
        if count > handle.remaining:
            raise ValueError(f"pull_sample: {count} keys asked, {handle.remaining} of "
                             f"{len(handle)} left in {handle!r}")
        keys = handle.keys[handle.used:handle.used + count]
        handle.used += count
        return keys

    def _range(self, key_range):
        num_keys = self.worker.num_keys
        if key_range is None:
            return 0, num_keys
        try:
            lo, hi = (int(x) for x in key_range)
        except (TypeError, ValueError):
            raise ValueError(f"key_range must be (lo, hi), got {key_range!r}") from None
        if not 0 <= lo < hi <= num_keys:
            raise ValueError(f"key_range ({lo}, {hi}) must satisfy 0 <= lo < hi <= {num_keys}")
        return lo, hi


def _count(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)
