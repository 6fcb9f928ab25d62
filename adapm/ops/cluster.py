"""A cluster's node servers on this machine, started and torn down by the launching
process (adapm.run, adapm-launch). Teardown cannot be skipped: it runs on normal exit, on
errors, on SIGINT/SIGTERM, and after a server was SIGKILLed, and it unlinks every table
segment by name even when the server that created it never got to."""

import contextlib
import logging
import multiprocessing
import os
import pickle
import signal
import socket
import sys
import threading
import time
import types
from multiprocessing.connection import Connection, wait

from adapm.common import config, logs
from adapm.common.config import WorkerEnv
from adapm.common.errors import ClusterError, failure_text
from adapm.common.process import join_process, stop_process, stop_processes
from adapm.node.control.metrics import node_port
from adapm.node.control.metrics import require as require_metrics
from adapm.node.server import serve
from adapm.ops.claims import claim_node
from adapm.table.shared_table import SharedTable, segment_exists, segment_name, unlink_segment
from adapm.table.stats import node_stats
from adapm.wire.security import ENV_CURVE_CLIENT

log = logging.getLogger("adapm.launch")


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


START_GRACE = 5.0  # seconds the launching process waits beyond the servers' start timeout

# What torch.distributed.init_process_group(backend) reads with no other argument (its
# env:// rendezvous, as torchrun sets it): every worker gets these, so that it can join a
# group of all the cluster's workers. MASTER_PORT is never the coordinator's nor a node
# server's port (docs/configuration.md, "torch.distributed").
DIST_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                  "LOCAL_WORLD_SIZE")
# Never passed on to a worker: under torchrun it makes init_process_group join torchrun's
# store as a client, and nobody would host the group's store.
NOT_INHERITED = ("TORCHELASTIC_USE_AGENT_STORE",)
# Set for every worker unless the launching process's environment sets them, as torchrun
# does: W workers that each start a thread per core (torch, a BLAS) overload the machine.
WORKER_DEFAULTS = {"OMP_NUM_THREADS": "1"}
OMP_NOTICE = ("adapm: OMP_NUM_THREADS=1 for every worker, since it is not set: {workers} "
              "worker(s) on this machine would otherwise each start one thread per core "
              "(torch, BLAS). Set OMP_NUM_THREADS to tune it for your application.")


def worker_defaults(environ=None):
    """WORKER_DEFAULTS that `environ` (default: this process's) does not set."""
    environ = os.environ if environ is None else environ
    return {name: value for name, value in WORKER_DEFAULTS.items() if name not in environ}


@contextlib.contextmanager
def _main_module_skipped(proc):
    """Start `proc` (spawned) without re-running the launching script in it. A spawned
    child first runs its parent's __main__ module again, imports included (a training
    script's `import torch`: seconds per process, before a node server can even start);
    a node server needs none of it, unless its arguments refer to something defined there
    (a callable init in the script), which their pickle names. Meanwhile, multiprocessing
    sees an empty __main__ (it reads sys.modules['__main__'] to prepare the child)."""
    # (a pipe's end is left out: pickling one outside of a start shares its descriptor)
    args = [arg for arg in proc._args if not isinstance(arg, Connection)]
    try:
        refers_to_main = b"__main__" in pickle.dumps((proc._target, args, proc._kwargs))
    except Exception:  # noqa: BLE001 - unpicklable: let start() report it as it would
        refers_to_main = True
    if refers_to_main:
        yield
        return
    script = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = script


class DistPortError(OSError):
    """The port of torch.distributed's rendezvous cannot be listened on."""

    def __init__(self, port, reason):
        super().__init__(f"cannot listen on port {port} for torch.distributed (the "
                         f"workers' MASTER_PORT): {reason}")
        self.port = port


