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


# Failure codes carried by FAILED / NODE_FAILED (code); `detail` says which node or worker.
FAIL_BARRIER = 1        # a barrier can never complete: worker `count` already finalized
FAIL_NODE_SILENT = 2    # node `count` stopped sending heartbeats
FAIL_WORKER_DIED = 3    # worker `count` died without finalizing
FAIL_MISMATCH = 4       # node `count` joined with a different cluster spec
FAIL_COORDINATOR = 5    # the coordinator went silent
FAIL_ROUTING = 6        # a request could not be routed (forwarded too often)
FAIL_REJECTED = 7       # a request was malformed or not allowed; count: the node
FAIL_BARRIER_NODE = 8   # a barrier can never complete: every worker of node `count` left
FAIL_STOPPED = 9        # the launching process stops the cluster: worker `count` failed
FAIL_INTERNAL = 10      # node `count` hit an internal error (its log has the traceback)
FAIL_START = 11         # node `count` gave up: the cluster did not form in time
FAIL_COLLECTIVES = 12   # workers wait in different barriers / saves: none can complete

FAILURE_TEXT = {
    FAIL_BARRIER: "a barrier can never complete: worker {} has already finalized",
    FAIL_NODE_SILENT: "node {} stopped responding (dead or unreachable)",
    FAIL_WORKER_DIED: "worker {} died without finalizing",
    FAIL_MISMATCH: "node {} joined with different cluster options",
    FAIL_COORDINATOR: "the coordinator (node 0) stopped responding",
    FAIL_ROUTING: "a request for keys could not be routed (detail {})",
    FAIL_REJECTED: "node {} rejected the request as malformed",
    FAIL_BARRIER_NODE: "a barrier can never complete: every worker of node {} has finalized",
    FAIL_STOPPED: "the cluster is being stopped because worker {} failed",
    FAIL_INTERNAL: "node {} hit an internal error (its log has the traceback)",
    FAIL_START: "node {} gave up waiting for the cluster to form",
    FAIL_COLLECTIVES: "workers wait in different collective calls (barrier() and save() "
                      "must be called by every worker in the same order), seen by node {}",
}


def failure_text(code, detail, reason=""):
    """What went wrong, for ClusterError and logs; `reason` (the failing node's own
    words: node, worker, key range) is appended when there is one."""
    text = FAILURE_TEXT.get(code, "unknown failure {}").format(detail)
    return f"{text}: {reason}" if reason else text
