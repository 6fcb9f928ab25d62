"""A node's failure, a part of the node server: whether and why the cluster failed as
this node knows it. A failure found here goes to the coordinator, which tells every node
(NODE_FAILED); either way the node marks it in its table, so that every waiting and later
call of its workers raises, and answers every request that waits in one of its parts."""

import logging
import time

from adapm.common.errors import FAIL_INTERNAL, failure_text
from adapm.wire import protocol

log = logging.getLogger("adapm.server")

FAILED_LINGER = 1.0      # seconds a failed node keeps answering "failed" before it exits


class NodeFailure:
    def __init__(self, node, outbox, view, answer_waiting):
        """answer_waiting(reply_failed): answer every request that waits in a part, each
        with reply_failed(identity, request_id)."""
        self.node = node
        self.outbox = outbox
        self.view = view
        self.answer_waiting = answer_waiting
        self.failed = None       # (code, detail, reason), once the cluster failed
        self.failed_at = 0.0

    @property
    def text(self):
        """Why the cluster failed ('' while it has not)."""
        return "" if self.failed is None else failure_text(*self.failed)

    def lingered(self, now):
        """Whether the failed node has answered "failed" long enough: it may exit."""
        return self.failed is not None and now - self.failed_at > FAILED_LINGER

    def report(self, code, detail, reason=""):
        """A failure this node found: the coordinator tells every node."""
        self.outbox.to_coordinator(protocol.NodeFailed(code=code, detail=detail,
                                                       text=reason))
        self.fail(code, detail, reason)

    def fail(self, code, detail, reason=""):
        """The cluster failed: every waiting and later call of every worker raises."""
        if self.failed is not None:
            return
        self.failed = (code, detail, reason)
        self.failed_at = time.monotonic()
        log.error("node %d: %s", self.node, failure_text(code, detail, reason))
        self.view.mark_failed(code, detail, reason)
        self.answer_waiting(self.reply_failed)

    def internal_error(self, what, exc):
        """A bug or an exhausted resource (a full arena): the node fails, loudly, and so
        does the cluster; never a dropped message that silently loses state."""
        reason = f"node {self.node}: internal error in {what}: {type(exc).__name__}: {exc}"
        log.error("%s", reason, exc_info=exc)
        self.report(FAIL_INTERNAL, self.node, reason)

    def reply_failed(self, identity, request_id):
        code, detail, reason = self.failed
        self.outbox.to_identity(identity, protocol.Failed(request_id=request_id, code=code,
                                                          detail=detail, text=reason))
