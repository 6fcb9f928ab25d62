"""A cluster's node servers on this machine, started and torn down by the launching
process (adapm.run, adapm-launch). Teardown cannot be skipped: it runs on normal exit, on
errors, on SIGINT/SIGTERM, and after a server was SIGKILLed, and it unlinks every table
segment by name even when the server that created it never got to."""

import contextlib
import multiprocessing
import signal
import threading
import time
from multiprocessing.connection import wait

from adapm import config
from adapm.config import WorkerEnv
from adapm.errors import ClusterError
from adapm.process import stop_process
from adapm.server import serve
from adapm.table import segment_name, unlink_segment


class Terminated(SystemExit):
    """SIGTERM received by the launching process: unwinds so that teardown runs."""

    def __init__(self, signum):
        super().__init__(128 + signum)
        self.signum = signum


@contextlib.contextmanager
def signals_unwind():
    """Turn SIGTERM into an exception (SIGINT already is one) while a cluster runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_term(signum, _frame):
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT/SIGTERM back during teardown, so that a second Ctrl-C cannot cut
    cleanup short; a held signal is re-delivered afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = []
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, lambda signum, _f: held.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for signum in held[:1]:
            signal.raise_signal(signum)


class LocalCluster:
    """The node servers of one cluster, as child processes of this one."""

    def __init__(self, spec):
        if spec.num_nodes != 1:
            raise ValueError(
                f"nodes={spec.num_nodes}: this version runs single-node clusters only "
                "(nodes=1); multi-node messaging is not implemented yet")
        self.spec = spec
        self.mp = multiprocessing.get_context("spawn")
        self.servers = []
        self.addresses = []
        self.segments = [segment_name(spec.cluster_id, n) for n in range(spec.num_nodes)]

    def start(self):
        timeout = config.env_float(config.ENV_START_TIMEOUT, config.DEFAULT_START_TIMEOUT)
        pipes = []
        for node in range(self.spec.num_nodes):
            receive, send = self.mp.Pipe(duplex=False)
            proc = self.mp.Process(target=serve, args=(self.spec, node, send),
                                   name=f"adapm-node{node}")
            proc.start()
            send.close()
            self.servers.append(proc)
            pipes.append(receive)
        for node, (proc, receive) in enumerate(zip(self.servers, pipes)):
            self.addresses.append(self._await_ready(node, proc, receive, timeout))
        return self

    @staticmethod
    def _await_ready(node, proc, receive, timeout):
        deadline = time.monotonic() + timeout
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ClusterError(f"node {node}: server did not start within {timeout} s")
                ready = wait([receive, proc.sentinel], timeout=left)
                if receive in ready:
                    try:
                        status, detail = receive.recv()
                    except EOFError:
                        status, detail = "error", "exited during start"
                    if status == "ready":
                        return detail
                    raise ClusterError(f"node {node}: server failed to start: {detail}")
                if proc.sentinel in ready:
                    raise ClusterError(
                        f"node {node}: server exited with code {proc.exitcode} during start")
        finally:
            receive.close()

    def worker_env(self, rank):
        node, local = divmod(rank, self.spec.workers_per_node)
        return WorkerEnv(rank=rank, local_rank=local, node=node,
                         num_nodes=self.spec.num_nodes,
                         workers_per_node=self.spec.workers_per_node,
                         server=self.addresses[node], table=self.segments[node],
                         cluster_id=self.spec.cluster_id)

    def server_sentinels(self):
        return {proc.sentinel: node for node, proc in enumerate(self.servers)}

    def check_servers(self):
        for node, proc in enumerate(self.servers):
            if proc.exitcode is not None:
                raise ClusterError(f"node {node}: server died (exit code {proc.exitcode})")

    def teardown(self, extra_processes=()):
        """Stop `extra_processes` (workers) and every server, then unlink every segment."""
        with signals_deferred():
            for proc in extra_processes:
                stop_process(proc)
            for proc in self.servers:
                stop_process(proc)
            for name in self.segments:
                unlink_segment(name)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.teardown()
            raise

    def __exit__(self, *exc):
        self.teardown()
        return False
