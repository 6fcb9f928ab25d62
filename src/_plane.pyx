# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The node server's compiled data plane (DESIGN.md §9): remote reads and writes of keys
this node owns, from the ROUTER socket to the table and back, with no Python object per
message or per key.

`Plane.drain` receives messages straight from libzmq (the library pyzmq loaded, reached
through function addresses: adapm.wire.libzmq), checks each one as adapm.wire.protocol
and adapm.node.admission would (header, token, sender, key range, frame sizes), runs the
table's kernel (kernels.pxd, optimizers.pxd) and writes the reply into the outgoing frame
itself. It serves PULL, PUSH, SET (of another node's worker: a local worker's set may have
to wait for a round, and overwrites replicas here), APPLY and their forwarded forms, whose
keys are all owned here, and the steady state of sync rounds: as owner, a SYNC straight
from a replica node that only syncs and drops replicas of keys owned here (deltas applied,
values sent when behind, holders updated); as replica node, a SYNC_REPLY that brings
values or "current" and drops nothing (copies refreshed, versions and rounds stamped).
What it did for a round it reports as an event (keys answered, per round) that the
Python control plane takes after each drain (take_events). The first message
it does not serve (any other type, a key not owned here, anything that fails a check) it
hands to the Python control plane as a list of bytes and stops: messages are handled in
the order they arrived, by one plane or the other, never overtaking each other.

Python is the reference: a message this plane serves is one the Python path would have
accepted and served the same way, and everything else it leaves to Python
(tests/integration/node/test_data_plane.py checks that, message by message)."""

import numpy as np

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.math cimport isfinite
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, qsort, realloc
from libc.string cimport memcmp, memcpy, memmove, memset

from arena cimport real
from atomic cimport adapm_load_acquire_u32, adapm_load_relaxed_u8, adapm_store_release_u32
from batch cimport Batch, _batch, _lock_next, _unlock_held
from keyset cimport keyset_add, keyset_contains, keyset_discard, keyset_reserve, keyset_t
from kernels cimport (
    _SERVE_NO_VALUE, _SERVE_VALUE, _SERVE_VALUE_IF_CHANGED, _evict, _install_copies, _pull,
    _replica_deltas, _replica_refresh, _serve_sync, _update,
)
from layout cimport ADAPM_ABSENT, ADAPM_OWNED, ADAPM_PENDING, ADAPM_REPLICA, adapm_entry_t
from optimizers cimport (
    OptStep, _OPT_ADAGRAD, _OPT_ADAM, _OPT_ROWWISE_ADAGRAD, _OPT_SGD, _apply_steps,
    _state_length,
)
from retention cimport retention_t, retention_within
from slots cimport slots_allocate, slots_free, slots_t
from wire_header cimport (
    WIRE_ALL_POSITIONS, WIRE_APPLY, WIRE_FWD_APPLY, WIRE_FWD_PULL, WIRE_FWD_PUSH, WIRE_FWD_SET,
    WIRE_HEADER_BYTES, WIRE_MAGIC, WIRE_PARAMS_COUNT, WIRE_PULL, WIRE_PULL_REPLY, WIRE_PUSH,
    WIRE_SERVER, WIRE_SET, WIRE_UPDATE_ACK, WIRE_VERSION, header_t,
    WIRE_HAS_DELTA, WIRE_HOPS_SHIFT, WIRE_REPLY_CURRENT, WIRE_REPLY_DROPPED, WIRE_REPLY_VALUE,
    WIRE_SYNC, WIRE_SYNC_DROP, WIRE_SYNC_KEEP, WIRE_SYNC_REPLY, WIRE_MOVE,
    WIRE_MOVE_FOR_ROUND, WIRE_OWNER_UPDATE,
)
from zmq_api cimport (
    ZMQ_DONTWAIT, ZMQ_EAGAIN, ZMQ_EINTR, ZMQ_SNDMORE, zmq_api_load, zmq_api_t, zmq_msg_t,
    zmq_recv_frame,
)


cdef enum:
    MAX_FRAMES = 8                  # identity + header + at most 4 data frames are legal
    MAX_KEYS = 0xFFFFFFFF           # protocol.MAX_KEYS_PER_MESSAGE
    PER_KEY = 32                    # bytes of per-key scratch a sync needs (see _slots)

cdef uint64_t STAMPS = 0xFFFFFFFF   # rounds.py's _STAMPS: a round stamped per key, modulo

# What the plane does with a received message.
cdef enum:
    _HAND_OVER = 0                  # to the Python control plane, as received
    _SERVED = 1
    _FAULT = 2                      # a lock timed out halfway through a write
    _SERVED_FULL = 3                # served, and the events queue is full: stop here
    _NO_MEMORY = 4                  # a reply's frame could not be allocated after the write
    _SPLIT = 5                      # served in part: the rest goes to Python (_hand_over_split)

# How the owner answers requests for keys (set_policy): the manager's modes.
cdef enum:
    POLICY_PYTHON = 0               # not here: requests go on to Python
    POLICY_ADAPTIVE = 1             # relocate unless intended, held elsewhere or bouncing
    POLICY_RELOCATE = 2             # relocate_only
    POLICY_REPLICATE = 3            # replicate_only, replicate_all

POLICIES = {"adaptive": POLICY_ADAPTIVE, "relocate_only": POLICY_RELOCATE,
            "replicate_only": POLICY_REPLICATE, "replicate_all": POLICY_REPLICATE}

# Events the plane reports to the control plane (take_events).
cdef enum:
    EVENT_SYNC_ANSWERED = 1         # keys of a round answered (SYNC_REPLY, MOVE): (round, keys)
    EVENT_MOVED_IN = 2              # the last keys a localize waits for arrived: (0, 0)
    EVENT_NOT_FULL = 3              # a replica of the round stays without a fresh value
                                    # (its drop was answered, but it is kept): (round, 0)
    MAX_EVENTS = 64                 # a drain stops once this many wait

# Plane.counters(), in order.
COUNTERS = ("bytes_received", "bytes_sent", "served", "replicas_made", "owner_changes",
            "relocations", "replicas_dropped", "unroutable")
EVENTS = {"sync_answered": EVENT_SYNC_ANSWERED, "moved_in": EVENT_MOVED_IN,
          "not_full": EVENT_NOT_FULL}


cdef struct Event:
    uint32_t kind
    uint64_t round
    uint64_t count


class PlaneFault(Exception):
    """The data plane could not finish a write it had begun (a key's lock timed out: its
    holder is presumed dead); the node fails, as the Python path's LockTimeout does."""


cdef struct Message:
    zmq_msg_t frames[MAX_FRAMES]
    int nframes                     # frames received and held (initialised)
    bint truncated                  # more frames arrived than MAX_FRAMES (dropped)
    header_t header


