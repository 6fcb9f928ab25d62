"""A worker's update of keys that became local while it looked elsewhere is applied
exactly once, also when part of it has to be retried (regression: a retry used to apply
the whole update again, doubling the part that had succeeded)."""
import os

import numpy as np
import pytest

from adapm.table import OWNED, SharedTable, segment_name
from adapm.worker import Worker

pytestmark = pytest.mark.timeout(30)


class OnceBusyView:
    """A real table view whose first update finds one key in the middle of a state
    change (a miss, not applied), as the kernel reports it; later calls are normal."""

    def __init__(self, view, busy_key):
        self.view, self.busy_key, self.calls = view, busy_key, 0
        self.uniform_length = view.uniform_length

    def update(self, keys, values, misses, additive):
        self.calls += 1
        if self.calls > 1:
            return self.view.update(keys, values, misses, additive)
        ok = keys != self.busy_key
        d = self.uniform_length
        rest = np.ascontiguousarray(values.reshape(-1, d)[ok].reshape(-1))
        self.view.update(keys[ok], rest, np.empty(int(ok.sum()), np.uint64), additive)
        misses[:1] = np.flatnonzero(~ok)[:1]
        return int((~ok).sum())


class RetryingWorker:
    _local_retry = Worker._local_retry
    node, rank = 0, 0


def test_a_partly_retried_push_is_applied_exactly_once():
    name = segment_name(f"r{os.getpid()}", 0)
    table = SharedTable.create(name, 10, 2, "float32", 1)
    try:
        table.install(np.arange(10, dtype=np.uint64), OWNED)
        table.publish()
        worker = RetryingWorker()
        worker._view = OnceBusyView(table.view, busy_key=4)
        keys = np.array([2, 4, 7], dtype=np.uint64)
        worker._local_retry(keys, np.ones(6, dtype=np.float32), "push")
        out = np.empty(20, dtype=np.float32)
        table.view.pull(np.arange(10, dtype=np.uint64), out, np.empty(10, np.uint64))
        expected = np.zeros((10, 2), dtype=np.float32)
        expected[[2, 4, 7]] = 1
        np.testing.assert_array_equal(out.reshape(10, 2), expected)
        assert worker._view.calls == 2
    finally:
        table.unlink()
        table.close()
