"""A worker's update of keys that became local while it looked elsewhere is applied
exactly once, also when part of it has to be retried (regression: a retry used to apply
the whole update again, doubling the part that had succeeded)."""
import os

import numpy as np
import pytest

from adapm.client.miss_path import MissPath
from adapm.table.shared_table import OWNED, SharedTable, segment_name

pytestmark = pytest.mark.timeout(30)


class OnceBusyView:
    """A real table view whose first update finds one key in the middle of a state
    change (a miss, not applied), as the kernel reports it; later calls are normal."""

    def __init__(self, view, busy_key):
        self.view, self.busy_key, self.calls = view, busy_key, 0
        self.uniform_length = view.uniform_length
        self.dtype, self.num_keys = view.dtype, view.num_keys

    def owners_of(self, keys, out):
        self.view.owners_of(keys, out)

    def states_of(self, keys, out):
        self.view.states_of(keys, out)

    def update(self, keys, values, misses, additive, owned_only=False):
        self.calls += 1
        if self.calls > 1:
            return self.view.update(keys, values, misses, additive, owned_only)
        ok = keys != self.busy_key
        d = self.uniform_length
        rest = np.ascontiguousarray(values.reshape(-1, d)[ok].reshape(-1))
        self.view.update(keys[ok], rest, np.empty(int(ok.sum()), np.uint64), additive)
        misses[:1] = np.flatnonzero(~ok)[:1]
        return int((~ok).sum())


def retrying(view):
    """The miss path of worker 0 on node 0 of two, over `view` (no requests in flight)."""
    return MissPath(view, requests=None, consistency=None, count=None, lock_error=None,
                    node=0, rank=0, num_nodes=2)


def test_a_partly_retried_push_is_applied_exactly_once():
    name = segment_name(f"r{os.getpid()}", 0)
    table = SharedTable.create(name, 10, 2, "float32", 1)
    try:
        table.install(np.arange(10, dtype=np.uint64), OWNED)
        table.publish()
        worker = retrying(OnceBusyView(table.view, busy_key=4))
        keys = np.array([2, 4, 7], dtype=np.uint64)
        away, _ = worker._local_retry(keys, np.ones(6, dtype=np.float32), "push")
        assert away.shape[0] == 0
        out = np.empty(20, dtype=np.float32)
        table.view.pull(np.arange(10, dtype=np.uint64), out, np.empty(10, np.uint64))
        expected = np.zeros((10, 2), dtype=np.float32)
        expected[[2, 4, 7]] = 1
        np.testing.assert_array_equal(out.reshape(10, 2), expected)
        assert worker._view.calls == 2
    finally:
        table.unlink()
        table.close()


class MovedOnView(OnceBusyView):
    """One key is gone for good (it moved on to node 1 meanwhile): every look misses it,
    and the location cache names its new owner."""

    def __init__(self, view, gone_key):
        super().__init__(view, gone_key)
        view._directory_array()["owner"][gone_key] = 1

    def _without_gone(self, keys, values, misses, op):
        ok = keys != self.busy_key
        d = self.uniform_length
        part = np.empty(int(ok.sum()) * d, dtype=values.dtype)
        if op == "update":
            part[:] = values.reshape(-1, d)[ok].reshape(-1)
            self.view.update(keys[ok], part, np.empty(int(ok.sum()), np.uint64), True)
        else:
            self.view.pull(keys[ok], part, np.empty(int(ok.sum()), np.uint64))
            values.reshape(-1, d)[ok] = part.reshape(-1, d)
        gone = np.flatnonzero(~ok)
        misses[:gone.shape[0]] = gone
        return gone.shape[0]

    def update(self, keys, values, misses, additive, owned_only=False):
        self.calls += 1
        return self._without_gone(keys, values, misses, "update")

    def pull(self, keys, values, misses, owned_only=False):
        self.calls += 1
        return self._without_gone(keys, values, misses, "pull")


@pytest.mark.parametrize("what", ["push", "pull"])
def test_a_key_that_moved_on_during_the_retry_is_handed_back_for_its_new_owner(what):
    """Regression: the retry used to spin on such a key for a second and then raise
    ClusterError; now the caller sends it to the node the location cache names."""
    name = segment_name(f"m{os.getpid()}{what}", 0)
    table = SharedTable.create(name, 10, 2, "float32", 1)
    try:
        values = np.arange(20, dtype=np.float32)
        table.install(np.arange(10, dtype=np.uint64), OWNED, values)
        table.publish()
        worker = retrying(MovedOnView(table.view, gone_key=4))
        keys = np.array([2, 4, 7], dtype=np.uint64)
        buf = np.ones(6, dtype=np.float32) if what == "push" else np.zeros(6, np.float32)
        away, dests = worker._local_retry(keys, buf, what)
        assert away.tolist() == [1] and dests.tolist() == [1]  # key 4, to node 1
        out = np.empty(20, dtype=np.float32)
        table.view.pull(np.arange(10, dtype=np.uint64), out, np.empty(10, np.uint64))
        if what == "push":  # the others applied once, key 4 not at all (it is elsewhere)
            expected = values.copy().reshape(10, 2)
            expected[[2, 7]] += 1
            np.testing.assert_array_equal(out.reshape(10, 2), expected)
        else:  # the others read
            np.testing.assert_array_equal(buf.reshape(3, 2)[[0, 2]],
                                          values.reshape(10, 2)[[2, 7]])
        assert worker._view.calls == 1  # no second look: it was handed back at once
    finally:
        table.unlink()
        table.close()
