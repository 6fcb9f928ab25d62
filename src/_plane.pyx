# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The node server's compiled data plane (DESIGN.md §9): remote reads and writes of keys
this node owns, from the ROUTER socket to the table and back, with no Python object per
message or per key.

`Plane.drain` receives messages straight from libzmq (the library pyzmq loaded, reached
through function addresses: adapm.node.data.libzmq), checks each one as adapm.wire.protocol
and adapm.node.admission would (header, token, sender, key range, frame sizes), runs the
table's kernel (kernels.pxd, optimizers.pxd) and writes the reply into the outgoing frame
itself. It serves PULL, PUSH, SET (of another node's worker: a local worker's set may have
to wait for a round, and overwrites replicas here), APPLY and their forwarded forms, whose
keys are all owned here. The first message
it does not serve (any other type, a key not owned here, anything that fails a check) it
hands to the Python control plane as a list of bytes and stops: messages are handled in
the order they arrived, by one plane or the other, never overtaking each other.

Python is the reference: a message this plane serves is one the Python path would have
accepted and served the same way, and everything else it leaves to Python
(tests/integration/node/test_data_plane.py checks that, message by message)."""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.math cimport isfinite
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, qsort, realloc
from libc.string cimport memcmp, memcpy

from arena cimport real
from atomic cimport adapm_load_relaxed_u8
from batch cimport Batch, _batch
from kernels cimport _pull, _update
from layout cimport ADAPM_OWNED, adapm_entry_t
from optimizers cimport (
    OptStep, _OPT_ADAGRAD, _OPT_ADAM, _OPT_ROWWISE_ADAGRAD, _OPT_SGD, _apply_steps,
    _state_length,
)
from wire_header cimport (
    WIRE_ALL_POSITIONS, WIRE_APPLY, WIRE_FWD_APPLY, WIRE_FWD_PULL, WIRE_FWD_PUSH, WIRE_FWD_SET,
    WIRE_HEADER_BYTES, WIRE_MAGIC, WIRE_PARAMS_COUNT, WIRE_PULL, WIRE_PULL_REPLY, WIRE_PUSH,
    WIRE_SERVER, WIRE_SET, WIRE_UPDATE_ACK, WIRE_VERSION, header_t,
)


# -- libzmq, by address (no header: the types as zmq.h declares them) ---------------------

ctypedef struct zmq_msg_t:          # opaque, 64 bytes, pointer-aligned
    uint64_t _[8]

ctypedef int (*msg_init_f)(zmq_msg_t*) noexcept nogil
ctypedef int (*msg_init_size_f)(zmq_msg_t*, size_t) noexcept nogil
ctypedef int (*msg_io_f)(zmq_msg_t*, void*, int) noexcept nogil
ctypedef int (*msg_close_f)(zmq_msg_t*) noexcept nogil
ctypedef void* (*msg_data_f)(zmq_msg_t*) noexcept nogil
ctypedef size_t (*msg_size_f)(const zmq_msg_t*) noexcept nogil
ctypedef int (*msg_more_f)(const zmq_msg_t*) noexcept nogil
ctypedef int (*errno_f)() noexcept nogil

cdef enum:
    ZMQ_DONTWAIT = 1
    ZMQ_SNDMORE = 2
    ZMQ_EAGAIN = 11                 # errno values of Linux, the one platform enabled
    ZMQ_EINTR = 4
    MAX_FRAMES = 8                  # identity + header + at most 4 data frames are legal
    MAX_KEYS = 0xFFFFFFFF           # protocol.MAX_KEYS_PER_MESSAGE

# What the plane does with a received message.
cdef enum:
    _HAND_OVER = 0                  # to the Python control plane, as received
    _SERVED = 1
    _FAULT = 2                      # a lock timed out halfway through a write


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
    cdef msg_init_f msg_init
    cdef msg_init_size_f msg_init_size
    cdef msg_io_f msg_recv, msg_send
    cdef msg_close_f msg_close
    cdef msg_data_f msg_data
    cdef msg_size_f msg_size
    cdef msg_more_f msg_more
    cdef errno_f zmq_errno
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

    def __cinit__(self):
        self.msg.nframes = 0
        self.keys_buf = self.misses_buf = NULL
        self.values_buf = NULL
        self.keys_cap = self.misses_cap = self.values_cap = 0

    def __init__(self, dict functions, uintptr_t socket, view, dict table, uint16_t node,
                 uint32_t num_nodes, uint32_t num_workers, uint32_t workers_per_node):
        """functions: adapm.node.data.libzmq.functions(); socket: the ROUTER's handle
        (pyzmq's Socket.underlying); table: view.kernel_handle(); workers_per_node: the
        node's workers are ranks node * workers_per_node onwards."""
        self.msg_init = <msg_init_f><uintptr_t>functions["zmq_msg_init"]
        self.msg_init_size = <msg_init_size_f><uintptr_t>functions["zmq_msg_init_size"]
        self.msg_recv = <msg_io_f><uintptr_t>functions["zmq_msg_recv"]
        self.msg_send = <msg_io_f><uintptr_t>functions["zmq_msg_send"]
        self.msg_close = <msg_close_f><uintptr_t>functions["zmq_msg_close"]
        self.msg_data = <msg_data_f><uintptr_t>functions["zmq_msg_data"]
        self.msg_size = <msg_size_f><uintptr_t>functions["zmq_msg_size"]
        self.msg_more = <msg_more_f><uintptr_t>functions["zmq_msg_more"]
        self.zmq_errno = <errno_f><uintptr_t>functions["zmq_errno"]
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

    def admit(self, uint64_t token, list worker_ids, list node_ids):
        """The cluster formed: its token, and the routing identity of every worker (by
        rank) and node server (by node), as protocol.worker_identity/node_identity give
        them. Each kind has one length (a name of fixed size and an 8-byte MAC)."""
        if len(worker_ids) != self.num_workers or len(node_ids) != self.num_nodes:
            raise ValueError("an identity per worker and per node")
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
                if outcome != _SERVED:
                    break
                self.served += 1  # a message handed over is counted by Python
                self.bytes_received += self._body_bytes()
                self._release_message()
        if got < 0:
            raise OSError(self.zmq_errno(), "the data plane could not receive")
        if outcome == _SERVED:  # the socket ran dry, or the budget was spent
            return taken, None
        if outcome == _FAULT:
            self._release_message()
            raise PlaneFault(f"node {self.node}: the lock of key {fault_key} timed out "
                             "while the data plane applied a write to it")
        return taken, self._hand_over()

    @property
    def nbytes(self):
        """The memory it holds: scratch buffers (they grow to the largest message) and
        the members' identities."""
        return self.keys_cap + self.misses_cap + self.values_cap + \
            len(self.worker_ids or b"") + len(self.node_ids or b"")

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
                self.msg_init(&m.frames[m.nframes])
                rc = self.msg_recv(&m.frames[m.nframes], self.socket, flags)
                if rc < 0:
                    self.msg_close(&m.frames[m.nframes])
                    if m.nframes == 0 and self.zmq_errno() in (ZMQ_EAGAIN, ZMQ_EINTR):
                        return 0
                    self._release_message()
                    return -1
                m.nframes += 1
                if not self.msg_more(&m.frames[m.nframes - 1]):
                    return 1
            else:  # beyond every legal message: drop the rest, hand over what is held
                self.msg_init(&spare)
                rc = self.msg_recv(&spare, self.socket, 0)
                more = rc >= 0 and self.msg_more(&spare)
                self.msg_close(&spare)
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
            self.msg_close(&self.msg.frames[i])
        self.msg.nframes = 0

    cdef object _hand_over(self):
        """The held message as bytes frames, for the Python path; the plane lets it go."""
        cdef int i
        cdef list frames = []
        for i in range(self.msg.nframes):
            frames.append(PyBytes_FromStringAndSize(
                <char*>self.msg_data(&self.msg.frames[i]), self.msg_size(&self.msg.frames[i])))
        self._release_message()
        return frames

    # -- checking ----------------------------------------------------------------------

    cdef inline char* _data(self, int i) noexcept nogil:
        return <char*>self.msg_data(&self.msg.frames[i])

    cdef inline size_t _size(self, int i) noexcept nogil:
        return self.msg_size(&self.msg.frames[i])

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
        if self.msg_init_size(&values, nbytes) != 0:
            return _HAND_OVER
        # The kernel writes into the frame libzmq sends; a frame of a few bytes lives
        # inside zmq_msg_t, maybe unaligned for the kernel's stores: then via scratch.
        out = <char*>self.msg_data(&values)
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
            self.msg_close(&values)
            return _HAND_OVER
        if not direct:
            memcpy(self.msg_data(&values), out, nbytes)
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

    cdef void _reply(self, uint8_t mtype, uint16_t flags, uint64_t count, const char* to,
                     size_t to_len, const char* positions, size_t positions_len,
                     zmq_msg_t* values) noexcept nogil:
        """Send a reply of `mtype` to routing identity `to`: header, then for a
        PULL_REPLY the positions and the values frame (handed to libzmq, not copied)."""
        cdef header_t h
        cdef bint more = mtype == WIRE_PULL_REPLY
        h.magic, h.version, h.type = WIRE_MAGIC, WIRE_VERSION, mtype
        h.src_node, h.flags, h.src_worker = self.node, flags, WIRE_SERVER
        h.request_id, h.count, h.arg0, h.arg1 = self.msg.header.request_id, count, 0, 0
        h.token = self.token
        if not self._send_copy(to, to_len, True) or \
                not self._send_copy(<const char*>&h, WIRE_HEADER_BYTES, more):
            if values != NULL:  # ROUTER_MANDATORY: that worker is gone (logged by Python)
                self.msg_close(values)
            self.unroutable += 1
            return
        self.bytes_sent += WIRE_HEADER_BYTES
        if more:
            self._send_copy(positions, positions_len, True)
            self.bytes_sent += positions_len + self.msg_size(values)
            if self.msg_send(values, self.socket, 0) < 0:
                self.msg_close(values)

    cdef bint _send_copy(self, const char* data, size_t size, bint more) noexcept nogil:
        cdef zmq_msg_t frame
        if self.msg_init_size(&frame, size) != 0:
            return False
        if size:
            memcpy(self.msg_data(&frame), data, size)
        if self.msg_send(&frame, self.socket, ZMQ_SNDMORE if more else 0) < 0:
            self.msg_close(&frame)
            return False
        return True

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
