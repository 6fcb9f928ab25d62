"""What the parts of a node server share: who the node is, its table, and the bookkeeping
that several parts read (ownership records, intents). Passed to each part explicitly;
the parts own everything else they keep."""

import numpy as np

from adapm.common.errors import ProtocolError
from adapm.table.keyset import KeyFlags
from adapm.table.shared_table import NODE_SLOT, OWNED


class NodeContext:
    def __init__(self, spec, node, table, ownership, intents, compiled=True):
        """compiled: the parts' key sets are the compiled ones (else the reference)."""
        self.spec = spec
        self.node = node
        self.num_nodes = spec.num_nodes
        self.num_keys = spec.num_keys
        self.workers = spec.workers_per_node
        self.first_rank = node * spec.workers_per_node
        self.table = table
        self.view = table.view
        self.ownership = ownership
        self.intents = intents
        self.key_flags = KeyFlags(spec.num_keys)  # the parts' KeySets, a bit per key each
        self.state_bytes = self.view.states_array()  # every key's state, read in place
        self.compiled = compiled

    def new_key_set(self):
        """A KeySet over this node's keys, sharing a byte per key with up to 7 others."""
        return self.key_flags.new_set(compiled=self.compiled)

    def count(self, name, n):
        """Add to one of the node's counters (in the table, read by w.stats())."""
        self.view.node_counter_add(NODE_SLOT[name], n)

    def check_keys(self, keys):
        if keys.shape[0] and int(keys.max()) >= self.num_keys:
            raise ProtocolError(f"key {int(keys.max())} out of range [0, {self.num_keys})")

    def is_local_worker(self, rank):
        return self.first_rank <= rank < self.first_rank + self.workers

    def lengths(self, keys):
        """The keys' value lengths, as allocator sizes."""
        return self.table.lengths(keys)

    def states(self, keys):
        states = np.empty(keys.shape[0], dtype=np.uint8)
        self.view.states_of(keys, states)
        return states

    def not_owned(self, keys):
        return self.table.states(keys) != OWNED
