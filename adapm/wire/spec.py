"""The cluster's spec: what a cluster is (keys, value lengths, nodes, workers, dtype, init,
mode, its id, CURVE keys and secret), validated where it is made and handed to every node
server; its fingerprint is what nodes must agree on when they join."""

import hashlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adapm.common.config import DTYPES, MODES, check_cluster_id, new_cluster_id
from adapm.table.initializers import parse_init
from adapm.table.shared_table import cluster_tag, normalise_lengths
from adapm.wire.cluster_secret import ClusterSecret


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
    curve: Any = None  # adapm.wire.security.CurveKeys of a secure cluster, else None
    # What node servers prove to each other as they join (adapm.wire.cluster_secret): fresh
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
            raise ValueError("secret must be an adapm.wire.cluster_secret.ClusterSecret")
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
