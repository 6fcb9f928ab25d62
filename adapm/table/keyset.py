"""Sets of keys as arrays: the node server's per-key state without Python sets.

A node server tracks a few sets of keys (its replicas, the keys it requested, the keys
on their way to it, ...) that change a batch at a time and are read, now and then, as a
whole. Python sets cost an object per key and a Python step per key on every batch;
`KeySet` costs one bit per key of the key range plus an array of its members, and every
operation is a few numpy calls over the keys of the batch: up to eight sets share one byte
per key (`KeyFlags`), each set one bit of it. Node servers use the compiled twin,
`adapm.table._keyset.CompiledKeySet` (src/_keyset.pyx: no sort per batch); `KeySet` is its
reference, and a test runs both side by side."""

import numpy as np

_NO_KEYS = np.empty(0, dtype=np.uint64)


class KeyFlags:
    """One byte per key shared by up to eight KeySets, one bit each: a node server keeps
    several sets over the same key range, and a byte per set and key would be most of
    its per-key memory."""

    BITS = 8

    def __init__(self, num_keys):
        self._flags = np.zeros(num_keys, dtype=np.uint8)
        self._used = 0

    def new_set(self, compiled=True):
        """A set sharing these flags: the compiled one (adapm.table._keyset), or the
        reference KeySet."""
        if self._used == self.BITS:
            raise RuntimeError(f"a KeyFlags holds at most {self.BITS} sets")
        self._used += 1
        if compiled:
            from adapm.table._keyset import CompiledKeySet
            return CompiledKeySet(self._flags.shape[0], flags=self._flags, bit=self._used - 1)
        return KeySet(self._flags.shape[0], flags=self._flags, bit=self._used - 1)


class KeySet:
    def __init__(self, num_keys, flags=None, bit=0):
        """A set over keys 0..num_keys-1; `flags` (uint8 per key) and `bit`: share that
        array with other sets (KeyFlags), else the set has a byte per key of its own."""
        self._flags = np.zeros(num_keys, dtype=np.uint8) if flags is None else flags
        self._bit = np.uint8(1 << bit)
        self._clear_bit = np.uint8(0xFF ^ (1 << bit))
        # The members in some order; may hold keys removed since (and a key removed and
        # added again twice) until `keys()` compacts it: removal is then one scatter.
        self._listed = np.empty(64, dtype=np.uint64)
        self._length = 0          # used part of _listed
        self._size = 0            # members
        self._compact = True      # _listed[:_length] is exactly the members, sorted

    def __len__(self):
        return self._size

    def __bool__(self):
        return self._size > 0

    def contains(self, keys):
        """Mask: which of `keys` are members."""
        return self._has(keys.astype(np.intp))

    def _has(self, idx):
        return (self._flags[idx] & self._bit) != 0

    def add(self, keys):
        """Add `keys` (any order, repeats allowed); returns those that were not members."""
        keys = np.unique(keys)  # sorted and distinct
        new = keys[~self._has(keys.astype(np.intp))]
        if new.shape[0] == 0:
            return new
        self._flags[new.astype(np.intp)] |= self._bit
        end = self._length + new.shape[0]
        if end > self._listed.shape[0]:
            grown = np.empty(max(end, 2 * self._listed.shape[0]), dtype=np.uint64)
            grown[:self._length] = self._listed[:self._length]
            self._listed = grown
        if self._length and self._listed[self._length - 1] >= new[0]:
            self._compact = False
        self._listed[self._length:end] = new
        self._length = end
        self._size += new.shape[0]
        return new

    def discard(self, keys):
        """Remove those of `keys` that are members; returns them."""
        keys = np.unique(keys)
        gone = keys[self._has(keys.astype(np.intp))]
        if gone.shape[0]:
            self._flags[gone.astype(np.intp)] &= self._clear_bit
            self._size -= gone.shape[0]
            self._compact = False
        return gone

    def keys(self):
        """The members, sorted (a copy)."""
        if not self._compact:
            listed = self._listed[:self._length]
            kept = np.unique(listed[self._has(listed.astype(np.intp))])
            self._listed[:kept.shape[0]] = kept
            self._length = kept.shape[0]
            self._compact = True
        return self._listed[:self._length].copy()

    def take(self):
        """The members, sorted; the set is empty afterwards."""
        members = self.keys() if self._size else _NO_KEYS
        self.clear()
        return members

    def clear(self):
        if self._size or self._length:
            self._flags[self._listed[:self._length].astype(np.intp)] &= self._clear_bit
        self._length = self._size = 0
        self._compact = True
