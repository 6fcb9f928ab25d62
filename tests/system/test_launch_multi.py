"""adapm-launch across nodes: failures, per-machine launches, network namespaces, --hosts."""
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from testpaths import TESTS

from adapm.common.process import parent_of

from conftest import coordinator_port, session_processes, wait_until_clean

pytestmark = pytest.mark.timeout(120)

HERE = TESTS
SCRIPT = str(HERE / "launch_script.py")
LAUNCHER = str(Path(sys.executable).with_name("adapm-launch"))


def launcher(*args, prefix=()):
    return subprocess.Popen([*prefix, LAUNCHER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(path, count, procs, timeout=60):
    deadline = time.monotonic() + timeout
    while len(list(path.glob("ready*"))) < count:
        for proc in procs:
            assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "workers did not start"
        time.sleep(0.05)


def child_named(parent, name):
    for pid, comm in session_processes():
        if comm == name and parent_of(pid) == parent:
            return pid
    raise AssertionError(f"no {name} under {parent}")



def assert_clean():
    segments, processes = wait_until_clean(timeout=15)
    assert not segments and not processes, (segments, processes)


def test_killed_node_server_fails_every_worker_within_ten_seconds(tmp_path):
    proc = launcher("--nodes", "2", "--workers-per-node", "2", "--num-keys", "40",
                    "--value-length", "2", SCRIPT, "loop", str(tmp_path))
    wait_for(tmp_path, 4, [proc])
    server = child_named(proc.pid, "adapm-node1")
    killed = time.time()
    os.kill(server, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0, out
    times = {int(r): float(t) for r, t in re.findall(r"rank (\d) ClusterError at ([\d.]+)", out)}
    assert sorted(times) == [0, 1, 2, 3], out
    assert max(times.values()) - killed < 10, out
    assert_clean()


def test_per_machine_launches_form_one_cluster(tmp_path):
    coordinator = f"127.0.0.1:{coordinator_port()}"
    common = ["--nnodes", "2", "--coordinator", coordinator, "--host", "127.0.0.1",
              "--workers-per-node", "2", "--num-keys", "30", "--value-length", "2",
              "--cluster-id", f"pm{uuid.uuid4().hex[:6]}"]
    procs = [launcher(*common[:2], "--node-rank", str(rank), *common[2:], SCRIPT, "sums",
                      str(tmp_path)) for rank in (0, 1)]
    outs = [p.communicate(timeout=90)[0] for p in procs]
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out
    # 4 workers add 1 (the script's first push) and then rank+1 to 30 keys x 2 values
    assert sum(out.count("total 840") for out in outs) == 4, outs
    assert_clean()


def test_port_conflict_is_a_clear_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = launcher("--num-keys", "4", "--port", str(port), SCRIPT, "ok", str(tmp_path))
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 1 and f"cannot listen on tcp://127.0.0.1:{port}" in out, out
    assert_clean()


# -- two hosts in network namespaces ------------------------------------------------

def _can_make_namespaces():
    return os.geteuid() == 0 and shutil.which("ip") is not None


@pytest.fixture
def two_hosts():
    """Two network namespaces joined by a veth pair: 10.77.0.1 and 10.77.0.2."""
    if not _can_make_namespaces():
        pytest.skip("network namespaces need root and iproute2 (ip)")
    tag = uuid.uuid4().hex[:6]
    names = [f"adapm-a{tag}", f"adapm-b{tag}"]
    veth = [f"va{tag}", f"vb{tag}"]

    def ip(*args, ns=None):
        cmd = ["ip", *(["netns", "exec", ns, "ip"] if ns else []), *args]
        subprocess.run(cmd, check=True, capture_output=True)

    try:
        for name in names:
            ip("netns", "add", name)
        ip("link", "add", veth[0], "type", "veth", "peer", "name", veth[1])
        for i, (name, dev) in enumerate(zip(names, veth)):
            ip("link", "set", dev, "netns", name)
            ip("addr", "add", f"10.77.0.{i + 1}/24", "dev", dev, ns=name)
            ip("link", "set", dev, "up", ns=name)
            ip("link", "set", "lo", "up", ns=name)
    except subprocess.CalledProcessError as exc:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
        pytest.skip(f"cannot make network namespaces here: {exc.stderr.decode().strip()}")
    yield names, ["10.77.0.1", "10.77.0.2"]
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_two_hosts_in_network_namespaces(tmp_path, two_hosts):
    names, addresses = two_hosts
    coordinator = f"{addresses[0]}:{coordinator_port()}"
    procs = []
    for rank, name in enumerate(names):
        procs.append(launcher(
            "--nnodes", "2", "--node-rank", str(rank), "--coordinator", coordinator,
            "--workers-per-node", "1", "--num-keys", "30", "--value-length", "2",
            SCRIPT, "sums", str(tmp_path), prefix=("ip", "netns", "exec", name)))
    outs = [p.communicate(timeout=90)[0] for p in procs]
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out
    # two workers add 1 (the script's first push) and then rank+1 to 30 keys x 2 values
    assert sum(out.count("total 300") for out in outs) == 2, outs
    assert "on node 1" in outs[1]
    assert_clean()


def test_hosts_file_over_ssh(tmp_path, two_hosts):
    """--hosts with a stand-in for ssh that enters the host's namespace instead."""
    names, addresses = two_hosts
    fake_ssh = tmp_path / "fake-ssh"
    fake_ssh.write_text('#!/bin/sh\nhost="$1"; shift\n'
                        f'exec ip netns exec "$host" env PATH="{Path(sys.executable).parent}'
                        ':$PATH" sh -c "$*"\n')
    fake_ssh.chmod(0o755)
    hosts = tmp_path / "hosts"
    hosts.write_text("\n".join(names) + "\n")
    proc = launcher("--hosts", str(hosts), "--ssh-command", str(fake_ssh),
                    "--coordinator", f"{addresses[0]}:{coordinator_port()}",
                    "--workers-per-node", "1", "--num-keys", "30", "--value-length", "2",
                    SCRIPT, "sums", str(tmp_path))
    out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert out.count("total 300") == 2, out
    assert f"[{names[1]}] [n1 w1]" in out
    assert_clean()


def test_killed_worker_fails_the_other_workers(tmp_path):
    proc = launcher("--nodes", "2", "--workers-per-node", "1", "--num-keys", "40",
                    "--value-length", "2", SCRIPT, "loop", str(tmp_path))
    wait_for(tmp_path, 2, [proc])
    [victim] = [pid for pid, name in session_processes() if name == "adapm-w1"]
    killed = time.time()
    os.kill(victim, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0, out
    [(rank, at)] = re.findall(r"rank (\d) ClusterError at ([\d.]+)", out)
    assert rank == "0" and float(at) - killed < 10, out
    assert "worker 1" in out.split("rank 0 ClusterError")[1].splitlines()[0]
    assert_clean()


# -- one node launched twice on one machine (issue 17, point 7) ----------------------

# Workers that wait for DIR/go before (`before`) or after (`after`) attaching to their
# node, then add rank + 1 to every key: a node's segment name exists until its workers
# attached, and not after.
GATED_SCRIPT = """
import os, sys, time
import numpy as np
import adapm

when, marker = sys.argv[1], sys.argv[2]


def ready_then_wait(rank):
    open(os.path.join(marker, f"ready{rank}"), "w").close()
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(marker, "go")):
        assert time.monotonic() < deadline, "no go"
        time.sleep(0.05)


if when == "before":
    ready_then_wait(os.environ["ADAPM_RANK"])
with adapm.worker() as w:
    if when == "after":
        ready_then_wait(w.rank)
    w.push(np.arange(w.num_keys), np.full((w.num_keys, 2), w.rank + 1.0))
    w.wait_sync()
    w.barrier()
    print(f"rank {w.rank}: total {w.pull(np.arange(w.num_keys)).sum():.0f}", flush=True)
    w.barrier()
"""


@pytest.mark.parametrize("when", ["before", "after"])
def test_node_launched_twice_fails_alone_and_the_cluster_finishes(tmp_path, when):
    """The second launch of node 1 (the same cluster id on the same machine) unlinked the
    real node 1's table name (its workers could not attach: the cluster failed), or, once
    they had, joined the cluster as a second node 1. It must fail by itself, touching
    nothing of the node that runs."""
    script = tmp_path / "gated.py"
    script.write_text(GATED_SCRIPT)
    cluster_id = f"tw{uuid.uuid4().hex[:6]}"
    common = ["--nnodes", "2", "--coordinator", f"127.0.0.1:{coordinator_port()}",
              "--host", "127.0.0.1", "--num-keys", "30", "--value-length", "2",
              "--cluster-id", cluster_id, str(script), when, str(tmp_path)]
    procs = [launcher("--node-rank", str(rank), *common) for rank in (0, 1)]
    try:
        wait_for(tmp_path, 2, procs)
        # it gives up soon if it gets as far as waiting for the cluster to form
        again = subprocess.run([LAUNCHER, "--node-rank", "1", *common], text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=dict(os.environ, ADAPM_START_TIMEOUT="10"), timeout=60)
        assert again.returncode == 1, again.stdout
        assert f"node 1 of cluster {cluster_id} already runs on this machine" in \
            again.stdout, again.stdout
        assert all(proc.poll() is None for proc in procs)
    finally:
        (tmp_path / "go").touch()
    outs = [proc.communicate(timeout=90)[0] for proc in procs]
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out
    # two workers add 1 and 2 to 30 keys x 2 values
    assert sum(out.count("total 180") for out in outs) == 2, outs
    assert_clean()


def test_segment_left_behind_is_removed_with_a_warning(caplog):
    """With the node held (no launcher of it runs here), its segment's name still existing
    was left by a run that did not end cleanly: removed, saying so, and the run starts (a
    job step retried after a crash)."""
    import posix_ipc

    from adapm.ops.cluster import LocalCluster
    from adapm.table.shared_table import segment_exists, segment_name, unlink_segment
    from adapm.wire.spec import ClusterSpec

    spec = ClusterSpec(num_keys=4, num_nodes=2, cluster_id=f"lb{uuid.uuid4().hex[:6]}")
    name = segment_name(spec.cluster_id, 1)
    posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=4096).close_fd()
    try:
        with LocalCluster(spec) as cluster:
            assert cluster.addresses
        assert not segment_exists(name)
        assert f"removed its table /dev/shm{name}, left by a run" in caplog.text
    finally:
        if segment_exists(name):
            unlink_segment(name)
