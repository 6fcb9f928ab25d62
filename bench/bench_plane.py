"""P1 the data plane's options (issue 19, DESIGN.md §9): what a node server pays per
remote pull, on its own side, for three ways of reading ZeroMQ:

- compiled: the compiled plane (src/_plane.pyx) receives with libzmq's own functions,
  reached by address in the library pyzmq loaded, checks, runs the kernel and replies;
- batches from pyzmq: pyzmq's Python sockets receive each message (recv_multipart,
  zero-copy frames), to be handed in batches to one compiled call: measured here without
  any processing at all, the floor of that option;
- python: the Python path (decode, sender check, kernel, reply encoded and sent).

One process, a table, a ROUTER and a DEALER on 127.0.0.1; the DEALER queues N pulls of
K keys x 16 float32 first, then the server side drains them under process_time. Printed:
microseconds of CPU per message. Run alone (python bench_plane.py)."""

import argparse
import os
import sys
import time

import numpy as np
import zmq

from adapm.node.admission import check_sender
from adapm.node.data import _plane
from adapm.table.shared_table import OWNED, SharedTable, segment_name
from adapm.wire import libzmq, protocol
from adapm.wire.protocol import node_identity, worker_identity

from common import line, save

TOKEN, DIM, NUM_KEYS = 0xFEED, 16, 100_000


class _Spec:
    num_workers, num_nodes = 2, 2


def _rig():
    table = SharedTable.create(segment_name(f"p1x{os.getpid()}", 0), NUM_KEYS, DIM,
                               "float32", 1, node=0, num_nodes=2)
    # Its name goes at once (the mapping stays): nothing is left in /dev/shm however this
    # process ends, SIGKILL included; no other process needs to attach.
    table.unlink()
    table.install(np.arange(NUM_KEYS, dtype=np.uint64), OWNED)
    table.publish()
    context = zmq.Context()
    router = context.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.RCVHWM, 0)
    router.setsockopt(zmq.SNDHWM, 0)  # as a node server's: replies never block
    port = router.bind_to_random_port("tcp://127.0.0.1")
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, worker_identity(1, TOKEN))
    dealer.setsockopt(zmq.SNDHWM, 0)
    dealer.setsockopt(zmq.RCVHWM, 0)
    dealer.connect(f"tcp://127.0.0.1:{port}")
    dealer.send(b"")
    router.recv_multipart()
    return table, context, router, dealer


def _queue(dealer, router, n, keys):
    msg = protocol.Pull(keys=keys, request_id=1)
    msg.src_worker, msg.src_node, msg.token = 1, 1, TOKEN
    frames = [bytes(f) for f in msg.encode()]
    for _ in range(n):
        dealer.send_multipart(frames)
    while router.getsockopt(zmq.EVENTS) & zmq.POLLIN == 0:
        time.sleep(0.001)
    time.sleep(0.2)  # everything arrived


def _compiled(table, router, n):
    plane = _plane.Plane(libzmq.functions(), router.underlying, table.view,
                         table.view.kernel_handle(), 0, 2, 2, 1)
    plane.admit(TOKEN, [worker_identity(r, TOKEN) for r in range(2)],
                [node_identity(n, TOKEN) for n in range(2)])
    plane.enabled = True
    start, taken = time.process_time(), 0
    while taken < n:
        got, frames = plane.drain(n - taken)
        assert frames is None
        taken += got
    return time.process_time() - start


def _pyzmq_receive_only(table, router, n):
    start = time.process_time()
    for _ in range(n):
        router.recv_multipart(copy=False)
    return time.process_time() - start


def _python(table, router, n):
    view = table.view
    start = time.process_time()
    for _ in range(n):
        frames = router.recv_multipart(copy=False)
        identity = frames[0].bytes
        msg = protocol.decode(frames[1:])
        check_sender(identity, msg, token=TOKEN, spec=_Spec, node=0,
                     registered=lambda *a: False)
        out = np.empty(msg.keys.shape[0] * DIM, dtype=np.float32)
        view.pull(msg.keys, out, np.empty(msg.keys.shape[0], np.uint64), True)
        reply = protocol.PullReply(request_id=msg.request_id, values=out,
                                   flags=protocol.ALL_POSITIONS)
        reply.token = TOKEN
        protocol.send(router, [identity, *reply.encode()])
    return time.process_time() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--messages", type=int, default=20_000)
    args = parser.parse_args(argv)
    if libzmq.functions() is None:
        print("P1  no libzmq of pyzmq's to reach from compiled code: nothing to compare")
        return None
    rows = {}
    table, context, router, dealer = _rig()
    try:
        for k in (1, 100):
            keys = np.arange(0, 2 * k, 2, dtype=np.uint64)
            for name, run in (("compiled", _compiled), ("pyzmq receive only", _pyzmq_receive_only),
                              ("python", _python)):
                best = None
                for _ in range(3):
                    _queue(dealer, router, args.messages, keys)
                    seconds = run(table, router, args.messages)
                    while dealer.poll(0):  # the replies
                        dealer.recv_multipart()
                    best = seconds if best is None else min(best, seconds)
                rows[f"{name}, {k} keys"] = best / args.messages * 1e6
                line("P1", f"pull of {k:3d} keys, {name:18s}: {rows[f'{name}, {k} keys']:5.2f} us "
                     "of CPU per message on the server side", "info")
    finally:
        for sock in (router, dealer):
            sock.close(0)
        context.term()
        table.close()
    path = save("plane", rows)
    print(f"    results: {path}")
    return rows


if __name__ == "__main__":
    sys.exit(main() and 0)
