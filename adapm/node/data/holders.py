"""The owner's record of who holds replicas of the keys it owns: one bit per node and key.

The manager asks it whether nodes other than a requester hold a key (then the key is
used in several places: replicate it rather than move it); a node's SYNC_DROP clears its
bit, a relocation forgets the key (the new owner learns the holders from their syncs).
Arrays, not sets: every call is a few numpy operations over the keys of one message."""

import numpy as np

_WORD_TYPES = (np.uint8, np.uint16, np.uint32, np.uint64)


class ReplicaHolders:
    def __init__(self, num_keys, num_nodes):
        # The narrowest word that holds a bit per node (a byte per key up to 8 nodes),
        # and as many 64-bit words as it takes beyond 64 nodes.
        self._type = next(t for t in _WORD_TYPES if num_nodes <= np.iinfo(t).bits) \
            if num_nodes <= 64 else np.uint64
        self._word_bits = np.iinfo(self._type).bits
        words = (num_nodes + self._word_bits - 1) // self._word_bits
        # Zeroed pages cost memory only once written: keys with holders are few.
        self._bits = np.zeros((num_keys, words), dtype=self._type)

    def raw(self):
        """The bits themselves, changed in place by the compiled data plane
        (adapm.node.data.plane): a row per key, little-endian words, so node n's bit is
        bit n % 8 of byte n // 8 of the key's row."""
        return self._bits

    def _word_and_bit(self, node):
        return node // self._word_bits, self._type(1 << (node % self._word_bits))

    def add(self, keys, node):
        word, bit = self._word_and_bit(node)
        self._bits[keys.astype(np.intp), word] |= bit

    def discard(self, keys, node):
        word, bit = self._word_and_bit(node)
        self._bits[keys.astype(np.intp), word] &= ~bit

    def forget(self, keys):
        self._bits[keys.astype(np.intp)] = 0

    def others(self, keys, node):
        """Mask: keys that a node other than `node` holds a replica of."""
        word, bit = self._word_and_bit(node)
        rows = self._bits[keys.astype(np.intp)].copy()
        rows[:, word] &= ~bit
        return rows.any(axis=1)
