"""Cluster description and every environment variable AdaPM reads (see docs/configuration.md).

A ClusterSpec says what the cluster is (shape, table, init, mode); a WorkerEnv says where
one worker process finds its node. adapm.run and adapm-launch pass a WorkerEnv to workers
through the environment, so both start workers in exactly the same way."""

import hashlib
import os
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adapm.cluster_secret import ENV_CLUSTER_SECRET, ClusterSecret  # noqa: F401
from adapm.initializers import parse_init
from adapm.ports import parse_port
from adapm.table import ENV_CLUSTER_TAG, cluster_tag, normalise_lengths  # noqa: F401

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
# Set for every worker besides, for torch.distributed: adapm.cluster.DIST_VARIABLES.
# Read by adapm-launch (as --dist-port): the port of the workers' torch.distributed group.
ENV_DIST_PORT = "ADAPM_DIST_PORT"
# Read by adapm-launch (as --metrics-port) and adapm.run (metrics_port=None): node servers
# serve Prometheus metrics from this port on (adapm.metrics; the i-th node of a machine
# on PORT + i, 0: any free port).
ENV_METRICS_PORT = "ADAPM_METRICS_PORT"
# Tuning that users may set, each with a default that needs no tuning.
ENV_HEARTBEAT_TIMEOUT = "ADAPM_HEARTBEAT_TIMEOUT"  # seconds without a server heartbeat
ENV_LOCK_TIMEOUT = "ADAPM_LOCK_TIMEOUT"            # seconds a key's lock may be held
ENV_START_TIMEOUT = "ADAPM_START_TIMEOUT"          # seconds for a cluster to form
ENV_NODE_TIMEOUT = "ADAPM_NODE_TIMEOUT"            # seconds of silence before a node is dead
ENV_PROFILE_SERVER = "ADAPM_PROFILE_SERVER"        # development: cProfile node servers to FILE
ENV_INTENT_LOG = "ADAPM_INTENT_LOG"                # diagnostics: node servers log intents to FILE
ENV_LOG_LEVEL = "ADAPM_LOG_LEVEL"    # level of every AdaPM process's log lines (adapm.logs)
# ENV_CLUSTER_SECRET ("ADAPM_CLUSTER_SECRET", from adapm.cluster_secret): read by a
# per-machine adapm-launch; what a JOIN proves knowledge of (never passed to workers).
# ENV_CLUSTER_TAG ("ADAPM_CLUSTER_TAG", from adapm.table, which needs it and which this
# module imports): inherited by every process; segment names carry it (the tests' scope).

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
class ClusterSpec:
    """What a cluster is. Validated on construction, in the calling process."""

    num_keys: int
    value_length: Any = 1
    num_nodes: int = 1
    workers_per_node: int = 1
    dtype: str = "float32"
    init: Any = None
    mode: str = "adaptive"
    host: str = "127.0.0.1"
    cluster_id: str = field(default_factory=new_cluster_id)
    curve: Any = None  # adapm.security.CurveKeys of a secure cluster, else None
    # What node servers prove to each other as they join (adapm.cluster_secret): fresh
    # for a cluster on one machine; a per-machine launch passes the machines' common one.
    secret: Any = field(default_factory=ClusterSecret.generate)

    def __post_init__(self):
        self.num_keys = _positive_int("num_keys", self.num_keys)
        self.num_nodes = _positive_int("nodes", self.num_nodes)
        self.workers_per_node = _positive_int("workers_per_node", self.workers_per_node)
        if self.num_nodes > 65535:
            raise ValueError("at most 65535 nodes")
        uniform, lengths = normalise_lengths(self.num_keys, self.value_length)
        self.value_length = uniform if uniform else lengths
        if str(np.dtype(self.dtype)) not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        self.dtype = str(np.dtype(self.dtype))
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        self.init = parse_init(self.init)
        if not isinstance(self.secret, ClusterSecret):
            raise ValueError("secret must be an adapm.cluster_secret.ClusterSecret")
        check_cluster_id(self.cluster_id)
        cluster_tag()  # a bad ADAPM_CLUSTER_TAG fails here, not later in a node server

    @property
    def num_workers(self):
        return self.num_nodes * self.workers_per_node

    def fingerprint(self):
        """A 63-bit digest of what every node must agree on (checked when nodes join)."""
        digest = hashlib.sha256()
        init = self.init if not callable(self.init) else ("callable",)
        for part in (self.num_keys, self.num_nodes, self.workers_per_node, self.dtype,
                     self.mode, repr(init), self.cluster_id, self.curve is not None):
            digest.update(repr(part).encode())
        if isinstance(self.value_length, np.ndarray):
            digest.update(self.value_length.tobytes())
        else:
            digest.update(repr(self.value_length).encode())
        return int.from_bytes(digest.digest()[:8], "little") >> 1


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


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
