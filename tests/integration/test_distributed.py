"""Dense layers on torch.distributed beside sparse rows in AdaPM: every worker started by
adapm.run or adapm-launch joins a group of all the cluster's workers with
torch.distributed.init_process_group("gloo") and no other argument."""
import json
import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
from testpaths import TESTS

import adapm
import adapm.ops.runner
from adapm.ops.cluster import LocalCluster

from conftest import coordinator_port

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.timeout(150)

HERE = TESTS
SCRIPT = str(HERE / "launch_script.py")
LAUNCHER = str(Path(sys.executable).with_name("adapm-launch"))
NUM_KEYS, DIM, LR, STEPS = 20, 2, 0.1, 4
DIST_ENV = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
            "LOCAL_WORLD_SIZE", "ADAPM_SERVER")


def ddp_task(w, steps=STEPS):
    """Train a small dense model under DistributedDataParallel on this worker's own data,
    its input partly rows of the parameter server (pulled, and updated by w.push with
    their gradient). Also run by tests/launch_script.py (mode ddp) under adapm-launch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    env = os.environ
    per_node = int(env["ADAPM_WORKERS_PER_NODE"])
    assert env["RANK"] == str(w.rank)
    assert env["WORLD_SIZE"] == str(w.num_workers)
    assert env["LOCAL_RANK"] == str(w.rank % per_node)
    assert env["LOCAL_WORLD_SIZE"] == str(per_node)
    assert env["MASTER_PORT"] != env["ADAPM_SERVER"].rpartition(":")[2]
    assert "TORCHELASTIC_USE_AGENT_STORE" not in env
    dist.init_process_group("gloo")  # no other argument: all from the environment
    try:
        total = torch.tensor([w.rank + 1.0])
        dist.all_reduce(total)
        assert total.item() == w.num_workers * (w.num_workers + 1) / 2, total
        torch.manual_seed(100 + w.rank)  # different weights: DDP starts all from rank 0's
        dense = torch.nn.Sequential(torch.nn.Linear(2 * DIM, 8), torch.nn.Tanh(),
                                    torch.nn.Linear(8, 1))
        model = DistributedDataParallel(dense)
        initial = torch.nn.utils.parameters_to_vector(dense.parameters()).detach().clone()
        opt = torch.optim.SGD(model.parameters(), lr=LR)
        data = torch.Generator().manual_seed(w.rank)  # different data per worker

        w.wait_sync()
        w.barrier()
        before = w.pull(np.arange(w.num_keys))
        w.barrier()  # everyone read `before` before anyone pushes
        pushed = np.zeros(before.shape)
        for _ in range(steps):
            keys = torch.randint(0, w.num_keys, (8,), generator=data).numpy()
            rows = torch.tensor(w.pull(keys), requires_grad=True)
            features = torch.randn(8, DIM, generator=data)
            target = torch.randn(8, 1, generator=data)
            loss = (model(torch.cat([rows, features], 1)) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()  # DDP averages the dense gradients over all workers
            opt.step()
            delta = (-LR * rows.grad).numpy()
            w.push(keys, delta)
            np.add.at(pushed, keys, delta)
        w.wait_sync()
        w.barrier()
        after = w.pull(np.arange(w.num_keys))
        final = torch.nn.utils.parameters_to_vector(dense.parameters()).detach()
        return {"env": {name: env[name] for name in DIST_ENV}, "initial": initial.numpy(),
                "final": final.numpy(), "before": before, "after": after, "pushed": pushed}
    finally:
        dist.destroy_process_group()


def check_training(results):
    """Every worker ends with the same dense weights, changed from the common start; the
    sparse rows agree everywhere and hold every worker's pushes."""
    initial, final = results[0]["initial"], results[0]["final"]
    assert not np.allclose(final, initial)
    for result in results:
        np.testing.assert_array_equal(result["initial"], initial)
        np.testing.assert_allclose(result["final"], final, rtol=0, atol=1e-6)
    before = results[0]["before"]
    expected = before + sum(result["pushed"] for result in results)
    assert np.abs(expected - before).max() > 1e-4  # the rows did change
    for result in results:
        np.testing.assert_array_equal(result["before"], before)
        np.testing.assert_allclose(result["after"], expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(result["after"], results[0]["after"], rtol=0, atol=1e-6)


def port_of(address):
    return int(address.rpartition(":")[2])


def assert_clean():
    from conftest import wait_until_clean
    segments, processes = wait_until_clean(timeout=15)
    assert not segments and not processes, (segments, processes)


def test_run_workers_join_one_group_and_train_with_ddp(monkeypatch):
    clusters = []

    class Recorded(LocalCluster):
        def start(self):
            super().start()
            clusters.append(self)
            return self

    monkeypatch.setattr(adapm.ops.runner, "LocalCluster", Recorded)
    # A launcher that torchrun started: it must not make init_process_group a client only.
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    results = adapm.run(ddp_task, nodes=2, workers_per_node=2, num_keys=NUM_KEYS,
                        value_length=DIM, init=("normal", 0.5, 0))
    [cluster] = clusters
    envs = [result["env"] for result in results]
    assert [env["LOCAL_RANK"] for env in envs] == ["0", "1", "0", "1"]
    assert {(env["MASTER_ADDR"], env["MASTER_PORT"]) for env in envs} == {
        ("127.0.0.1", str(cluster.dist_port))}
    taken = {port_of(cluster.coordinator), *map(port_of, cluster.addresses.values())}
    assert len(taken) == 3 and cluster.dist_port not in taken, (cluster.dist_port, taken)
    check_training(results)


def test_launch_across_two_launchers_with_master_port_in_their_environment(tmp_path):
    """torchrun-like: each launcher reads the coordinator from MASTER_ADDR/MASTER_PORT and
    the node count from WORLD_SIZE; the workers get MASTER_PORT + 1 and WORLD_SIZE 4."""
    coordinator = coordinator_port()
    cluster_id = f"dd{uuid.uuid4().hex[:6]}"
    procs = []
    for rank in (0, 1):
        environ = {**os.environ, "MASTER_ADDR": "127.0.0.1",
                   "MASTER_PORT": str(coordinator), "WORLD_SIZE": "2",
                   "NODE_RANK": str(rank)}
        environ.pop("ADAPM_DIST_PORT", None)
        procs.append(subprocess.Popen(
            [LAUNCHER, "--workers-per-node", "2", "--num-keys", str(NUM_KEYS),
             "--value-length", str(DIM), "--cluster-id", cluster_id,
             SCRIPT, "ddp", str(tmp_path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=environ))
    outs = [proc.communicate(timeout=120)[0] for proc in procs]
    for proc, out in zip(procs, outs):
        assert proc.returncode == 0, out
    found = dict(re.findall(r"\] rank (\d) ddp (\{.*\})$", "\n".join(outs), re.MULTILINE))
    assert sorted(found) == ["0", "1", "2", "3"], outs
    results = [{key: value if key == "env" else np.array(value)
                for key, value in json.loads(found[str(rank)]).items()} for rank in range(4)]
    for result in results:
        assert result["env"]["MASTER_ADDR"] == "127.0.0.1"
        assert result["env"]["MASTER_PORT"] == str(coordinator + 1)
        assert result["env"]["WORLD_SIZE"] == "4"
    check_training(results)
    assert_clean()


@pytest.mark.parametrize("how", ["option", "environment", "coordinator + 1"])
def test_a_taken_dist_port_is_a_clear_error_before_workers_start(tmp_path, how):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        environ = {**os.environ}
        environ.pop("ADAPM_DIST_PORT", None)
        args = ["--num-keys", "4"]
        if how == "option":
            args += ["--dist-port", str(port)]
        elif how == "environment":
            environ["ADAPM_DIST_PORT"] = str(port)
        else:
            args += ["--nnodes", "1", "--node-rank", "0", "--coordinator",
                     f"127.0.0.1:{port - 1}"]
        proc = subprocess.run([LAUNCHER, *args, SCRIPT, "ok", str(tmp_path)], env=environ,
                              capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert f"cannot listen on port {port} for torch.distributed" in out, out
    assert "--dist-port" in out and "ADAPM_DIST_PORT" in out, out
    assert "[n0 w0]" not in out, out  # no worker started
    assert_clean()


def test_dist_port_must_not_be_the_coordinators(tmp_path):
    port = coordinator_port()
    proc = subprocess.run([LAUNCHER, "--num-keys", "4", "--nnodes", "1", "--node-rank", "0",
                           "--coordinator", f"127.0.0.1:{port}", "--dist-port", str(port),
                           SCRIPT, "ok", str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "is the coordinator's port" in proc.stderr, proc.stderr
