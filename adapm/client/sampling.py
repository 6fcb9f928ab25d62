"""Sampling access: draws of keys (negative sampling) that cost no remote access.

    handle = w.prepare_sample(n, start, end)      # draws n keys now, announces them
    keys, values = w.pull_sample(handle, count)   # the next `count` of them, with values
    handle = w.prepare_sample(n, start, key_range=(lo, hi), distribution=weights)

The distribution: `prepare_sample` draws `n` keys independently, with replacement, from
the key range (or `key_range=(lo, hi)`), from a random stream of its own per worker,
seeded by the worker's rank (so a run is reproducible). By default every key of the range
is equally likely (`rng.integers`). With `distribution=`, key lo + i is drawn with
probability weights[i] / sum(weights): one non-negative, finite weight per key of the
range (probabilities are weights too), at least one positive. A `Distribution` built once
from the weights can be passed instead of the array, so that a training loop that draws
every step does not validate and sum the weights every step. Such draws use Walker's
alias table, built once per Distribution (Vose's construction): one uniform number and
O(1) work per draw (numpy), whatever the range; a key of weight 0 is never drawn. The
draws are fixed when the handle is made; `pull_sample` only hands them out in order.
Nothing about placement changes which keys are drawn.

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

    def prepare(self, n, start, end=None, key_range=None, distribution=None):
        n = _count("n", n)
        lo, hi = self._range(key_range)
        end = start + 1 if end is None else end
        if n and hi - lo < 1:
            raise ValueError(f"key_range {key_range} is empty")
        if distribution is not None:  # checked before anything is drawn
            distribution = _distribution_for(distribution, lo, hi)
        if not n:
            keys = np.empty(0, dtype=np.uint64)
        elif distribution is None:
            keys = self.rng.integers(lo, hi, size=n, dtype=np.uint64)
        else:
            keys = distribution.draw(self.rng, n).astype(np.uint64) + np.uint64(lo)
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


class Distribution:
    """A distribution over the keys of a range, for prepare_sample(..., distribution=):
    key lo + i of the range is drawn with probability weights[i] / sum(weights).

    `weights`: a 1-D array-like of non-negative, finite int or float weights, one per key
    of the range in key order, at least one positive (probabilities that sum to 1 are
    weights too; they are normalised anyway). Refused with ValueError otherwise. Build it
    once and pass it to every prepare_sample call that draws from it: the weights are
    validated and summed here, not at every draw. Its length must match the range the
    call draws from (`key_range`, or every key of the table)."""

    __slots__ = ("probabilities", "_accept", "_alias")

    def __init__(self, weights):
        p = _weights(weights)
        self._accept, self._alias = _alias_table(p)
        p.flags.writeable = False
        self.probabilities = p            # float64, sums to 1 (read-only)

    def __len__(self):
        return self.probabilities.shape[0]

    def __repr__(self):
        return f"Distribution over {len(self)} keys"

    def draw(self, rng, n):
        """`n` positions in [0, len(self)), independent draws from `rng` (a numpy
        Generator) by the alias table: a uniform number u in [0, len) picks column
        floor(u), whose own position is kept when the fraction of u is below the
        column's acceptance, else its alias is taken."""
        x = rng.random(n)
        x *= len(self)
        column = x.astype(np.int64)
        np.minimum(column, len(self) - 1, out=column)  # rounding cannot leave the table
        x -= column
        return np.where(x < self._accept[column], column, self._alias[column])


def _alias_table(p):
    """Walker's alias table of the probabilities p, by Vose's construction: column i keeps
    position i with probability accept[i] and gives alias[i] otherwise, so that every
    position's total is n * p. A position of weight 0 has acceptance 0 and an alias of
    positive weight: it is never drawn, whatever rounding leaves over."""
    n = p.shape[0]
    scaled = p * n
    accept, alias = np.ones(n), np.arange(n, dtype=np.int64)
    small = np.flatnonzero(scaled < 1.0).tolist()
    large = np.flatnonzero(scaled >= 1.0).tolist()
    mass = scaled.tolist()
    while small and large:
        s, g = small.pop(), large[-1]
        accept[s], alias[s] = mass[s], g
        mass[g] -= 1.0 - mass[s]
        if mass[g] < 1.0:
            small.append(large.pop())
    # what rounding leaves in either list keeps its own column (acceptance 1)
    zero = np.flatnonzero(p == 0)
    accept[zero] = 0.0
    alias[zero[alias[zero] == zero]] = int(np.argmax(p))
    return accept, alias


def _weights(weights):
    """The weights as float64 probabilities (a new array), or ValueError saying why not."""
    try:
        arr = np.asarray(weights)
    except Exception as exc:  # ragged lists and the like
        raise ValueError(f"distribution must be a 1-D array of weights: {exc}") from None
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"distribution must be int or float weights, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"distribution must be a 1-D array of weights, got shape "
                         f"{arr.shape}")
    arr = arr.astype(np.float64)  # a copy: the caller's array is never changed
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.shape[0]:
        raise ValueError(f"distribution: weights must be finite, got {arr[bad[0]]} at "
                         f"position {bad[0]} ({bad.shape[0]} non-finite)")
    bad = np.flatnonzero(arr < 0)
    if bad.shape[0]:
        raise ValueError(f"distribution: weights must be >= 0, got {arr[bad[0]]} at "
                         f"position {bad[0]} ({bad.shape[0]} negative)")
    top = arr.max() if arr.shape[0] else 0.0
    if not top > 0:
        raise ValueError(f"distribution: the {arr.shape[0]} weights sum to 0; at least "
                         "one key needs a positive weight")
    arr /= top  # first to the largest: a sum of huge finite weights cannot overflow
    arr /= arr.sum()
    return arr


def _distribution_for(distribution, lo, hi):
    """`distribution` (a Distribution or weights) as a Distribution over [lo, hi)."""
    if not isinstance(distribution, Distribution):
        distribution = Distribution(distribution)
    if len(distribution) != hi - lo:
        raise ValueError(f"distribution has {len(distribution)} weights, but the key range "
                         f"[{lo}, {hi}) has {hi - lo} keys: give one weight per key")
    return distribution


def _count(name, value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) \
            or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)
