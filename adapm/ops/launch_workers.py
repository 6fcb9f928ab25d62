"""adapm-launch's processes on this machine: its nodes (LocalCluster) and one process per
worker running the script, their output prefixed, the first failure reported, and the
statistics printed at the end."""

import os
import signal
import subprocess
import sys
import threading
import time

from adapm.common import logs
from adapm.common.config import ENV_DIST_PORT, ENV_LAUNCHER_PID
from adapm.common.errors import FAIL_STOPPED, AdapmError
from adapm.ops.bootstrap import BOOTSTRAP, EXIT_CLUSTER_FAILED
from adapm.ops.cluster import NOT_INHERITED, DistPortError, LocalCluster, Terminated, signals_unwind
from adapm.table.stats import format_summary
from adapm.table.stats import title as summary_title
from adapm.wire.security import without_secrets

SHUTDOWN_GRACE = 10.0  # seconds workers get to notice a node's failure before they are stopped
STOP_GRACE = 2.0       # seconds workers get to raise ClusterError after another one failed


def _pump(stream, prefix, out, lock, own=None):
    """Copy a process's output line by line, each line prefixed; a line that begins
    with `own` (a worker's log lines: [node N worker R]) already says who wrote it and is
    copied as it is, as adapm.run prints it."""
    for raw in iter(stream.readline, b""):
        text = raw.decode(errors="replace").rstrip("\n")
        line = text if own and text.startswith(own) else f"{prefix} {text}"
        with lock:
            out.write(f"{line}\n")
            out.flush()
    stream.close()


def start_pump(stream, prefix, lock, own=None):
    pump = threading.Thread(target=_pump, args=(stream, prefix, sys.stdout, lock, own),
                            daemon=True)
    pump.start()
    return pump


def worker_bootstrap():
    """BOOTSTRAP, with the worker's log lines configured (adapm.common.logs.configure_worker:
    level and prefix from its environment) before the script runs, once BOOTSTRAP has
    dropped the current folder from sys.path."""
    head, anchor, tail = BOOTSTRAP.partition("from adapm.ops.bootstrap import")
    if not anchor:
        return BOOTSTRAP
    configure = "from adapm.common.logs import configure_worker; configure_worker(); "
    return f"{head}{configure}{anchor}{tail}"


def wait_first_failure(procs, servers=None, sweep=0.01, grace=2.0):
    """Wait for every worker; return (rank, code) of the failure to report, or None.

    A worker that only stopped because the cluster failed (EXIT_CLUSTER_FAILED) is a
    consequence: for `grace` seconds the others may still show the cause, which wins.
    A node server that fails (servers: node -> process) is reported as ("node N", 1) once
    the workers had SHUTDOWN_GRACE seconds to stop by themselves."""
    waiting = dict(enumerate(procs))
    consequence, deadline = None, None
    server_failure, stop_by = None, None
    while waiting:
        for rank, proc in list(waiting.items()):
            code = proc.poll()
            if code is None:
                continue
            del waiting[rank]
            if code == EXIT_CLUSTER_FAILED:
                if consequence is None:
                    consequence, deadline = (rank, code), time.monotonic() + grace
            elif code != 0:
                return rank, code
        if consequence is not None and time.monotonic() > deadline and server_failure is None:
            return consequence
        for node, proc in (servers or {}).items():
            if server_failure is None and proc.exitcode not in (None, 0):
                server_failure = (f"node {node}", 1)
                stop_by = time.monotonic() + SHUTDOWN_GRACE
                print(f"adapm-launch: node {node}'s server failed (exit code "
                      f"{proc.exitcode})", file=sys.stderr, flush=True)
        if server_failure is not None and time.monotonic() > stop_by:
            return server_failure
        time.sleep(sweep)
    return server_failure or consequence


def launch(spec, target, nodes=None, port="0", coordinator=None, dist_host=None,
           dist_port=0, metrics_port=None):
    """Run `target` (bootstrap arguments) in every worker of the given nodes (default:
    all) on this machine; return the exit code. `dist_host`, `dist_port`: the workers'
    MASTER_ADDR and MASTER_PORT (default: the spec's host and a free port).
    `metrics_port`: the node servers' Prometheus port (adapm.node.control.metrics), None: none.
    At the end it prints the statistics of every node where node 0 runs here (the
    coordinator collects them), else of this machine's nodes."""
    procs, lock = [], threading.Lock()
    ranks = []
    grace = 0.0
    with signals_unwind():
        cluster = None
        try:
            cluster = LocalCluster(spec, nodes=nodes, coordinator=coordinator, port=port,
                                   dist_host=dist_host, dist_port=dist_port,
                                   metrics_port=metrics_port)
            cluster.start()
            for node in cluster.nodes:
                for local in range(spec.workers_per_node):
                    rank = node * spec.workers_per_node + local
                    # A worker gets the keys of a client only, never the four keys this
                    # launcher may have been given in ADAPM_CURVE_KEYS.
                    env = dict(without_secrets(os.environ), **cluster.worker_environ(rank))
                    for name in NOT_INHERITED:
                        env.pop(name, None)
                    env[ENV_LAUNCHER_PID] = str(os.getpid())
                    # Each worker leads a session of its own, so that teardown reaches what
                    # the script starts too; signals reach workers through the launcher.
                    procs.append(subprocess.Popen(
                        [sys.executable, "-c", worker_bootstrap(), *target], env=env,
                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, start_new_session=True))
                    ranks.append(rank)
                    start_pump(procs[-1].stdout, f"[n{node} w{rank}]", lock,
                                own=logs.worker_prefix(node, rank))
            failure = wait_first_failure(procs, cluster.servers)
            if failure is None:
                await_shutdown(cluster)
                return 0
            who, code = failure
            if isinstance(who, int):
                cluster.fail(FAIL_STOPPED, ranks[who])
                who = f"worker {ranks[who]}"
            grace = STOP_GRACE
            print(f"adapm-launch: {who} failed with exit code {code}; stopping the cluster",
                  file=sys.stderr, flush=True)
            return code if code > 0 else 128 - code
        except DistPortError as exc:
            print(f"adapm-launch: {exc}; choose another with --dist-port (or "
                  f"{ENV_DIST_PORT}; across machines it defaults to the coordinator's port "
                  "+ 1)", file=sys.stderr, flush=True)
            return 1
        except (AdapmError, ValueError, OSError) as exc:
            print(f"adapm-launch: {exc}", file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt:
            print("adapm-launch: interrupted; stopping the cluster", file=sys.stderr, flush=True)
            return 128 + signal.SIGINT
        except Terminated as exc:
            print("adapm-launch: terminated; stopping the cluster", file=sys.stderr, flush=True)
            return 128 + exc.signum
        finally:
            if cluster is not None:
                if cluster.tables and procs:
                    per_node, missing = cluster.final_stats()
                    print(f"adapm-launch: {summary_title(per_node, spec.mode, missing)}:\n"
                          f"{format_summary(per_node)}", file=sys.stderr, flush=True)
                cluster.teardown(procs, groups=True, grace=grace)


def await_shutdown(cluster):
    """Every local worker finished: keep serving until every node is done (the
    coordinator then shuts all servers down), so that remote workers can still reach
    the keys this node owns."""
    while any(proc.exitcode is None for proc in cluster.servers.values()):
        for proc in cluster.servers.values():
            proc.join(0.1)
    for node, proc in cluster.servers.items():
        if proc.exitcode != 0:
            raise AdapmError(f"node {node}'s server ended with exit code {proc.exitcode}")