def reserve_port(port):
    """A TCP socket listening on `port` (0: any free port) of every interface, as torch's
    TCPStore binds it. While it is open, nothing else on this machine (the coordinator, a
    node server) can take the port; closed before the workers start, it leaves no
    TIME_WAIT behind (it accepted nothing), so worker 0's TCPStore can bind it."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as TCPStore does
        sock.bind(("", port))
        sock.listen(1)
    except OSError as exc:
        sock.close()
        raise DistPortError(port, exc.strerror or str(exc)) from None
    return sock


class LocalCluster:
    """The node servers of one cluster that run on this machine, as child processes.

    `nodes`: which node ids to run here (default: all, a whole cluster on one machine).
    `coordinator`: the coordinator's address; node 0 binds it. Default: a free port on
    the spec's host (only possible when node 0 runs here). `port`: the node servers'
    listening port: 0 (any free port), a number, or LOW-HIGH.

    `dist_host`, `dist_port`: where the workers' torch.distributed group meets (their
    MASTER_ADDR and MASTER_PORT; worker 0, on node 0, hosts it). Default: the spec's host
    and a free port (only possible when node 0 runs here). Where node 0 runs, the port is
    held from before the servers start until they are up (so neither the coordinator nor
    a node server can take it); a port that cannot be listened on raises DistPortError
    before any server starts.

    `log_level`: of every process started (adapm.common.logs.resolve_level: default
    ADAPM_LOG_LEVEL, else INFO); the workers find it in their environment.

    `metrics_port`: each node server serves Prometheus metrics on the spec's host, the
    i-th node of `nodes` on metrics_port + i (0: any free port each; adapm.node.control.metrics);
    None: no metrics. ImportError when prometheus_client is missing."""

    def __init__(self, spec, nodes=None, coordinator=None, port="0", dist_host=None,
                 dist_port=0, log_level=None, metrics_port=None):
        self.spec = spec
        self.metrics_port = metrics_port
        if metrics_port is not None:
            require_metrics()
        self._stats_reader = None   # receives node 0's ("stats", ...) at the end
        self._cluster_stats = None  # {node: statistics} of every node, from node 0
        self.log_level = logs.resolve_level(log_level)
        config.data_plane()  # a bad ADAPM_DATA_PLANE fails here, before anything starts
        self._noticed = False  # OMP_NOTICE printed
        self.nodes = list(range(spec.num_nodes)) if nodes is None else list(nodes)
        node_port(metrics_port, len(self.nodes) - 1)  # ValueError past port 65535
        if coordinator is None and 0 not in self.nodes:
            raise ValueError("the coordinator's address is needed when node 0 runs elsewhere")
        if not dist_port and 0 not in self.nodes:
            raise ValueError("torch.distributed's port is needed when node 0 runs elsewhere")
        self.dist_host = dist_host or spec.host
        self.dist_port = int(dist_port)
        self.coordinator = coordinator or f"tcp://{spec.host}:0"
        self.port = port
        self.mp = multiprocessing.get_context("spawn")
        self.servers = {}
        self.addresses = {}
        self.tables = {}
        self.segments = []  # the names teardown unlinks: see _claim_nodes
        self._claims = []

    def start(self):
        timeout = config.env_float(config.ENV_START_TIMEOUT, config.DEFAULT_START_TIMEOUT)
        # A little longer than the servers wait themselves: their own failure says what
        # they waited for, which beats this process's plain "did not form".
        deadline = time.monotonic() + timeout + START_GRACE
        self._claim_nodes()
        # Worker 0 hosts torch.distributed's store: hold its port while the servers bind.
        held = reserve_port(self.dist_port) if 0 in self.nodes else None
        try:
            if held is not None:
                self.dist_port = held.getsockname()[1]
            self._start_servers(deadline)
        finally:
            if held is not None:
                held.close()
        return self

    def _claim_nodes(self):
        """Hold every node of this machine (adapm.ops.claims.claim_node) before anything
        starts: a node that runs here already is an error, and nothing of it is touched.
        Teardown unlinks only the names of the nodes held here. A segment name of a node
        held here was left by a run of it that did not end cleanly (a launcher running
        that node would hold it): it is removed, with a warning, so that a job step
        retried after a crash starts, as it did before claims."""
        for node in self.nodes:
            self._claims.append(claim_node(self.spec.cluster_id, node))
            name = segment_name(self.spec.cluster_id, node)
            if segment_exists(name):
                log.warning("node %d of cluster %s: removed its table /dev/shm%s, left by a "
                            "run that did not end cleanly (no launcher of that node runs "
                            "here)", node, self.spec.cluster_id, name)
                unlink_segment(name)
            self.segments.append(name)

    def _start_servers(self, deadline):
        pipes = {}
        if 0 in self.nodes:  # node 0 first: it binds the coordinator the others join
            pipes[0] = self._start_server(0)
            self.coordinator = self._await(0, pipes[0], "coordinator", deadline)
        for node in self.nodes:
            if node != 0:
                pipes[node] = self._start_server(node)
        for node, address in self._await_all(pipes, "ready", deadline):
            self.addresses[node] = address
            if node == 0:  # at the end, node 0 sends every node's statistics on it
                self._stats_reader = threading.Thread(
                    target=self._receive_stats, args=(pipes[0],), daemon=True)
                self._stats_reader.start()
            else:
                pipes[node].close()
            # Keep a mapping of each table: its name goes away once the workers attached,
            # and a failure must still be announced to the workers through it.
            self.tables[node] = SharedTable.attach(segment_name(self.spec.cluster_id, node))

    def _start_server(self, node):
        receive, send = self.mp.Pipe(duplex=False)
        listen = f"tcp://{self.spec.host}:{self.port}"
        proc = self.mp.Process(target=_serve, name=f"adapm-node{node}",
                               args=(self.spec, node, self.coordinator, send, listen,
                                     self.log_level),
                               kwargs={"metrics_port": node_port(self.metrics_port,
                                                                 self.nodes.index(node))})
        with _main_module_skipped(proc):
            proc.start()
        send.close()
        self.servers[node] = proc
        return receive

    def _await_all(self, pipes, wanted, deadline):
        """(node, detail) of every node as it reports `wanted`; the first node that fails
        raises at once (two nodes given one port: the second cannot bind, and the first
        would wait for it until the start timeout)."""
        waiting = dict(pipes)
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClusterError(f"node{'s' if len(waiting) > 1 else ''} "
                                   f"{', '.join(map(str, sorted(waiting)))}: cluster did not "
                                   f"form within the start timeout ({config.ENV_START_TIMEOUT})")
            handles = [h for node in waiting for h in (waiting[node],
                                                       self.servers[node].sentinel)]
            ready = set(wait(handles, timeout=left))
            for node in [n for n in waiting if waiting[n] in ready or
                         self.servers[n].sentinel in ready]:
                yield node, self._await(node, waiting.pop(node), wanted, deadline)

    def _await(self, node, receive, wanted, deadline):
        proc = self.servers[node]
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ClusterError(f"node {node}: cluster did not form within the start "
                                   f"timeout ({config.ENV_START_TIMEOUT})")
            ready = wait([receive, proc.sentinel], timeout=left)
            if receive in ready:
                try:
                    status, detail = receive.recv()
                except EOFError:
                    status, detail = "error", "exited during start"
                if status == wanted:
                    return detail
                raise ClusterError(f"node {node}: server failed to start: {detail}")
            if proc.sentinel in ready:
                raise ClusterError(
                    f"node {node}: server exited with code {proc.exitcode} during start")

    def worker_environ(self, rank):
        """The environment of worker `rank`: where it finds its node, torch.distributed's
        variables (dist_environ), and, in a secure cluster, the keys a client needs
        (never the server's secret key); the log level (ADAPM_LOG_LEVEL); WORKER_DEFAULTS
        this process's environment does not set (OMP_NUM_THREADS=1, said once per
        cluster on stderr). Remove NOT_INHERITED besides."""
        environ = self.worker_env(rank).to_environ()
        environ.update(self.dist_environ(rank))
        environ[config.ENV_LOG_LEVEL] = self.log_level
        defaults = worker_defaults()
        environ.update(defaults)
        if "OMP_NUM_THREADS" in defaults and not self._noticed:
            self._noticed = True
            if logs.shows(self.log_level, logging.WARNING):
                workers = len(self.nodes) * self.spec.workers_per_node
                print(OMP_NOTICE.format(workers=workers), file=sys.stderr, flush=True)
        if self.spec.curve is not None:
            environ[ENV_CURVE_CLIENT] = self.spec.curve.client_text()
        return environ

    def dist_environ(self, rank):
        """DIST_VARIABLES of worker `rank`: RANK is its AdaPM rank, WORLD_SIZE every worker
        of the cluster, LOCAL_RANK its index on its node, LOCAL_WORLD_SIZE workers per node."""
        local = rank % self.spec.workers_per_node
        values = (self.dist_host, self.dist_port, rank, self.spec.num_workers, local,
                  self.spec.workers_per_node)
        return {name: str(value) for name, value in zip(DIST_VARIABLES, values)}

    def worker_env(self, rank):
        node, local = divmod(rank, self.spec.workers_per_node)
        return WorkerEnv(rank=rank, local_rank=local, node=node,
                         num_nodes=self.spec.num_nodes,
                         workers_per_node=self.spec.workers_per_node,
                         server=self.addresses[node],
                         table=segment_name(self.spec.cluster_id, node),
                         cluster_id=self.spec.cluster_id)

    def server_sentinels(self):
        return {proc.sentinel: node for node, proc in self.servers.items()}

    def server_failure(self, node):
        """None when node's server ended normally (the cluster shut down), else the error."""
        proc = self.servers[node]
        proc.join(1.0)
        if proc.exitcode == 0:
            return None
        cause = self._failure_seen_by(node)
        if cause:  # it ended because the cluster failed: the cause, not its exit, is news
            return ClusterError(f"node {node}: the cluster failed: {cause}")
        return ClusterError(f"node {node}: server died (exit code {proc.exitcode})")

    def _failure_seen_by(self, node):
        """Why the cluster failed, as node `node`'s server wrote it into its table before
        it ended ('' if it wrote nothing: it died by itself)."""
        table = self.tables.get(node)
        if table is None:
            return ""
        try:
            code = table.view.failed
            return failure_text(code, table.view.failed_detail,
                                table.view.failed_reason) if code else ""
        except (ValueError, RuntimeError):  # unmapped already
            return ""

    def stats(self):
        """{node: statistics} of the nodes running here (adapm.table.stats.node_stats)."""
        return {node: node_stats(table.view) for node, table in self.tables.items()}

    def _receive_stats(self, receive):
        """Node 0's last word, in a thread: every node's statistics, or nothing (EOF)."""
        try:
            while True:
                status, detail = receive.recv()
                if status == "stats":
                    self._cluster_stats = detail
                    return
        except (EOFError, OSError, ValueError, TypeError):
            pass
        finally:
            receive.close()

    def final_stats(self, timeout=0.5):
        """({node: statistics}, nodes missing) for the summary at the end of a run: where
        node 0 runs here and the run ended normally, every node's (the coordinator
        collected them as the nodes shut down; waits up to `timeout` seconds for them),
        else those of the nodes running here."""
        if self._stats_reader is not None:
            self._stats_reader.join(timeout)
        if self._cluster_stats is not None:
            stats = dict(self._cluster_stats)
            return stats, set(range(self.spec.num_nodes)) - set(stats)
        return self.stats(), set()

    def fail(self, code, detail):
        """Announce a failure to every worker of the local nodes (through their tables):
        each raises ClusterError in its next call or wait."""
        for table in self.tables.values():
            table.view.mark_failed(code, detail)

    def teardown(self, extra_processes=(), groups=False, grace=0.0):
        """Stop `extra_processes` (workers; `groups`: each leads its process group) after
        up to `grace` seconds for them to exit by themselves, and every server; then
        unlink every segment."""
        with signals_deferred():
            deadline = time.monotonic() + grace
            for proc in extra_processes:
                join_process(proc, deadline - time.monotonic())
            stop_processes(extra_processes, group=groups)
            for proc in self.servers.values():
                stop_process(proc)
            for name in self.segments:
                unlink_segment(name)
            for table in self.tables.values():
                table.close()
            self.tables = {}
            for claim in self._claims:  # last: the names are gone, another run may start
                claim.close()
            self._claims = []

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.teardown()
            raise

    def __exit__(self, *exc):
        self.teardown()
        return False


def _serve(spec, node, coordinator, ready, listen, log_level, metrics_port=None):
    """A node server process: its log lines (`[node N]`, at `log_level`), then serve."""
    logs.configure(log_level, logs.node_prefix(node))
    logs.started(logging.getLogger("adapm.server"), "node server")
    serve(spec, node, coordinator, ready, listen, metrics_port)
