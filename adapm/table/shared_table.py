"""The node-local shared-memory parameter table (Python side).

A POSIX shared-memory segment (posix_ipc) that the node server creates, fills and unlinks,
and that every worker of the node maps. The byte layout and the hot path live in the Cython
module adapm.table._table; this module names segments, creates/attaches/unlinks them, allocates
value slots and names the counter slots. It knows nothing of the network or the manager."""

import os
import re

import numpy as np
import posix_ipc

from adapm.table import _table
from adapm.table._slots import CompiledSlotAllocator
from adapm.table._table import (  # noqa: F401
    ABSENT,
    KEEP_OWNER,
    OWNED,
    PENDING,
    REPLICA,
    SERVE_NO_VALUE,
    SERVE_VALUE,
    SERVE_VALUE_IF_CHANGED,
    LockTimeout,
    TableView,
)

SEGMENT_PREFIX = "/adapm-"
# Segments made by processes with this variable set carry its value in their names, so
# that whoever set it (the test suite) can tell its segments from anyone else's.
ENV_CLUSTER_TAG = "ADAPM_CLUSTER_TAG"
_TAG_PATTERN = re.compile(r"[A-Za-z0-9_]{0,32}")  # no "/" or "-": the name stays parseable

# Slots of each worker's counter block (uint64 each). The worker is their only writer.
WORKER_COUNTERS = (
    "clock", "pulls_local", "pulls_remote", "pushes_local", "pushes_remote",
    "sets_local", "sets_remote", "intents", "bytes_sent", "bytes_received", "pid",
    "bytes_to_node",
    # Worker.count_samples: data points trained on, those of the first call, and when the
    # first and the last call were made (time.monotonic_ns of the worker's machine).
    "samples", "samples_first", "samples_start_ns", "samples_last_ns",
)
WORKER_SLOT = {name: i for i, name in enumerate(WORKER_COUNTERS)}
# Node-level counters, written by the node server only.
NODE_COUNTERS = (
    "relocations", "replicas_made", "replicas_dropped", "late_intents", "bytes_sent",
    "bytes_received", "malformed_messages", "intents_received", "owner_changes",
    "rounds_started", "rounds_done",
    "full_round_done",  # number of the last completed round that synced every replica
    "reaction_us",      # the node's estimate of the time from an intent to a usable key
    "replicas_retained",  # unintended replicas kept a round (learned retention), summed
    "plane_served",     # remote requests the compiled data plane served
)
NODE_SLOT = {name: i for i, name in enumerate(NODE_COUNTERS)}
# What a node server says it does, in the header (TableView.set_server_idle): a worker
# that appends an intent wakes a sleeping server, and a polling one for an intent due soon.
SERVER_AWAKE, SERVER_ASLEEP, SERVER_POLLING = 0, 1, 2


def cluster_tag():
    """The value of ADAPM_CLUSTER_TAG ('' when unset), checked to be usable in a name."""
    tag = os.environ.get(ENV_CLUSTER_TAG, "")
    if not _TAG_PATTERN.fullmatch(tag):
        raise ValueError(f"environment variable {ENV_CLUSTER_TAG}={tag!r} must be at most "
                         "32 letters, digits or _")
    return tag


def segment_prefix(tag):
    """What the names of every segment made under cluster tag `tag` start with."""
    return f"{SEGMENT_PREFIX}{tag}-" if tag else SEGMENT_PREFIX


def segment_name(cluster_id, node):
    """The /dev/shm name of a node's table: /adapm-[TAG-]CLUSTER_ID-nNODE. The tag is in
    the name rather than in the cluster id so that it marks every segment, also those of
    clusters whose id was given (--cluster-id, or derived from the coordinator), and so
    that machines of one cluster need not share it (ids are checked when nodes join)."""
    return f"{segment_prefix(cluster_tag())}{cluster_id}-n{node}"


def unlink_segment(name):
    """Remove a segment name; True when it existed. Mappings stay valid until unmapped."""
    try:
        posix_ipc.unlink_shared_memory(name)
        return True
    except posix_ipc.ExistentialError:
        return False


def segment_exists(name):
    return os.path.exists("/dev/shm" + name)


