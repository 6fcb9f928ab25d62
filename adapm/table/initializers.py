"""Initial values of the parameters.

Schemes (docs/design/API.md): None/"zeros"; ("uniform", low, high, seed); ("normal", std,
seed); or a callable init(keys) -> values (one with `needs_value_length`, as adapm.optim's
inits, is called init(keys, value_length)). The random schemes are counter based: the
value of element j of key k is a pure function of (seed, k, j) (a SplitMix64 hash), so the
same seed gives the same values whatever the number of nodes and whichever node computes
them."""

import os

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_TWO_TO_MINUS_53 = 1.0 / (1 << 53)
# Elements hashed per chunk, to bound temporary memory.
CHUNK_ELEMENTS = 1 << 20


def _splitmix64(x):
    """SplitMix64 finaliser over a uint64 array (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _unit_interval(seed, stream, keys, lengths):
    """Uniform doubles in [0, 1) for every element of every key (flat, key order)."""
    lengths = lengths.astype(np.intp)
    key_rep = np.repeat(keys, lengths)
    starts = np.cumsum(lengths) - lengths
    element = (np.arange(key_rep.shape[0]) - np.repeat(starts, lengths)).astype(np.uint64)
    base = _splitmix64(np.uint64(seed) * np.uint64(2) + np.uint64(stream) + _M1)
    with np.errstate(over="ignore"):
        h = _splitmix64(_splitmix64(key_rep ^ base) + element)
    return (h >> np.uint64(11)).astype(np.float64) * _TWO_TO_MINUS_53


def parse_init(init):
    """Check an init spec early (in the caller), returning it normalised."""
    if init is None or init == "zeros":
        return ("zeros",)
    if callable(init):
        return init
    if isinstance(init, (tuple, list)) and init:
        name = init[0]
        if name == "checkpoint" and len(init) == 2 and isinstance(init[1], (str, os.PathLike)):
            return ("checkpoint", os.path.abspath(init[1]))
        if name == "uniform" and len(init) == 4:
            low, high, seed = float(init[1]), float(init[2]), int(init[3])
            if not high >= low:
                raise ValueError(f"uniform init needs low <= high, got {low}, {high}")
            return ("uniform", low, high, seed)
        if name == "normal" and len(init) == 3:
            std, seed = float(init[1]), int(init[2])
            if not std >= 0:
                raise ValueError(f"normal init needs std >= 0, got {std}")
            return ("normal", std, seed)
    raise ValueError(
        "init must be None, 'zeros', ('uniform', low, high, seed), ('normal', std, seed) "
        f"or a callable, got {init!r}")


def initial_values(init, keys, lengths, dtype):
    """Flat initial values (dtype) for `keys` with value lengths `lengths` (integer arrays;
    apps call it with their own int64 ids too)."""
    init = parse_init(init)
    if not callable(init) and init[0] == "checkpoint":
        raise ValueError("a checkpoint is restored by the node servers as a whole "
                         "(adapm.checkpoint), not computed per key")
    keys = np.asarray(keys, dtype=np.uint64)
    lengths = np.asarray(lengths, dtype=np.uint64)
    total = int(lengths.sum())
    if callable(init):
        if total == 0:
            return np.zeros(0, dtype=dtype)
        if getattr(init, "needs_value_length", False):  # adapm.optim's inits: the layout
            if (lengths != lengths[0]).any():
                raise ValueError("an optimizer's init needs a uniform value_length")
            values = np.asarray(init(keys.copy(), int(lengths[0])))
        else:
            values = np.asarray(init(keys.copy()))
        if values.dtype.kind not in "fiu" or values.size != total:
            raise ValueError(
                f"init callable returned {values.shape} {values.dtype} for {len(keys)} keys, "
                f"expected {total} numeric values")
        return np.ascontiguousarray(values, dtype=dtype).reshape(-1)
    if init[0] == "zeros":
        return np.zeros(total, dtype=dtype)
    if init[0] == "uniform":
        _, low, high, seed = init
        u = _unit_interval(seed, 0, keys, lengths)
        return (low + (high - low) * u).astype(dtype)
    _, std, seed = init
    u1 = 1.0 - _unit_interval(seed, 1, keys, lengths)  # (0, 1]
    u2 = _unit_interval(seed, 2, keys, lengths)
    return (std * np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).astype(dtype)


def chunks(keys, lengths):
    """Split (keys, lengths) into pieces of about CHUNK_ELEMENTS elements."""
    if keys.shape[0] == 0:
        return
    ends = np.cumsum(lengths)
    start_key = 0
    while start_key < keys.shape[0]:
        base = ends[start_key - 1] if start_key else 0
        stop = int(np.searchsorted(ends, base + CHUNK_ELEMENTS, side="right"))
        stop = max(stop, start_key + 1)
        yield keys[start_key:stop], lengths[start_key:stop]
        start_key = stop
