import os
import time

import pytest

from adapm.process import adapm_processes


def adapm_segments():
    return sorted(f for f in os.listdir("/dev/shm") if f.startswith("adapm-"))


def wait_until_clean(before_segments=(), before_processes=(), timeout=10.0):
    """Leftover (segments, processes) after up to `timeout` seconds of grace."""
    deadline = time.monotonic() + timeout
    while True:
        segments = set(adapm_segments()) - set(before_segments)
        processes = set(adapm_processes()) - set(before_processes)
        if (not segments and not processes) or time.monotonic() > deadline:
            return segments, processes
        time.sleep(0.05)


@pytest.fixture(autouse=True)
def no_leftovers():
    """Every test must leave no AdaPM process and no /dev/shm segment behind."""
    segments, processes = adapm_segments(), adapm_processes()
    yield
    left_segments, left_processes = wait_until_clean(segments, processes)
    for pid, _ in left_processes:  # do not let one failure cascade into the next tests
        try:
            os.kill(pid, 9)
        except OSError:
            pass
    assert not left_segments, f"shared-memory segments left behind: {left_segments}"
    assert not left_processes, f"processes left behind: {left_processes}"
