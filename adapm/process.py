"""Process hygiene shared by every AdaPM process: die with the parent, predictable signals."""

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig=signal.SIGTERM):
    """Ask Linux to send `sig` to this process when its parent exits (even by SIGKILL),
    so that no node server or worker outlives the process that started it."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), sig)


def stop_process(proc, grace=3.0):
    """SIGTERM, wait `grace` seconds, then SIGKILL. Works for multiprocessing.Process and
    subprocess.Popen. Returns the exit code (or None when it could not be reaped)."""
    if _exitcode(proc) is None:
        try:
            proc.terminate()
        except (ProcessLookupError, OSError):
            pass
        _join(proc, grace)
    if _exitcode(proc) is None:
        try:
            proc.kill()
        except (ProcessLookupError, OSError):
            pass
        _join(proc, grace)
    return _exitcode(proc)


def _exitcode(proc):
    if hasattr(proc, "exitcode"):
        return proc.exitcode
    return proc.poll()


def _join(proc, timeout):
    if hasattr(proc, "join"):
        proc.join(timeout)
    else:
        try:
            proc.wait(timeout)
        except Exception:  # subprocess.TimeoutExpired
            pass
