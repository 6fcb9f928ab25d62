"""adapm.run: a whole cluster on this machine, from Python, torn down when it returns."""

import os
import traceback
from multiprocessing.connection import wait

from adapm.cluster import LocalCluster, signals_unwind
from adapm.config import ClusterSpec
from adapm.errors import ClusterError, WorkerError
from adapm.process import die_with_parent, set_process_name


def run(fn, args=(), kwargs=None, *, nodes=1, workers_per_node=1, num_keys,
        value_length=1, mode="adaptive", init=None, dtype="float32"):
    """Run fn(worker, *args, **kwargs) in every worker of a fresh local cluster; return
    the workers' return values ordered by rank. A worker's exception raises WorkerError
    (after the whole cluster is torn down); a dead node server raises ClusterError."""
    if not callable(fn):
        raise TypeError("fn must be callable")
    spec = ClusterSpec(num_keys=num_keys, value_length=value_length, num_nodes=nodes,
                       workers_per_node=workers_per_node, dtype=dtype, init=init, mode=mode)
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
                    args=(cluster.worker_env(rank), fn, tuple(args), kwargs, send))
                proc.start()
                send.close()
                workers.append((proc, receive))
            return _collect(cluster, workers)
        finally:
            cluster.teardown([proc for proc, _ in workers])
            for _, receive in workers:
                receive.close()


def _collect(cluster, workers):
    """Wait for every worker's result; raise at the first failure of a worker or server."""
    results = [None] * len(workers)
    waiting = {receive: rank for rank, (_, receive) in enumerate(workers)}
    exited = {proc.sentinel: rank for rank, (proc, _) in enumerate(workers)}
    servers = cluster.server_sentinels()
    while waiting:
        ready = wait([*waiting, *exited, *servers], timeout=1.0)
        for handle in ready:
            if handle in waiting:
                rank = waiting.pop(handle)
                results[rank] = _receive_result(rank, handle, workers[rank][0])
            elif handle in exited:
                rank = exited.pop(handle)
                receive = workers[rank][1]
                if receive in waiting and not receive.poll(0):
                    proc = workers[rank][0]
                    proc.join(1.0)
                    raise WorkerError(rank, f"exited with code {proc.exitcode} "
                                            "before returning a result")
            elif handle in servers:
                cluster.check_servers()
                raise ClusterError(f"node {servers[handle]}: server died")
    return results


def _receive_result(rank, receive, proc):
    try:
        message = receive.recv()
    except EOFError:
        proc.join(1.0)
        raise WorkerError(rank, f"exited with code {proc.exitcode} before returning "
                                "a result") from None
    if message[0] == "ok":
        return message[1]
    _, text, remote_tb = message
    raise WorkerError(rank, text, remote_tb)


def _worker_main(env, fn, args, kwargs, send):
    """Body of a worker process started by run()."""
    from adapm.worker import worker

    die_with_parent()
    set_process_name(f"adapm-w{env.rank}")
    os.environ.update(env.to_environ())
    try:
        with worker() as w:
            result = fn(w, *args, **kwargs)
        send.send(("ok", result))
    except BaseException as exc:  # noqa: BLE001 - everything is reported to the parent
        try:
            send.send(("error", f"{type(exc).__name__}: {exc}", traceback.format_exc()))
        except Exception:
            pass
        raise SystemExit(1) from None
    finally:
        send.close()
