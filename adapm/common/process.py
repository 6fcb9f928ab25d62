"""Process hygiene shared by every AdaPM process: die with the parent, predictable signals."""

import ctypes
import os
import signal
import sys
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_NAME = 15
PROCESS_PREFIX = "adapm-"  # every process AdaPM starts is named so (see /proc/PID/comm)


def _libc():
    return ctypes.CDLL(None, use_errno=True)


def set_process_name(name):
    """Name this process (Linux comm, 15 characters) so that ps and tests can find it."""
    if sys.platform.startswith("linux"):
        try:
            _libc().prctl(_PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)
        except (OSError, AttributeError):
            pass


def adapm_processes():
    """(pid, name) of every live process on this machine named by set_process_name."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{entry}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if name.startswith(PROCESS_PREFIX) and state != "Z":
            found.append((int(entry), name))
    return found


def parent_of(pid):
    """The parent pid of process `pid`, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def sibling_named(name):
    """The pid of the live process `name` (set_process_name) that shares this process's
    parent: under adapm.run, a worker finds its cluster's node servers and other workers
    so, and never another cluster's (tests that stall or kill one)."""
    parent = os.getppid()
    for pid, found in adapm_processes():
        if found == name and parent_of(pid) == parent:
            return pid
    raise LookupError(f"no process {name} beside process {os.getpid()}")


def descends_from(pid, ancestor):
    """Whether `ancestor` started `pid`, directly or through other processes (that are
    still alive: a process whose parent died was re-parented and descends from it no more)."""
    seen = set()
    while pid not in (None, 0, 1) and pid not in seen:  # seen: a pid reused mid-walk
        if pid == ancestor:
            return True
        seen.add(pid)
        pid = parent_of(pid)
    return False


def environ_value(pid, name):
    """The value of environment variable `name` in the environment process `pid` started
    with (later changes are not seen), or None: not set, not our process, or gone."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return None
    prefix = name.encode() + b"="
    for entry in entries:
        if entry.startswith(prefix):
            return entry[len(prefix):].decode(errors="replace")
    return None


def die_with_parent(parent, sig=signal.SIGTERM):
    """Ask Linux to send `sig` to this process when its parent exits (even by SIGKILL),
    so that no node server or worker outlives the process that started it. `parent` is
    the pid of the process that started this one, as that process knows it: if it died
    before this call, getppid() already names another process and we stop now."""
    if not sys.platform.startswith("linux"):
        return
    try:
        _libc().prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


def own_process_group():
    """Lead a process group of one's own, so that stop_process also reaches whatever
    this process starts (a training script's helpers), not only the process itself."""
    try:
        os.setpgid(0, 0)
    except OSError:
        pass


def stop_process(proc, grace=3.0, group=False):
    """SIGTERM, wait `grace` seconds, then SIGKILL. Works for multiprocessing.Process and
    subprocess.Popen. With `group`, the signals go to the process group the process
    leads (see own_process_group), and the group is SIGKILLed at the end in any case, so
    that nothing it started survives. Returns the exit code (None: not reaped)."""
    if _exitcode(proc) is None:
        _signal(proc, signal.SIGTERM, group)
        join_process(proc, grace)
    if _exitcode(proc) is None:
        _signal(proc, signal.SIGKILL, group)
        join_process(proc, grace)
    if group:
        _signal(proc, signal.SIGKILL, group)
    return _exitcode(proc)


def stop_processes(procs, grace=3.0, group=False):
    """stop_process for many at once: SIGTERM to all of them first, then up to `grace`
    seconds for all, then SIGKILL. One at a time, the first one's death reached the
    others before their SIGTERM did: a DDP worker whose peer vanished mid-allreduce
    printed gloo's 20-line traceback on every Ctrl-C."""
    procs = list(procs)
    for proc in procs:
        if _exitcode(proc) is None:
            _signal(proc, signal.SIGTERM, group)
    deadline = time.monotonic() + grace
    for proc in procs:
        join_process(proc, deadline - time.monotonic())
    for proc in procs:
        stop_process(proc, grace=grace, group=group)  # SIGKILL what is left


def _signal(proc, sig, group):
    try:
        if group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _exitcode(proc):
    if hasattr(proc, "exitcode"):
        return proc.exitcode
    return proc.poll()


def join_process(proc, timeout):
    """Wait up to `timeout` seconds for a multiprocessing.Process or subprocess.Popen."""
    if timeout <= 0:
        return
    if hasattr(proc, "join"):
        proc.join(timeout)
    else:
        try:
            proc.wait(timeout)
        except Exception:  # subprocess.TimeoutExpired
            pass
