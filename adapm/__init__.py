"""AdaPM for Python: an adaptive parameter server driven by intent signaling.

    results = adapm.run(task, args=(...), nodes=1, workers_per_node=2,
                        num_keys=100_000, value_length=16)

or, in a script started by adapm-launch:

    with adapm.worker() as w:
        ...

See docs/ for the design, the API and the configuration."""

from adapm import checkpoint
from adapm.checkpoint import CheckpointError
from adapm.client.worker import Pending, Worker, worker
from adapm.common.errors import AdapmError, ClosedError, ClusterError, ProtocolError, WorkerError
from adapm.ops.runner import run

__version__ = "0.1.0"

__all__ = [
    "AdapmError", "CheckpointError", "ClosedError", "ClusterError", "ProtocolError",
    "WorkerError", "Pending", "checkpoint", "Worker", "run", "worker", "__version__",
]
