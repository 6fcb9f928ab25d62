"""Log lines (issue 12.4) and the workers' OMP_NUM_THREADS (issue 12.5): the level from
ADAPM_LOG_LEVEL, adapm.run(log_level=...) and adapm-launch --log-level reaches node
servers and workers, every line says who wrote it, the cluster-up line says how long
forming took; every worker gets OMP_NUM_THREADS=1 unless it was set, said once."""
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from testpaths import TESTS

import adapm
from adapm.common import logs

pytestmark = pytest.mark.timeout(120)

LAUNCHER = str(Path(sys.executable).with_name("adapm-launch"))
SCRIPT = str(TESTS / "launch_script.py")
TIME = r"\d\d:\d\d:\d\d\.\d{3}"
OMP_NOTICE = "OMP_NUM_THREADS=1 for every worker"


def worker_view(w):
    """What a worker sees: its environment as it was when the process started (what
    torch or a BLAS loaded at import time read) and now."""
    with open("/proc/self/environ", "rb") as f:
        at_start = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    return {"start": at_start.get(b"OMP_NUM_THREADS", b"").decode() or None,
            "now": os.environ.get("OMP_NUM_THREADS"),
            "level": os.environ.get("ADAPM_LOG_LEVEL")}


def adapm_lines(text):
    """The lines written by AdaPM's loggers (TIME LEVEL adapm.PART: ...)."""
    return [line for line in text.splitlines()
            if re.search(rf"{TIME} [A-Z]+ adapm\.[a-z_.]+: ", line)]


def test_run_debug_reaches_servers_and_workers_with_their_prefixes(capfd, monkeypatch):
    monkeypatch.setenv("ADAPM_LOG_LEVEL", "ERROR")  # the keyword wins over the variable
    views = adapm.run(worker_view, nodes=2, workers_per_node=1, num_keys=6,
                      log_level="debug")
    assert [view["level"] for view in views] == ["DEBUG", "DEBUG"]
    err = capfd.readouterr().err
    assert re.search(rf"^\[node 0\] {TIME} INFO adapm\.server: cluster up: 2 nodes x 1 worker "
                     r"formed in \d+\.\d s$", err, re.M), err
    assert re.search(rf"^\[node 1\] {TIME} DEBUG adapm\.server: joined the cluster", err,
                     re.M), err
    for node, rank in ((0, 0), (1, 1)):
        assert re.search(rf"^\[node {node} worker {rank}\] {TIME} DEBUG adapm\.worker: "
                         rf"attached to node {node} at tcp://", err, re.M), err
        assert re.search(rf"^\[node {node}\] {TIME} INFO adapm\.server: 1 worker attached "
                         r"\d+\.\d s after the cluster formed", err, re.M), err
    assert re.search(rf"^\[node 0\] {TIME} INFO adapm\.server: every worker finished: "
                     "shutting down", err, re.M), err
    lines = adapm_lines(err)
    assert lines and all(re.match(r"\[node \d+( worker \d+)?\] ", line) for line in lines), err


def test_run_level_from_the_environment_and_the_default(capfd, monkeypatch):
    monkeypatch.setenv("ADAPM_LOG_LEVEL", "warning")
    views = adapm.run(worker_view, workers_per_node=1, num_keys=4)
    assert views[0]["level"] == "WARNING"
    err = capfd.readouterr().err
    assert not adapm_lines(err), err  # nothing went wrong: no line at all
    monkeypatch.delenv("ADAPM_LOG_LEVEL")
    views = adapm.run(worker_view, workers_per_node=1, num_keys=4)
    assert views[0]["level"] == logs.DEFAULT_LEVEL == "INFO"
    err = capfd.readouterr().err
    assert "cluster up: 1 node x 1 worker formed in" in err, err
    assert " DEBUG " not in err, err


