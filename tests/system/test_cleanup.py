"""Nothing outlives a cluster: no process, no /dev/shm segment, in every way it can end."""
import os
import signal
import subprocess
import sys
import time

import pytest
from testpaths import TESTS

import adapm
from adapm.common.process import parent_of
from adapm.ops.cluster import LocalCluster
from adapm.wire.spec import ClusterSpec

from conftest import session_processes, session_segments, wait_until_clean

pytestmark = pytest.mark.timeout(90)

SCRIPT = str(TESTS / "cluster_script.py")


def start_script(how, tmp_path):
    return subprocess.Popen([sys.executable, SCRIPT, how, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for_markers(tmp_path, count, proc, timeout=30):
    deadline = time.monotonic() + timeout
    while len(list(tmp_path.glob("ready*"))) < count:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.05)


def children_of(pid):
    return [(child, name) for child, name in session_processes() if parent_of(child) == pid]


def assert_clean():
    segments, processes = wait_until_clean(timeout=10)
    assert not segments and not processes, (segments, processes)


def test_normal_exit_leaves_nothing(tmp_path):
    proc = start_script("normal", tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "results [4.0, 4.0]" in out
    assert_clean()


def test_worker_exception_leaves_nothing(tmp_path):
    proc = start_script("raise", tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 3, out
    assert "WorkerError: worker 1 failed: ValueError: task failed on purpose" in out
    assert_clean()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_to_parent_leaves_nothing(tmp_path, sig):
    proc = start_script("wait", tmp_path)
    wait_for_markers(tmp_path, 2, proc)
    assert len(children_of(proc.pid)) == 3  # one node server, two workers
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode != 0, out
    assert_clean()


def test_node_server_sigkill_leaves_nothing(tmp_path):
    proc = start_script("wait", tmp_path)
    wait_for_markers(tmp_path, 2, proc)
    [server] = [pid for pid, name in children_of(proc.pid) if name == "adapm-node0"]
    os.kill(server, signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 3, out
    assert "ClusterError: node 0: server died" in out
    assert_clean()


def test_parent_sigkill_leaves_nothing(tmp_path):
    """Even the launching process dying without any cleanup leaves nothing: its children
    get SIGTERM from the kernel, and the node server unlinks its segment."""
    proc = start_script("wait", tmp_path)
    wait_for_markers(tmp_path, 2, proc)
    proc.kill()
    proc.communicate(timeout=30)
    assert_clean()


def test_worker_sees_cluster_error_when_server_dies(monkeypatch):
    monkeypatch.setenv("ADAPM_HEARTBEAT_TIMEOUT", "1")
    cluster = LocalCluster(ClusterSpec(num_keys=8, workers_per_node=2))
    with cluster:
        w = adapm.Worker(cluster.worker_env(0))
        try:
            os.kill(cluster.servers[0].pid, signal.SIGKILL)
            started = time.monotonic()
            with pytest.raises(adapm.ClusterError, match="presumed dead"):
                w.barrier()  # worker 1 never comes: only the dead server can end this
            assert time.monotonic() - started < 5
        finally:
            w.finalize()
    assert not session_segments()


def test_barrier_after_a_worker_finalized_fails_instead_of_hanging():
    cluster = LocalCluster(ClusterSpec(num_keys=8, workers_per_node=2))
    with cluster:
        w0 = adapm.Worker(cluster.worker_env(0))
        w1 = adapm.Worker(cluster.worker_env(1))
        w1.finalize()
        with pytest.raises(adapm.ClusterError, match="already finalized"):
            w0.barrier()
        w0.finalize()


def test_the_plane_benchmark_killed_midway_leaves_no_segment():
    """bench/bench_plane.py maps a table of its own: SIGKILLed after its first figure (the
    table in use, no cleanup code can run), no segment of its stays in /dev/shm."""
    from testpaths import ROOT
    proc = subprocess.Popen([sys.executable, "bench_plane.py", "--messages", "20000"],
                            cwd=ROOT / "bench", stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("P1"), line + proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
    assert not [name for name in os.listdir("/dev/shm") if f"p1x{proc.pid}-" in name]
