"""adapm.run: a whole cluster on this machine, from Python, torn down when it returns."""

import multiprocessing
import os
import time
import traceback
from multiprocessing.connection import wait

from adapm.cluster import NOT_INHERITED, LocalCluster, signals_unwind
from adapm.config import ClusterSpec
from adapm.errors import ClusterError, WorkerError
from adapm.process import die_with_parent, own_process_group, set_process_name
from adapm.security import CurveKeys, claim_client_keys


def run(fn, args=(), kwargs=None, *, nodes=1, workers_per_node=1, num_keys,
        value_length=1, mode="adaptive", init=None, dtype="float32", secure=False):
    """Run fn(worker, *args, **kwargs) in every worker of a fresh local cluster; return
    the workers' return values ordered by rank. A worker's exception raises WorkerError
    (after the whole cluster is torn down); a dead node server raises ClusterError.
    `secure`: authenticate and encrypt every connection with fresh CURVE keys.

    Every worker finds torch.distributed's variables in its environment (MASTER_ADDR,
    a free MASTER_PORT on this machine, RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE),
    so that fn can call torch.distributed.init_process_group(backend) with no other
    argument to join a group of all the cluster's workers."""
    if not callable(fn):
        raise TypeError("fn must be callable")
    spec = ClusterSpec(num_keys=num_keys, value_length=value_length, num_nodes=nodes,
                       workers_per_node=workers_per_node, dtype=dtype, init=init, mode=mode,
                       curve=CurveKeys.generate() if secure else None)
    kwargs = dict(kwargs or {})
    with signals_unwind():
        cluster = LocalCluster(spec)
        workers = []
        try:
            cluster.start()
            for rank in range(spec.num_workers):
                receive, send = cluster.mp.Pipe(duplex=False)
                proc = cluster.mp.Process(
                    target=_worker_main, name=f"adapm-worker{rank}",
                    args=(cluster.worker_environ(rank), fn, tuple(args), kwargs, send))
                proc.start()
                send.close()
                workers.append((proc, receive))
            return _collect(cluster, workers)
        finally:
            cluster.teardown([proc for proc, _ in workers], groups=True)
            for _, receive in workers:
                receive.close()


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
        message = receive.recv()
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


def _worker_main(environ, fn, args, kwargs, send):
    """Body of a worker process started by run()."""
    from adapm.worker import worker

    die_with_parent(multiprocessing.parent_process().pid)
    own_process_group()
    set_process_name(f"adapm-w{environ['ADAPM_RANK']}")
    for name in NOT_INHERITED:
        os.environ.pop(name, None)
    os.environ.update(environ)
    claim_client_keys()  # before fn runs: nothing it starts inherits the keys
    w = None
    try:
        w = worker()
        result = fn(w, *args, **kwargs)
        w.finalize()
        send.send(("ok", result))
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
        # Report before leaving the cluster, so the cause arrives before its consequences.
        kind = "cluster_error" if isinstance(exc, ClusterError) else "error"
        try:
            send.send((kind, f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        except Exception:
            pass
        raise SystemExit(1) from None
    finally:
        if w is not None:
            w.finalize()
        send.close()
