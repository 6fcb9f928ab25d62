"""The suite's leftover check (conftest) touches only what this pytest session started:
a training job that runs beside `pytest` must survive it, while a test's own leftovers
are still found and removed."""
import os
import subprocess
import sys
import time

import posix_ipc
import pytest
from testpaths import TESTS

from adapm.common.config import new_cluster_id
from adapm.common.process import adapm_processes, descends_from, parent_of
from adapm.table.shared_table import ENV_CLUSTER_TAG, segment_name, unlink_segment

from conftest import (
    SESSION_TAG,
    remove_leftovers,
    session_processes,
    session_segments,
    wait_until_clean,
)

pytestmark = pytest.mark.timeout(90)

SCRIPT = str(TESTS / "cluster_script.py")

# Runs a command, writes its pid to PID, its output to OUT and its exit code to RC once it
# ends. With DETACH=1 it first leaves this process tree (fork, new session, parent exits),
# as a job that someone started in another terminal would be.
WRAPPER = """
import os, subprocess, sys
pid, out, rc, detach, cmd = *sys.argv[1:4], sys.argv[4] == "1", sys.argv[5:]
if detach:
    if os.fork():
        os._exit(0)
    os.setsid()
with open(out, "w") as f:
    job = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    with open(pid + ".tmp", "w") as p:
        p.write(str(job.pid))
    os.rename(pid + ".tmp", pid)
    code = job.wait()
with open(rc + ".tmp", "w") as f:
    f.write(str(code))
os.rename(rc + ".tmp", rc)
"""


def children_of(pid):
    """The AdaPM processes (pid, name) that `pid` started: a cluster's servers and workers."""
    return {(child, name) for child, name in adapm_processes() if parent_of(child) == pid}


def make_segment(monkeypatch, tag):
    """A segment as a cluster started under `tag` (None: untagged) names it; its name."""
    with monkeypatch.context() as env:
        if tag is None:
            env.delenv(ENV_CLUSTER_TAG, raising=False)
        else:
            env.setenv(ENV_CLUSTER_TAG, tag)
        name = segment_name(new_cluster_id(), 0)
    posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=4096).close_fd()
    return name.lstrip("/")


class Job:
    """A training job (cluster_script.py hold) started under cluster tag `tag` (None: no
    tag), in this process tree or (detach) outside it, that holds until released."""

    def __init__(self, workdir, detach, tag):
        self.dir = workdir
        self.dir.mkdir()
        env = {k: v for k, v in os.environ.items() if k != ENV_CLUSTER_TAG}
        if tag:
            env[ENV_CLUSTER_TAG] = tag
        self.files = {name: self.dir / name for name in ("pid", "out", "rc")}
        wrapper = subprocess.Popen(
            [sys.executable, "-c", WRAPPER, *map(str, self.files.values()),
             "1" if detach else "0", sys.executable, SCRIPT, "hold", str(self.dir)], env=env)
        if detach:
            wrapper.wait(timeout=10)  # the job itself lives on, outside this process tree

    def wait_ready(self, timeout=30):
        """The job's node server and workers, once both workers are in their task."""
        deadline = time.monotonic() + timeout
        while len(list(self.dir.glob("ready*"))) < 2:
            assert not self.files["rc"].exists(), self.output()
            assert time.monotonic() < deadline, "the job's workers did not start"
            time.sleep(0.05)
        return children_of(int(self.files["pid"].read_text()))

    def finish(self, timeout=30):
        """Release the job; its (exit code, output), or (None, output) if it hangs."""
        (self.dir / "release").touch()
        deadline = time.monotonic() + timeout
        while not self.files["rc"].exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if not self.files["rc"].exists():
            return None, self.output()
        return int(self.files["rc"].read_text()), self.output()

    def output(self):
        return self.files["out"].read_text() if self.files["out"].exists() else ""


def start_own_cluster(workdir):
    """A cluster of this session's, stuck in its task: (the script's process, its node
    server and workers)."""
    workdir.mkdir()
    proc = subprocess.Popen([sys.executable, SCRIPT, "wait", str(workdir)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while len(list(workdir.glob("ready*"))) < 2:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "own workers did not start"
        time.sleep(0.05)
    return proc, children_of(proc.pid)


@pytest.mark.parametrize("detach, tag", [(True, None), (False, "someone_else")],
                         ids=["untagged-job-elsewhere", "other-tag-below-pytest"])
def test_leftover_check_spares_an_unrelated_cluster(tmp_path, monkeypatch, detach, tag):
    """Take the fixture's snapshot, start an unrelated job (and a segment of its) and a
    cluster and segment of our own that are still there when the test ends, then run the
    fixture's check and removal: only ours are reported and removed; the job finishes
    with its right result, and its segment stays."""
    before = session_segments(), session_processes()
    outsider = Job(tmp_path / "outsider", detach, tag)
    outsider_segment = make_segment(monkeypatch, tag)
    own = None
    try:
        outsider_processes = outsider.wait_ready()
        assert len(outsider_processes) == 3
        own, own_processes = start_own_cluster(tmp_path / "own")
        own_segment = make_segment(monkeypatch, SESSION_TAG)

        segments, processes = wait_until_clean(*before, timeout=1.0)
        assert (segments, processes) == ({own_segment}, own_processes)
        remove_leftovers(segments, processes)
        own.communicate(timeout=30)
        assert wait_until_clean(*before) == (set(), set())
        assert outsider_processes <= set(adapm_processes())
        assert os.path.exists(f"/dev/shm/{outsider_segment}")
    finally:
        if own is not None and own.poll() is None:
            own.terminate()  # adapm.run stops its cluster
            own.communicate(timeout=30)
        code, out = outsider.finish()
        unlink_segment("/" + outsider_segment)
    assert code == 0, out
    assert "results [4.0, 4.0]" in out, out


def test_leftover_check_finds_and_removes_own_leftovers(tmp_path, monkeypatch):
    """A cluster of this session's that left pytest's process tree (re-parented, as after
    its launcher's parent died) and a segment nobody unlinked are this session's
    leftovers: the check reports them, and removal kills them and unlinks the segment."""
    before = session_segments(), session_processes()
    job = Job(tmp_path / "job", detach=True, tag=SESSION_TAG)
    try:
        job_processes = job.wait_ready()
        assert not any(descends_from(pid, os.getpid()) for pid, _ in job_processes)
        own_segment = make_segment(monkeypatch, SESSION_TAG)

        segments, processes = wait_until_clean(*before, timeout=1.0)
        assert (segments, processes) == ({own_segment}, job_processes)
        remove_leftovers(segments, processes)
        assert wait_until_clean(*before) == (set(), set())
        assert not os.path.exists(f"/dev/shm/{own_segment}")
    finally:
        code, out = job.finish()
    assert code == 3 and "Error" in out, out  # its cluster died under it
