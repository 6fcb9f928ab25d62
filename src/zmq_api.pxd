# libzmq, by address (no header: the types as zmq.h declares them), for the compiled parts
# that send and receive on pyzmq's sockets: the node's data plane (_plane.pyx) and the
# worker's miss path (_miss_path.pyx). adapm.wire.libzmq resolves the addresses in the
# libzmq that pyzmq loaded.
from libc.stdint cimport uint64_t, uintptr_t

ctypedef struct zmq_msg_t:          # opaque, 64 bytes, pointer-aligned
    uint64_t _[8]

ctypedef struct zmq_pollitem_t:     # zmq_pollitem_t on POSIX
    void* socket
    int fd
    short events
    short revents

ctypedef int (*msg_init_f)(zmq_msg_t*) noexcept nogil
ctypedef int (*msg_init_size_f)(zmq_msg_t*, size_t) noexcept nogil
ctypedef int (*msg_io_f)(zmq_msg_t*, void*, int) noexcept nogil
ctypedef int (*msg_close_f)(zmq_msg_t*) noexcept nogil
ctypedef void* (*msg_data_f)(zmq_msg_t*) noexcept nogil
ctypedef size_t (*msg_size_f)(const zmq_msg_t*) noexcept nogil
ctypedef int (*msg_more_f)(const zmq_msg_t*) noexcept nogil
ctypedef int (*errno_f)() noexcept nogil
ctypedef int (*poll_f)(zmq_pollitem_t*, int, long) noexcept nogil

cdef enum:
    ZMQ_DONTWAIT = 1
    ZMQ_SNDMORE = 2
    ZMQ_POLLIN = 1
    ZMQ_EAGAIN = 11                 # errno values of Linux, the one platform enabled
    ZMQ_EINTR = 4


cdef struct zmq_api_t:
    msg_init_f msg_init
    msg_init_size_f msg_init_size
    msg_io_f msg_recv
    msg_io_f msg_send
    msg_close_f msg_close
    msg_data_f msg_data
    msg_size_f msg_size
    msg_more_f msg_more
    errno_f last_errno
    poll_f poll


cdef inline void zmq_api_load(zmq_api_t* api, dict functions):
    """`api` from adapm.wire.libzmq.functions()."""
    api.msg_init = <msg_init_f><uintptr_t>functions["zmq_msg_init"]
    api.msg_init_size = <msg_init_size_f><uintptr_t>functions["zmq_msg_init_size"]
    api.msg_recv = <msg_io_f><uintptr_t>functions["zmq_msg_recv"]
    api.msg_send = <msg_io_f><uintptr_t>functions["zmq_msg_send"]
    api.msg_close = <msg_close_f><uintptr_t>functions["zmq_msg_close"]
    api.msg_data = <msg_data_f><uintptr_t>functions["zmq_msg_data"]
    api.msg_size = <msg_size_f><uintptr_t>functions["zmq_msg_size"]
    api.msg_more = <msg_more_f><uintptr_t>functions["zmq_msg_more"]
    api.last_errno = <errno_f><uintptr_t>functions["zmq_errno"]
    api.poll = <poll_f><uintptr_t>functions["zmq_poll"]


cdef inline int zmq_recv_frame(const zmq_api_t* api, zmq_msg_t* frame, void* sock,
                               int flags) noexcept nogil:
    """One frame into `frame` (initialised here, closed again when nothing came): 0, or
    -1 (api.last_errno(): ZMQ_EAGAIN when nothing waits, ZMQ_EINTR on a signal)."""
    api.msg_init(frame)
    if api.msg_recv(frame, sock, flags) < 0:
        api.msg_close(frame)
        return -1
    return 0
