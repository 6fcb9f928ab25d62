"""The per-key ownership protocol's bookkeeping (DESIGN.md §5), free of sockets and tables.

- Every key has a home node, key % num_nodes, which is also its first owner and always
  learns who owns the key now. Each change of owner carries a counter; the home accepts
  only newer information, since messages may overtake each other.
- The owner of a key holds its counter; a relocation moves value, ownership and
  counter + 1 in one message. The old owner caches the new owner, so it forwards what it
  receives for the key along the key's path; the new owner tells the home.
"""

import numpy as np


def home_of(keys, num_nodes):
    return (keys % np.uint64(num_nodes)).astype(np.uint16)


def split_by(dest):
    """{node: indices into dest} for each node that occurs in `dest`, indices ascending."""
    if dest.shape[0] == 0:
        return {}
    first = dest[0]
    if (dest == first).all():
        return {int(first): np.arange(dest.shape[0])}
    order = np.argsort(dest, kind="stable")
    sorted_dest = dest[order]
    cuts = np.flatnonzero(sorted_dest[1:] != sorted_dest[:-1]) + 1
    return {int(part[0]): order[start:stop] for part, start, stop in
            zip(np.split(sorted_dest, cuts), np.r_[0, cuts], np.r_[cuts, dest.shape[0]])}


def route(view, keys, node, num_nodes):
    """Where a node sends requests for keys it cannot serve itself: the cached owner, or
    the key's home where the cache points to the node itself (the key is on its way
    here), or -1 where that is the node too (nowhere to go)."""
    dest = np.empty(keys.shape[0], dtype=np.uint16)
    view.owners_of(keys, dest)
    dest = dest.astype(np.int32)
    here = dest == node
    if here.any():
        home = home_of(keys[here], num_nodes).astype(np.int32)
        home[home == node] = -1
        dest[here] = home
    return dest


class Ownership:
    """One node's view: counters of the keys it owns, and the records of its home keys."""

    def __init__(self, node, num_nodes, num_keys):
        self.node = node
        self.num_nodes = num_nodes
        # Ownership counter per key, meaningful for keys this node owns (it travels with
        # the key). 4 bytes per key of private memory.
        self.counter = np.zeros(num_keys, dtype=np.uint32)
        # For home keys (k % num_nodes == node), indexed k // num_nodes: the latest owner
        # this home heard of, and the counter of that information.
        home_count = len(range(node, num_keys, num_nodes))
        self.home_owner = np.full(home_count, node, dtype=np.uint16)
        self.home_counter = np.zeros(home_count, dtype=np.uint32)

    def is_home(self, keys):
        return home_of(keys, self.num_nodes) == self.node

    def record(self, keys, owner, counters):
        """The home hears that `owner` owns `keys` as of `counters`; returns the mask of
        keys whose record changed (newer information only)."""
        slots = (keys // np.uint64(self.num_nodes)).astype(np.intp)
        newer = counters > self.home_counter[slots]
        self.home_owner[slots[newer]] = owner
        self.home_counter[slots[newer]] = counters[newer]
        return newer

