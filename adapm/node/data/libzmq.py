"""The libzmq that pyzmq loaded, for the compiled data plane (adapm.node.data.plane).

The data plane receives and sends ZeroMQ messages from compiled code, on the sockets
pyzmq created. It needs no libzmq headers and links no library: the functions it calls
are resolved here, by address, in the very libzmq that pyzmq's backend already loaded
(bundled in pyzmq's wheel, or the system's), so both speak to the same sockets. Options
measured before choosing this one are in docs/architecture.md ("The two planes").

`functions()` returns {name: address} of the functions the plane calls, or None where the
library cannot be found (no /proc, a pyzmq without a Cython backend): the node server
then reads every message in Python, as before (slower, the same behaviour)."""

import ctypes
import functools
import os

import zmq

# What the plane calls, each with the C prototype it assumes (libzmq 4.x, zmq.h):
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
)


@functools.lru_cache(maxsize=1)
def functions():
    """{name: address} of FUNCTIONS in the libzmq pyzmq uses, or None."""
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
