"""adapm.run: a whole cluster on this machine, from Python, torn down when it returns."""

import contextlib
import logging
import multiprocessing
import os
import pickle
import sys
import time
import traceback
from multiprocessing.connection import wait

import adapm.checkpoint as checkpoint
from adapm.common import logs
from adapm.common.config import ENV_METRICS_PORT, env_port
from adapm.common.errors import ClusterError, WorkerError
from adapm.common.process import die_with_parent, own_process_group, set_process_name
from adapm.ops.cluster import NOT_INHERITED, WORKER_DEFAULTS, LocalCluster, signals_unwind
from adapm.ops.spawn_check import check_importable, describe
from adapm.table.stats import format_summary, title
from adapm.wire.security import CurveKeys, claim_client_keys
from adapm.wire.spec import ClusterSpec

# Seconds run() waits, after the workers returned, for node 0's statistics of every node
# (the nodes shut down and send theirs: well under a second; node 0 waits up to 2 s).
SUMMARY_WAIT = 5.0

log = logging.getLogger("adapm.worker")


def run(fn, args=(), kwargs=None, *, nodes=1, workers_per_node=1, num_keys=None,
        value_length=None, mode="adaptive", init=None, dtype=None, secure=False,
        restore=None, log_level=None, metrics_port=None, summary=True):
    """Run fn(worker, *args, **kwargs) in every worker of a fresh local cluster; return
    the workers' return values ordered by rank. A worker's exception raises WorkerError
    (after the whole cluster is torn down); a dead node server raises ClusterError.
    `secure`: authenticate and encrypt every connection with fresh CURVE keys.
    `restore`: start from the checkpoint at this path (Worker.save), on any number of
    nodes and workers; num_keys, value_length and dtype then default to the
    checkpoint's, and must match it when given.

    Every worker finds torch.distributed's variables in its environment (MASTER_ADDR,
    a free MASTER_PORT on this machine, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE),
    so that fn can call torch.distributed.init_process_group(backend) with no other
    argument to join a group of all the cluster's workers; and OMP_NUM_THREADS=1 unless
    this process's environment sets it.

    `log_level`: of the node servers' and workers' log lines (DEBUG, INFO, WARNING,
    ERROR, CRITICAL; default ADAPM_LOG_LEVEL, else INFO). Workers are spawned processes
    that import fn by its module and name: fn (and a callable init) must be defined at
    module level of an importable .py file, else TypeError before any process starts.

    `metrics_port`: every node server serves Prometheus metrics on 127.0.0.1, node i on
    metrics_port + i (0: any free port, logged); default ADAPM_METRICS_PORT, else none
    (needs prometheus_client: pip install 'adapm[metrics]'). `summary`: print the
    statistics table of every node (adapm.table.stats) to stderr once the workers returned."""
    if not callable(fn):
        raise TypeError("fn must be callable")
    check_importable(fn, "fn")
    if callable(init):
        check_importable(init, "init")
    num_keys, value_length, dtype, init = checkpoint.table_shape(
        restore, num_keys, value_length, dtype, init)
    spec = ClusterSpec(num_keys=num_keys, value_length=value_length, num_nodes=nodes,
                       workers_per_node=workers_per_node, dtype=dtype, init=init, mode=mode,
                       curve=CurveKeys.generate() if secure else None)
    kwargs = dict(kwargs or {})
    with signals_unwind():
        if metrics_port is None:
            metrics_port = env_port(ENV_METRICS_PORT)
        cluster = LocalCluster(spec, log_level=log_level, metrics_port=metrics_port)
        workers = []
        try:
            cluster.start()
            for rank in range(spec.num_workers):
                receive, send = cluster.mp.Pipe(duplex=False)
                environ = cluster.worker_environ(rank)
                proc = cluster.mp.Process(
                    target=_worker_main, name=f"adapm-worker{rank}",
                    args=(environ, fn, tuple(args), kwargs, send))
                with _inherited(environ, WORKER_DEFAULTS):
                    proc.start()
                send.close()
                workers.append((proc, receive))
            results = _collect(cluster, workers)
            if summary:
                _print_summary(cluster, spec.mode)
            return results
        finally:
            cluster.teardown([proc for proc, _ in workers], groups=True)
            for _, receive in workers:
                receive.close()


