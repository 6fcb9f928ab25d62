"""The owner's record of who holds replicas of the keys it owns: one bit per node and key.

The manager asks it whether nodes other than a requester hold a key (then the key is
used in several places: replicate it rather than move it); a node's SYNC_DROP clears its
bit, a relocation forgets the key (the new owner learns the holders from their syncs).
Arrays, not sets: every call is a few numpy operations over the keys of one message."""

import numpy as np

_WORD_BITS = 64


class ReplicaHolders:
    def __init__(self, num_keys, num_nodes):
        words = (num_nodes + _WORD_BITS - 1) // _WORD_BITS
        # Zeroed pages cost memory only once written: keys with holders are few.
        self._bits = np.zeros((num_keys, words), dtype=np.uint64)

    @staticmethod
    def _word_and_bit(node):
        return node // _WORD_BITS, np.uint64(1) << np.uint64(node % _WORD_BITS)

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
