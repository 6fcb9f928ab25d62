"""adapm-launch on this machine: real launcher, node server and worker processes."""
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import wait_until_clean

pytestmark = pytest.mark.timeout(90)

SCRIPT = str(Path(__file__).with_name("launch_script.py"))


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
        "from adapm.initializers import initial_values\n"
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
