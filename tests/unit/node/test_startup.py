"""Startup (adapm.node.startup) alone: the JOIN with its proof of the cluster secret, the
token read from the coordinator's PEERS (only one whose MAC proves the secret, answering
this node's JOIN), and what the node says while the cluster forms (a failure naming the
node once the start timeout passed) and while its workers attach."""
import logging

import pytest
from node_parts import ADDRESSES, wire

from adapm.common.errors import FAIL_START
from adapm.node.startup import START_REPORT_EVERY, Startup
from adapm.wire import protocol
from adapm.wire.cluster_secret import ClusterSecret
from adapm.wire.protocol import MsgType
from adapm.wire.spec import ClusterSpec

pytestmark = pytest.mark.timeout(60)

NODE = 1
HERE = ADDRESSES[NODE]
COORDINATOR = "tcp://127.0.0.1:7000"
TOKEN = 0x1234_5678_9ABC


class Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines = []

    def emit(self, record):
        self.lines.append((record.levelname, record.getMessage()))

    def take(self):
        lines, self.lines = self.lines, []
        return lines


@pytest.fixture(name="log_lines")
def log_lines_fixture():
    """The lines of the adapm.server logger (whatever configured it before)."""
    logger = logging.getLogger("adapm.server")
    handler, level = Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


class Joining:
    """Node 1 of 2 (2 workers: ranks 2 and 3) starting, its malformed reasons recorded;
    `join` is the JOIN as the coordinator receives it."""

    def __init__(self, start_timeout=60.0):
        self.spec = ClusterSpec(num_keys=12, num_nodes=2, workers_per_node=2)
        self.dropped = []
        self.part = Startup(self.spec, NODE, start_timeout, self.dropped.append)
        self.join = wire(self.part.join(HERE, COORDINATOR))

    def peers(self, token=TOKEN, addresses=ADDRESSES[:2], secret=None, join=None):
        """PEERS as a coordinator answers `join` (this node's), through the wire: it reads
        the nonce of the JOIN, then masks the token and MACs with `secret` (the
        cluster's)."""
        secret = secret or self.spec.secret
        join = join or self.join
        nonce = self.spec.secret.check_join(join.proof, NODE, join.fingerprint,
                                            join.addresses[0])
        assert nonce is not None
        masked = secret.mask_token(token, NODE, nonce)
        return wire(protocol.Peers(cluster_token=masked, addresses=list(addresses),
                                   proof=secret.peers_proof(NODE, nonce, masked, addresses)))


def test_the_join_carries_the_fingerprint_the_address_and_a_proof_of_the_secret():
    joining = Joining()
    join = joining.join
    assert join.type == MsgType.JOIN
    assert join.fingerprint == joining.spec.fingerprint() and join.addresses == [HERE]
    secret = joining.spec.secret
    assert secret.check_join(join.proof, NODE, join.fingerprint, HERE) is not None
    assert secret.check_join(join.proof, 0, join.fingerprint, HERE) is None   # node 0's?
    assert ClusterSecret.generate().check_join(join.proof, NODE, join.fingerprint,
                                               HERE) is None
    assert joining.part.coordinator_address == COORDINATOR


def test_peers_from_the_coordinator_gives_the_clusters_token():
    joining = Joining()
    peers = joining.peers()
    assert peers.cluster_token != TOKEN            # masked on the wire
    assert joining.part.token_of(peers) == TOKEN
    assert joining.dropped == []


def test_a_peers_without_a_valid_proof_is_refused_and_counted_as_malformed(log_lines):
    joining = Joining()
    forged = joining.peers(secret=ClusterSecret.generate())    # another secret's MAC
    assert joining.part.token_of(forged) is None
    tampered = joining.peers()
    tampered.proof = bytes([tampered.proof[0] ^ 1]) + tampered.proof[1:]
    assert joining.part.token_of(tampered) is None
    replaced = joining.peers()
    replaced.addresses = [ADDRESSES[0], "tcp://10.0.0.66:9001"]  # not what was proved
    assert joining.part.token_of(replaced) is None
    other_join = wire(Startup(joining.spec, NODE, 60.0, joining.dropped.append).join(
        HERE, COORDINATOR))
    assert joining.part.token_of(joining.peers(join=other_join)) is None  # not this JOIN's
    assert joining.dropped == ["PEERS without a valid proof of the cluster secret: "
                               "ignored"] * 4
    assert joining.part.token_of(joining.peers(addresses=ADDRESSES[:3])) is None
    assert joining.part.token_of(joining.peers(token=0)) is None
    assert len(joining.dropped) == 4               # those two are errors, logged
    errors = [text for level, text in log_lines.take() if level == "ERROR"]
    assert errors == ["node 1: coordinator sent 3 addresses",
                      "node 1: coordinator sent no cluster token"]


def test_waiting_reports_what_it_waits_for_then_fails_naming_the_node(log_lines):
    joining = Joining(start_timeout=30.0)
    startup, failed = joining.part, []
    t0 = startup.started_at

    def fail(*failure):
        failed.append(failure)

    startup.waiting(t0 + 1.0, fail)
    assert log_lines.take() == [] and failed == []
    startup.waiting(t0 + START_REPORT_EVERY + 1.0, fail)
    (level, text), = log_lines.take()
    assert level == "WARNING" and text.startswith(
        f"node 1: waiting for the coordinator at {COORDINATOR}")
    startup.heard(7)                               # more than there are: 2
    startup.waiting(t0 + 2 * START_REPORT_EVERY + 1.0, fail)
    (level, text), = log_lines.take()
    assert f"2 of 2 nodes have joined the coordinator at {COORDINATOR}" in text
    assert failed == []
    startup.waiting(t0 + 31.0, fail)
    (code, detail, reason), = failed
    assert (code, detail) == (FAIL_START, NODE)
    assert reason.startswith("node 1: the cluster did not form within 30 s")
    assert reason.endswith(f"2 of 2 nodes have joined the coordinator at {COORDINATOR}; "
                           "waiting for the others")


def test_attaching_names_the_workers_not_attached_then_says_once_that_all_are(log_lines):
    startup = Joining().part
    startup.attaching(startup.started_at + 100.0, {0})
    assert log_lines.take() == []                  # the cluster has not formed yet
    startup.formed()
    log_lines.take()
    t0 = startup.formed_at
    startup.attaching(t0 + 1.0, {0})
    assert log_lines.take() == []                  # not yet due
    startup.attaching(t0 + START_REPORT_EVERY + 1.0, {0})
    (level, text), = log_lines.take()
    assert level == "INFO" and text.startswith("waiting for worker 3 to attach, 6 s after")
    startup.attaching(t0 + START_REPORT_EVERY + 2.0, {0, 1})
    (level, text), = log_lines.take()
    assert text == f"2 workers attached {START_REPORT_EVERY + 2.0:.1f} s after the cluster " \
                   "formed"
    assert startup.attached_at == t0 + START_REPORT_EVERY + 2.0
    startup.attaching(t0 + 100.0, {0, 1})
    assert log_lines.take() == []                  # said once
