"""The exceptions of the public API. Bad arguments raise ValueError/TypeError instead."""


class AdapmError(Exception):
    """Base class of every AdaPM error."""


class ClusterError(AdapmError):
    """A node or worker of the cluster died or cannot be reached; the cluster is unusable."""


class ClosedError(AdapmError):
    """The worker was used after finalize()."""


class ProtocolError(AdapmError):
    """A message on the wire was malformed; it is dropped and counted, never executed."""


class WorkerError(AdapmError):
    """A worker raised: carries its rank and the remote traceback (text)."""

    def __init__(self, rank, message, remote_traceback=""):
        super().__init__(f"worker {rank} failed: {message}\n{remote_traceback}".rstrip())
        self.rank = rank
        self.remote_traceback = remote_traceback
