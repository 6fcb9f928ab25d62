"""The libzmq that pyzmq loaded, for the compiled parts that use pyzmq's sockets: the node
server's data plane (adapm.node.data.plane) and the worker's miss path
(adapm.client.miss_path).

They receive and send ZeroMQ messages from compiled code, on the sockets pyzmq created,
with no libzmq header and no library linked: the functions they call are resolved here, by
address, in the very libzmq that pyzmq's backend already loaded (bundled in pyzmq's wheel,
or the system's), so both speak to the same sockets. Options
measured before choosing this one are in docs/architecture.md ("The two planes").

`functions()` returns {name: address} of the functions they call (src/zmq_api.pxd), or None
where the library cannot be found (not Linux, a pyzmq without a Cython backend): node
servers and workers then read every message in Python (slower, the same behaviour)."""

import ctypes
import functools
import os
import sys

import zmq

# What they call, each with the C prototype it assumes (libzmq 4.x, zmq.h):
FUNCTIONS = (
    "zmq_msg_init",       # int (zmq_msg_t*)
    "zmq_msg_init_size",  # int (zmq_msg_t*, size_t)
    "zmq_msg_recv",       # int (zmq_msg_t*, void* socket, int flags)
    "zmq_msg_send",       # int (zmq_msg_t*, void* socket, int flags)
    "zmq_msg_close",      # int (zmq_msg_t*)
    "zmq_msg_data",       # void* (zmq_msg_t*)
    "zmq_msg_size",       # size_t (const zmq_msg_t*)
    "zmq_msg_more",       # int (const zmq_msg_t*)
    "zmq_errno",          # int (void)
    "zmq_poll",           # int (zmq_pollitem_t*, int, long)
)


@functools.lru_cache(maxsize=1)
def functions():
    """{name: address} of FUNCTIONS in the libzmq pyzmq uses, or None (also on a machine
    that is not little-endian Linux, the one kind the compiled parts are built for)."""
    if sys.byteorder != "little" or not sys.platform.startswith("linux"):
        return None
    path = loaded_path()
    if path is None:
        return None
    try:
        library = ctypes.CDLL(path)  # the loaded instance: dlopen of the same file
        return {name: ctypes.cast(getattr(library, name), ctypes.c_void_p).value
                for name in FUNCTIONS}
    except (OSError, AttributeError):
        return None


def loaded_path():
    """The file of the libzmq mapped into this process (pyzmq is imported), or None."""
    if "cython" not in zmq.backend.Socket.__module__.split("."):
        return None  # the CFFI backend: its sockets' handles are not libzmq's to share
    try:
        with open(f"/proc/{os.getpid()}/maps") as maps:
            paths = {line.split()[-1] for line in maps if ".so" in line}
    except OSError:
        return None
    found = sorted(p for p in paths if os.path.basename(p).startswith("libzmq"))
    return found[0] if found else None
