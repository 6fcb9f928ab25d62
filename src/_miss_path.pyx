# cython: boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The worker's miss path in compiled code (DESIGN.md §9; issue 19, point 4): a pull's
missed keys split by destination, each node's requests built and sent, and every reply
placed in the caller's buffer, with no Python object per message or per key.

adapm.client.miss_path.MissPath is the reference and the Python around it: it calls
`pull` once for a call's misses, then `wait` until the call is done. `wait` hands the
Python side whatever is not a clean answer to the call (`FOREIGN`: a reply to another of
the worker's operations, a late or malformed message; `HANDOFF`: a message for this call
that is not a clean PULL_REPLY, such as FAILED), so that Python decides about it exactly as
it always did (adapm.client.requests). Only uniform tables (rows of one length) are served
here; `pull` declines (`FALLBACK`) anything else it would have to decide about: a key whose
location cache names this node (it arrived meanwhile), a node with no socket.

Sockets are the worker's pyzmq DEALERs (one per node), used through the libzmq pyzmq
loaded (src/zmq_api.pxd, adapm.wire.libzmq); messages are byte for byte those of
adapm.wire.protocol (tests/integration/client/test_compiled_miss_path.py)."""

from cpython.bytes cimport PyBytes_FromStringAndSize
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset

from layout cimport ADAPM_PENDING, ADAPM_REPLICA, adapm_entry_t
from wire_header cimport (
    WIRE_ALL_POSITIONS, WIRE_APPLY, WIRE_HEADER_BYTES, WIRE_MAGIC, WIRE_PARAMS_COUNT,
    WIRE_PULL, WIRE_PULL_REPLY, WIRE_PUSH, WIRE_SET, WIRE_VERSION, header_t,
)
from zmq_api cimport (
    ZMQ_DONTWAIT, ZMQ_EAGAIN, ZMQ_EINTR, ZMQ_POLLIN, ZMQ_SNDMORE, zmq_api_load, zmq_api_t,
    zmq_msg_t, zmq_pollitem_t, zmq_recv_frame,
)

# What pull and wait return.
cpdef enum Status:
    FALLBACK = 0    # pull: nothing sent; the Python path serves the call
    STARTED = 1     # pull: requests sent
    DONE = 2        # wait: every missed key placed
    IDLE = 3        # wait: nothing arrived within the timeout (or a signal): check, wait again
    FOREIGN = 4     # wait: a message not for this call: take_message() for Requests.dispatch
    HANDOFF = 5     # wait: a message for this call that is not a clean answer:
                    # take_message(); the Python path takes the call over (take_call)

cdef enum:
    MAX_FRAMES = 8                  # beyond any legal message to a worker: dropped
    MAX_KEYS = 0xFFFFFFFF           # protocol.MAX_KEYS_PER_MESSAGE


cdef struct Request:
    uint64_t start                  # its keys: order[start:start + n] (positions in the call)
    uint64_t n
    uint64_t left                   # keys not answered yet
    uint32_t node                   # where it went


cdef class CompiledMissPath:
    cdef zmq_api_t zmq
    cdef const adapm_entry_t* directory
    cdef uint64_t num_keys, uniform, itemsize, row_bytes
    cdef uint16_t node
    cdef uint32_t num_nodes, rank
    cdef uint64_t token
    cdef void** sockets             # per node: this worker's DEALER to it (NULL: none)
    cdef zmq_pollitem_t* items      # the connected ones, polled together
    cdef int nitems
    cdef object _keep               # the pyzmq sockets and the view, alive while we are
    # the call in flight (pull .. DONE, take_call or abandon)
    cdef bint active
    cdef uint64_t first_request
    cdef Request* requests
    cdef size_t nrequests, requests_cap
    cdef uint64_t* order            # missed positions grouped by request
    cdef size_t order_cap
    cdef uint32_t* dest             # per missed key: its node (scratch)
    cdef size_t* node_counts        # per node + 1: a call's counting sort (scratch)
    cdef size_t dest_cap
    cdef char* out
    cdef uint64_t out_rows
    cdef uint64_t left
    # a message for Python (take_message)
    cdef zmq_msg_t frames[MAX_FRAMES]
    cdef int nframes
    cdef public uint64_t bytes_sent, bytes_to_node, bytes_received
    cdef public uint64_t placed, dropped   # replies placed; messages of too many frames

    def __cinit__(self):
        self.sockets = NULL
        self.items = NULL
        self.requests = NULL
        self.order = NULL
        self.dest = NULL
        self.node_counts = NULL
        self.nframes = 0
        self.active = False

    def __init__(self, dict functions, view, uint16_t node, uint32_t num_nodes, uint32_t rank,
                 uint64_t token, dict sockets):
        """functions: adapm.wire.libzmq.functions(); view: the node's TableView (its
        location cache and row length); sockets: node -> this worker's pyzmq DEALER to it."""
        table = view.kernel_handle()
        if not table["uniform_length"]:
            raise ValueError("the compiled miss path serves tables of one row length")
        zmq_api_load(&self.zmq, functions)
        self.directory = <const adapm_entry_t*><uintptr_t>table["directory"]
        self.num_keys = table["num_keys"]
        self.uniform = table["uniform_length"]
        self.itemsize = table["itemsize"]
        self.row_bytes = self.uniform * self.itemsize
        self.node, self.num_nodes, self.rank, self.token = node, num_nodes, rank, token
        self.sockets = <void**>malloc(num_nodes * sizeof(void*))
        self.items = <zmq_pollitem_t*>malloc(num_nodes * sizeof(zmq_pollitem_t))
        self.node_counts = <size_t*>malloc((num_nodes + 1) * sizeof(size_t))
        if self.sockets == NULL or self.items == NULL or self.node_counts == NULL:
            raise MemoryError()
        memset(self.sockets, 0, num_nodes * sizeof(void*))
        self.nitems = 0
        for n, sock in sorted(sockets.items()):
            if not 0 <= n < num_nodes:
                raise ValueError(f"a socket for node {n} of {num_nodes}")
            self.sockets[n] = <void*><uintptr_t>sock.underlying
            self.items[self.nitems].socket = self.sockets[n]
            self.items[self.nitems].fd = 0
            self.items[self.nitems].events = ZMQ_POLLIN
            self.items[self.nitems].revents = 0
            self.nitems += 1
        self._keep = (view, dict(sockets))
        self.bytes_sent = self.bytes_to_node = self.bytes_received = 0
        self.placed = self.dropped = 0

    def __dealloc__(self):
        self._release_message()
        free(self.sockets)
        free(self.items)
        free(self.requests)
        free(self.order)
        free(self.dest)
        free(self.node_counts)

    # -- sending ---------------------------------------------------------------------------

    def pull(self, const uint64_t[::1] keys, unsigned char[:, ::1] out, const uint64_t[::1] misses,
             Py_ssize_t nmiss, uint64_t first_request):
        """Send requests for the keys at positions misses[:nmiss] of `keys` (their rows of
        `out` are filled as replies come), request ids from `first_request` on: STARTED
        (`requests` of them), or FALLBACK (nothing sent)."""
        if self.active:
            raise RuntimeError("a call is in flight")
        if out.shape[0] != keys.shape[0] or <uint64_t>out.shape[1] != self.row_bytes:
            raise ValueError("out: a row of the table's length per key")
        if nmiss < 0 or nmiss > misses.shape[0] or nmiss > keys.shape[0]:
            raise ValueError("misses")
        if nmiss == 0:
            return FALLBACK
        cdef int rc
        if not self._prepare(&keys[0], keys.shape[0], &misses[0], <size_t>nmiss, False):
            return FALLBACK
        self.out, self.out_rows = <char*>&out[0, 0], keys.shape[0]
        self.first_request = first_request
        self.left = <uint64_t>nmiss
        self.active = True
        with nogil:
            rc = self._send_requests(&keys[0], WIRE_PULL, NULL, 0, NULL)
        if rc < 0:  # the call is given up: requests already sent are answered to nobody
            self.active = False
            raise OSError(self.zmq.last_errno(), "sending a pull request")
        return STARTED

    @property
    def requests(self):
        """How many requests the call in flight sent (ids first_request onwards)."""
        return self.nrequests if self.active else 0

    cdef bint _prepare(self, const uint64_t* keys, uint64_t n, const uint64_t* misses,
                       size_t nmiss, bint copies_here) except -1:
        """The requests of a call's misses (_route, then _group): True, or False where
        the compiled path declines the call; MemoryError."""
        cdef int rc
        if not self._reserve(nmiss):
            raise MemoryError()
        with nogil:
            rc = self._route(keys, n, misses, nmiss, copies_here)
            if rc == 1:
                rc = self._group(misses, nmiss)
        if rc < 0:
            raise MemoryError()
        return rc == 1

    cdef bint _reserve(self, size_t nmiss):
        cdef void* p
        if nmiss > self.order_cap:
            p = realloc(self.order, nmiss * 8)
            if p == NULL:
                return False
            self.order, self.order_cap = <uint64_t*>p, nmiss
        if nmiss > self.dest_cap:
            p = realloc(self.dest, nmiss * 4)
            if p == NULL:
                return False
            self.dest, self.dest_cap = <uint32_t*>p, nmiss
        return True

    cdef int _route(self, const uint64_t* keys, uint64_t n, const uint64_t* misses,
                    size_t nmiss, bint copies_here=False) noexcept nogil:
        """self.dest for each miss as MissPath._destinations gives it (the location
        cache, adapm.policy.ownership.route; with `copies_here`, a set's rule: a key this
        node holds a copy of goes to this node's server): 1, or 0 where some key routes
        nowhere (here) or to a node without a socket."""
        cdef size_t i
        cdef uint64_t key
        cdef uint32_t owner
        cdef uint8_t state
        for i in range(nmiss):
            if misses[i] >= n:
                return 0
            key = keys[misses[i]]
            if key >= self.num_keys:
                return 0
            owner = self.directory[key].owner
            if copies_here:
                state = self.directory[key].state
                if state == ADAPM_REPLICA or state == ADAPM_PENDING:
                    if self.sockets[self.node] == NULL:
                        return 0
                    self.dest[i] = self.node
                    continue
            if owner == self.node:  # on its way here: its home knows where it is
                owner = <uint32_t>(key % self.num_nodes)
                if owner == self.node:
                    return 0
            if owner >= self.num_nodes or self.sockets[owner] == NULL:
                return 0
            self.dest[i] = owner
        return 1

    cdef int _group(self, const uint64_t* misses, size_t nmiss) noexcept nogil:
        """self.order: the misses by node (in node order, each in call order), and the
        requests: each node's keys in messages of at most min(num_keys, MAX_KEYS) keys, as
        MissPath._messages splits them. 1, or -1 out of memory."""
        cdef size_t i, node, at = 0, total = 0, step, part
        cdef size_t* counts = self.node_counts
        cdef void* p
        memset(counts, 0, (self.num_nodes + 1) * sizeof(size_t))
        for i in range(nmiss):
            counts[self.dest[i] + 1] += 1
        step = <size_t>(self.num_keys if self.num_keys < MAX_KEYS else MAX_KEYS)
        for node in range(self.num_nodes):
            total += (counts[node + 1] + step - 1) // step
            counts[node + 1] += counts[node]
        if total > self.requests_cap:
            p = realloc(self.requests, total * sizeof(Request))
            if p == NULL:
                return -1
            self.requests, self.requests_cap = <Request*>p, total
        for i in range(nmiss):  # counting sort: stable, so each node's keys keep call order
            self.order[counts[self.dest[i]]] = misses[i]
            counts[self.dest[i]] += 1
        self.nrequests = 0
        for node in range(self.num_nodes):  # counts[node] is now the end of its run
            while at < counts[node]:
                part = counts[node] - at if counts[node] - at < step else step
                self.requests[self.nrequests].start = at
                self.requests[self.nrequests].n = part
                self.requests[self.nrequests].left = part
                self.requests[self.nrequests].node = <uint32_t>node
                self.nrequests += 1
                at += part
        return 1

    cdef int _send_requests(self, const uint64_t* keys, uint8_t mtype, const char* rows,
                            size_t row_bytes, const char* params) noexcept nogil:
        """One message per request, to the node of its keys: a PULL (keys), or a PUSH or
        SET (keys, their rows) or APPLY (keys, rows, params), the frames protocol.encode
        gives. 0, or -1 (errno)."""
        cdef size_t r, i
        cdef Request* q
        cdef header_t* h
        cdef uint64_t* k
        cdef char* v
        cdef zmq_msg_t frame
        cdef void* sock
        for r in range(self.nrequests):
            q = &self.requests[r]
            sock = self.sockets[q.node]
            if self.zmq.msg_init_size(&frame, WIRE_HEADER_BYTES) != 0:
                return -1
            h = <header_t*>self.zmq.msg_data(&frame)
            memset(h, 0, WIRE_HEADER_BYTES)
            h.magic, h.version, h.type = WIRE_MAGIC, WIRE_VERSION, mtype
            h.src_node, h.src_worker = self.node, self.rank
            h.request_id = self.first_request + r
            h.token = self.token
            if self._send_frame(&frame, sock, True) < 0:
                return -1
            if self.zmq.msg_init_size(&frame, q.n * 8) != 0:
                return -1
            k = <uint64_t*>self.zmq.msg_data(&frame)
            for i in range(q.n):
                k[i] = keys[self.order[q.start + i]]
            if self._send_frame(&frame, sock, rows != NULL) < 0:
                return -1
            self._sent(q, WIRE_HEADER_BYTES + q.n * 8)
            if rows == NULL:
                continue
            if self.zmq.msg_init_size(&frame, q.n * row_bytes) != 0:
                return -1
            v = <char*>self.zmq.msg_data(&frame)
            for i in range(q.n):
                memcpy(v + i * row_bytes, rows + self.order[q.start + i] * row_bytes,
                       row_bytes)
            if self._send_frame(&frame, sock, params != NULL) < 0:
                return -1
            self._sent(q, q.n * row_bytes)
            if params == NULL:
                continue
            if self.zmq.msg_init_size(&frame, WIRE_PARAMS_COUNT * 8) != 0:
                return -1
            memcpy(self.zmq.msg_data(&frame), params, WIRE_PARAMS_COUNT * 8)
            if self._send_frame(&frame, sock, False) < 0:
                return -1
            self._sent(q, WIRE_PARAMS_COUNT * 8)
        return 0

    cdef inline void _sent(self, const Request* q, uint64_t nbytes) noexcept nogil:
        """Count bytes sent as Requests.send does: to this node's server apart."""
        if q.node == self.node:
            self.bytes_to_node += nbytes
        else:
            self.bytes_sent += nbytes

    cdef int _send_frame(self, zmq_msg_t* frame, void* sock, bint more) noexcept nogil:
        if self.zmq.msg_send(frame, sock, ZMQ_SNDMORE if more else 0) < 0:
            self.zmq.msg_close(frame)
            return -1
        return 0

    # -- updates ---------------------------------------------------------------------------

    def send_update(self, const uint64_t[::1] keys, const unsigned char[:, ::1] rows,
                    const uint64_t[::1] misses, Py_ssize_t nmiss, int mtype,
                    const unsigned char[::1] params, uint64_t first_request,
                    uint64_t[::1] order_out):
        """Send the keys at misses[:nmiss] of `keys` with their `rows` (a row per key) to
        their owners as PUSH, SET (a key this node holds a copy of goes to this node's
        server) or APPLY (with the 64-byte `params` frame), request ids from
        `first_request` on: the number of requests sent (their acknowledgements go to
        Requests; `order_out` gets the positions of the keys sent, in message order, and
        `requests_of()` each request's key count), or 0 (FALLBACK: nothing sent)."""
        if self.active:
            raise RuntimeError("a call is in flight")
        if mtype not in (WIRE_PUSH, WIRE_SET, WIRE_APPLY):
            raise ValueError(f"message type {mtype}")
        if rows.shape[0] != keys.shape[0] or rows.shape[1] == 0:
            raise ValueError("rows: one per key")
        if (params is None) != (mtype != WIRE_APPLY) or \
                (params is not None and params.shape[0] != WIRE_PARAMS_COUNT * 8):
            raise ValueError("params: an APPLY's 64 bytes, for an APPLY only")
        if nmiss < 0 or nmiss > misses.shape[0] or nmiss > keys.shape[0] or \
                order_out.shape[0] < nmiss:
            raise ValueError("misses")
        if nmiss == 0:
            return 0
        cdef int rc
        cdef size_t row_bytes = rows.shape[1]
        cdef const char* p = NULL if params is None else <const char*>&params[0]
        if not self._prepare(&keys[0], keys.shape[0], &misses[0], <size_t>nmiss,
                             mtype == WIRE_SET):
            return 0
        self.first_request = first_request
        with nogil:
            rc = self._send_requests(&keys[0], <uint8_t>mtype, <const char*>&rows[0, 0],
                                     row_bytes, p)
        if rc < 0:
            raise OSError(self.zmq.last_errno(), "sending an update")
        memcpy(&order_out[0], self.order, <size_t>nmiss * 8)
        return self.nrequests

    def requests_of(self, uint64_t[::1] counts_out):
        """Each request's key count of the last send_update, into counts_out."""
        cdef size_t r
        if <size_t>counts_out.shape[0] < self.nrequests:
            raise ValueError("counts_out: one per request")
        for r in range(self.nrequests):
            counts_out[r] = self.requests[r].n

    # -- waiting -------------------------------------------------------------------------

    def wait(self, long timeout_ms):
        """Receive until the call is done (DONE), nothing arrived for `timeout_ms` or a
        signal came (IDLE), or a message is for Python (FOREIGN, HANDOFF: take_message)."""
        if not self.active:
            raise RuntimeError("no call in flight")
        cdef int status
        with nogil:
            status = self._wait(timeout_ms)
        if status < 0:
            raise OSError(self.zmq.last_errno(), "receiving a pull's replies")
        if status == DONE:
            self.active = False
        return status

    cdef int _wait(self, long timeout_ms) noexcept nogil:
        cdef int i, rc, status
        while self.left:
            for i in range(self.nitems):  # what is there already, before any poll
                while True:
                    rc = self._receive(self.items[i].socket)
                    if rc <= 0:
                        break
                    status = self._take()
                    if status != 0:
                        return status
                    if self.left == 0:
                        return DONE
                if rc < 0:
                    return -1
            rc = self.zmq.poll(self.items, self.nitems, timeout_ms)
            if rc < 0:
                return IDLE if self.zmq.last_errno() == ZMQ_EINTR else -1
            if rc == 0:
                return IDLE
        return DONE

    cdef int _receive(self, void* sock) noexcept nogil:
        """One whole message into self.frames: 1, 0 when none waits, -1 on error. A
        message of more frames than any legal one is dropped whole (Python's decoder
        drops it too)."""
        cdef zmq_msg_t spare
        cdef int rc, flags = ZMQ_DONTWAIT
        cdef bint truncated = False, more
        self._release_message()
        while True:
            if self.nframes < MAX_FRAMES:
                if zmq_recv_frame(&self.zmq, &self.frames[self.nframes], sock, flags) < 0:
                    if self.nframes == 0 and self.zmq.last_errno() in (ZMQ_EAGAIN, ZMQ_EINTR):
                        return 0
                    self._release_message()
                    return -1
                self.bytes_received += self.zmq.msg_size(&self.frames[self.nframes])
                self.nframes += 1
                more = self.zmq.msg_more(&self.frames[self.nframes - 1])
            else:
                self.zmq.msg_init(&spare)
                rc = self.zmq.msg_recv(&spare, sock, 0)
                if rc >= 0:
                    self.bytes_received += self.zmq.msg_size(&spare)
                more = rc >= 0 and self.zmq.msg_more(&spare)
                self.zmq.msg_close(&spare)
                truncated = True
                if rc < 0:
                    self._release_message()
                    return -1
            if not more:
                if truncated:
                    self._release_message()
                    self.dropped += 1
                    return 2  # dropped: look for the next one
                return 1
            flags = 0  # the rest of a multipart message is there already

    cdef void _release_message(self) noexcept nogil:
        cdef int i
        for i in range(self.nframes):
            self.zmq.msg_close(&self.frames[i])
        self.nframes = 0

    cdef int _take(self) noexcept nogil:
        """The held message: placed (0, released), or FOREIGN / HANDOFF (kept for
        take_message). A dropped one (nframes 0) is 0."""
        cdef const header_t* h
        cdef Request* q
        if self.nframes == 0:
            return 0
        if self.zmq.msg_size(&self.frames[0]) != WIRE_HEADER_BYTES:
            return FOREIGN
        h = <const header_t*>self.zmq.msg_data(&self.frames[0])
        if h.magic != WIRE_MAGIC or h.version != WIRE_VERSION:
            return FOREIGN
        if h.request_id < self.first_request or \
                h.request_id - self.first_request >= self.nrequests:
            return FOREIGN
        q = &self.requests[h.request_id - self.first_request]
        if h.type != WIRE_PULL_REPLY or self.nframes != 3 or not self._place(h, q):
            return HANDOFF
        self._release_message()
        self.placed += 1
        return 0

    cdef bint _place(self, const header_t* h, Request* q) noexcept nogil:
        """A PULL_REPLY's values into the caller's rows, where Python's decoder and
        PullOp.feed would accept it without complaint (else False, nothing written):
        positions a whole number of uint32 within the request (or ALL_POSITIONS: every
        key of it, in order), values exactly those rows, no more keys than it waits for."""
        cdef size_t pbytes = self.zmq.msg_size(&self.frames[1])
        cdef size_t vbytes = self.zmq.msg_size(&self.frames[2])
        cdef const uint32_t* pos = <const uint32_t*>self.zmq.msg_data(&self.frames[1])
        cdef const char* values = <const char*>self.zmq.msg_data(&self.frames[2])
        cdef uint64_t count, i
        cdef bint every = h.flags & WIRE_ALL_POSITIONS
        if pbytes % 4 or pbytes // 4 > MAX_KEYS:
            return False
        count = q.n if every else pbytes // 4
        if vbytes != count * self.row_bytes or count > q.left:
            return False
        if not every:
            for i in range(count):
                if pos[i] >= q.n:
                    return False
        for i in range(count):
            memcpy(self.out + self.order[q.start + (i if every else pos[i])] * self.row_bytes,
                   values + i * self.row_bytes, self.row_bytes)
        q.left -= count
        self.left -= count
        return True

    def take_message(self):
        """The message wait() left for Python, as bytes frames (it is let go here)."""
        cdef int i
        frames = [PyBytes_FromStringAndSize(<char*>self.zmq.msg_data(&self.frames[i]),
                                            self.zmq.msg_size(&self.frames[i]))
                  for i in range(self.nframes)]
        self._release_message()
        return frames

    def take_call(self):
        """Give the call in flight to the Python path: [(request id, node, positions of
        its keys in the call, keys it still waits for)] of the requests not answered in
        full; nothing is in flight here afterwards."""
        cdef size_t r
        cdef Request* q
        taken = []
        if self.active:
            for r in range(self.nrequests):
                q = &self.requests[r]
                if q.left:
                    taken.append((self.first_request + r, q.node,
                                  [self.order[q.start + i] for i in range(q.n)], q.left))
        self.active = False
        return taken

    def abandon(self):
        """Forget the call in flight (its late replies are FOREIGN from now on)."""
        self.active = False
