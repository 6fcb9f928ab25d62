"""A node server's process: what `adapm.node.server.serve` does around the server's
event loop (the parent's death, signals, profiling, and reporting to the launching
process), and the liveness of other processes (a node's workers)."""

import multiprocessing
import os
import signal
import time

# numpy imports numpy.ma the first time np.unique (and union1d, intersect1d, ...) runs,
# 60 ms of CPU. Left to the first sync round, that is a node's first reaction to an
# intent waiting on an import; here it is part of start-up, as every other import.
import numpy.ma  # noqa: F401

from adapm.common import config
from adapm.common.process import die_with_parent, set_process_name
from adapm.table.stats import node_stats


def alive(pid):
    """True unless process `pid` is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _send_quietly(connection, message):
    """Send on the launching process's pipe, which it may have closed (not an error)."""
    try:
        connection.send(message)
    except OSError:
        pass


def run(server_class, spec, node, coordinator, ready, listen, metrics_port):
    """Run a node server (server_class: adapm.node.server.NodeServer) in this process, reporting
    on `ready` as adapm.node.server.serve says; exits the process."""
    die_with_parent(multiprocessing.parent_process().pid)
    set_process_name(f"adapm-node{node}")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launching process decides
    server = server_class(spec, node, coordinator, listen, metrics_port)
    signal.signal(signal.SIGTERM, server.request_stop)
    try:
        try:
            server.start()
        except Exception as exc:
            ready.send(("error", f"node {node}: could not start: {exc}"))
            raise SystemExit(1) from None
        if node == 0:
            ready.send(("coordinator", server.coordinator_address))
        server.on_ready = lambda address: ready.send(("ready", address))
        profile_to = os.environ.get(config.ENV_PROFILE_SERVER)
        if profile_to:
            import cProfile
            # CPU time, not wall time: on a busy machine a server waits for a core, and
            # that wait is not its cost.
            profile = cProfile.Profile(time.process_time)
            profile.runcall(server.serve_forever)
            profile.dump_stats(f"{profile_to}.node{node}")
        else:
            server.serve_forever()
        if server.addresses is None and server.failure:  # gave up before the cluster formed
            ready.send(("error", server.failure))
        if server.coordinator is not None and server.coordinator.ending_since is not None \
                and not server.failure:  # every node done: the summary of all of them
            _send_quietly(ready, ("stats", {**server.coordinator.stats,
                                            node: node_stats(server.view)}))
    finally:
        server.close()
        ready.close()
    raise SystemExit(server.exit_code)