cdef class Plane:
    # libzmq
    cdef zmq_api_t zmq
    cdef void* socket
    # the table
    cdef object view                # keeps the segment mapped while the plane lives
    cdef adapm_entry_t* directory
    cdef char* arena
    cdef uint64_t capacity, itemsize, uniform, num_keys, timeout_ns
    cdef int dtype
    # the cluster
    cdef uint64_t token
    cdef uint16_t node
    cdef uint32_t num_nodes, num_workers
    cdef uint64_t first_rank, local_workers  # this node's workers: ranks first_rank + i
    cdef bytes worker_ids, node_ids # each member's routing identity, fixed width
    cdef const char* worker_ids_p   # their bytes (kept alive by the two above)
    cdef const char* node_ids_p
    cdef Py_ssize_t worker_id_len, node_id_len
    cdef public bint enabled
    # counters, read by the node server after each drain
    cdef readonly uint64_t bytes_received, bytes_sent, served, unroutable
    # scratch (grown as needed, freed with the plane)
    cdef Message msg
    cdef uint64_t* keys_buf
    cdef uint64_t* misses_buf
    cdef char* values_buf
    cdef size_t keys_cap, misses_cap, values_cap
    cdef OptStep step               # an APPLY's optimizer step, once its params are checked
    # sync rounds (serve_rounds, admit): served only once both are set
    cdef void** peers               # this node's DEALER to each node (NULL: none, itself)
    cdef object peer_sockets        # the pyzmq sockets, kept alive
    cdef uint32_t* fresh            # the table's per-key round stamps
    cdef uint8_t* holder_bits       # ReplicaHolders' bits: key k, node n: bit n % 8 of
    cdef size_t holder_stride       #   byte k * holder_stride + n // 8
    cdef uint32_t* seen_version     # ReplicaCopies.seen_version
    cdef char* synced               # ReplicaCopies.synced: uint32 or uint64 per key
    cdef int synced_width
    cdef keyset_t* pending          # ReplicaCopies.pending (a CompiledKeySet's state)
    cdef keyset_t* moving_in        # ReplicaCopies.moving_in (likewise)
    cdef object round_state         # the arrays and the set above, kept alive
    # the owner's answer to requests (set_policy, set_clock): the manager's decision
    cdef int policy                 # POLICY_*: how requests are answered here
    cdef const int32_t* intent_counts    # per key: intents of this node's workers
    cdef retention_t retention      # Retention's arrays (read only here)
    cdef bint retains               # ... given (not None)
    cdef uint32_t* arrived          # Rounds.arrived_round: per key, its stamp
    cdef uint32_t* owner_counter    # Ownership.counter
    cdef int64_t settle_rounds
    cdef double now                 # Retention's clock at this drain (set_clock)
    cdef uint64_t round             # this node's last round started (set_clock)
    cdef object policy_state        # the arrays above, kept alive
    cdef readonly uint64_t replicas_made, owner_changes, relocations
    # keys arriving (serve_arrivals)
    cdef keyset_t* held             # ReplicaCopies.held
    cdef keyset_t* rejoin           # Rounds.rejoin and Rounds.refresh (serve_drops)
    cdef keyset_t* refresh
    cdef object drop_state
    cdef readonly uint64_t replicas_dropped
    cdef uint16_t* home_owner       # Ownership.home_owner, home_counter: the records of
    cdef uint32_t* home_counter     #   this node's home keys, by key // num_nodes
    cdef object arrival_state
    cdef uint64_t* freed            # slots given up by relocations: (offset, length)
    cdef readonly size_t nfreed     # slots waiting in `freed` (take_freed, or the allocator)
    cdef slots_t* slots             # the table's slot allocator (NULL: Python frees them)
    cdef object allocator           # ... kept alive
    cdef size_t freed_cap
    cdef Event events[MAX_EVENTS]
    cdef int nevents
    cdef readonly bint events_full  # the last drain stopped to have its events taken
    cdef Py_ssize_t split           # keys of the message served in part left to Python
    cdef char* out_buf              # an owner's answer's values
    cdef char* move_buf             # a relocation's values, offsets, marks
    cdef size_t move_cap
    cdef char* per_key_buf          # a sync's per-key flags, versions, slots
    cdef size_t out_cap, per_key_cap

    def __cinit__(self):
        self.msg.nframes = 0
        self.keys_buf = self.misses_buf = NULL
        self.values_buf = self.out_buf = self.per_key_buf = self.move_buf = NULL
        self.move_cap = 0
        self.keys_cap = self.misses_cap = self.values_cap = self.out_cap = 0
        self.per_key_cap = 0
        self.peers = NULL
        self.pending = self.moving_in = NULL
        self.nevents = 0
        self.policy = POLICY_PYTHON
        self.held = NULL
        self.home_owner = NULL
        self.home_counter = NULL
        self.freed = NULL
        self.nfreed = self.freed_cap = 0
        self.slots = NULL
        self.rejoin = self.refresh = NULL

    def __init__(self, dict functions, uintptr_t socket, view, dict table, uint16_t node,
                 uint32_t num_nodes, uint32_t num_workers, uint32_t workers_per_node):
        """functions: adapm.wire.libzmq.functions(); socket: the ROUTER's handle
        (pyzmq's Socket.underlying); table: view.kernel_handle(); workers_per_node: the
        node's workers are ranks node * workers_per_node onwards."""
        zmq_api_load(&self.zmq, functions)
        self.socket = <void*>socket
        self.view = view
        self.directory = <adapm_entry_t*><uintptr_t>table["directory"]
        self.arena = <char*><uintptr_t>table["arena"]
        self.capacity = table["arena_capacity"]
        self.itemsize = table["itemsize"]
        self.uniform = table["uniform_length"]
        self.num_keys = table["num_keys"]
        self.timeout_ns = table["lock_timeout_ns"]
        self.dtype = table["dtype"]
        self.fresh = <uint32_t*><uintptr_t>table["fresh"]
        self.node, self.num_nodes, self.num_workers = node, num_nodes, num_workers
        self.first_rank = <uint64_t>node * workers_per_node
        self.local_workers = workers_per_node
        self.token = 0
        self.enabled = False

    def __dealloc__(self):
        self._release_message()
        free(self.keys_buf)
        free(self.misses_buf)
        free(self.values_buf)
        free(self.out_buf)
        free(self.per_key_buf)
        free(self.peers)
        free(self.freed)
        free(self.move_buf)

    def admit(self, uint64_t token, list worker_ids, list node_ids, dict peers=None):
        """The cluster formed: its token, and the routing identity of every worker (by
        rank) and node server (by node), as protocol.worker_identity/node_identity give
        them. Each kind has one length (a name of fixed size and an 8-byte MAC).
        peers: node -> this node's DEALER socket to it (pyzmq), where sync answers go;
        without them the plane leaves sync rounds to Python."""
        if len(worker_ids) != self.num_workers or len(node_ids) != self.num_nodes:
            raise ValueError("an identity per worker and per node")
        if peers:
            if self.peers == NULL:
                self.peers = <void**>calloc(self.num_nodes, sizeof(void*))
                if self.peers == NULL:
                    raise MemoryError()
            for node, sock in peers.items():
                if not 0 <= node < self.num_nodes or node == self.node:
                    raise ValueError(f"a peer socket for node {node}")
                self.peers[node] = <void*><uintptr_t>sock.underlying
            self.peer_sockets = dict(peers)
        self.worker_id_len = len(worker_ids[0]) if worker_ids else 0
        self.node_id_len = len(node_ids[0]) if node_ids else 0
        if any(len(i) != self.worker_id_len for i in worker_ids) or \
                any(len(i) != self.node_id_len for i in node_ids):
            raise ValueError("identities of one kind must have one length")
        self.worker_ids = b"".join(worker_ids)
        self.node_ids = b"".join(node_ids)
        self.worker_ids_p = self.worker_ids
        self.node_ids_p = self.node_ids
        self.token = token

    def serve_rounds(self, holder_bits, seen_version, synced, pending_set, moving_set,
                     allocator=None):
        """Serve sync rounds' steady state too, and send rounds (send_round), on the
        node's per-key round state: holder_bits (ReplicaHolders.raw(): a row of bytes per
        key), seen_version (uint32 per key) and synced (uint32 or uint64 per key) of
        ReplicaCopies, and its pending and moving-in sets (CompiledKeySets, changed and
        read through their handle()). The arrays are changed in place; none may be
        replaced afterwards. `allocator`: the table's CompiledSlotAllocator, which the
        slots the plane gives up go back to and make_pending takes slots from (None:
        they wait for take_freed, and make_pending is not available)."""
        for name, arr in (("holder_bits", holder_bits), ("seen_version", seen_version),
                          ("synced", synced)):
            if not arr.flags.c_contiguous or arr.shape[0] != self.num_keys:
                raise ValueError(f"{name}: a contiguous array of a row per key")
        if seen_version.dtype.itemsize != 4 or synced.dtype.itemsize not in (4, 8) or \
                holder_bits.strides[0] * 8 < self.num_nodes:
            raise ValueError("the round state's element types")
        self.holder_bits = <uint8_t*><uintptr_t>holder_bits.ctypes.data
        self.holder_stride = holder_bits.strides[0]
        self.seen_version = <uint32_t*><uintptr_t>seen_version.ctypes.data
        self.synced = <char*><uintptr_t>synced.ctypes.data
        self.synced_width = synced.dtype.itemsize
        self.pending = <keyset_t*><uintptr_t>pending_set.handle()
        self.moving_in = <keyset_t*><uintptr_t>moving_set.handle()
        self.round_state = (holder_bits, seen_version, synced, pending_set, moving_set)
        if allocator is not None:
            self.slots = <slots_t*><uintptr_t>allocator.handle()
            self.allocator = allocator

    def send_round(self, uint64_t round_id, const uint64_t[::1] keys,
                   const uint32_t[::1] kinds):
        """Send round `round_id`'s SYNCs (rounds._send_round's work): for each key (uint64,
        distinct) with its SYNC kind (uint32), its delta taken under its lock (a replica's
        value - value at last sync; none for keys moving in), HAS_DELTA where it is not
        zero, the version last seen; the keys grouped by where they go (the location
        cache, or the home where that is this node), one SYNC per node in node order
        through the DEALER to it. Returns (the keys with a delta, the number of keys
        sent: the others have nowhere to go, the path leads back here). Raises before
        anything changed when it cannot send (can_send_rounds)."""
        cdef Py_ssize_t n = keys.shape[0], i
        cdef uint64_t fault_key = 0, sent = 0
        cdef Py_ssize_t ndirty = 0
        cdef int outcome
        if not self.can_send_rounds:
            raise RuntimeError("the data plane does not send rounds")
        if kinds.shape[0] != n:
            raise ValueError("a kind per key")
        for i in range(n):
            if keys[i] >= self.num_keys:
                raise IndexError(f"key {keys[i]} of {self.num_keys}")
        dirty = np.empty(n, dtype=np.uint64)
        cdef uint64_t[::1] dv = dirty
        with nogil:
            outcome = self._send_round(round_id, &keys[0] if n else NULL,
                                       &kinds[0] if n else NULL, n,
                                       &dv[0] if n else NULL, &ndirty, &sent, &fault_key)
        if outcome == _FAULT:
            raise PlaneFault(f"node {self.node}: the lock of key {fault_key} timed out "
                             "while the data plane took its delta for a sync round")
        if outcome != _SERVED:
            raise PlaneFault(f"node {self.node}: no memory to send sync round {round_id}")
        return dirty[:ndirty], sent

    @property
    def can_send_rounds(self):
        """Whether send_round may be called: the round state and the peers are known,
        the plane is on, and the cluster has at most 64 nodes."""
        return self.pending != NULL and self.peers != NULL and self.enabled and \
            not self.view.closed and self.num_nodes <= 64

    def set_policy(self, mode, intent_counts, last_used, levels, retain_seconds, arrived,
                   owner_counter, int64_t settle_rounds):
        """Answer requests for keys here too, as Manager.relocate_mask decides in `mode`
        (POLICIES; others leave requests to Python) from: intent_counts (int32 per key,
        the intent store's count), the Retention's last_used (float32 per key) and
        levels (uint8 per key) with retain_seconds (its SECONDS), arrived (uint32 per
        key, Rounds.arrived_round), settle_rounds (SETTLE_ROUNDS); owner_counter (uint32
        per key, Ownership.counter) goes with a relocated key. last_used and levels may
        be None (no retention). Arrays are read in place."""
        cdef int i
        arrays = [intent_counts, arrived, owner_counter] + \
            ([] if last_used is None else [last_used, levels])
        if any(not a.flags.c_contiguous or a.shape[0] != self.num_keys for a in arrays):
            raise ValueError("a contiguous array of a value per key")
        if intent_counts.dtype.itemsize != 4 or arrived.dtype.itemsize != 4 or \
                owner_counter.dtype.itemsize != 4 or len(retain_seconds) > 16 or \
                (last_used is not None and (last_used.dtype.itemsize != 4 or
                                            levels.dtype.itemsize != 1)):
            raise ValueError("the policy's element types")
        self.intent_counts = <const int32_t*><uintptr_t>intent_counts.ctypes.data
        self.arrived = <uint32_t*><uintptr_t>arrived.ctypes.data
        self.owner_counter = <uint32_t*><uintptr_t>owner_counter.ctypes.data
        self.retains = last_used is not None
        if self.retains:
            self.retention.last_used = <float*><uintptr_t>last_used.ctypes.data
            self.retention.level = <uint8_t*><uintptr_t>levels.ctypes.data
            self.retention.let_go = NULL  # only the plan lets keys go
            self.retention.levels = len(retain_seconds)
            for i in range(self.retention.levels):
                self.retention.seconds[i] = retain_seconds[i]
        self.settle_rounds = settle_rounds
        self.policy_state = (intent_counts, last_used, levels, arrived, owner_counter)
        self.policy = POLICIES.get(mode, POLICY_PYTHON)

    def serve_arrivals(self, held_set, home_owner, home_counter):
        """Install keys that arrive by relocation for a round here too (after
        set_policy): held_set, ReplicaCopies.held (a CompiledKeySet); home_owner (uint16)
        and home_counter (uint32), Ownership's records of this node's home keys, changed
        in place."""
        homes = len(range(self.node, self.num_keys, self.num_nodes))
        if home_owner.dtype.itemsize != 2 or home_counter.dtype.itemsize != 4 or \
                home_owner.shape[0] != homes or home_counter.shape[0] != homes or \
                not home_owner.flags.c_contiguous or not home_counter.flags.c_contiguous:
            raise ValueError("a record per home key")
        self.held = <keyset_t*><uintptr_t>held_set.handle()
        self.home_owner = <uint16_t*><uintptr_t>home_owner.ctypes.data
        self.home_counter = <uint32_t*><uintptr_t>home_counter.ctypes.data
        self.arrival_state = (held_set, home_owner, home_counter)

    def serve_drops(self, rejoin_set, refresh_set):
        """Answer the drops of this node's rounds too (after serve_rounds with an
        allocator, set_policy and serve_arrivals): rejoin_set and refresh_set are
        Rounds.rejoin and Rounds.refresh (CompiledKeySets), changed in place."""
        if self.slots == NULL or self.held == NULL or self.intent_counts == NULL:
            raise RuntimeError("serve_drops needs the copies' state, the allocator and "
                               "the policy first")
        self.rejoin = <keyset_t*><uintptr_t>rejoin_set.handle()
        self.refresh = <keyset_t*><uintptr_t>refresh_set.handle()
        self.drop_state = (rejoin_set, refresh_set)

    def set_clock(self, double now, uint64_t round_id):
        """The clock the next answers decide by: Retention's `now` (seconds since its
        base) and this node's round (the last one started)."""
        self.now, self.round = now, round_id

    def take_freed(self):
        """Slots given up by relocations since the last call, where serve_rounds got no
        allocator: (offsets, lengths), for the slot allocator."""
        cdef size_t i
        offsets = np.empty(self.nfreed, dtype=np.uint64)
        lengths = np.empty(self.nfreed, dtype=np.uint64)
        cdef uint64_t[::1] o = offsets
        cdef uint64_t[::1] l = lengths
        for i in range(self.nfreed):
            o[i], l[i] = self.freed[2 * i], self.freed[2 * i + 1]
        self.nfreed = 0
        return offsets, lengths

    def make_pending(self, keys):
        """ReplicaCopies.make_pending in one call: of `keys` (uint64), those ABSENT here
        become PENDING (a zeroed value slot and a zeroed "value at last sync" slot from the
        allocator, the state set under the key's lock, its version stepped, the location
        cache left as it is), join the held and pending sets, and their "value at last
        sync" slot is recorded. Returns them, in the order of `keys`. MemoryError (the
        arena is full) before anything changed; needs serve_rounds with an allocator and
        serve_arrivals."""
        if self.slots == NULL or self.held == NULL:
            raise RuntimeError("the data plane keeps no copies here (serve_rounds with an "
                               "allocator, serve_arrivals)")
        if self.view.closed:
            raise RuntimeError("the data plane's table is closed")
        cdef const uint64_t[::1] k = np.ascontiguousarray(keys, dtype=np.uint64)
        cdef Py_ssize_t n = k.shape[0], i, m = 0
        for i in range(n):
            if k[i] >= self.num_keys:
                raise IndexError(f"key {k[i]} of {self.num_keys}")
        made = np.empty(n, dtype=np.uint64)
        slots = np.empty(2 * n, dtype=np.uint64)
        lengths = np.empty(2 * n, dtype=np.uint64)
        cdef uint64_t[::1] mk = made
        cdef uint64_t[::1] so = slots
        cdef uint64_t[::1] ln = lengths
        cdef bint ok
        with nogil:
            self._flush_freed()
            for i in range(n):
                if adapm_load_relaxed_u8(&self.directory[k[i]].state) == ADAPM_ABSENT:
                    mk[m] = k[i]
                    m += 1
            for i in range(m):
                ln[i] = ln[m + i] = self.directory[mk[i]].length
            ok = keyset_reserve(self.held, self.held.length + m) and \
                keyset_reserve(self.pending, self.pending.length + m)
            if ok and m:
                ok = slots_allocate(self.slots, &ln[0], 2 * m, &so[0])
        if not ok:
            raise MemoryError(f"node {self.node}: parameter table arena full: no slots for "
                              f"{m} requested keys")
        if m == 0:
            return made[:0]
        cdef Py_ssize_t failed = -1, admitted
        with nogil:
            admitted = self._admit_pending(&mk[0], m, &so[0], &ln[0], &failed)
        if failed >= 0:
            raise PlaneFault(f"node {self.node}: the lock of key {mk[failed]} timed out "
                             "while the data plane made it PENDING")
        return made[:admitted]

    cdef Py_ssize_t _admit_pending(self, uint64_t* keys, Py_ssize_t m, const uint64_t* slots,
                                   const uint64_t* lengths, Py_ssize_t* failed) noexcept nogil:
        """keys[:m], ABSENT when looked at, with their value slots slots[:m] and "value
        at last sync" slots slots[m:2m] (zeroed here): each key still ABSENT under its
        lock becomes PENDING in its slot and joins the copies' state (room reserved);
        the others' slots go back. The keys made PENDING are moved to the front of `keys`
        in order; returns how many. A lock that times out stops the walk (failed: its
        index; its slots and those of the keys after it go back)."""
        cdef Py_ssize_t i, kept = 0
        cdef uint64_t key, itemsize = self.itemsize
        cdef adapm_entry_t* e
        cdef Batch b
        for i in range(2 * m):
            memset(self.arena + slots[i] * itemsize, 0, lengths[i] * itemsize)
        b = _batch(self.directory, keys, m, self.timeout_ns, NULL, itemsize, self.capacity)
        while _lock_next(&b):
            e = b.entry
            if e.state != ADAPM_ABSENT:  # taken meanwhile (never by another thread today)
                _unlock_held(&b, False)
                slots_free(self.slots, slots[b.i], lengths[b.i])
                slots_free(self.slots, slots[m + b.i], lengths[m + b.i])
                continue
            e.offset = slots[b.i]
            e.state = ADAPM_PENDING
            e.version += 1
            _unlock_held(&b, True)
            key = keys[b.i]
            if self.synced_width == 4:
                (<uint32_t*>self.synced)[key] = <uint32_t>slots[m + b.i]
            else:
                (<uint64_t*>self.synced)[key] = slots[m + b.i]
            keyset_add(self.held, key)
            keyset_add(self.pending, key)
            keys[kept] = key  # an index the walk has passed
            kept += 1
        failed[0] = b.failed
        if b.failed >= 0:
            for i in range(b.failed, m):
                slots_free(self.slots, slots[i], lengths[i])
                slots_free(self.slots, slots[m + i], lengths[m + i])
        return kept

    cdef void _flush_freed(self) noexcept nogil:
        """The slots relocations gave up go back to the allocator, if the plane has it
        (any it has no memory to list stay queued for the next time)."""
        cdef size_t i = 0
        if self.slots == NULL:
            return
        while i < self.nfreed and slots_free(self.slots, self.freed[2 * i],
                                             self.freed[2 * i + 1]):
            i += 1
        if i:
            memmove(self.freed, self.freed + 2 * i, (self.nfreed - i) * 16)
            self.nfreed -= i

    def counters(self):
        """Its counters in one call, in the order of COUNTERS."""
        return (self.bytes_received, self.bytes_sent, self.served, self.replicas_made,
                self.owner_changes, self.relocations, self.replicas_dropped, self.unroutable)

    def take_events(self):
        """What the plane did for the control plane to act on, since the last call, in
        order: (kind, round, count) tuples (EVENTS names the kinds)."""
        cdef int i
        events = [(self.events[i].kind, self.events[i].round, self.events[i].count)
                  for i in range(self.nevents)]
        self.nevents = 0
        return events

    def drain(self, int budget):
        """Serve up to `budget` messages of the socket. Returns (messages taken, frames):
        frames is None when the socket ran dry or the budget was spent, else the frames
        (bytes, routing identity first) of the message taken last, which this plane
        leaves to the caller; it stops there, so that order is kept."""
        cdef int taken = 0, outcome = _SERVED, got = 0
        cdef uint64_t fault_key = 0
        if not self.enabled or self.token == 0:
            raise RuntimeError("the data plane is not enabled")
        if self.view.closed:  # never a pointer into an unmapped segment
            raise RuntimeError("the data plane's table is closed")
        with nogil:
            while taken < budget:
                got = self._receive()
                if got <= 0:
                    break
                taken += 1
                outcome = self._handle(&fault_key)
                if outcome == _SERVED and self.nevents == MAX_EVENTS:
                    outcome = _SERVED_FULL
                if outcome != _SERVED and outcome != _SERVED_FULL:
                    break
                self.served += 1  # a message handed over is counted by Python
                self.bytes_received += self._body_bytes()
                self._release_message()
                if outcome == _SERVED_FULL:
                    break
            self._flush_freed()
        if got < 0:
            raise OSError(self.zmq.last_errno(), "the data plane could not receive")
        self.events_full = outcome == _SERVED_FULL
        if outcome == _SERVED or outcome == _SERVED_FULL:  # ran dry, budget spent, or
            return taken, None                              # the events are to be taken
        if outcome == _FAULT:
            self._release_message()
            raise PlaneFault(f"node {self.node}: the lock of key {fault_key} timed out "
                             "while the data plane applied a write to it")
        if outcome == _SPLIT:
            self.served += 1
            return taken, self._hand_over_split()
        if outcome == _NO_MEMORY:
            self._release_message()
            raise PlaneFault(f"node {self.node}: no memory for the answer to a sync of "
                             f"node {self.msg.header.src_node} after its deltas were applied")
        return taken, self._hand_over()

    @property
    def nbytes(self):
        """The memory it holds: scratch buffers (they grow to the largest message) and
        the members' identities."""
        return self.keys_cap + self.misses_cap + self.values_cap + self.out_cap + \
            self.move_cap + self.freed_cap + self.per_key_cap + len(self.worker_ids or b"") + len(self.node_ids or b"") + \
            (self.num_nodes * sizeof(void*) if self.peers != NULL else 0)

    # -- receiving ---------------------------------------------------------------------

    cdef int _receive(self) noexcept nogil:
        """Take one whole message into self.msg: 1, or 0 when none waits, -1 on error."""
        cdef Message* m = &self.msg
        cdef zmq_msg_t spare
        cdef int rc, flags = ZMQ_DONTWAIT
        cdef bint more
        m.nframes = 0
        m.truncated = False
        while True:
            if m.nframes < MAX_FRAMES:
                if zmq_recv_frame(&self.zmq, &m.frames[m.nframes], self.socket, flags) < 0:
                    if m.nframes == 0 and self.zmq.last_errno() in (ZMQ_EAGAIN, ZMQ_EINTR):
                        return 0
                    self._release_message()
                    return -1
                m.nframes += 1
                if not self.zmq.msg_more(&m.frames[m.nframes - 1]):
                    return 1
            else:  # beyond every legal message: drop the rest, hand over what is held
                self.zmq.msg_init(&spare)
                rc = self.zmq.msg_recv(&spare, self.socket, 0)
                more = rc >= 0 and self.zmq.msg_more(&spare)
                self.zmq.msg_close(&spare)
                m.truncated = True
                if rc < 0:
                    self._release_message()
                    return -1
                if not more:
                    return 1
            flags = 0  # the rest of a multipart message is there already

    cdef void _release_message(self) noexcept nogil:
        cdef int i
        for i in range(self.msg.nframes):
            self.zmq.msg_close(&self.msg.frames[i])
        self.msg.nframes = 0

    cdef object _hand_over(self):
        """The held message as bytes frames, for the Python path; the plane lets it go."""
        cdef int i
        cdef list frames = []
        for i in range(self.msg.nframes):
            frames.append(PyBytes_FromStringAndSize(
                <char*>self.zmq.msg_data(&self.msg.frames[i]), self.zmq.msg_size(&self.msg.frames[i])))
        self._release_message()
        return frames

    # -- checking ----------------------------------------------------------------------

    cdef inline char* _data(self, int i) noexcept nogil:
        return <char*>self.zmq.msg_data(&self.msg.frames[i])

    cdef inline size_t _size(self, int i) noexcept nogil:
        return self.zmq.msg_size(&self.msg.frames[i])

    cdef int _handle(self, uint64_t* fault_key) noexcept nogil:
        """Check the held message and serve it, or say it goes to Python."""
        cdef Message* m = &self.msg
        cdef header_t* h = &m.header
        cdef uint64_t requester
        cdef const char* reply_to
        cdef size_t reply_to_len
        if m.truncated or m.nframes < 3 or self._size(1) != WIRE_HEADER_BYTES:
            return _HAND_OVER
        memcpy(h, self._data(1), WIRE_HEADER_BYTES)
        if h.magic != WIRE_MAGIC or h.version != WIRE_VERSION or h.token != self.token:
            return _HAND_OVER
        if h.type == WIRE_SYNC or h.type == WIRE_SYNC_REPLY or h.type == WIRE_MOVE:
            return self._handle_round(fault_key)
        cdef int frames = _frames_of(h.type)
        if frames == 0 or m.nframes != 2 + frames:
            return _HAND_OVER
        if _from_worker(h.type):
            if h.src_worker >= self.num_workers or not self._is_worker(0, h.src_worker):
                return _HAND_OVER
            requester = h.src_worker
            if h.type == WIRE_SET and requester - self.first_rank < self.local_workers:
                return _HAND_OVER  # a local worker's set: it may wait for a round (Python)
        else:
            if h.src_node >= self.num_nodes or h.src_node == self.node:
                return _HAND_OVER
            if not self._is_node(0, h.src_node):
                return _HAND_OVER
            if h.arg0 < 0 or <uint64_t>h.arg0 >= self.num_workers:
                return _HAND_OVER
            requester = <uint64_t>h.arg0
        reply_to = self.worker_ids_p + requester * self.worker_id_len
        reply_to_len = self.worker_id_len
        cdef Py_ssize_t n = self._checked_keys()
        if n < 0:
            return _HAND_OVER
        if h.type == WIRE_PULL or h.type == WIRE_FWD_PULL:
            return self._serve_pull(n, reply_to, reply_to_len)
        if h.type == WIRE_APPLY or h.type == WIRE_FWD_APPLY:
            return self._serve_apply(n, reply_to, reply_to_len, fault_key)
        return self._serve_update(n, h.type == WIRE_PUSH or h.type == WIRE_FWD_PUSH,
                                  reply_to, reply_to_len, fault_key)

    cdef bint _is_worker(self, int frame, uint64_t rank) noexcept nogil:
        return self._size(frame) == <size_t>self.worker_id_len and memcmp(
            self._data(frame), self.worker_ids_p + rank * self.worker_id_len,
            self.worker_id_len) == 0

    cdef bint _is_node(self, int frame, uint64_t node) noexcept nogil:
        return self._size(frame) == <size_t>self.node_id_len and memcmp(
            self._data(frame), self.node_ids_p + node * self.node_id_len,
            self.node_id_len) == 0

    cdef Py_ssize_t _checked_keys(self) noexcept nogil:
        """The keys frame (2) copied to keys_buf: their number, or -1 when a frame does
        not fit them (keys out of range, a second frame of the wrong size)."""
        cdef size_t size = self._size(2), i
        cdef Py_ssize_t n
        if size % 8 != 0 or size // 8 > MAX_KEYS:
            return -1
        n = size // 8
        if not self._reserve_keys(n):
            return -1
        memcpy(self.keys_buf, self._data(2), size)  # frames need not be 8-byte aligned
        for i in range(<size_t>n):
            if self.keys_buf[i] >= self.num_keys:
                return -1
        cdef uint8_t mtype = self.msg.header.type
        if mtype == WIRE_FWD_PULL:                 # positions: one uint32 per key
            if self._size(3) != <size_t>n * 4:
                return -1
        elif mtype == WIRE_APPLY or mtype == WIRE_FWD_APPLY:  # gradients: dim per key
            if not self._checked_step() or self._size(3) != <size_t>n * self.step.dim * \
                    self.itemsize or not self._distinct(n):
                return -1
        elif mtype != WIRE_PULL:                   # values: each key's length
            if self._size(3) != self._total_length(n) * self.itemsize:
                return -1
        return n

    cdef bint _checked_step(self) noexcept nogil:
        """An APPLY's params frame (4), checked as adapm.optim.read_params checks it, into
        self.step."""
        cdef double p[WIRE_PARAMS_COUNT]
        cdef int i, kind
        if self._size(4) != sizeof(p) or self.uniform == 0:
            return False
        memcpy(p, self._data(4), sizeof(p))
        for i in range(WIRE_PARAMS_COUNT):
            if not isfinite(p[i]) or (i >= 2 and p[i] < 0):
                return False
        if p[5] >= 1 or p[6] >= 1 or p[1] < 1 or p[1] > <double>self.uniform:
            return False
        if p[0] != _OPT_SGD and p[0] != _OPT_ADAGRAD and p[0] != _OPT_ROWWISE_ADAGRAD and \
                p[0] != _OPT_ADAM:
            return False
        kind = <int>p[0]
        if <double><uint64_t>p[1] != p[1] or \
                <uint64_t>p[1] + _state_length(kind, <uint64_t>p[1]) != self.uniform:
            return False
        self.step.kind, self.step.dim = kind, <uint64_t>p[1]
        self.step.lr, self.step.eps, self.step.weight_decay = p[2], p[3], p[4]
        self.step.beta1, self.step.beta2, self.step.step_size = p[5], p[6], p[7]
        return True

    cdef bint _distinct(self, Py_ssize_t n) noexcept nogil:
        """No key twice (an APPLY's sender sums a key's gradients): checked on a sorted
        copy in misses_buf."""
        cdef Py_ssize_t i
        if not self._reserve_misses(n):
            return False
        memcpy(self.misses_buf, self.keys_buf, n * 8)
        qsort(self.misses_buf, n, 8, _by_key)
        for i in range(1, n):
            if self.misses_buf[i] == self.misses_buf[i - 1]:
                return False
        return True

    cdef uint64_t _total_length(self, Py_ssize_t n) noexcept nogil:
        cdef uint64_t total = 0
        cdef Py_ssize_t i
        if self.uniform:
            return <uint64_t>n * self.uniform
        for i in range(n):
            total += self.directory[self.keys_buf[i]].length
        return total

    cdef uint64_t _body_bytes(self) noexcept nogil:
        cdef uint64_t total = 0
        cdef int i
        for i in range(1, self.msg.nframes):
            total += self._size(i)
        return total

    cdef bint _all_owned(self, Py_ssize_t n) noexcept nogil:
        # Only this thread changes a key's state (relocations, replicas): no race.
        cdef Py_ssize_t i
        for i in range(n):
            if adapm_load_relaxed_u8(&self.directory[self.keys_buf[i]].state) != ADAPM_OWNED:
                return False
        return True

    # -- serving -----------------------------------------------------------------------

    cdef int _serve_pull(self, Py_ssize_t n, const char* reply_to, size_t reply_to_len
                         ) noexcept nogil:
        cdef uint64_t nbytes = self._total_length(n) * self.itemsize
        cdef int64_t nmiss
        cdef Batch b
        cdef zmq_msg_t values
        cdef char* out
        cdef bint direct
        if not self._all_owned(n) or not self._reserve_misses(n) or \
                not self._reserve_values(nbytes):
            return _HAND_OVER
        if self.zmq.msg_init_size(&values, nbytes) != 0:
            return _HAND_OVER
        # The kernel writes into the frame libzmq sends; a frame of a few bytes lives
        # inside zmq_msg_t, maybe unaligned for the kernel's stores: then via scratch.
        out = <char*>self.zmq.msg_data(&values)
        direct = (<uintptr_t>out) % 8 == 0
        if not direct:
            out = self.values_buf
        b = _batch(self.directory, self.keys_buf, n, self.timeout_ns, self.arena,
                   self.itemsize, self.capacity)
        if self.dtype == 0:
            nmiss = _pull(&b, <float*>self.arena, <float*>out, self.misses_buf, True,
                          self.uniform)
        else:
            nmiss = _pull(&b, <double*>self.arena, <double*>out, self.misses_buf, True,
                          self.uniform)
        if nmiss != 0 or b.failed >= 0:  # a lock timed out: Python fails loudly on it
            self.zmq.msg_close(&values)
            return _HAND_OVER
        if not direct:
            memcpy(self.zmq.msg_data(&values), out, nbytes)
        if self.msg.header.type == WIRE_PULL:
            self._reply(WIRE_PULL_REPLY, WIRE_ALL_POSITIONS, 0, reply_to, reply_to_len,
                        NULL, 0, &values)
        else:
            self._reply(WIRE_PULL_REPLY, 0, 0, reply_to, reply_to_len, self._data(3),
                        self._size(3), &values)
        return _SERVED

    cdef int _serve_update(self, Py_ssize_t n, bint additive, const char* reply_to,
                           size_t reply_to_len, uint64_t* fault_key) noexcept nogil:
        cdef uint64_t nbytes = self._size(3)
        cdef int64_t nmiss
        cdef Batch b
        if not self._all_owned(n) or not self._reserve_misses(n) or \
                not self._reserve_values(nbytes):
            return _HAND_OVER
        memcpy(self.values_buf, self._data(3), nbytes)  # aligned for the kernel
        b = _batch(self.directory, self.keys_buf, n, self.timeout_ns, self.arena,
                   self.itemsize, self.capacity)
        if self.dtype == 0:
            nmiss = _update(&b, <float*>self.arena, <const float*>self.values_buf,
                            self.misses_buf, additive, True, self.uniform)
        else:
            nmiss = _update(&b, <double*>self.arena, <const double*>self.values_buf,
                            self.misses_buf, additive, True, self.uniform)
        if b.failed >= 0:
            fault_key[0] = self.keys_buf[b.failed]
            return _FAULT
        if n - nmiss > 0:  # nmiss is 0: every key was owned, and only this thread changes that
            self._reply(WIRE_UPDATE_ACK, 0, n - nmiss, reply_to, reply_to_len, NULL, 0, NULL)
        return _SERVED

    cdef int _serve_apply(self, Py_ssize_t n, const char* reply_to, size_t reply_to_len,
                          uint64_t* fault_key) noexcept nogil:
        """One optimizer step per key (distinct, all owned: the same kernel and arithmetic
        as the Python path's apply_optimizer, key by key), acknowledged with the count."""
        cdef uint64_t nbytes = self._size(3), count = <uint64_t>n * self.step.dim
        cdef int64_t nmiss
        cdef Batch b
        if not self._all_owned(n) or not self._reserve_misses(n) or \
                not self._reserve_values(nbytes):
            return _HAND_OVER
        memcpy(self.values_buf, self._data(3), nbytes)  # aligned, and the step writes it
        if not _all_finite(self.values_buf, count, self.dtype):  # they would spoil rows
            return _HAND_OVER
        b = _batch(self.directory, self.keys_buf, n, self.timeout_ns, self.arena,
                   self.itemsize, self.capacity)
        if self.dtype == 0:
            nmiss = _apply_steps(&b, <float*>self.arena, <float*>self.values_buf, &self.step,
                                 self.misses_buf, True, self.uniform)
        else:
            nmiss = _apply_steps(&b, <double*>self.arena, <double*>self.values_buf, &self.step,
                                 self.misses_buf, True, self.uniform)
        if b.failed >= 0:
            fault_key[0] = self.keys_buf[b.failed]
            return _FAULT
        if n - nmiss > 0:
            self._reply(WIRE_UPDATE_ACK, 0, n - nmiss, reply_to, reply_to_len, NULL, 0, NULL)
        return _SERVED

    # -- starting a round --------------------------------------------------------------

    cdef int _send_round(self, uint64_t round_id, const uint64_t* keys, const uint32_t* kinds,
                         Py_ssize_t n, uint64_t* dirty, Py_ssize_t* ndirty, uint64_t* sent,
                         uint64_t* fault_key) noexcept nogil:
        """send_round's work. Per-key scratch (as a sync of n keys): slots, flags,
        versions, destinations (as uint32 in _versions_out), skip marks; keys_buf holds
        the keys in send order, misses_buf their index."""
        cdef uint64_t* slots
        cdef uint32_t* flags
        cdef uint32_t* versions
        cdef uint32_t* dest
        cdef uint8_t* skip
        cdef uint64_t key, home, length, pos = 0, total = 0
        cdef uint64_t* starts
        cdef Py_ssize_t i, j, d, at
        cdef Batch b
        cdef bint any_nonzero
        cdef uint32_t nowhere = self.num_nodes
        if not _grow(<void**>&self.per_key_buf, &self.per_key_cap, <size_t>n * PER_KEY + 8) or \
                not self._reserve_keys(n) or not self._reserve_misses(n) or \
                not _grow(<void**>&self.out_buf, &self.out_cap, <size_t>n * 8 + 8):
            return _NO_MEMORY
        slots, flags, versions = self._slots(n), self._counters(n), self._versions(n)
        dest, skip, starts = self._versions_out(n), self._bytes(n, 0), <uint64_t*>self.out_buf
        for i in range(n):
            key = keys[i]
            slots[i] = (<const uint32_t*>self.synced)[key] if self.synced_width == 4 \
                else (<const uint64_t*>self.synced)[key]
            skip[i] = self.moving_in.size != 0 and keyset_contains(self.moving_in, key)
            versions[i] = self.seen_version[key]
            starts[i] = total
            total += self.directory[key].length
            dest[i] = self.directory[key].owner
            if dest[i] == self.node:  # on its way here: its home knows the way
                home = key % self.num_nodes
                dest[i] = nowhere if home == self.node else <uint32_t>home
        if not self._reserve_values(total * self.itemsize):
            return _NO_MEMORY
        b = _batch(self.directory, keys, n, self.timeout_ns, self.arena, self.itemsize,
                   self.capacity)
        if self.dtype == 0:
            _replica_deltas(&b, <float*>self.arena, slots, <float*>self.values_buf, skip)
        else:
            _replica_deltas(&b, <double*>self.arena, slots, <double*>self.values_buf, skip)
        if b.failed >= 0:
            fault_key[0] = keys[b.failed]
            return _FAULT
        ndirty[0] = 0
        for i in range(n):
            length = self.directory[keys[i]].length
            any_nonzero = False
            for j in range(<Py_ssize_t>length):
                if (self.dtype == 0 and (<float*>self.values_buf)[starts[i] + j] != 0) or \
                        (self.dtype != 0 and (<double*>self.values_buf)[starts[i] + j] != 0):
                    any_nonzero = True
                    break
            flags[i] = kinds[i] | (WIRE_HAS_DELTA if any_nonzero else 0)
            if any_nonzero:
                dirty[ndirty[0]] = keys[i]
                ndirty[0] += 1
        # Grouped by destination, in node order, each group in key order (can_send_rounds:
        # at most 64 nodes, and `nowhere`).
        self._group(dest, n, self.num_nodes + 1, self.misses_buf)
        sent[0] = 0
        at = 0
        while at < n:
            d = dest[self.misses_buf[at]]
            j = at
            while j < n and dest[self.misses_buf[j]] == d:
                j += 1
            if d != nowhere:
                if self.peers[d] == NULL:
                    return _NO_MEMORY
                if not self._send_sync(round_id, <uint64_t>d, keys, at, j, starts, n):
                    return _NO_MEMORY
                sent[0] += j - at
            at = j
        return _SERVED

    cdef bint _send_sync(self, uint64_t round_id, uint64_t node, const uint64_t* keys,
                         Py_ssize_t first, Py_ssize_t last, const uint64_t* starts,
                         Py_ssize_t n) noexcept nogil:
        """One SYNC to `node` of the keys at misses_buf[first:last] (indices into keys,
        per-key scratch of a round of n keys): keys, the deltas of those with HAS_DELTA,
        flags, versions. False when a frame could not be allocated (the node fails)."""
        cdef void* sock = self.peers[node]
        cdef Py_ssize_t m = last - first, i, idx
        cdef uint64_t nbytes = 0, length
        cdef uint32_t* flags = self._counters(n)
        cdef uint32_t* versions = self._versions(n)
        cdef zmq_msg_t frame
        cdef char* p
        cdef header_t h = self._header(WIRE_SYNC, 0, round_id, 0, self.node, 0)
        for i in range(m):
            idx = self.misses_buf[first + i]
            if flags[idx] & WIRE_HAS_DELTA:
                nbytes += self.directory[keys[idx]].length * self.itemsize
        self._send_on(sock, <const char*>&h, WIRE_HEADER_BYTES, True)
        if not self._send_gathered(sock, <const char*>keys, 8, self.misses_buf, first, last,
                                   True):
            return False
        if self.zmq.msg_init_size(&frame, nbytes) != 0:
            return False
        p = <char*>self.zmq.msg_data(&frame)
        for i in range(m):
            idx = self.misses_buf[first + i]
            if flags[idx] & WIRE_HAS_DELTA:
                length = self.directory[keys[idx]].length * self.itemsize
                memcpy(p, self.values_buf + starts[idx] * self.itemsize, length)
                p += length
        self._send_frame(sock, &frame, True)
        if not self._send_gathered(sock, <const char*>flags, 4, self.misses_buf, first, last,
                                   True) or \
                not self._send_gathered(sock, <const char*>versions, 4, self.misses_buf, first,
                                        last, False):
            return False
        self.bytes_sent += WIRE_HEADER_BYTES + m * 16 + nbytes
        return True

    cdef header_t _header(self, uint8_t mtype, uint16_t flags, uint64_t request_id,
                          uint64_t count, int64_t arg0, int64_t arg1) noexcept nogil:
        """The header of a message this node server sends (protocol.Message.encode's)."""
        cdef header_t h
        h.magic, h.version, h.type = WIRE_MAGIC, WIRE_VERSION, mtype
        h.src_node, h.flags, h.src_worker = self.node, flags, WIRE_SERVER
        h.request_id, h.count, h.arg0, h.arg1 = request_id, count, arg0, arg1
        h.token = self.token
        return h

    cdef void _group(self, const uint32_t* group, Py_ssize_t n, uint32_t groups,
                     uint64_t* order) noexcept nogil:
        """order = the indices 0..n-1 grouped by group[i] (< groups <= 65), groups in
        ascending order, indices ascending within each (a counting sort)."""
        cdef uint64_t counts[65]
        cdef uint64_t at = 0
        cdef uint32_t g
        cdef Py_ssize_t i
        for g in range(groups):
            counts[g] = 0
        for i in range(n):
            counts[group[i]] += 1
        for g in range(groups):
            counts[g], at = at, at + counts[g]
        for i in range(n):
            order[counts[group[i]]] = i
            counts[group[i]] += 1

    cdef bint _send_gathered(self, void* sock, const char* base, size_t width,
                             const uint64_t* order, Py_ssize_t first, Py_ssize_t last,
                             bint more) noexcept nogil:
        """One frame of the `width`-byte items base[order[first]] .. base[order[last -
        1]]; False when it could not be allocated."""
        cdef zmq_msg_t frame
        cdef char* p
        cdef Py_ssize_t i
        if self.zmq.msg_init_size(&frame, (last - first) * width) != 0:
            return False
        p = <char*>self.zmq.msg_data(&frame)
        for i in range(first, last):
            memcpy(p + (i - first) * width, base + order[i] * width, width)
        self._send_frame(sock, &frame, more)
        return True

    cdef void _send_frame(self, void* sock, zmq_msg_t* frame, bint more) noexcept nogil:
        if self.zmq.msg_send(frame, sock, ZMQ_SNDMORE if more else 0) < 0:
            self.zmq.msg_close(frame)

    # -- sync rounds -------------------------------------------------------------------

    cdef int _handle_round(self, uint64_t* fault_key) noexcept nogil:
        """A SYNC or SYNC_REPLY from another node server: checked as protocol.decode,
        admission.check_sender and rounds.on_sync/on_sync_reply check it, then served
        when it is the steady state (see the module's doc), else handed over."""
        cdef header_t* h = &self.msg.header
        if self.pending == NULL or self.peers == NULL or self.msg.nframes != 6:
            return _HAND_OVER
        if h.flags != 0 or h.src_node >= self.num_nodes or h.src_node == self.node or \
                not self._is_node(0, h.src_node):
            return _HAND_OVER
        cdef Py_ssize_t n = self._round_keys()
        if n <= 0:
            return _HAND_OVER
        if h.type == WIRE_SYNC:
            return self._serve_sync_msg(n, fault_key)
        if h.type == WIRE_MOVE:
            return self._serve_move(n, fault_key)
        return self._serve_sync_reply(n, fault_key)

    cdef Py_ssize_t _round_keys(self) noexcept nogil:
        """A sync's keys frame (2) copied to keys_buf, counters (4) and versions (5) to
        per-key scratch: their number, or -1 when the frames do not fit."""
        cdef size_t size = self._size(2), i
        cdef Py_ssize_t n
        if size % 8 != 0 or size // 8 > MAX_KEYS:
            return -1
        n = size // 8
        if self._size(4) != <size_t>n * 4 or self._size(5) != <size_t>n * 4:
            return -1
        if not self._reserve_keys(n) or not _grow(<void**>&self.per_key_buf,
                                                  &self.per_key_cap, <size_t>n * PER_KEY):
            return -1
        memcpy(self.keys_buf, self._data(2), size)
        for i in range(<size_t>n):
            if self.keys_buf[i] >= self.num_keys:
                return -1
        memcpy(self._counters(n), self._data(4), n * 4)
        memcpy(self._versions(n), self._data(5), n * 4)
        return n

    # Per-key scratch of a sync of n keys: 8-byte slots, then four uint32 arrays, then
    # five uint8 arrays (PER_KEY bytes a key, with room to spare).
    cdef inline uint64_t* _slots(self, Py_ssize_t n) noexcept nogil:
        return <uint64_t*>self.per_key_buf

    cdef inline uint32_t* _counters(self, Py_ssize_t n) noexcept nogil:
        return <uint32_t*>(self.per_key_buf + 8 * n)

    cdef inline uint32_t* _versions(self, Py_ssize_t n) noexcept nogil:
        return <uint32_t*>(self.per_key_buf + 12 * n)

    cdef inline uint32_t* _versions_out(self, Py_ssize_t n) noexcept nogil:
        return <uint32_t*>(self.per_key_buf + 16 * n)

    cdef inline uint32_t* _answers(self, Py_ssize_t n) noexcept nogil:
        return <uint32_t*>(self.per_key_buf + 20 * n)

    cdef inline uint8_t* _bytes(self, Py_ssize_t n, int which) noexcept nogil:
        return <uint8_t*>(self.per_key_buf + (24 + which) * n)

    cdef int _serve_sync_msg(self, Py_ssize_t n, uint64_t* fault_key) noexcept nogil:
        """The owner's answer (rounds._answer_sync) to a SYNC a replica node sent itself,
        when all of its keys that this plane answers are owned here: the requests decided
        as the manager decides them (set_policy), every delta added, each key's version
        read and its value copied when the replica is behind (KEEP) or the key is
        replicated there, the holder bits updated, the relocated keys taken out and sent
        in one MOVE, the rest answered in one SYNC_REPLY. Requests the plane does not
        decide stay in the message, which then goes on to Python with them alone
        (_SPLIT)."""
        cdef header_t* h = &self.msg.header
        cdef uint64_t holder = h.src_node, used, length, key, moved = 0
        cdef uint32_t* counters = self._counters(n)
        cdef uint32_t* seen = self._versions(n)
        cdef uint32_t* answers = self._answers(n)
        cdef uint64_t* requested = self._slots(n)
        cdef uint8_t* has_delta = self._bytes(n, 0)
        cdef uint8_t* wanted = self._bytes(n, 1)
        cdef uint8_t* owned = self._bytes(n, 2)
        cdef uint8_t* with_value = self._bytes(n, 3)
        cdef uint8_t* relocate = self._bytes(n, 4)
        cdef uint32_t kind, flags
        cdef Py_ssize_t i, ns = 0, nr = 0, nrep
        cdef const char* deltas = self._data(3)
        cdef size_t dpos = 0, spos = 0
        cdef Batch b
        cdef zmq_msg_t values
        if h.arg0 != <int64_t>holder or self.peers[holder] == NULL:
            return _HAND_OVER  # forwarded, or for another node, or no reply path: Python
        if not self._reserve_values(self._size(3)):
            return _HAND_OVER
        for i in range(n):  # in place: the keys answered here first (ns <= i)
            flags = counters[i]
            kind = flags & ~(<uint32_t>WIRE_HAS_DELTA)
            if kind > WIRE_SYNC_DROP:
                return _HAND_OVER  # unknown flags: Python rejects them
            key = self.keys_buf[i]
            length = self.directory[key].length * self.itemsize
            if flags & WIRE_HAS_DELTA:
                if dpos + length > self._size(3):
                    return _HAND_OVER
                if kind != 0 or self.policy != POLICY_PYTHON:  # gathered, aligned
                    memcpy(self.values_buf + spos, deltas + dpos, length)
                    spos += length
                dpos += length
            if kind == 0 and self.policy == POLICY_PYTHON:  # a request left to Python
                requested[nr] = i
                nr += 1
                continue
            self.keys_buf[ns], counters[ns], seen[ns] = key, flags, seen[i]
            has_delta[ns] = (flags & WIRE_HAS_DELTA) != 0
            wanted[ns] = _SERVE_VALUE if kind == 0 else \
                _SERVE_VALUE_IF_CHANGED if kind == WIRE_SYNC_KEEP else _SERVE_NO_VALUE
            ns += 1
        self.split = nr
        if dpos != self._size(3) or ns == 0 or not self._all_owned(ns) or \
                not _grow(<void**>&self.out_buf, &self.out_cap,
                          self._total_length(ns) * self.itemsize):
            return _HAND_OVER
        for i in range(ns):  # every decision before anything changes (relocate_mask)
            relocate[i] = (counters[i] & ~(<uint32_t>WIRE_HAS_DELTA)) == 0 and \
                self._relocates(self.keys_buf[i], holder)
            if relocate[i]:
                wanted[i] = _SERVE_NO_VALUE  # the MOVE takes the value
                moved += 1
        if moved and not self._reserve_freed(self.nfreed + moved):
            return _HAND_OVER
        b = _batch(self.directory, self.keys_buf, ns, self.timeout_ns, self.arena,
                   self.itemsize, self.capacity)
        if self.dtype == 0:
            used = _serve_sync(&b, <float*>self.arena, <const float*>self.values_buf,
                               has_delta, seen, wanted, owned, self._versions_out(n),
                               with_value, <float*>self.out_buf, self.uniform)
        else:
            used = _serve_sync(&b, <double*>self.arena, <const double*>self.values_buf,
                               has_delta, seen, wanted, owned, self._versions_out(n),
                               with_value, <double*>self.out_buf, self.uniform)
        if b.failed >= 0:  # deltas before it are applied: the node fails
            fault_key[0] = self.keys_buf[b.failed]
            return _FAULT
        self._track_holders(ns, holder, counters, relocate)
        if moved:
            if not self._send_move(ns, holder, relocate, moved, fault_key):
                return _NO_MEMORY if fault_key[0] == <uint64_t>-1 else _FAULT
        nrep = 0
        for i in range(ns):  # the SYNC_REPLY: every key not relocated, in order
            if relocate[i]:
                continue
            kind = counters[i] & ~(<uint32_t>WIRE_HAS_DELTA)
            self.keys_buf[nrep] = self.keys_buf[i]
            self._versions_out(n)[nrep] = self._versions_out(n)[i]
            answers[nrep] = WIRE_REPLY_DROPPED if kind == WIRE_SYNC_DROP else \
                WIRE_REPLY_VALUE if with_value[i] else WIRE_REPLY_CURRENT
            nrep += 1
        if nrep:
            if self.zmq.msg_init_size(&values, used * self.itemsize) != 0:
                return _NO_MEMORY  # the deltas are applied: Python must not apply them again
            memcpy(self.zmq.msg_data(&values), self.out_buf, used * self.itemsize)
            self._send_sync_reply(holder, nrep, n, &values)
        return _SPLIT if nr else _SERVED

    cdef int _serve_move(self, Py_ssize_t n, uint64_t* fault_key) noexcept nogil:
        """A MOVE answering this node's round (Relocation.on_move with purpose
        MOVE_FOR_ROUND) whose keys, all distinct, this node holds as copies (it asked for
        them): each becomes OWNED in its copy's slot (_install_copies: the arriving value
        plus the updates made here since the last sync), its "value at last sync" slot
        goes to the allocator (take_freed), it leaves the copies' sets, its ownership
        counter, arrival stamp and home record are written, OWNER_UPDATE goes to the
        other homes, and events say that the round's keys are answered (and, when the
        last keys a localize waits for came, moved_in). Anything else goes to Python."""
        cdef header_t* h = &self.msg.header
        cdef uint32_t* counters = self._counters(n)
        cdef uint32_t* versions = self._versions(n)
        cdef uint64_t* slots = self._slots(n)
        cdef uint64_t key, total = 0, stamp
        cdef uint8_t state
        cdef Py_ssize_t i
        cdef bint moving
        cdef Batch b
        if h.arg1 != WIRE_MOVE_FOR_ROUND or self.held == NULL or self.policy == POLICY_PYTHON:
            return _HAND_OVER  # a localize's MOVE, or no state to install into: Python
        if not self._distinct(n):
            return _HAND_OVER
        for i in range(n):
            key = self.keys_buf[i]
            state = adapm_load_relaxed_u8(&self.directory[key].state)
            if (state != ADAPM_REPLICA and state != ADAPM_PENDING) or \
                    not keyset_contains(self.held, key):
                return _HAND_OVER  # not a copy asked for here: Python decides
            slots[i] = (<const uint32_t*>self.synced)[key] if self.synced_width == 4 \
                else (<const uint64_t*>self.synced)[key]
            total += self.directory[key].length
        if self._size(3) != total * self.itemsize or not self._reserve_values(self._size(3)) \
                or not self._reserve_freed(self.nfreed + n):
            return _HAND_OVER
        memcpy(self.values_buf, self._data(3), self._size(3))
        b = _batch(self.directory, self.keys_buf, n, self.timeout_ns, self.arena,
                   self.itemsize, self.capacity)
        if self.dtype == 0:
            _install_copies(&b, <float*>self.arena, slots, <const float*>self.values_buf,
                            versions, self.node)
        else:
            _install_copies(&b, <double*>self.arena, slots, <const double*>self.values_buf,
                            versions, self.node)
        if b.failed >= 0:
            fault_key[0] = self.keys_buf[b.failed]
            return _FAULT
        stamp = self.round % STAMPS + 1
        moving = self.moving_in.size != 0
        for i in range(n):
            key = self.keys_buf[i]
            keyset_discard(self.pending, key)
            keyset_discard(self.held, key)
            keyset_discard(self.moving_in, key)
            self.owner_counter[key] = counters[i]
            self.arrived[key] = <uint32_t>stamp
            self.freed[2 * self.nfreed] = slots[i]
            self.freed[2 * self.nfreed + 1] = self.directory[key].length
            self.nfreed += 1
        self.relocations += n
        self.owner_changes += 1
        if moving and self.moving_in.size == 0:
            self._event(EVENT_MOVED_IN, 0, 0)
        if not self._tell_homes(n, counters):
            fault_key[0] = <uint64_t>-1
            return _NO_MEMORY
        self._event(EVENT_SYNC_ANSWERED, h.request_id, n)
        return _SERVED

    cdef bint _tell_homes(self, Py_ssize_t n, const uint32_t* counters) noexcept nogil:
        """Relocation._tell_homes: this node owns the keys now, as of `counters`; its own
        home keys' records are written here (newer counters only), the other homes get
        one OWNER_UPDATE each, in node order."""
        cdef Py_ssize_t i, at, j
        cdef uint64_t key, slot
        cdef uint32_t home
        cdef header_t h
        cdef uint32_t* homes = self._answers(n)  # free in a MOVE's scratch, as misses_buf
        cdef uint64_t* order = self.misses_buf   # (only _distinct's check used it)
        if self.num_nodes > 64:
            return False
        for i in range(n):
            homes[i] = self.keys_buf[i] % self.num_nodes
        self._group(homes, n, self.num_nodes, order)
        at = 0
        while at < n:
            home = homes[order[at]]
            j = at
            while j < n and homes[order[j]] == home:
                j += 1
            if home == self.node:
                for i in range(at, j):
                    key = self.keys_buf[order[i]]
                    slot = key // self.num_nodes
                    if counters[order[i]] > self.home_counter[slot]:
                        self.home_owner[slot] = self.node
                        self.home_counter[slot] = counters[order[i]]
            elif self.peers[home] != NULL:
                h = self._header(WIRE_OWNER_UPDATE, 0, 0, 0, self.node, 0)
                self._send_on(self.peers[home], <const char*>&h, WIRE_HEADER_BYTES, True)
                if not self._send_gathered(self.peers[home], <const char*>self.keys_buf, 8,
                                           order, at, j, True) or \
                        not self._send_gathered(self.peers[home], <const char*>counters, 4,
                                                order, at, j, False):
                    return False
                self.bytes_sent += WIRE_HEADER_BYTES + (j - at) * 12
            else:
                return False
            at = j
        return True

    cdef bint _relocates(self, uint64_t key, uint64_t holder) noexcept nogil:
        """Manager.relocate_mask for one requested key: relocate it to `holder` unless a
        worker here intends it or used it within its retention, another node holds a
        replica of it, or it arrived here by relocation fewer than settle_rounds ago."""
        cdef const uint8_t* row
        cdef uint8_t bits
        cdef size_t byte
        cdef int64_t since
        if self.policy == POLICY_RELOCATE:
            return True
        if self.policy == POLICY_REPLICATE:
            return False
        if self.intent_counts[key] > 0:
            return False
        if self.retains and retention_within(&self.retention, key, self.now):
            return False
        row = self.holder_bits + key * self.holder_stride
        for byte in range(self.holder_stride):
            bits = row[byte]
            if byte == holder // 8:
                bits &= ~(<uint8_t>(1 << (holder % 8)))
            if bits:
                return False
        if self.arrived[key]:  # rounds since it arrived, modulo the stamps' range
            since = (<int64_t>(self.round % STAMPS + 1) - <int64_t>self.arrived[key]) % \
                <int64_t>STAMPS
            if since < 0:
                since += STAMPS
            since = since - 1 if since > 0 else 0
            if since < self.settle_rounds:
                return False
        return True

    cdef void _track_holders(self, Py_ssize_t ns, uint64_t holder, const uint32_t* counters,
                             const uint8_t* relocate) noexcept nogil:
        """Who holds replicas (rounds._answer_requests, then _track_holders): a key
        replicated to `holder` gains its bit, a dropped one loses it; relocated keys
        forget all of them (their new owner learns them anew)."""
        cdef Py_ssize_t i
        cdef uint8_t* row
        cdef uint8_t bit = <uint8_t>(1 << (holder % 8))
        cdef uint32_t kind
        for i in range(ns):
            kind = counters[i] & ~(<uint32_t>WIRE_HAS_DELTA)
            if kind == 0 and not relocate[i]:
                self.holder_bits[self.keys_buf[i] * self.holder_stride + holder // 8] |= bit
                self.replicas_made += 1
        for i in range(ns):
            kind = counters[i] & ~(<uint32_t>WIRE_HAS_DELTA)
            if kind == WIRE_SYNC_DROP:
                self.holder_bits[self.keys_buf[i] * self.holder_stride + holder // 8] &= \
                    ~bit
            elif relocate[i]:
                row = self.holder_bits + self.keys_buf[i] * self.holder_stride
                memset(row, 0, self.holder_stride)

    cdef bint _send_move(self, Py_ssize_t ns, uint64_t holder, const uint8_t* relocate,
                         uint64_t moved, uint64_t* fault_key) noexcept nogil:
        """Eviction.evict_and_move for the relocated keys of a sync: taken out of the
        table (_evict), one MOVE to `holder` (values, ownership counters + 1, versions;
        the round as its request id, purpose MOVE_FOR_ROUND), their slots queued for the
        allocator (take_freed). False: a lock timed out (fault_key) or no memory
        (fault_key = -1)."""
        cdef uint64_t* keys = self.misses_buf  # the relocated keys, in order
        cdef uint64_t m = 0, nbytes = 0, i, key
        cdef uint64_t* offsets
        cdef uint8_t* taken
        cdef Batch b
        cdef zmq_msg_t frame
        cdef header_t h
        cdef void* sock = self.peers[holder]
        cdef char* p
        fault_key[0] = <uint64_t>-1
        if not self._reserve_misses(moved):
            return False
        keys = self.misses_buf
        for i in range(<uint64_t>ns):
            if relocate[i]:
                keys[m] = self.keys_buf[i]
                nbytes += self.directory[keys[m]].length * self.itemsize
                m += 1
        # scratch: the values in move_buf, offsets and taken after them
        if not _grow(<void**>&self.move_buf, &self.move_cap, nbytes + m * 9 + 16):
            return False
        offsets = <uint64_t*>(self.move_buf + ((nbytes + 7) // 8) * 8)
        taken = <uint8_t*>(offsets + m)
        b = _batch(self.directory, keys, m, self.timeout_ns, self.arena, self.itemsize,
                   self.capacity)
        _evict(&b, self.arena, self.itemsize, <uint16_t>holder, self.move_buf, offsets, taken)
        if b.failed >= 0:
            fault_key[0] = keys[b.failed]
            return False
        h = self._header(WIRE_MOVE, 0, self.msg.header.request_id, 0, 0, WIRE_MOVE_FOR_ROUND)
        self._send_on(sock, <const char*>&h, WIRE_HEADER_BYTES, True)
        self._send_on(sock, <const char*>keys, m * 8, True)
        self._send_on(sock, self.move_buf, nbytes, True)
        if self.zmq.msg_init_size(&frame, m * 4) != 0:
            return False
        p = <char*>self.zmq.msg_data(&frame)
        for i in range(m):
            (<uint32_t*>p)[0] = self.owner_counter[keys[i]] + 1
            p += 4
        self._send_frame(sock, &frame, True)
        if self.zmq.msg_init_size(&frame, m * 4) != 0:
            return False
        p = <char*>self.zmq.msg_data(&frame)
        for i in range(m):  # ABSENT now: nobody changes them
            (<uint32_t*>p)[0] = adapm_load_acquire_u32(&self.directory[keys[i]].version)
            p += 4
        self._send_frame(sock, &frame, False)
        self.bytes_sent += WIRE_HEADER_BYTES + m * 16 + nbytes
        for i in range(m):
            self.freed[2 * self.nfreed] = offsets[i]
            self.freed[2 * self.nfreed + 1] = self.directory[keys[i]].length
            self.nfreed += 1
        self.owner_changes += 1
        return True

    cdef bint _reserve_freed(self, size_t n) noexcept nogil:
        return _grow(<void**>&self.freed, &self.freed_cap, n * 16)

    cdef void _send_sync_reply(self, uint64_t holder, Py_ssize_t n, Py_ssize_t layout,
                               zmq_msg_t* values) noexcept nogil:
        """A SYNC_REPLY to node `holder` through this node's DEALER to it: the n keys
        answered (keys_buf), values, answers, versions (per-key scratch of a sync of
        `layout` keys)."""
        cdef void* sock = self.peers[holder]
        cdef header_t h = self._header(WIRE_SYNC_REPLY, 0, self.msg.header.request_id, 0, 0, 0)
        # A DEALER queues (or blocks at its high-water mark, as pyzmq's send does): the
        # frames of one message go out together or, on a closed socket, not at all.
        self._send_on(sock, <const char*>&h, WIRE_HEADER_BYTES, True)
        self._send_on(sock, <const char*>self.keys_buf, n * 8, True)
        self.bytes_sent += WIRE_HEADER_BYTES + n * 8 + self.zmq.msg_size(values) + n * 8
        if self.zmq.msg_send(values, sock, ZMQ_SNDMORE) < 0:
            self.zmq.msg_close(values)
        self._send_on(sock, <const char*>self._answers(layout), n * 4, True)
        self._send_on(sock, <const char*>self._versions_out(layout), n * 4, False)

    cdef int _serve_sync_reply(self, Py_ssize_t n, uint64_t* fault_key) noexcept nogil:
        """The replica node's side of the keys an owner answered with a value or
        "current" (rounds.on_sync_reply without drops): copies refreshed with the owner's
        values (a PENDING copy becomes a REPLICA and leaves the pending set), every
        key's version seen and round stamped, and an event: so many keys of the round
        answered. Dropped keys (what stays depends on intents) stay in the message, which
        then goes on to Python with them alone (_SPLIT)."""
        cdef uint32_t* answers = self._counters(n)
        cdef uint32_t* versions = self._versions(n)
        cdef uint64_t* dropped = self._slots(n)
        cdef uint64_t* slots = <uint64_t*>self.out_buf
        cdef uint64_t values_len = 0, key, round_id = self.msg.header.request_id
        cdef Py_ssize_t i, ns = 0, nv = 0, nr = 0
        cdef Batch b
        if not self._reserve_misses(n) or not _grow(<void**>&self.out_buf, &self.out_cap,
                                                    <size_t>n * 8):
            return _HAND_OVER
        if self.rejoin != NULL and not (  # room for whatever the drops need, up front
                keyset_reserve(self.rejoin, self.rejoin.length + n) and
                keyset_reserve(self.refresh, self.refresh.length + n) and
                self._reserve_freed(self.nfreed + 2 * n)):
            return _HAND_OVER
        slots = <uint64_t*>self.out_buf
        for i in range(n):  # in place: the answers served here first (ns <= i)
            if answers[i] == WIRE_REPLY_DROPPED:
                dropped[nr] = i
                nr += 1
                continue
            if answers[i] != WIRE_REPLY_VALUE and answers[i] != WIRE_REPLY_CURRENT:
                return _HAND_OVER  # unknown answers: Python rejects them
            key = self.keys_buf[i]
            self.keys_buf[ns], answers[ns], versions[ns] = key, answers[i], versions[i]
            if answers[ns] == WIRE_REPLY_VALUE:  # with their "value at last sync" slots
                self.misses_buf[nv] = key
                slots[nv] = (<const uint32_t*>self.synced)[key] if self.synced_width == 4 \
                    else (<const uint64_t*>self.synced)[key]
                values_len += self.directory[key].length
                nv += 1
            ns += 1
        self.split = nr
        if (ns == 0 and self.rejoin == NULL) or self._size(3) != values_len * self.itemsize \
                or not self._reserve_values(self._size(3)):
            return _HAND_OVER
        if nv:
            memcpy(self.values_buf, self._data(3), self._size(3))
            b = _batch(self.directory, self.misses_buf, nv, self.timeout_ns, self.arena,
                       self.itemsize, self.capacity)
            if self.dtype == 0:
                _replica_refresh(&b, <float*>self.arena, slots, <const float*>self.values_buf)
            else:
                _replica_refresh(&b, <double*>self.arena, slots,
                                 <const double*>self.values_buf)
            if b.failed >= 0:
                fault_key[0] = self.misses_buf[b.failed]
                return _FAULT
            for i in range(nv):
                keyset_discard(self.pending, self.misses_buf[i])
        for i in range(ns):  # up to date as of this round (rounds.on_sync_reply)
            key = self.keys_buf[i]
            self.seen_version[key] = versions[i]
            adapm_store_release_u32(&self.fresh[key], <uint32_t>round_id)
        if nr and self.rejoin != NULL:
            if not self._release_dropped(dropped, nr, round_id, fault_key):
                self._event(EVENT_SYNC_ANSWERED, round_id, ns)  # what was done is done
                return _FAULT
            self._event(EVENT_SYNC_ANSWERED, round_id, ns + nr)
            return _SERVED
        self._event(EVENT_SYNC_ANSWERED, round_id, ns)
        return _SPLIT if nr else _SERVED

    cdef bint _release_dropped(self, const uint64_t* dropped, Py_ssize_t nr,
                               uint64_t round_id, uint64_t* fault_key) noexcept nogil:
        """Rounds._release of the keys at `dropped` (indices into the message's keys,
        room reserved): a key an intent of this node names again rejoins (it is asked
        for anew); the others' copies go when no worker wrote them since their last sync
        (ABSENT under the lock, both slots back to the allocator, out of the held set),
        else they stay and sync with the next round (refresh). A key kept either way
        means the round did not sync every replica (EVENT_NOT_FULL, before the keys are
        counted as answered). False: a lock timed out (fault_key; keys before it done)."""
        cdef const char* keys = self._data(2)
        cdef uint64_t key, value_slot, synced_slot, length
        cdef Py_ssize_t i
        cdef bint kept = False, clean
        cdef adapm_entry_t* e
        cdef Batch b
        for i in range(nr):
            memcpy(&key, keys + 8 * dropped[i], 8)
            if self.intent_counts[key] > 0:
                keyset_add(self.rejoin, key)
                kept = True
                continue
            synced_slot = (<const uint32_t*>self.synced)[key] if self.synced_width == 4 \
                else (<const uint64_t*>self.synced)[key]
            b = _batch(self.directory, &key, 1, self.timeout_ns, NULL, self.itemsize,
                       self.capacity)
            if not _lock_next(&b):
                fault_key[0] = key
                return False
            e = b.entry
            length = e.length
            clean = e.state == ADAPM_REPLICA and synced_slot + length <= self.capacity and \
                memcmp(self.arena + e.offset * self.itemsize,  # bitwise, as release_clean
                       self.arena + synced_slot * self.itemsize, length * self.itemsize) == 0
            if clean:
                value_slot = e.offset
                e.state = ADAPM_ABSENT
            _unlock_held(&b, clean)
            if not clean:  # written since: its delta goes, and a value comes, next round
                keyset_add(self.refresh, key)
                kept = True
                continue
            keyset_discard(self.held, key)
            self._give_back(value_slot, length)
            self._give_back(synced_slot, length)
            self.replicas_dropped += 1
        if kept:
            self._event(EVENT_NOT_FULL, round_id, 0)
        return True

    cdef void _give_back(self, uint64_t offset, uint64_t length) noexcept nogil:
        """A slot back to the allocator, or queued (room reserved) where it has no memory
        to list it now."""
        if slots_free(self.slots, offset, length):
            return
        self.freed[2 * self.nfreed] = offset
        self.freed[2 * self.nfreed + 1] = length
        self.nfreed += 1

    cdef object _hand_over_split(self):
        """The rest of a sync this plane served in part, for the Python path: the same
        routing identity and header, with the keys it left (their indices in
        _slots(n)) and their data; the plane lets the message go."""
        cdef Py_ssize_t n = self._size(2) // 8, nr = self.split, i, j = 0
        cdef const uint64_t* left = self._slots(n)
        cdef const char* keys = self._data(2)
        cdef const char* deltas = self._data(3)
        cdef const char* counters = self._data(4)
        cdef const char* versions = self._data(5)
        cdef uint32_t flags
        cdef uint64_t key, length, dpos = 0
        cdef bint sync = self.msg.header.type == WIRE_SYNC
        cdef bytearray k = bytearray(nr * 8), c = bytearray(nr * 4), v = bytearray(nr * 4)
        cdef bytearray d = bytearray()
        for i in range(n):
            memcpy(&flags, counters + 4 * i, 4)
            memcpy(&key, keys + 8 * i, 8)
            length = self.directory[key].length * self.itemsize
            if j < nr and <Py_ssize_t>left[j] == i:
                memcpy(<char*>k + 8 * j, keys + 8 * i, 8)
                memcpy(<char*>c + 4 * j, counters + 4 * i, 4)
                memcpy(<char*>v + 4 * j, versions + 4 * i, 4)
                if sync and flags & WIRE_HAS_DELTA:
                    d += deltas[dpos:dpos + length]
                j += 1
            if sync and flags & WIRE_HAS_DELTA:
                dpos += length
        frames = [PyBytes_FromStringAndSize(self._data(0), self._size(0)),
                  PyBytes_FromStringAndSize(self._data(1), self._size(1)),
                  bytes(k), bytes(d), bytes(c), bytes(v)]
        self.bytes_received += self._body_bytes() - sum(len(f) for f in frames[1:])
        self._release_message()
        return frames

    cdef void _event(self, uint32_t kind, uint64_t round_id, uint64_t count) noexcept nogil:
        """Queue an event (the drain stops once MAX_EVENTS wait); one of the same kind
        and round as the last adds to it."""
        cdef Event* last
        if self.nevents:
            last = &self.events[self.nevents - 1]
            if last.kind == kind and last.round == round_id:
                last.count += count
                return
        self.events[self.nevents].kind = kind
        self.events[self.nevents].round = round_id
        self.events[self.nevents].count = count
        self.nevents += 1

    cdef bint _send_on(self, void* sock, const char* data, size_t size, bint more
                       ) noexcept nogil:
        cdef zmq_msg_t frame
        if self.zmq.msg_init_size(&frame, size) != 0:
            return False
        if size:
            memcpy(self.zmq.msg_data(&frame), data, size)
        if self.zmq.msg_send(&frame, sock, ZMQ_SNDMORE if more else 0) < 0:
            self.zmq.msg_close(&frame)
            return False
        return True

    cdef void _reply(self, uint8_t mtype, uint16_t flags, uint64_t count, const char* to,
                     size_t to_len, const char* positions, size_t positions_len,
                     zmq_msg_t* values) noexcept nogil:
        """Send a reply of `mtype` to routing identity `to`: header, then for a
        PULL_REPLY the positions and the values frame (handed to libzmq, not copied)."""
        cdef bint more = mtype == WIRE_PULL_REPLY
        cdef header_t h = self._header(mtype, flags, self.msg.header.request_id, count, 0, 0)
        if not self._send_copy(to, to_len, True) or \
                not self._send_copy(<const char*>&h, WIRE_HEADER_BYTES, more):
            if values != NULL:  # ROUTER_MANDATORY: that worker is gone (logged by Python)
                self.zmq.msg_close(values)
            self.unroutable += 1
            return
        self.bytes_sent += WIRE_HEADER_BYTES
        if more:
            self._send_copy(positions, positions_len, True)
            self.bytes_sent += positions_len + self.zmq.msg_size(values)
            if self.zmq.msg_send(values, self.socket, 0) < 0:
                self.zmq.msg_close(values)

    cdef bint _send_copy(self, const char* data, size_t size, bint more) noexcept nogil:
        return self._send_on(self.socket, data, size, more)

    # -- scratch -----------------------------------------------------------------------

    cdef bint _reserve_keys(self, size_t n) noexcept nogil:
        return _grow(<void**>&self.keys_buf, &self.keys_cap, n * 8)

    cdef bint _reserve_misses(self, size_t n) noexcept nogil:
        return _grow(<void**>&self.misses_buf, &self.misses_cap, n * 8)

    cdef bint _reserve_values(self, size_t nbytes) noexcept nogil:
        return _grow(<void**>&self.values_buf, &self.values_cap, nbytes)


cdef inline int _frames_of(uint8_t mtype) noexcept nogil:
    """Data frames of each type the plane serves (0: not one of them)."""
    if mtype == WIRE_PULL:
        return 1
    if mtype == WIRE_PUSH or mtype == WIRE_SET or mtype == WIRE_FWD_PULL or \
            mtype == WIRE_FWD_PUSH or mtype == WIRE_FWD_SET:
        return 2
    if mtype == WIRE_APPLY or mtype == WIRE_FWD_APPLY:
        return 3
    return 0


cdef inline bint _from_worker(uint8_t mtype) noexcept nogil:
    return mtype == WIRE_PULL or mtype == WIRE_PUSH or mtype == WIRE_SET or \
        mtype == WIRE_APPLY


cdef bint _all_finite(const char* values, uint64_t count, int dtype) noexcept nogil:
    cdef uint64_t i
    if dtype == 0:
        for i in range(count):
            if not isfinite((<const float*>values)[i]):
                return False
    else:
        for i in range(count):
            if not isfinite((<const double*>values)[i]):
                return False
    return True


cdef int _by_key(const void* a, const void* b) noexcept nogil:
    cdef uint64_t x = (<const uint64_t*>a)[0], y = (<const uint64_t*>b)[0]
    return (x > y) - (x < y)


cdef bint _grow(void** buf, size_t* cap, size_t nbytes) noexcept nogil:
    """Make *buf hold at least nbytes (at least 8, 16-byte aligned by malloc)."""
    cdef void* p
    if nbytes <= cap[0]:
        return True
    if nbytes < 2 * cap[0]:
        nbytes = 2 * cap[0]
    p = realloc(buf[0], nbytes if nbytes > 8 else 8)
    if p == NULL:
        return False
    buf[0] = p
    cap[0] = nbytes
    return True
