"""Selecting and placing the values of some keys in flat value arrays (key order), for
uniform and per-key value lengths alike."""

import numpy as np


def element_index(starts, lengths):
    """Flat element indices of the segments [start, start + length), concatenated."""
    lengths = lengths.astype(np.intp)
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.intp)
    seg_starts = np.cumsum(lengths) - lengths
    return np.repeat(starts.astype(np.intp) - seg_starts, lengths) + np.arange(total)


class Segments:
    """The layout of one flat value array: the keys' lengths, in key order."""

    def __init__(self, lengths, uniform):
        self.uniform = uniform
        self.lengths = lengths
        self._starts = None

    @classmethod
    def of(cls, view, keys):
        if view.uniform_length:
            return cls(None, view.uniform_length)
        lengths = np.empty(keys.shape[0], dtype=np.uint64)
        view.lengths_of(keys, lengths)
        return cls(lengths, 0)

    @property
    def starts(self):
        if self._starts is None:
            self._starts = np.cumsum(self.lengths) - self.lengths
        return self._starts

    def take(self, values, idx):
        """Flat values of the keys at positions `idx`."""
        if self.uniform:
            return values.reshape(-1, self.uniform)[idx].reshape(-1)
        return values[element_index(self.starts[idx], self.lengths[idx])]

    def put(self, out, idx, values):
        """Write flat `values` (of the keys at positions idx, in that order) into `out`."""
        if self.uniform:
            out.reshape(-1, self.uniform)[idx] = values.reshape(-1, self.uniform)
        else:
            out.reshape(-1)[element_index(self.starts[idx], self.lengths[idx])] = values

    def nonzero(self, values):
        """Mask: keys whose values in `values` (flat, all keys) are not all zero."""
        if self.uniform:
            return values.reshape(-1, self.uniform).any(axis=1)
        if self.lengths.shape[0] == 0:
            return np.zeros(0, dtype=bool)
        return np.logical_or.reduceat(values != 0, self.starts.astype(np.intp))

    def size(self, idx):
        if self.uniform:
            return len(idx) * self.uniform
        return int(self.lengths[idx].sum())
