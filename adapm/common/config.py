"""Cluster description and every environment variable AdaPM reads (see docs/configuration.md).

A ClusterSpec says what the cluster is (shape, table, init, mode); a WorkerEnv says where
one worker process finds its node. adapm.run and adapm-launch pass a WorkerEnv to workers
through the environment, so both start workers in exactly the same way."""

import os
import re
import secrets
from dataclasses import dataclass

from adapm.common.ports import parse_port

MODES = ("adaptive", "static", "replicate_only", "relocate_only", "replicate_all")
RELOCATING_MODES = ("adaptive", "relocate_only")  # modes in which keys change owner
INTENT_MODES = ("adaptive", "relocate_only", "replicate_only")  # modes that act on intents
DTYPES = ("float32", "float64")

# Environment variables set for every worker process (by adapm.run and adapm-launch).
ENV_RANK = "ADAPM_RANK"                  # global worker rank, 0 .. num_workers-1
ENV_LOCAL_RANK = "ADAPM_LOCAL_RANK"      # index of the worker on its node
ENV_NODE = "ADAPM_NODE"                  # node id, 0 .. num_nodes-1
ENV_NUM_NODES = "ADAPM_NUM_NODES"
ENV_WORKERS_PER_NODE = "ADAPM_WORKERS_PER_NODE"
ENV_SERVER = "ADAPM_SERVER"              # ZeroMQ address of the node server
ENV_TABLE = "ADAPM_TABLE"                # POSIX shared-memory name of the node's table
ENV_CLUSTER_ID = "ADAPM_CLUSTER_ID"
ENV_LAUNCHER_PID = "ADAPM_LAUNCHER_PID"  # set by adapm-launch: the workers' parent
# Set for every worker besides, for torch.distributed: adapm.ops.cluster.DIST_VARIABLES.
# Read by adapm-launch (as --dist-port): the port of the workers' torch.distributed group.
ENV_DIST_PORT = "ADAPM_DIST_PORT"
# Read by adapm-launch (as --metrics-port) and adapm.run (metrics_port=None): node servers
# serve Prometheus metrics from this port on (adapm.node.control.metrics; the i-th node of a machine
# on PORT + i, 0: any free port).
ENV_METRICS_PORT = "ADAPM_METRICS_PORT"
# Tuning that users may set, each with a default that needs no tuning.
ENV_HEARTBEAT_TIMEOUT = "ADAPM_HEARTBEAT_TIMEOUT"  # seconds without a server heartbeat
ENV_LOCK_TIMEOUT = "ADAPM_LOCK_TIMEOUT"            # seconds a key's lock may be held
ENV_START_TIMEOUT = "ADAPM_START_TIMEOUT"          # seconds for a cluster to form
ENV_NODE_TIMEOUT = "ADAPM_NODE_TIMEOUT"            # seconds of silence before a node is dead
ENV_PROFILE_SERVER = "ADAPM_PROFILE_SERVER"        # development: cProfile node servers to FILE
ENV_INTENT_LOG = "ADAPM_INTENT_LOG"                # diagnostics: node servers log intents to FILE
ENV_DATA_PLANE = "ADAPM_DATA_PLANE"  # node servers and workers: "compiled" (default) or "python"
ENV_LOG_LEVEL = "ADAPM_LOG_LEVEL"    # level of every AdaPM process's log lines (adapm.common.logs)
# ENV_CLUSTER_SECRET ("ADAPM_CLUSTER_SECRET", from adapm.wire.cluster_secret): read by a
# per-machine adapm-launch; what a JOIN proves knowledge of (never passed to workers).
# ENV_CLUSTER_TAG ("ADAPM_CLUSTER_TAG", from adapm.table.shared_table, which needs it and which this
# module imports): inherited by every process; segment names carry it (the tests' scope).

DATA_PLANES = ("compiled", "python")  # ENV_DATA_PLANE's values; the first is the default

DEFAULT_HEARTBEAT_TIMEOUT = 5.0
DEFAULT_LOCK_TIMEOUT = 5.0
DEFAULT_START_TIMEOUT = 60.0
DEFAULT_NODE_TIMEOUT = 3.0


def env_port(name):
    """A port (0 .. 65535) from environment variable `name`; None when it is unset or
    empty, ValueError when it is not a port."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return parse_port(raw)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={raw!r}: {exc}") from None


def env_float(name, default):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"environment variable {name} must be > 0, got {raw}")
    return value


# A cluster id is part of the names of shared-memory segments (/dev/shm/adapm-ID-nNODE)
# and travels in messages and environment variables: nothing that could end or escape a
# name ("/", spaces, ...), and short enough for any of them.
CLUSTER_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
CLUSTER_ID_RULE = "1 to 64 letters, digits, _ or - (it is part of shared-memory names)"


def new_cluster_id():
    return secrets.token_hex(6)


def check_cluster_id(cluster_id):
    """`cluster_id`, if it is one (CLUSTER_ID_RULE); ValueError saying what is allowed."""
    if not isinstance(cluster_id, str) or not CLUSTER_ID_PATTERN.fullmatch(cluster_id):
        raise ValueError(f"{cluster_id!r} is not a cluster id: {CLUSTER_ID_RULE}")
    return cluster_id


@dataclass
class WorkerEnv:
    """Where one worker finds its node; travels as ADAPM_* environment variables."""

    rank: int
    local_rank: int
    node: int
    num_nodes: int
    workers_per_node: int
    server: str
    table: str
    cluster_id: str

    _FIELDS = (
        ("rank", ENV_RANK, int), ("local_rank", ENV_LOCAL_RANK, int), ("node", ENV_NODE, int),
        ("num_nodes", ENV_NUM_NODES, int), ("workers_per_node", ENV_WORKERS_PER_NODE, int),
        ("server", ENV_SERVER, str), ("table", ENV_TABLE, str),
        ("cluster_id", ENV_CLUSTER_ID, str),
    )

    def to_environ(self):
        return {var: str(getattr(self, name)) for name, var, _ in self._FIELDS}

    @classmethod
    def from_environ(cls, environ=None):
        environ = os.environ if environ is None else environ
        missing = [var for _, var, _ in cls._FIELDS if var not in environ]
        if missing:
            raise RuntimeError(
                "not started by adapm-launch or adapm.run: missing environment variables "
                + ", ".join(missing))
        values = {}
        for name, var, kind in cls._FIELDS:
            try:
                values[name] = kind(environ[var])
            except ValueError:
                raise RuntimeError(f"malformed {var}={environ[var]!r}") from None
        return cls(**values)


def data_plane(environ=None):
    """Which data plane node servers and workers use: ADAPM_DATA_PLANE, "compiled" when
    unset or empty (DESIGN.md §9), or "python" (the reference); anything else is a
    ValueError."""
    environ = os.environ if environ is None else environ
    choice = environ.get(ENV_DATA_PLANE) or DATA_PLANES[0]
    if choice not in DATA_PLANES:
        raise ValueError(f"environment variable {ENV_DATA_PLANE}={choice!r} must be "
                         f"{' or '.join(map(repr, DATA_PLANES))}")
    return choice
