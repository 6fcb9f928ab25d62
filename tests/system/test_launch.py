"""adapm-launch on this machine: real launcher, node server and worker processes."""
import os
import signal
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
from testpaths import TESTS

from conftest import wait_until_clean

pytestmark = pytest.mark.timeout(90)

SCRIPT = str(TESTS / "launch_script.py")


# The console script that `pip install` made, beside this interpreter.
LAUNCHER = str(Path(sys.executable).with_name("adapm-launch"))


def launch(*args):
    return subprocess.Popen([LAUNCHER, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def test_runs_script_in_every_worker_with_prefixed_output(tmp_path):
    proc = launch("--workers-per-node", "3", "--num-keys", "5", "--value-length", "2",
                  SCRIPT, "ok", str(tmp_path))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    for rank in range(3):
        assert f"[n0 w{rank}] rank {rank} of 3 sees 30" in out
    # the summary table: 3 workers pushed 5 keys and pulled 5 keys twice, all local
    assert "statistics (keys) of node(s) 0" in out
    header, row = out.split("statistics (keys)")[1].splitlines()[1:3]
    assert header.split()[:3] == ["node", "local", "%"] and row.split()[:2] == ["0", "100.0"]


def test_failing_worker_sets_exit_code_and_stops_everyone(tmp_path):
    proc = launch("--workers-per-node", "2", "--num-keys", "5", "--value-length", "2",
                  SCRIPT, "fail", str(tmp_path))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 5, out
    assert "[n0 w1] failing on purpose" in out
    assert "worker 1 failed with exit code 5" in out
    segments, processes = wait_until_clean()
    assert not segments and not processes


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_the_cluster(tmp_path, sig):
    proc = launch("--workers-per-node", "2", "--num-keys", "5", "--value-length", "2",
                  SCRIPT, "wait", str(tmp_path))
    deadline = time.monotonic() + 30
    while len(list(tmp_path.glob("ready*"))) < 2:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 128 + sig, out
    segments, processes = wait_until_clean()
    assert not segments and not processes


@pytest.mark.parametrize("args, message", [
    (["--num-keys", "0", "x.py"], "num_keys must be >= 1"),
    (["--num-keys", "5", "--init", "gauss:1", "x.py"], "use zeros, uniform"),
    (["--num-keys", "5"], "give a SCRIPT"),
    (["--num-keys", "5", "--optimizer", "lbfgs", "x.py"], "use one of sgd, adagrad"),
    (["--num-keys", "5", "--optimizer", "adagrad", "--value-length", "7", "x.py"],
     "value_length 7 does not hold rows"),
    (["--num-keys", "5", "--optimizer", "adam:lr=-1", "--value-length", "6", "x.py"],
     "lr must be >= 0"),
])
def test_bad_options_are_usage_errors(args, message):
    proc = launch(*args)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2 and message in out, out


def test_optimizer_init_fills_rows_and_starts_the_state(tmp_path):
    """--init with --optimizer: the rows are --init's (as that init gives rows of dim),
    Adagrad's accumulators start at 0, never noise (which gave NaN rows before)."""
    script = tmp_path / "check.py"
    script.write_text(
        "import numpy as np, adapm\n"
        "from adapm.table.initializers import initial_values\n"
        "with adapm.worker() as w:\n"
        "    values = w.pull(np.arange(w.num_keys))\n"
        "    rows = initial_values(('normal', 0.5, 3), np.arange(w.num_keys),\n"
        "                          np.full(w.num_keys, 4), np.float64).reshape(-1, 4)\n"
        "    assert np.allclose(values[:, :4], rows, atol=1e-6), values\n"
        "    assert (values[:, 4:] == 0).all(), values\n"
        "    print('state ok', w.rank)\n")
    proc = launch("--nodes", "2", "--num-keys", "20", "--value-length", "8",
                  "--optimizer", "adagrad", "--init", "normal:0.5:3", str(script))
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert out.count("state ok") == 2, out


# -- launcher input (issue 17, point 7) ---------------------------------------------

def refused(*args, env=None, timeout=30):
    """Run the launcher with bad input: it must stop at once with a usage error (exit
    code 2) and no traceback; returns its output."""
    environ = dict(os.environ, **(env or {}))
    proc = subprocess.run([LAUNCHER, *args],
                          capture_output=True, text=True, env=environ, timeout=timeout)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "Traceback" not in out, out
    return out


PER_MACHINE = ("--nnodes", "2", "--node-rank", "1", "--num-keys", "4")


@pytest.mark.parametrize("args, env, message", [
    # ZeroMQ took these modulo 65536: 70000 listened on 4464, 131073 on 1
    (["--port", "70000"], {}, "'--port': 70000 is not a port (0 .. 65535)"),
    (["--port", "131073"], {}, "'--port': 131073 is not a port (0 .. 65535)"),
    (["--port", "-1"], {}, "'--port': -1 is not a port (0 .. 65535)"),
    (["--port", "http"], {}, "'--port': 'http' is not a port (a number 0 .. 65535)"),
    (["--port", "0-10"], {}, "'--port': 0-10: a range LOW-HIGH needs 1 <= LOW <= HIGH <= 65535"),
    (["--port", "20-10"], {}, "'--port': 20-10: a range LOW-HIGH needs 1 <= LOW"),
    (["--port", "60000-70000"], {}, "'--port': 60000-70000: a range LOW-HIGH needs"),
    (["--metrics-port", "70000"], {}, "'--metrics-port': 70000 is not a port (0 .. 65535)"),
    ([], {"ADAPM_METRICS_PORT": "70000"},
     "'--metrics-port': 70000 is not a port (0 .. 65535) (from ADAPM_METRICS_PORT)"),
    (["--nodes", "2", "--metrics-port", "65535"], {},
     "--metrics-port: metrics port 65535 + 1 (node 1 of this machine) is not a port"),
    (["--dist-port", "70000"], {}, "'--dist-port': 70000 is not a port (1 .. 65535)"),
    ([], {"ADAPM_DIST_PORT": "99999"},
     "'--dist-port': 99999 is not a port (1 .. 65535) (from ADAPM_DIST_PORT)"),
    ([*PER_MACHINE, "--coordinator", "127.0.0.1:70000"], {},
     "--coordinator 127.0.0.1:70000: 70000 is not a port (1 .. 65535)"),
    ([*PER_MACHINE, "--coordinator", "127.0.0.1:0"], {},
     "--coordinator 127.0.0.1:0: 0 is not a port (1 .. 65535)"),
    ([*PER_MACHINE, "--coordinator", "127.0.0.1:x"], {},
     "--coordinator 127.0.0.1:x: 'x' is not a port (a number 1 .. 65535)"),
    ([*PER_MACHINE], {"ADAPM_COORDINATOR": "127.0.0.1:65536"},
     "ADAPM_COORDINATOR=127.0.0.1:65536: 65536 is not a port (1 .. 65535)"),
    ([*PER_MACHINE], {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "131073"},
     "MASTER_PORT=131073: 131073 is not a port (1 .. 65535)"),
])
def test_ports_out_of_range_are_usage_errors(args, env, message):
    if "node 1 of this machine" in message and find_spec("prometheus_client") is None:
        pytest.skip("the node's metrics port is checked once prometheus_client is there")
    args = args if "--num-keys" in args else [*args, "--num-keys", "4"]
    assert message in refused(*args, "x.py", env=env)


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:70000", "tcp://127.0.0.1:0-10",
                                     "tcp://127.0.0.1:10-5", "tcp://127.0.0.1:5-65536"])
