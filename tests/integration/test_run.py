"""adapm.run with real node-server and worker processes on one node."""
import numpy as np
import pytest

import adapm
from adapm.table.initializers import initial_values

pytestmark = pytest.mark.timeout(90)

NUM_KEYS = 500
D = 8


def push_random(w, seed, rounds, batch):
    """Push integer-valued updates to random keys (with duplicates); return the final table
    as seen by this worker after everyone finished."""
    rng = np.random.default_rng(seed + w.rank)
    for _ in range(rounds):
        keys = rng.integers(0, w.num_keys, size=batch)
        keys[: batch // 10] = keys[batch // 10: 2 * (batch // 10)]  # 10% duplicates
        w.push(keys, rng.integers(-3, 4, size=(batch, D)))
    w.wait_sync()
    w.barrier()
    return w.pull(np.arange(w.num_keys))


def expected_sums(seed, workers, rounds, batch):
    table = np.zeros((NUM_KEYS, D))
    for rank in range(workers):
        rng = np.random.default_rng(seed + rank)
        for _ in range(rounds):
            keys = rng.integers(0, NUM_KEYS, size=batch)
            keys[: batch // 10] = keys[batch // 10: 2 * (batch // 10)]
            np.add.at(table, keys, rng.integers(-3, 4, size=(batch, D)))
    return table


def test_exact_sums_with_four_workers():
    seeds, rounds, batch = 11, 60, 200
    results = adapm.run(push_random, args=(seeds, rounds, batch), workers_per_node=4,
                        num_keys=NUM_KEYS, value_length=D)
    expect = expected_sums(seeds, 4, rounds, batch)
    assert len(results) == 4
    for table in results:
        np.testing.assert_array_equal(table, expect)


def setter_and_checker(w, rounds):
    """Ranks 0-1 set whole vectors to one repeated value; ranks 2-3 check every pulled
    vector is uniform. Returns the number of torn vectors seen."""
    rng = np.random.default_rng(w.rank)
    keys = np.arange(16)
    torn = 0
    w.barrier()
    for _ in range(rounds):
        if w.rank < 2:
            fill = rng.integers(0, 1000, size=16).astype(np.float32)
            w.set(keys, np.repeat(fill[:, None], 256, axis=1))
        else:
            rows = w.pull(keys)
            torn += int((rows != rows[:, :1]).any(axis=1).sum())
    return torn


def test_no_torn_reads_between_worker_processes():
    torn = adapm.run(setter_and_checker, args=(3000,), workers_per_node=4, num_keys=16,
                     value_length=256)
    assert torn == [0, 0, 0, 0]


def per_key_task(w):
    keys = np.array([4, 1, 4])
    w.push(keys, np.ones(3 + 1 + 3))  # lengths 3, 1, 3
    w.barrier()
    return w.pull(np.arange(w.num_keys))


def test_per_key_lengths():
    lengths = np.array([1, 1, 2, 2, 3, 3])
    [flat] = adapm.run(per_key_task, num_keys=6, value_length=lengths)
    expect = np.zeros(12)
    starts = np.cumsum(lengths) - lengths
    expect[starts[4]:starts[4] + 3] = 2
    expect[starts[1]] = 1
    np.testing.assert_array_equal(flat, expect)


def precision_task(w):
    w.push([0], [[1e-12, 1.0]])
    w.push([0], [[1.0, 1e-12]])
    return w.pull([0]), w.pull([0]).dtype


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_both_dtypes(dtype):
    [(values, got_dtype)] = adapm.run(precision_task, num_keys=3, value_length=2, dtype=dtype)
    assert got_dtype == np.dtype(dtype)
    if dtype == "float64":
        assert values[0, 0] == 1.0 + 1e-12
    else:
        assert values[0, 0] == np.float32(1.0)


def pull_all(w):
    return w.pull(np.arange(w.num_keys))


def times_ten(keys):
    return np.repeat(keys.astype(float) * 10, 3)


@pytest.mark.parametrize("init", [None, "zeros", ("uniform", -1.0, 2.0, 7),
                                  ("normal", 0.5, 7), times_ten])
def test_init_schemes(init):
    [values] = adapm.run(pull_all, num_keys=300, value_length=3, init=init)
    keys = np.arange(300, dtype=np.uint64)
    expect = initial_values(init, keys, np.full(300, 3, dtype=np.uint64), "float32")
    np.testing.assert_array_equal(values.reshape(-1), expect)
    if isinstance(init, tuple) and init[0] == "uniform":
        assert values.min() >= -1.0 and values.max() < 2.0 and values.std() > 0.5
    if isinstance(init, tuple) and init[0] == "normal":
        assert abs(values.std() - 0.5) < 0.05 and abs(values.mean()) < 0.05


def test_init_same_seed_same_values_twice():
    a = adapm.run(pull_all, num_keys=50, value_length=4, init=("normal", 1.0, 3))
    b = adapm.run(pull_all, num_keys=50, value_length=4, init=("normal", 1.0, 3),
                  workers_per_node=2)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(b[0], b[1])


def bad_inputs(w):
    """Every bad input of docs/design/API.md's error table raises and changes nothing."""
    before = w.pull(np.arange(w.num_keys)).copy()
    cases = [
        lambda: w.pull([-1]),
        lambda: w.pull([w.num_keys]),
        lambda: w.pull([1.0, 2.0]),
        lambda: w.pull([[1, 2]]),
        lambda: w.pull(np.array(["a"])),
        lambda: w.push([1, -2], np.ones((2, 4))),
        lambda: w.push([1, w.num_keys], np.ones((2, 4))),
        lambda: w.push([1, 2], np.ones((2, 5))),
        lambda: w.push([1, 2], np.ones((4, 2))),
        lambda: w.push([1, 2], np.ones(7)),
        lambda: w.push([1, 2], np.array([["a"] * 4] * 2)),
        lambda: w.push([1, 2], np.ones((2, 4), dtype=complex)),
        lambda: w.set([1, 2], np.ones((3, 4))),
        lambda: w.set(np.array([0.5]), np.ones((1, 4))),
        lambda: w.push_async([1, 2], np.ones((2, 3))),
        lambda: w.pull([1], out=np.empty((1, 4), dtype=np.float64)),
        lambda: w.pull([1], out=np.empty((2, 4), dtype=np.float32)),
        lambda: w.intent([1], 5, 5),
        lambda: w.intent([1], 5, 4),
        lambda: w.intent([1], -1),
        lambda: w.intent([w.num_keys], 0),
        lambda: w.intent([1], 1.5),
    ]
    failures = []
    for i, case in enumerate(cases):
        try:
            case()
            failures.append(f"case {i} did not raise")
        except ValueError:
            pass
        except Exception as exc:
            failures.append(f"case {i} raised {type(exc).__name__}: {exc}")
    after = w.pull(np.arange(w.num_keys))
    return failures, bool((before == after).all())


def test_bad_inputs_raise_value_error_and_change_nothing():
    [(failures, unchanged)] = adapm.run(bad_inputs, num_keys=10, value_length=4,
                                        init=("uniform", 0, 1, 1))
    assert failures == []
    assert unchanged


def use_after_finalize(w):
    w.finalize()
    w.finalize()  # idempotent
    raised = []
    for call in (lambda: w.pull([1]), lambda: w.push([1], [[1.0]]), lambda: w.barrier(),
                 lambda: w.intent([1], 0), lambda: w.advance_clock(), lambda: w.stats()):
        try:
            call()
        except adapm.ClosedError:
            raised.append(True)
    return len(raised)


def test_use_after_finalize_is_closed_error():
    assert adapm.run(use_after_finalize, num_keys=4) == [6]
    assert issubclass(adapm.ClosedError, adapm.AdapmError)


def fail_on_rank_one(w):
    if w.rank == 1:
        raise RuntimeError("boom from the task")
    w.barrier()  # would wait forever for rank 1 without failure handling
    return w.rank


def test_worker_exception_becomes_worker_error():
    with pytest.raises(adapm.WorkerError) as info:
        adapm.run(fail_on_rank_one, workers_per_node=3, num_keys=4)
    assert info.value.rank == 1
    assert "boom from the task" in str(info.value)
    assert "fail_on_rank_one" in info.value.remote_traceback


def async_task(w):
    h = w.push_async([1, 2, 1], np.ones((3, 2)))
    assert h.wait() is None
    p = w.pull_async([1, 2])
    out = np.empty((2, 2), dtype=np.float32)
    w.pull([2, 1], out=out)
    return p.wait(), out


def test_async_handles_and_out_buffer():
    [(pulled, out)] = adapm.run(async_task, num_keys=4, value_length=2)
    np.testing.assert_array_equal(pulled, [[2, 2], [1, 1]])
    np.testing.assert_array_equal(out, [[1, 1], [2, 2]])


def stats_task(w):
    w.push([1, 2, 3], np.ones((3, 2)))
    w.set([1], np.ones((1, 2)))
    w.pull([1, 2])
    w.intent([1, 2, 3, 4], 2, 4)
    assert w.clock == 0
    assert w.advance_clock() == 1
    w.barrier()
    w.wait_sync()
    return w.stats()


def test_stats_count_keys():
    stats = adapm.run(stats_task, workers_per_node=2, num_keys=10, value_length=2)
    mine = stats[0]
    assert (mine["pushes_local"], mine["sets_local"], mine["pulls_local"]) == (3, 1, 2)
    assert mine["pulls_remote"] == mine["pushes_remote"] == 0
    assert mine["intents"] == 4 and mine["clock"] == 1
    assert mine["relocations"] == 0 and mine["replicas"] == 0
    # one node: all of the worker's traffic is with its own node server, on its machine
    assert mine["bytes_sent"] == 0 and mine["bytes_to_node"] > 0
    assert mine["bytes_received"] > 0
    node = stats[1]["node"]
    assert node["pushes_local"] == 6 and node["intents"] == 8
    # one node has nothing to place: intents are checked and counted, not sent
    assert node["intents_received"] == 0
    assert node["malformed_messages"] == 0


def identity_task(w, a, b=0):
    return (w.rank, w.num_workers, w.node, w.num_nodes, w.num_keys, a, b)


def test_results_in_rank_order_with_args_and_kwargs():
    results = adapm.run(identity_task, args=("x",), kwargs={"b": 2}, workers_per_node=3,
                        num_keys=7)
    assert results == [(r, 3, 0, 1, 7, "x", 2) for r in range(3)]


@pytest.mark.parametrize("kwargs", [
    {"num_keys": 0}, {"num_keys": 5, "workers_per_node": 0}, {"num_keys": 5, "mode": "nope"},
    {"num_keys": 5, "dtype": "int32"}, {"num_keys": 5, "value_length": 0},
    {"num_keys": 5, "init": ("uniform", 1)}, {"num_keys": 5, "value_length": [1, 2]},
])
def test_bad_cluster_arguments(kwargs):
    with pytest.raises(ValueError):
        adapm.run(identity_task, args=(1,), **kwargs)


# -- fn must be importable by a spawned worker (issue 12.5) -------------------------------

def _make_nested():
    def nested(w):
        return w.rank
    return nested


@pytest.mark.parametrize("fn, says", [
    (lambda w: w.rank, "lambda"),
    (_make_nested(), "local object"),
    (__import__("functools").partial(_make_nested(), 1), "functools.partial"),
])
def test_a_function_spawned_workers_cannot_import_fails_before_any_process(fn, says):
    import multiprocessing
    import time

    started = time.monotonic()
    with pytest.raises(TypeError) as caught:
        adapm.run(fn, num_keys=4)
    text = str(caught.value)
    assert says in text and "module level of a .py file" in text, text
    assert "spawn" in text, text
    assert time.monotonic() - started < 2 and not multiprocessing.active_children()


def test_a_callable_init_is_checked_too():
    with pytest.raises(TypeError, match="init .*cannot be sent"):
        adapm.run(identity_task, args=(1,), num_keys=4, init=lambda keys: keys)


SCRIPT_TOP_LEVEL = """
import adapm

def task(w, base):
    return base + w.rank

if __name__ == "__main__":
    print("results", adapm.run(task, args=(10,), workers_per_node=2, num_keys=4))
"""

SCRIPT_GUARDED = """
import adapm

if __name__ == "__main__":
    def task(w):
        return w.rank
    try:
        adapm.run(task, num_keys=4)
    except TypeError as exc:
        print("TypeError:", exc)
"""

INTERACTIVE = """
import adapm
def task(w):
    return w.rank
try:
    adapm.run(task, num_keys=4)
except TypeError as exc:
    print("TypeError:", exc)
"""


def _python(tmp_path, *args):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_a_module_level_function_of_a_script_still_works(tmp_path):
    (tmp_path / "top.py").write_text(SCRIPT_TOP_LEVEL)
    assert "results [10, 11]" in _python(tmp_path, "top.py")


def test_a_function_under_the_main_guard_or_typed_in_a_session_is_refused(tmp_path):
    (tmp_path / "guarded.py").write_text(SCRIPT_GUARDED)
    out = _python(tmp_path, "guarded.py")
    assert "TypeError:" in out and 'if __name__ == "__main__":' in out, out
    out = _python(tmp_path, "-c", INTERACTIVE)
    assert "TypeError:" in out and "interactive session" in out, out


SCRIPT_COUNTS_ITS_RUNS = """
import os
import sys

import numpy as np

import adapm

open(os.path.join(sys.argv[1], str(os.getpid())), "w").close()  # a process ran this file

def task(w):
    return float(w.pull(np.arange(4)).sum())

def fours(keys):
    return np.full(keys.shape[0], 4.0)

if __name__ == "__main__":
    init = fours if sys.argv[2] == "script-init" else None
    print("results", adapm.run(task, nodes=2, num_keys=4, init=init, summary=False))
"""


@pytest.mark.parametrize("init", ["none", "script-init"])
def test_node_servers_do_not_run_the_script_unless_its_init_is_there(tmp_path, init):
    """A spawned child runs its parent's script again (its imports: seconds with torch);
    node servers skip it, unless they need a callable the script defines."""
    (tmp_path / "counted.py").write_text(SCRIPT_COUNTS_ITS_RUNS)
    runs = tmp_path / "runs"
    runs.mkdir()
    out = _python(tmp_path, "counted.py", str(runs), init)
    assert ("results [0.0, 0.0]" if init == "none" else "results [16.0, 16.0]") in out
    # the launching process, its 2 workers, and the 2 node servers only for the init
    assert len(list(runs.iterdir())) == 1 + 2 + (2 if init == "script-init" else 0)