def normalise_lengths(num_keys, value_length):
    """(uniform_length or 0, per-key lengths as uint64 array or None)."""
    if np.ndim(value_length) == 0:
        length = int(value_length)
        if length < 1:
            raise ValueError(f"value_length must be >= 1, got {length}")
        return length, None
    lengths = np.asarray(value_length)
    if lengths.ndim != 1 or lengths.shape[0] != num_keys or lengths.dtype.kind not in "iu":
        raise ValueError(
            f"per-key value_length must be a 1-D integer array of length num_keys={num_keys}")
    if lengths.shape[0] and (lengths.min() < 1 or lengths.max() >= 2**32):
        raise ValueError("every per-key value length must be in [1, 2**32)")
    return 0, lengths.astype(np.uint64)


class SlotAllocator:
    """Value slots in the arena (the reference of adapm.table._slots.CompiledSlotAllocator,
    which tables use: its state is shared with the compiled data plane). Only the node
    server allocates, so this is private state of that process: a bump pointer plus free
    lists by length. A free list is a list of numpy arrays (each call to free() appends
    one), so that the thousands of slots a sync round takes or gives back cost a few array
    operations, not a loop over keys."""

    def __init__(self, capacity, uniform=0):
        """uniform: the table's one value length (0: lengths per key). Calls whose
        lengths are all that one take a shorter path (a node server allocates and frees
        slots every sync round), with the same result."""
        self.capacity = capacity
        self.top = 0
        self.uniform = uniform
        self._free = {}  # length -> [uint64 arrays of free offsets], used as a stack

    def allocate(self, lengths):
        """Offsets for slots of the given lengths (uint64 array)."""
        lengths = np.asarray(lengths, dtype=np.uint64)
        if self.uniform and (lengths == self.uniform).all():
            return self._allocate_uniform(lengths.shape[0])
        offsets = np.empty(lengths.shape[0], dtype=np.uint64)
        fresh = np.ones(lengths.shape[0], dtype=bool)
        for length in (_distinct(lengths) if self._free else ()):
            if not self._free.get(length):
                continue
            wanted = np.flatnonzero(lengths == length)
            reused = self._pop(length, wanted.shape[0])
            offsets[wanted[:reused.shape[0]]] = reused
            fresh[wanted[:reused.shape[0]]] = False
        need = lengths[fresh]
        total = int(need.sum())
        if self.top + total > self.capacity:
            raise MemoryError(
                f"parameter table arena full: {self.top + total} > {self.capacity} elements")
        ends = np.cumsum(need, dtype=np.uint64)
        offsets[fresh] = self.top + ends - need
        self.top += total
        return offsets

    def _allocate_uniform(self, count):
        """allocate() of `count` slots of the uniform length: freed ones first (as
        allocate takes them), then fresh ones from the top."""
        length = self.uniform
        stack = self._free.get(length, ())
        fresh = max(0, count - sum(chunk.shape[0] for chunk in stack))
        if self.top + fresh * length > self.capacity:  # before any freed slot is taken
            raise MemoryError(f"parameter table arena full: {self.top + fresh * length} > "
                              f"{self.capacity} elements")
        reused = self._pop(length, count) if stack else _NO_OFFSETS
        offsets = np.empty(count, dtype=np.uint64)
        offsets[:reused.shape[0]] = reused
        offsets[reused.shape[0]:] = np.arange(self.top, self.top + fresh * length, length,
                                              dtype=np.uint64)
        self.top += fresh * length
        return offsets

    def _pop(self, length, count):
        """Up to `count` free offsets of slots of `length`, taken off its free list."""
        stack, taken, left = self._free[length], [], count
        while stack and left:
            chunk = stack[-1]
            if chunk.shape[0] <= left:
                taken.append(stack.pop())
                left -= chunk.shape[0]
            else:
                taken.append(chunk[chunk.shape[0] - left:])
                stack[-1] = chunk[:chunk.shape[0] - left]
                left = 0
        return np.concatenate(taken) if taken else np.empty(0, dtype=np.uint64)

    def free(self, offsets, lengths):
        offsets = np.asarray(offsets, dtype=np.uint64)
        lengths = np.asarray(lengths, dtype=np.uint64)
        if self.uniform and (lengths == self.uniform).all():
            if offsets.shape[0]:  # a copy: the caller may reuse its array
                self._free.setdefault(self.uniform, []).append(offsets.copy())
            return
        distinct = _distinct(lengths)
        for length in distinct:
            # a copy either way: the caller may reuse its array
            part = offsets.copy() if len(distinct) == 1 else offsets[lengths == length]
            self._free.setdefault(length, []).append(part)


_NO_OFFSETS = np.empty(0, dtype=np.uint64)


def _one_length(lengths):
    """Whether every length is the first (a uniform table's: the usual case)."""
    return lengths.shape[0] > 0 and lengths.min() == lengths.max()