def test_coordinator_bind_address_refuses_ports_out_of_range(address):
    import zmq

    from adapm.node.control.coordinator import bind_address
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:
        with pytest.raises(OSError, match=f"cannot listen on {address}: .*65535"):
            bind_address(sock, address)
    finally:
        sock.close(linger=0)
        ctx.term()


COORDINATOR = ("--coordinator", "127.0.0.1:29999")


@pytest.mark.parametrize("args, env, message", [
    (["--nodes", "0"], {}, "'--nodes': 0 is not in the range x>=1"),  # ran one node
    (["--nodes", "-2"], {}, "'--nodes': -2 is not in the range x>=1"),
    (["--nnodes", "0", "--node-rank", "0", *COORDINATOR], {},
     "'--nnodes': 0 is not in the range x>=1"),
    (["--workers-per-node", "0"], {}, "'--workers-per-node': 0 is not in the range x>=1"),
    (["--workers-per-node", "-1"], {}, "'--workers-per-node': -1 is not in the range x>=1"),
    (["--nnodes", "2", "--node-rank", "-1", *COORDINATOR], {},
     "'--node-rank': -1 is not in the range x>=0"),
    (["--nnodes", "2", "--node-rank", "2", *COORDINATOR], {}, "--node-rank 2 outside 0..1"),
    # each of these ran a local cluster of one node, ignoring what was asked
    (["--node-rank", "1", *COORDINATOR], {},
     "--node-rank 1 needs the number of nodes: --nnodes"),
    (["--nnodes", "2", *COORDINATOR], {}, "--nnodes 2 needs this machine's --node-rank"),
    (["--nodes", "2", "--node-rank", "1"], {},
     "--nodes runs every node on this machine: drop --nnodes and --node-rank"),
    (["--node-rank", "0", *COORDINATOR], {"SLURM_NNODES": "0"},
     "SLURM_NNODES=0: a cluster has at least one node"),
])
def test_node_counts_and_ranks_out_of_range_are_usage_errors(args, env, message):
    assert message in refused(*args, "--num-keys", "4", "x.py", env=env)


@pytest.mark.parametrize("cluster_id", ["a/b", "", "x" * 65, "job 1", "día", "a\\b"])
def test_bad_cluster_id_is_a_usage_error_that_says_what_is_allowed(cluster_id):
    """A "/" in the id made the node server fail with ZeroMQ's "Invalid parameter(s)"."""
    out = refused("--nnodes", "2", "--node-rank", "1", *COORDINATOR, "--cluster-id",
                  cluster_id, "--num-keys", "4", "x.py")
    assert f"'--cluster-id': {cluster_id!r} is not a cluster id: 1 to 64 letters, digits, " \
           "_ or -" in out, out


def test_cluster_spec_refuses_a_bad_cluster_id():
    from adapm.wire.spec import ClusterSpec
    with pytest.raises(ValueError, match="is not a cluster id: 1 to 64 letters"):
        ClusterSpec(num_keys=4, cluster_id="../x")
    assert ClusterSpec(num_keys=4, cluster_id="job-7_a").cluster_id == "job-7_a"