def _print_summary(cluster, mode):
    """The statistics table of every node, to stderr, as adapm-launch prints it."""
    per_node, missing = cluster.final_stats(SUMMARY_WAIT)
    if per_node:
        print(f"adapm.run: {title(per_node, mode, missing)}:\n{format_summary(per_node)}",
              file=sys.stderr, flush=True)


def _collect(cluster, workers, grace=2.0):
    """Wait for every worker's result; raise at the first failure of a worker or server.

    A worker failing with ClusterError is usually a consequence of another failure (its
    barrier could not complete because a peer left): for `grace` seconds the cause may
    still arrive, and is raised in preference."""
    results = [None] * len(workers)
    waiting = {receive: rank for rank, (_, receive) in enumerate(workers)}
    exited = {proc.sentinel: rank for rank, (proc, _) in enumerate(workers)}
    servers = cluster.server_sentinels()
    consequence, deadline = None, None
    while waiting:
        if consequence is not None and time.monotonic() > deadline:
            raise consequence
        ready = wait([*waiting, *exited, *servers], timeout=0.2)
        for handle in ready:
            if handle in waiting:
                rank = waiting.pop(handle)
                try:
                    results[rank] = _receive_result(rank, handle, workers[rank][0])
                except _Consequence as exc:
                    if consequence is None:
                        consequence, deadline = exc.error, time.monotonic() + grace
            elif handle in exited:
                rank = exited.pop(handle)
                receive = workers[rank][1]
                if receive in waiting and not receive.poll(0):
                    proc = workers[rank][0]
                    proc.join(1.0)
                    raise WorkerError(rank, f"exited with code {proc.exitcode} "
                                            "before returning a result")
            elif handle in servers:
                error = cluster.server_failure(servers.pop(handle))
                if error is not None:
                    raise error
    if consequence is not None:
        raise consequence
    return results


class _Consequence(Exception):
    def __init__(self, error):
        super().__init__(str(error))
        self.error = error


def _receive_result(rank, receive, proc):
    try:
        message = pickle.loads(receive.recv_bytes())
    except EOFError:
        proc.join(1.0)
        raise WorkerError(rank, f"exited with code {proc.exitcode} before returning "
                                "a result") from None
    if message[0] == "ok":
        return message[1]
    kind, text, remote_tb = message
    if kind == "cluster_error":
        raise _Consequence(WorkerError(rank, text, remote_tb))
    raise WorkerError(rank, text, remote_tb)


def _by_value(message, rank):
    """The message pickled by value with the standard pickler: multiprocessing's would
    hand torch tensors over as shared-memory handles, which die with this process before
    the parent reads them (FileNotFoundError)."""
    try:
        return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - reported as the worker's own error
        raise TypeError(f"worker {rank}: its return value cannot be pickled to reach "
                        f"adapm.run's caller: {type(exc).__name__}: {exc}") from None


def _worker_main(environ, fn, args, kwargs, send):
    """Body of a worker process started by run()."""
    from adapm.client.worker import worker

    die_with_parent(multiprocessing.parent_process().pid)
    own_process_group()
    set_process_name(f"adapm-w{environ['ADAPM_RANK']}")
    for name in NOT_INHERITED:
        os.environ.pop(name, None)
    os.environ.update(environ)
    logs.configure_worker()
    logs.started(log, "worker", slow_level=logging.DEBUG)  # its node says it waits for it
    claim_client_keys()  # before fn runs: nothing it starts inherits the keys
    w = None
    try:
        log.debug("started; attaching to node %s, then running %s", environ["ADAPM_NODE"],
                  describe(fn))
        w = worker()
        result = fn(w, *args, **kwargs)
        w.finalize()
        send.send_bytes(_by_value(("ok", result), rank=environ["ADAPM_RANK"]))
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
        # Report before leaving the cluster, so the cause arrives before its consequences.
        kind = "cluster_error" if isinstance(exc, ClusterError) else "error"
        try:
            send.send_bytes(pickle.dumps((kind, f"{type(exc).__name__}: {exc}",
                                          traceback.format_exc())))
        except Exception:
            pass
        raise SystemExit(1) from None
    finally:
        if w is not None:
            w.finalize()
        send.close()


@contextlib.contextmanager
def _inherited(environ, names):
    """The variables of `names` that `environ` (a worker's) sets, in this process's
    environment while a worker is started: a spawned worker inherits them from its first
    instruction. _worker_main would set them too late: spawn imports fn's module first
    (torch, numpy: OpenMP reads OMP_NUM_THREADS as it loads)."""
    values = {name: environ[name] for name in names if name in environ}
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