def _distinct(lengths):
    """The distinct lengths, as ints: without a sort when they are all one."""
    if lengths.shape[0] == 0:
        return []
    if _one_length(lengths):
        return [int(lengths[0])]
    return np.unique(lengths).tolist()


class SharedTable:
    """One node's table: a mapped segment plus, for its creator, the slot allocator."""

    def __init__(self, name, view, owner):
        self.name = name
        self.view = view
        self.is_owner = owner
        # compiled: the node server's data plane allocates and frees in it as well
        self.allocator = CompiledSlotAllocator(view.arena_capacity, view.uniform_length) \
            if owner else None

    @classmethod
    def create(cls, name, num_keys, value_length, dtype, num_workers, node=0, num_nodes=1,
               arena_capacity=None, cluster_id=b""):
        """Create a segment (it must not exist) with every key ABSENT and cached at `node`.

        arena_capacity (elements) defaults to room for every key's value; the segment is
        sparse, so capacity that is never written costs no memory."""
        uniform, lengths = normalise_lengths(num_keys, value_length)
        total = num_keys * uniform if uniform else int(lengths.sum())
        capacity = total if arena_capacity is None else int(arena_capacity)
        dtype = np.dtype(dtype)
        size = _table.layout_sizes(num_keys, num_workers, capacity, dtype.itemsize)
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600,
                                     size=size["total_bytes"])
        try:
            view = TableView.create(shm.fd, num_keys, uniform, dtype, node, num_nodes,
                                    num_workers, capacity, cluster_id)
        except BaseException:
            shm.close_fd()
            unlink_segment(name)
            raise
        shm.close_fd()
        table = cls(name, view, owner=True)
        directory = view._directory_array()  # no worker has attached yet: no locks
        directory["length"] = uniform if uniform else lengths
        directory["owner"] = node
        return table

    @classmethod
    def attach(cls, name):
        try:
            shm = posix_ipc.SharedMemory(name)
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(f"no parameter table {name} in /dev/shm") from None
        try:
            view = TableView.attach(shm.fd)
        finally:
            shm.close_fd()
        return cls(name, view, owner=False)

    # -- creator's operations (before workers attach, or under the keys' locks) --------

    def install(self, keys, state=OWNED, values=None):
        """Allocate slots for `keys` (sorted uint64 array, or a slice of the key range;
        currently ABSENT), optionally write their values (flat), and give them `state`.
        Used at creation, before publish() (no locks: no worker has attached yet)."""
        directory = self.view._directory_array()
        lengths = directory["length"][keys].astype(np.uint64)
        offsets = self.allocator.allocate(lengths)
        if values is not None:
            arena = self.view._arena_array()
            if _contiguous(offsets, lengths):
                start = int(offsets[0]) if offsets.shape[0] else 0
                arena[start:start + values.shape[0]] = values
            else:
                for off, length, pos in zip(offsets.tolist(), lengths.tolist(),
                                            (np.cumsum(lengths) - lengths).tolist()):
                    arena[off:off + length] = values[pos:pos + length]
        directory["offset"][keys] = offsets
        directory["state"][keys] = state
        return offsets

    def set_owners(self, keys, owner):
        """Cache `owner` (one node, or one per key) as the owner of `keys`, each under its
        lock (a live table's entries change only so)."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        owners = np.ascontiguousarray(np.broadcast_to(owner, keys.shape), dtype=np.uint16)
        return self.view.set_owners(keys, owners)

    def lengths(self, keys):
        """The keys' value lengths (uint64), e.g. as allocator sizes."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        lengths = np.empty(keys.shape[0], dtype=np.uint64)
        self.view.lengths_of(keys, lengths)
        return lengths

    def states(self, keys):
        """The keys' states (uint8; a snapshot: only the node server changes them)."""
        keys = np.ascontiguousarray(keys, dtype=np.uint64)
        states = np.empty(keys.shape[0], dtype=np.uint8)
        self.view.states_of(keys, states)
        return states

    def publish(self):
        self.view.publish()

    # -- lifetime ------------------------------------------------------------------

    def close(self):
        self.view.close()

    def unlink(self):
        return unlink_segment(self.name)

    def allocated_bytes(self):
        """Bytes of memory the segment really uses (tmpfs allocates on first write)."""
        return os.stat("/dev/shm" + self.name).st_blocks * 512


def _contiguous(offsets, lengths):
    return offsets.shape[0] == 0 or bool(np.all(offsets[1:] == offsets[:-1] + lengths[:-1]))