def test_a_bad_level_fails_before_anything_starts(monkeypatch):
    with pytest.raises(ValueError, match="use one of DEBUG, INFO"):
        adapm.run(worker_view, num_keys=4, log_level="loud")
    monkeypatch.setenv("ADAPM_LOG_LEVEL", "loud")
    with pytest.raises(ValueError, match="ADAPM_LOG_LEVEL"):
        adapm.run(worker_view, num_keys=4)


def launch(tmp_path, *args, env=None):
    proc = subprocess.run([LAUNCHER, *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=90, env=env)
    return proc.returncode, proc.stdout + proc.stderr


def test_launch_log_level_reaches_servers_and_workers_with_their_prefixes(tmp_path):
    env = {**os.environ, "ADAPM_LOG_LEVEL": "ERROR"}  # the option wins over the variable
    code, out = launch(tmp_path, "--log-level", "debug", "--workers-per-node", "2",
                       "--num-keys", "5", "--value-length", "2", SCRIPT, "ok", str(tmp_path),
                       env=env)
    assert code == 0, out
    assert re.search(rf"^\[node 0\] {TIME} INFO adapm\.server: cluster up: 1 node x 2 workers "
                     r"formed in \d+\.\d s$", out, re.M), out
    assert re.search(rf"^\[node 0\] {TIME} DEBUG adapm\.coordinator: ", out, re.M), out
    for rank in (0, 1):
        # the same line as under adapm.run: not prefixed a second time by the launcher
        assert re.search(rf"^\[node 0 worker {rank}\] {TIME} DEBUG adapm\.worker: attached to "
                         "node 0", out, re.M), out
        assert f"[n0 w{rank}] rank {rank} of 2 sees 20" in out, out  # the script's own output
    lines = adapm_lines(out)
    assert lines and all(re.match(r"\[node \d+( worker \d+)?\] ", line) for line in lines), out


def test_launch_level_from_the_environment(tmp_path):
    code, out = launch(tmp_path, "--num-keys", "4", "--value-length", "2", SCRIPT, "ok",
                       str(tmp_path), env={**os.environ, "ADAPM_LOG_LEVEL": "debug"})
    assert code == 0, out
    assert re.search(rf"^\[node 0 worker 0\] {TIME} DEBUG adapm\.worker: attached", out,
                     re.M), out
    code, out = launch(tmp_path, "--log-level", "LOUD", "--num-keys", "4", SCRIPT, "ok",
                       str(tmp_path))
    assert code == 2 and "--log-level" in out, out


def test_omp_num_threads_is_one_in_every_worker_said_once(capfd, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("ADAPM_LOG_LEVEL", raising=False)
    views = adapm.run(worker_view, workers_per_node=2, num_keys=4)
    # set from the process's first instruction: before fn's module (torch) was imported
    assert [(v["start"], v["now"]) for v in views] == [("1", "1"), ("1", "1")]
    assert "OMP_NUM_THREADS" not in os.environ  # the launching process's is left alone
    assert capfd.readouterr().err.count(OMP_NOTICE) == 1
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    views = adapm.run(worker_view, workers_per_node=2, num_keys=4)
    assert [(v["start"], v["now"]) for v in views] == [("3", "3"), ("3", "3")]
    assert OMP_NOTICE not in capfd.readouterr().err


def test_the_omp_notice_follows_the_log_level(capfd, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    views = adapm.run(worker_view, num_keys=4, log_level="ERROR")
    assert views[0]["now"] == "1"
    assert OMP_NOTICE not in capfd.readouterr().err


OMP_SCRIPT = """
import os
import adapm
with adapm.worker() as w:
    print(f"rank {w.rank} OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
"""


@pytest.mark.parametrize("preset", [None, "2"])
def test_launch_sets_omp_num_threads_unless_set(tmp_path, preset):
    script = tmp_path / "omp.py"
    script.write_text(OMP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if preset:
        env["OMP_NUM_THREADS"] = preset
    code, out = launch(tmp_path, "--workers-per-node", "2", "--num-keys", "4", str(script),
                       env=env)
    assert code == 0, out
    for rank in (0, 1):
        assert f"[n0 w{rank}] rank {rank} OMP_NUM_THREADS={preset or 1}" in out, out
    assert out.count(OMP_NOTICE) == (0 if preset else 1), out


def test_configure_prefixes_every_line_of_a_traceback(capfd):
    logger = logging.getLogger("adapm.test_logs")
    saved = logging.getLogger("adapm").handlers[:], logging.getLogger("adapm").propagate
    try:
        logs.configure("INFO", logs.worker_prefix(2, 5))
        logger.debug("not shown")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("failed")
        logs.configure("INFO", logs.worker_prefix(2, 5))  # replaces, does not add a handler
        logger.info("once")
    finally:
        root = logging.getLogger("adapm")
        root.handlers[:] = saved[0]
        root.propagate = saved[1]
        root.setLevel(logging.NOTSET)
    err = capfd.readouterr().err
    lines = err.splitlines()
    assert "not shown" not in err and err.count("once") == 1, err
    assert len(lines) > 3 and all(line.startswith("[node 2 worker 5] ") for line in lines), err
    assert re.match(rf"\[node 2 worker 5\] {TIME} ERROR adapm\.test_logs: failed$", lines[0])


def _busy_for(w, seconds):
    """Pushes and pulls across both nodes, with barriers and a localize, for `seconds`."""
    import numpy as np
    rng = np.random.default_rng(w.rank)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        keys = rng.integers(0, w.num_keys, size=200)
        w.intent(keys, w.clock, w.clock + 2)
        w.push(keys, np.ones((200, 1), dtype=np.float32))
        w.pull(keys)
        w.advance_clock()
    w.localize(np.arange(w.rank, 20, 2))
    w.barrier()
    return True


def test_debug_shows_what_each_node_does_while_it_runs(capfd):
    """Issue 17, point 11: `--log-level debug` added only 8 lines to a whole run. Now each
    node server says every 2 s what it did (accesses, rounds, relocations, replicas,
    bytes, with rates), and each barrier, save phase and localize."""
    adapm.run(_busy_for, args=(5.0,), nodes=2, num_keys=1000, log_level="debug",
              summary=False)
    err = capfd.readouterr().err
    for node in (0, 1):
        activity = re.findall(rf"^\[node {node}\] {TIME} DEBUG adapm\.activity: last "
                              r"\d+\.\d s: ([\d,]+) keys accessed \([\d.]+% local, "
                              r"[\d,]+/s\); [\d,]+ rounds", err, re.M)
        assert len(activity) >= 1, err
        assert any(int(n.replace(",", "")) > 0 for n in activity), activity
        assert re.search(rf"^\[node {node}\] {TIME} DEBUG adapm\.server: node {node}: every "
                         r"node reached barrier\(\) number 1", err, re.M), err
        assert re.search(rf"^\[node {node}\] {TIME} DEBUG adapm\.relocation: node {node}: "
                         r"worker \d asks to localize 10 keys", err, re.M), err
    assert re.search(r"DEBUG adapm\.coordinator: coordinator: every node reached barrier",
                     err), err


def test_an_interval_without_activity_says_nothing():
    from adapm.node.control.activity import describe
    quiet = dict.fromkeys(["pulls_local", "pulls_remote", "pushes_local", "pushes_remote",
                           "sets_local", "sets_remote", "bytes_sent", "bytes_received",
                           "node_bytes_sent", "node_bytes_received", "node_rounds_done"], 0)
    assert describe(quiet, 2.0, 5) == ""
    busy = dict(quiet, pulls_local=90, pulls_remote=10, node_rounds_done=4,
                node_relocations=3, node_replicas_made=2, node_replicas_dropped=1,
                node_late_intents=0, node_malformed_messages=0)
    line = describe(busy, 2.0, 5)
    assert "100 keys accessed (90.0% local, 50/s); 4 rounds (2/s), 3 keys relocated" in line
