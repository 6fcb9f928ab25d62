"""The leftover check every test runs under, scoped to this pytest session.

Other people run AdaPM on this machine too (a training job beside `pytest`): the check
must never report, let alone kill or unlink, what is theirs. So this session sets its own
ADAPM_CLUSTER_TAG, which every process a test starts inherits and which every segment
made under it carries in its name, and looks only at those."""
import os
import secrets
import signal
import time

import pytest

from adapm.common.process import adapm_processes, descends_from, environ_value
from adapm.table.shared_table import ENV_CLUSTER_TAG, segment_prefix, unlink_segment

SESSION_PID = os.getpid()
# Unique to this session (pid: other sessions now; random: sessions after this pid's reuse).
SESSION_TAG = f"pytest{SESSION_PID}_{secrets.token_hex(4)}"
os.environ[ENV_CLUSTER_TAG] = SESSION_TAG  # before any test starts anything


def session_segments():
    """This session's AdaPM segments in /dev/shm (names without the leading /)."""
    prefix = segment_prefix(SESSION_TAG).lstrip("/")
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith(prefix))


def in_session(pid):
    """Whether process `pid` was started by this session. Its tag decides, as it survives
    re-parenting; a process started with a cleared environment counts if it descends from
    pytest. A process under pytest with another tag stands for someone else's job."""
    tag = environ_value(pid, ENV_CLUSTER_TAG)
    if tag is not None:
        return tag == SESSION_TAG
    return descends_from(pid, SESSION_PID)


def session_processes():
    """(pid, name) of this session's live AdaPM processes."""
    return [(pid, name) for pid, name in adapm_processes() if in_session(pid)]


def wait_until_clean(before_segments=(), before_processes=(), timeout=10.0):
    """This session's leftover (segments, processes), other than those given, after up to
    `timeout` seconds of grace."""
    deadline = time.monotonic() + timeout
    while True:
        segments = set(session_segments()) - set(before_segments)
        processes = set(session_processes()) - set(before_processes)
        if (not segments and not processes) or time.monotonic() > deadline:
            return segments, processes
        time.sleep(0.05)


def remove_leftovers(segments, processes):
    """SIGKILL the processes and unlink the segments, so that one test's failure does not
    cascade into the next tests. Only what is still this session's: a pid may have been
    reused since it was listed."""
    still_ours = set(session_processes())
    for pid, name in processes:
        if (pid, name) in still_ours:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    prefix = segment_prefix(SESSION_TAG).lstrip("/")
    for name in segments:
        if name.startswith(prefix):
            unlink_segment("/" + name)


# Optional packages: without one, the tests of what needs it skip. The run says so at its
# top and bottom, with the command that includes them (README.md's test command installs
# only the test extra; CI installs these too).
OPTIONAL_PACKAGES = (
    ("torch", "torch", "adapm.torch, DDP, the ctr and gnn apps"),
    ("pyarrow", "fast", "the readers' multithreaded pyarrow path"),
    ("prometheus_client", "metrics", "the Prometheus metrics endpoints"),
    ("yaml", "test-all", "a PyYAML cross-check of the Kubernetes example"),
)


def missing_optional_packages():
    import importlib.util
    return [(module, extra, what) for module, extra, what in OPTIONAL_PACKAGES
            if importlib.util.find_spec(module) is None]


def _missing_lines():
    missing = missing_optional_packages()
    if not missing:
        return []
    return ["adapm: optional packages missing, so their tests will be SKIPPED:",
            *(f"  - {module} (extra '{extra}'): {what}" for module, extra, what in missing),
            "  to run every test, as CI does: pip install '.[test-all]' (README.md)"]


def pytest_report_header(config):
    return _missing_lines()


def pytest_terminal_summary(terminalreporter):
    for line in _missing_lines():
        terminalreporter.write_line(line, yellow=True)


@pytest.fixture(autouse=True)
def no_leftovers():
    """Every test must leave no AdaPM process and no /dev/shm segment behind."""
    before = session_segments(), session_processes()
    yield
    left_segments, left_processes = wait_until_clean(*before)
    remove_leftovers(left_segments, left_processes)
    assert not left_segments, f"shared-memory segments left behind: {left_segments}"
    assert not left_processes, f"processes left behind: {left_processes}"


@pytest.fixture
def make_table():
    """make(...) -> a published table of this test (its keys, or those `owned`, OWNED),
    unlinked afterwards; shared by the table's own tests."""
    import numpy as np

    from adapm.table.shared_table import OWNED, SharedTable, segment_name
    made = []

    def make(num_keys=100, value_length=4, dtype="float32", workers=2, values=None,
             publish=True, node=0, num_nodes=1, owned=None, arena_capacity=None):
        name = segment_name(f"t{os.getpid()}x{len(made)}", node)
        table = SharedTable.create(name, num_keys, value_length, dtype, workers, node=node,
                                   num_nodes=num_nodes, arena_capacity=arena_capacity)
        made.append(table)
        keys = np.arange(num_keys, dtype=np.uint64) if owned is None else \
            np.asarray(owned, dtype=np.uint64)
        table.install(keys, OWNED, values)
        if publish:
            table.publish()
        return table

    yield make
    for table in made:
        table.unlink()
        table.close()


def coordinator_port(host="127.0.0.1"):
    """A port for a test's fixed coordinator address: free now, and so is the next one
    (the workers' default torch.distributed port across machines is the coordinator's
    + 1). Taken below the kernel's ephemeral range, so that no connection or `port 0`
    bind of the test's own processes is handed either of them meanwhile (ephemeral ports
    are given out in sequence: one picked with bind(('', 0)) has its successor taken
    soon)."""
    import random
    import socket

    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10_000, max(low - 2, 10_002))
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind((host, port))
                b.bind((host, port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free pair of ports below the ephemeral range")
