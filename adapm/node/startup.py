"""A node's start-up, a part of the node server: its JOIN to the coordinator, the
coordinator's answer (PEERS: every node's address and the cluster's token, with a proof
of the cluster secret), and what the node says while the cluster forms and its workers
attach: a line every few seconds about what it waits for, and a failure once the start
timeout passed without a cluster."""

import logging
import time

from adapm.common import config
from adapm.common.errors import FAIL_START
from adapm.wire import protocol
from adapm.wire.cluster_secret import ENV_CLUSTER_SECRET, NONCE_BYTES

log = logging.getLogger("adapm.server")

START_REPORT_EVERY = 5.0  # seconds between "waiting for ..." lines while the cluster forms


class Startup:
    def __init__(self, spec, node, start_timeout, malformed):
        """malformed(reason): drop and count a message that fails validation."""
        self.spec = spec
        self.node = node
        self.workers = spec.workers_per_node
        self.first_rank = node * spec.workers_per_node
        self.start_timeout = start_timeout
        self.malformed = malformed
        self.coordinator_address = None
        self.started_at = self._reported_at = time.monotonic()
        self.joined = 0             # nodes that joined, as the coordinator's heartbeats say
        self.formed_at = self.attached_at = None  # for the log lines only
        self._join_nonce = None     # of this node's JOIN: PEERS's token is masked with it

    def join(self, address, coordinator_address):
        """The JOIN this node sends the coordinator at `coordinator_address`."""
        self.coordinator_address = coordinator_address
        fingerprint = self.spec.fingerprint()
        proof = self.spec.secret.join_proof(self.node, fingerprint, address)
        self._join_nonce = proof[:NONCE_BYTES]
        return protocol.Join(fingerprint=fingerprint, addresses=[address], proof=proof)

    def heard(self, joined):
        """A coordinator's heartbeat: `joined` nodes have joined so far."""
        self.joined = min(int(joined), self.spec.num_nodes)

    def token_of(self, msg):
        """The cluster's token from the coordinator's PEERS, None if it is not valid."""
        if len(msg.addresses) != self.spec.num_nodes:
            log.error("node %d: coordinator sent %d addresses", self.node, len(msg.addresses))
            return None
        secret = self.spec.secret
        if not secret.check_peers(msg.proof, self.node, self._join_nonce, msg.cluster_token,
                                  msg.addresses):
            self.malformed("PEERS without a valid proof of the cluster secret: ignored")
            return None
        token = secret.mask_token(msg.cluster_token, self.node, self._join_nonce)
        if not 0 < token < 2**63:
            log.error("node %d: coordinator sent no cluster token", self.node)
            return None
        return token

    def formed(self):
        self.formed_at = self._reported_at = now = time.monotonic()
        if self.node == 0:
            log.info("cluster up: %d node%s x %d worker%s formed in %.1f s",
                     self.spec.num_nodes, "s" if self.spec.num_nodes > 1 else "",
                     self.workers, "s" if self.workers > 1 else "", now - self.started_at)
        else:
            log.debug("joined the cluster of %d nodes in %.1f s", self.spec.num_nodes,
                      now - self.started_at)

    def waiting(self, now, fail):
        """Until the cluster has formed, keep trying for the whole start timeout (ZeroMQ
        reconnects and delivers the JOIN once the coordinator is up), saying every few
        seconds what this node waits for; then give up, loudly: fail(code, detail,
        reason)."""
        waited = now - self.started_at
        if waited > self.start_timeout:
            reason = (f"node {self.node}: the cluster did not form within "
                      f"{self.start_timeout:.0f} s ({config.ENV_START_TIMEOUT}): "
                      f"{self._state()}")
            fail(FAIL_START, self.node, reason)
        elif now - self._reported_at >= START_REPORT_EVERY:
            self._reported_at = now
            log.warning("node %d: %s (%.0f s of %.0f s)", self.node, self._state(),
                        waited, self.start_timeout)

    def attaching(self, now, attached):
        """Log lines only, until every worker attached: every START_REPORT_EVERY seconds,
        which of this node's workers (`attached`: the local indices that said hello) have
        not attached yet; once all have, how long that took."""
        if self.attached_at is not None or self.formed_at is None:
            return
        if len(attached) >= self.workers:
            self.attached_at = now
            log.info("%d worker%s attached %.1f s after the cluster formed", self.workers,
                     "s" if self.workers > 1 else "", now - self.formed_at)
        elif now - self._reported_at >= START_REPORT_EVERY:
            self._reported_at = now
            waiting = [self.first_rank + i for i in range(self.workers) if i not in attached]
            log.info("waiting for worker%s %s to attach, %.0f s after the cluster formed (a "
                     "worker attaches once its code calls adapm.worker(), after its imports: "
                     "torch alone can take 10 s or more)", "s" if len(waiting) > 1 else "",
                     ", ".join(map(str, waiting)), now - self.formed_at)

    def _state(self):
        if self.joined == 0:
            return (f"waiting for the coordinator at {self.coordinator_address} (is node 0 "
                    f"up, and does every machine have the same cluster secret, "
                    f"{ENV_CLUSTER_SECRET} or --secret-file?)")
        return (f"{self.joined} of {self.spec.num_nodes} nodes have joined the coordinator "
                f"at {self.coordinator_address}; waiting for the others")
