"""Any start order (issue 9.4): per-machine launches that start seconds apart in either
order form one cluster and say what they wait for; two local nodes given one port fail at
once; a torchrun-style WORLD_SIZE that counts processes is not read as the node count."""
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import click
import pytest
from testpaths import TESTS

from adapm.ops.placement import machine_placement

from conftest import coordinator_port, wait_until_clean

pytestmark = pytest.mark.timeout(120)

HERE = TESTS
SCRIPT = str(HERE / "launch_script.py")
LAUNCHER = str(Path(sys.executable).with_name("adapm-launch"))
STAGGER = 6.0  # seconds: longer than the node timeout (3 s) that used to end the wait



def per_machine(rank, coordinator, cluster_id, tmp_path):
    return subprocess.Popen(
        [LAUNCHER, "--nnodes", "2", "--node-rank", str(rank), "--coordinator", coordinator,
         "--host", "127.0.0.1", "--workers-per-node", "1", "--num-keys", "30",
         "--value-length", "2", "--cluster-id", cluster_id, SCRIPT, "sums", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.parametrize("first", [1, 0])
def test_nodes_started_seconds_apart_in_either_order_form_one_cluster(tmp_path, first):
    port = coordinator_port()
    coordinator = f"127.0.0.1:{port}"
    cluster_id = f"so{uuid.uuid4().hex[:6]}"
    early = per_machine(first, coordinator, cluster_id, tmp_path)
    time.sleep(STAGGER)
    assert early.poll() is None, early.stdout.read()  # still waiting, not given up
    late = per_machine(1 - first, coordinator, cluster_id, tmp_path)
    outs = {first: early.communicate(timeout=90)[0], 1 - first: late.communicate(timeout=90)[0]}
    for proc, out in ((early, outs[first]), (late, outs[1 - first])):
        assert proc.returncode == 0, out
    # 2 workers: the script pushes 1, then rank + 1, to 30 keys x 2 values
    assert sum(out.count("total 300") for out in outs.values()) == 2, outs
    if first == 1:
        assert f"node 1: waiting for the coordinator at tcp://127.0.0.1:{port}" in outs[1]
    else:
        assert "1 of 2 nodes joined" in outs[0] and "waiting for node 1" in outs[0], outs[0]
    segments, processes = wait_until_clean(timeout=15)
    assert not segments and not processes


def test_a_node_whose_coordinator_never_comes_gives_up_at_the_start_timeout(tmp_path):
    coordinator = f"127.0.0.1:{coordinator_port()}"
    proc = subprocess.Popen(
        [LAUNCHER, "--nnodes", "2", "--node-rank", "1", "--coordinator", coordinator,
         "--host", "127.0.0.1", "--num-keys", "4", SCRIPT, "ok", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "ADAPM_START_TIMEOUT": "4"})
    out = proc.communicate(timeout=60)[0]
    assert proc.returncode != 0
    assert "the cluster did not form within 4 s" in out, out
    assert f"waiting for the coordinator at tcp://{coordinator}" in out, out


def test_two_local_nodes_given_one_port_fail_at_once(tmp_path):
    port = coordinator_port()
    started = time.monotonic()
    proc = subprocess.run([LAUNCHER, "--nodes", "2", "--port", str(port), "--num-keys", "4",
                           SCRIPT, "ok", str(tmp_path)], capture_output=True, text=True,
                          timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert time.monotonic() - started < 20, "waited for the start timeout"
    assert f"cannot listen on tcp://127.0.0.1:{port}" in out and "node 1" in out, out


@pytest.mark.parametrize("environ,expected", [
    ({}, (None, None)),
    ({"WORLD_SIZE": "3", "NODE_RANK": "1"}, (3, 1)),           # one process per machine
    ({"WORLD_SIZE": "3", "LOCAL_WORLD_SIZE": "1", "GROUP_RANK": "2"}, (3, 2)),
    ({"SLURM_NNODES": "4", "SLURM_NODEID": "3", "NODE_RANK": "0"}, (4, 3)),  # precedence
    ({"GROUP_WORLD_SIZE": "2", "WORLD_SIZE": "2", "GROUP_RANK": "1"}, (2, 1)),
])
def test_machine_placement_from_the_environment(environ, expected):
    assert machine_placement(environ) == expected


@pytest.mark.parametrize("environ,said", [
    ({"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "0"}, "LOCAL_WORLD_SIZE=4"),
    ({"SLURM_NNODES": "2", "WORLD_SIZE": "8"}, "SLURM_NNODES=2, WORLD_SIZE=8"),
    ({"GROUP_WORLD_SIZE": "2", "WORLD_SIZE": "8"}, "WORLD_SIZE counts processes"),
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not a number"),
])
def test_a_process_count_is_not_read_as_the_node_count(environ, said):
    with pytest.raises(click.UsageError, match=said):
        machine_placement(environ)


def test_launcher_refuses_a_world_size_that_counts_processes(tmp_path):
    environ = {**os.environ, "WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4",
               "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(coordinator_port())}
    proc = subprocess.run([LAUNCHER, "--num-keys", "4", SCRIPT, "ok", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, env=environ)
    assert proc.returncode == 2 and "LOCAL_WORLD_SIZE=4" in proc.stderr, proc.stderr


def test_a_node_waiting_for_a_missing_peer_says_how_many_joined_and_gives_up(tmp_path):
    """Nodes 0 and 1 of 3 start, node 2 never does: node 1 hears the coordinator all the
    time, and still reports how many of 3 joined, and gives up at the start timeout."""
    coordinator = f"127.0.0.1:{coordinator_port()}"
    environ = {**os.environ, "ADAPM_START_TIMEOUT": "7"}
    cluster_id = f"mj{uuid.uuid4().hex[:6]}"
    procs = [subprocess.Popen(
        [LAUNCHER, "--nnodes", "3", "--node-rank", str(rank), "--coordinator", coordinator,
         "--host", "127.0.0.1", "--num-keys", "6", "--cluster-id", cluster_id,
         SCRIPT, "ok", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, env=environ) for rank in (0, 1)]
    outs = [proc.communicate(timeout=60)[0] for proc in procs]
    assert all(proc.returncode != 0 for proc in procs), outs
    assert "node 1: 2 of 3 nodes have joined the coordinator" in outs[1], outs[1]
    assert "the cluster did not form within 7 s" in outs[1], outs[1]
    assert "waiting for node 2" in outs[0], outs[0]
