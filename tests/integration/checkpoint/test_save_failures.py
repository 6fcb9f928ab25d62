"""Checkpoints under attack (Worker.save, adapm.checkpoint, restore): consistency in every
mode, keys saved exactly once, interrupted and mismatched saves that must fail loudly
instead of hanging, corruption found on restore, and malformed CHECKPOINT messages.
test_save_restore.py has the saves and restores that go well.

These came from an adversarial review: each failed before its fix and says which claim
it attacks."""
import contextlib
import glob
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq
from testpaths import TESTS

import adapm
import adapm.checkpoint as checkpoint
from adapm.checkpoint import CheckpointError
from adapm.common.errors import FAIL_REJECTED, AdapmError, ClosedError
from adapm.common.process import sibling_named
from adapm.ops.cluster import LocalCluster
from adapm.optim import Adagrad
from adapm.wire import protocol
from adapm.wire.protocol import Message, MsgType, worker_identity
from adapm.wire.spec import ClusterSpec

pytestmark = pytest.mark.timeout(120)

NUM_KEYS = 300



def _data_dirs(path):
    return sorted(d for d in os.listdir(path) if d.startswith("v-"))


# -- claim 1 and 2: consistent in every mode, every key exactly once ---------------------

def _count_pushes(w, path, saves, ragged):
    """Every worker adds 1 to each value of random keys (intents: keys relocate and
    replicate) between saves; returns its own additions per key (per value: ragged keys
    get 1 on each of their values), and what the save returned."""
    rng = np.random.default_rng(w.rank + 5)
    added, manifests = [], []
    lengths = 1 + np.arange(NUM_KEYS) % 3 if ragged else np.ones(NUM_KEYS, dtype=np.int64)
    for _ in range(saves):
        mine = np.zeros(NUM_KEYS)
        for _ in range(25):
            keys = rng.integers(0, NUM_KEYS, 40)
            w.intent(np.unique(keys), w.clock, w.clock + 2)
            w.advance_clock()
            if ragged:
                w.push(keys, np.ones(int(lengths[keys].sum()), dtype=np.float32))
            else:
                w.push(keys, np.ones((keys.shape[0], 1), dtype=np.float32))
            np.add.at(mine, keys, 1.0)
        manifests.append(w.save(path))
        added.append(mine)
    return added, manifests[-1]["data"], w.stats()["relocations"]


def _check_parts_partition_the_keys(path):
    """Claim 2: the parts' keys are disjoint and together every key once."""
    saved = checkpoint.Checkpoint(path)
    every = np.concatenate([keys for _, keys, _ in saved.parts()])
    assert np.array_equal(np.sort(every), np.arange(NUM_KEYS, dtype=np.uint64))


@pytest.mark.parametrize("mode", ["relocate_only", "replicate_all"])
def test_saves_are_exact_in_the_other_modes(tmp_path, mode):
    path = str(tmp_path / mode)
    results = adapm.run(_count_pushes, args=(path, 2, False), nodes=2, workers_per_node=2,
                        num_keys=NUM_KEYS, mode=mode)
    expected = sum(np.sum(added, axis=0) for added, _, _ in results)
    _, values = checkpoint.load(path)
    assert np.array_equal(values[:, 0], expected)
    assert len({data for _, data, _ in results}) == 1
    assert _data_dirs(path) == [results[0][1]]
    _check_parts_partition_the_keys(path)
    if mode == "relocate_only":
        assert sum(relocated for _, _, relocated in results) > 0


def test_ragged_saves_while_keys_relocate_are_exact_and_restore_bit_for_bit(tmp_path):
    path = str(tmp_path / "ragged")
    lengths = 1 + np.arange(NUM_KEYS) % 3
    results = adapm.run(_count_pushes, args=(path, 2, True), nodes=2, workers_per_node=2,
                        num_keys=NUM_KEYS, value_length=lengths)
    assert sum(relocated for _, _, relocated in results) > 0
    per_key = sum(np.sum(added, axis=0) for added, _, _ in results)
    _, values = checkpoint.load(path)
    assert np.array_equal(values, np.repeat(per_key, lengths).astype(np.float32))
    _check_parts_partition_the_keys(path)
    [pulled] = adapm.run(_pull_all, nodes=1, restore=path)
    assert pulled.tobytes() == values.tobytes()
    pulled = adapm.run(_pull_all, nodes=3, restore=path)
    assert all(p.tobytes() == values.tobytes() for p in pulled)


def _pull_all(w):
    return w.pull(np.arange(w.num_keys))


def _gather_on_node_0_then_save(w, path):
    """Every key relocated to node 0: node 1's part holds no key at all."""
    if w.node == 0:
        w.localize(np.arange(w.num_keys))
    w.barrier()
    keys = np.arange(w.rank, w.num_keys, w.num_workers)
    w.set(keys, keys.astype(np.float32)[:, None] * 2)
    manifest = w.save(path)
    return [part["num_keys"] for part in manifest["parts"]]


def test_a_node_that_owns_no_key_saves_an_empty_part(tmp_path):
    path = str(tmp_path / "empty-part")
    counts = adapm.run(_gather_on_node_0_then_save, args=(path,), nodes=2,
                       num_keys=NUM_KEYS, mode="relocate_only")
    assert counts[0] == [NUM_KEYS, 0]
    _, values = checkpoint.load(path)
    assert np.array_equal(values[:, 0], np.arange(NUM_KEYS, dtype=np.float32) * 2)
    pulled = adapm.run(_pull_all, nodes=2, restore=path)
    assert all(np.array_equal(p[:, 0], values[:, 0]) for p in pulled)


# -- claim 4: corruption, incl. what only the node servers find ---------------------------

def _save_keys(w, path):
    keys = np.arange(w.rank, w.num_keys, w.num_workers)
    w.set(keys, keys.astype(np.float32)[:, None] + 0.5)
    w.save(path)


def _damage(filename, how):
    raw = bytearray(filename.read_bytes())
    if how == "flipped":
        raw[-3] ^= 0x10
        filename.write_bytes(bytes(raw))
    elif how == "truncated":
        filename.write_bytes(bytes(raw[:-8]))
    else:
        filename.unlink()


@pytest.mark.parametrize("how", ["flipped", "truncated", "missing"])
def test_a_damaged_part_found_by_the_node_servers_names_the_file(tmp_path, how):
    path = str(tmp_path / "ck")
    adapm.run(_save_keys, args=(path,), nodes=2, num_keys=NUM_KEYS)
    part = checkpoint.read_manifest(path)["parts"][1]["values"]
    _damage(tmp_path / "ck" / part, how)
    # the manifest is fine (run() reads only it first): the servers find the damage
    with pytest.raises(AdapmError) as caught:
        adapm.run(_pull_all, nodes=2, restore=path)
    assert os.path.basename(part) in str(caught.value)
    assert ("missing" if how == "missing" else "corrupt") in str(caught.value)


LAUNCHER = os.path.join(os.path.dirname(sys.executable), "adapm-launch")
SCRIPT = str(TESTS / "checkpoint_script.py")


def test_launch_restore_of_a_corrupt_part_fails_naming_the_file(tmp_path):
    path = str(tmp_path / "ck")
    adapm.run(_save_keys, args=(path,), nodes=2, num_keys=NUM_KEYS)
    part = checkpoint.read_manifest(path)["parts"][0]["keys"]
    _damage(tmp_path / "ck" / part, "flipped")
    shown = subprocess.run([LAUNCHER, "--nodes", "2", "--restore", path, SCRIPT, "show",
                            path], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=90, cwd=tmp_path)
    assert shown.returncode != 0, shown.stdout
    assert "corrupt" in shown.stdout and os.path.basename(part) in shown.stdout, shown.stdout
    assert "total" not in shown.stdout  # no worker ran on damaged values


def _ragged_checkpoint(make_table, path):
    """A one-node checkpoint of 6 keys of lengths 1, 2, 3, 1, 2, 3; returns its data
    folder."""
    lengths = np.array([1, 2, 3, 1, 2, 3], dtype=np.uint32)
    flat = np.arange(int(lengths.sum()), dtype=np.float64)
    table = make_table(6, lengths, dtype="float64", values=flat)
    data = "v-0000000000000002-000001"
    checkpoint.write_node_part(str(path), data, table.view, 0, lengths=lengths)
    checkpoint.write_worker_state(str(path), data, 0, 0)
    checkpoint.commit(str(path), data, {
        "num_keys": 6, "dtype": "float64", "value_length": None, "mode": "adaptive",
        "nodes": 1, "workers_per_node": 1})
    return path / data


def test_corrupt_per_key_lengths_are_detected(make_table, tmp_path):
    """lengths.npy says how the flat values split into keys: its CRC is in the manifest
    and checked whenever it is read (before the fix none covered it, and a changed
    length that keeps the total loaded other values silently)."""
    folder = _ragged_checkpoint(make_table, tmp_path)
    np.save(folder / "lengths.npy", np.array([2, 1, 3, 1, 2, 3], dtype=np.uint32))
    with pytest.raises(CheckpointError, match="lengths"):
        checkpoint.load(tmp_path, keys=[0])  # key 0 would come back as [0.0, 1.0]


@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_a_damaged_lengths_file_is_a_checkpoint_error_naming_it(make_table, tmp_path, how):
    """A truncated or missing lengths.npy is a CheckpointError naming it (before the fix:
    a bare ValueError or FileNotFoundError from np.load)."""
    folder = _ragged_checkpoint(make_table, tmp_path)
    if how == "truncated":
        raw = (folder / "lengths.npy").read_bytes()
        (folder / "lengths.npy").write_bytes(raw[:-6])
    else:
        (folder / "lengths.npy").unlink()
    with pytest.raises(CheckpointError, match="lengths.npy"):
        checkpoint.table_shape(str(tmp_path), None, None, None, None)


def _ragged_save(w, path):
    keys = np.arange(w.rank, w.num_keys, w.num_workers)
    w.set(keys, np.repeat(keys.astype(np.float32), 1 + keys % 3))
    w.save(path)


def _pull_everything(w):
    return w.pull(np.arange(w.num_keys))


def test_a_restore_refuses_changed_per_key_lengths(tmp_path):
    """Through real clusters: lengths rewritten with the same total (values would shift
    from key to key) stop the restore with an error naming the file."""
    path = str(tmp_path / "ragged")
    adapm.run(_ragged_save, args=(path,), nodes=2, num_keys=30,
              value_length=1 + np.arange(30) % 3)
    [lengths_file] = glob.glob(os.path.join(path, "v-*", "lengths.npy"))
    lengths = np.load(lengths_file)
    np.save(lengths_file, np.roll(lengths, 1))  # same total, other split
    with pytest.raises(CheckpointError, match="lengths.npy: corrupt"):
        adapm.run(_pull_everything, nodes=3, restore=path)


# -- claim 6: workers that disagree must get errors, never a hang -------------------------

def _save_or_barrier(w, path):
    """Worker 0 saves; worker 1 calls barrier() twice (a bug in the training script)."""
    if w.rank == 0:
        w.save(path)
    else:
        w.barrier()
        w.barrier()


@pytest.mark.timeout(60)
def test_save_while_another_worker_calls_barrier_is_an_error_not_a_hang(tmp_path):
    """save()'s phases are barriers of their own: worker 1's barrier() cannot complete
    them, and the node reports the split instead of waiting for ever (before the fix,
    save() began with a plain barrier() that worker 1's completed: both then hung)."""
    with pytest.raises(AdapmError, match="different collective calls"):
        adapm.run(_save_or_barrier, args=(str(tmp_path / "ck"),), nodes=1,
                  workers_per_node=2, num_keys=NUM_KEYS)


def _save_or_barrier_across_nodes(w, path):
    if w.node == 0:
        w.save(path)
    else:
        w.barrier()
        w.barrier()


@pytest.mark.timeout(60)
def test_save_on_one_node_and_barrier_on_the_other_is_an_error_not_a_hang(tmp_path):
    """Across nodes the coordinator sees every node waiting, in different barriers."""
    with pytest.raises(AdapmError, match="different collective calls"):
        adapm.run(_save_or_barrier_across_nodes, args=(str(tmp_path / "ck"),), nodes=2,
                  num_keys=NUM_KEYS)


def _one_bad_optimizer_then_leave(w, path):
    """Worker 1 names an optimizer whose layout the table's values (length 3) cannot
    hold: its save raises (after the FREEZE phase), it gives up and leaves. Worker 0 must
    then not wait for it for ever."""
    if w.rank == 1:
        try:
            w.save(path, optimizer=Adagrad(lr=0.1))  # 2 * dim values: 3 is no layout
        except (ValueError, AdapmError) as exc:
            time.sleep(1.0)  # worker 0 is in the WRITTEN phase by now; then leave
            return f"refused: {exc}"
        return "saved"
    w.save(path)
    return "saved"


@pytest.mark.timeout(60)
def test_a_worker_leaving_in_the_middle_of_a_save_fails_the_others(tmp_path):
    """A worker that leaves while the others of its node wait in a checkpoint phase
    fails the cluster, as it does during a barrier (before the fix: a hang)."""
    try:
        results = adapm.run(_one_bad_optimizer_then_leave, args=(str(tmp_path / "ck"),),
                            nodes=1, workers_per_node=2, num_keys=NUM_KEYS, value_length=3)
    except AdapmError:
        return  # a clear error: fine
    assert results[0] != "saved", results  # a save without worker 1's state is no save


def _bad_optimizer_then_go_on(w, path):
    """Every worker names an optimizer the table's layout does not fit; the save must
    fail (it cannot be written) and training must go on."""
    keys = np.arange(w.rank, w.num_keys, w.num_workers)
    w.set(keys, np.ones((keys.shape[0], 3), dtype=np.float32))
    try:
        w.save(path, optimizer=Adagrad(lr=0.1))
    except (ValueError, AdapmError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    else:
        error = None
    w.intent(np.arange(w.num_keys), w.clock, w.clock + 5)  # replicas want sync rounds
    w.push(keys, np.ones((keys.shape[0], 3), dtype=np.float32))
    w.wait_sync()   # needs a sync round: a node left frozen never starts one
    w.save(path)
    return error


@pytest.mark.timeout(60)
def test_a_save_refused_for_its_optimizer_leaves_the_cluster_running(tmp_path):
    """An optimizer that does not fit the table is refused before the save begins, and
    whatever fails after FREEZE still goes through every phase: the cluster thaws and
    sync rounds run again (before the fix, wait_sync hung on a frozen node)."""
    path = str(tmp_path / "ck")
    errors = adapm.run(_bad_optimizer_then_go_on, args=(path,), nodes=2, num_keys=NUM_KEYS,
                       value_length=3)
    assert all(error for error in errors)
    _, values = checkpoint.load(path)
    assert np.array_equal(values, np.full((NUM_KEYS, 3), 2.0, dtype=np.float32))


def _save_with_different_paths(w, base):
    try:
        w.save(os.path.join(base, f"ck{w.rank}"))
    except CheckpointError as exc:
        error = str(exc)
    else:
        error = None
    w.push(np.array([w.rank]), np.ones((1, 1), dtype=np.float32))
    w.save(os.path.join(base, "same"))  # the cluster goes on
    return error


def test_saves_to_different_paths_fail_in_every_worker(tmp_path):
    errors = adapm.run(_save_with_different_paths, args=(str(tmp_path),), nodes=2,
                       workers_per_node=2, num_keys=NUM_KEYS)
    assert all(errors), errors
    assert not os.path.exists(tmp_path / "ck0" / "manifest.json")
    _, values = checkpoint.load(tmp_path / "same")
    assert values[:4, 0].tolist() == [1.0] * 4


def _leave_early_or_save(w, path):
    if w.rank == 1:
        return "left"  # adapm.run finalizes it
    time.sleep(0.5)
    w.save(path)
    return "saved"


@pytest.mark.parametrize("nodes", [1, 2])
def test_save_after_another_worker_finalized_is_an_error(tmp_path, nodes):
    with pytest.raises(AdapmError, match="finalized"):
        adapm.run(_leave_early_or_save, args=(str(tmp_path / "ck"),), nodes=nodes,
                  workers_per_node=3 - nodes, num_keys=NUM_KEYS)
    assert not os.path.exists(tmp_path / "ck" / "manifest.json")


def _save_after_finalize(w, path):
    w.finalize()
    try:
        w.save(path)
    except ClosedError as exc:
        return str(exc)
    return None


def test_save_after_finalize_is_a_clear_error(tmp_path):
    [error] = adapm.run(_save_after_finalize, args=(str(tmp_path / "ck"),), num_keys=10)
    assert error and "finalized" in error


# -- claim 3: interrupted saves: a full disk, a killed worker, a stopped node server ------

def _limit_file_size(limit):
    """This process: files may not grow past `limit` bytes (a full disk, as the writer
    sees it: EFBIG instead of ENOSPC; SIGXFSZ ignored so that the write fails)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    return hard


def _unlimit_file_size(hard):
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))


def _full_disk_on_node_1(w, path):
    keys = np.arange(w.rank, w.num_keys, w.num_workers)
    w.set(keys, np.repeat(keys.astype(np.float32)[:, None], 16, axis=1))
    w.save(path)
    w.set(keys, -np.ones((keys.shape[0], 16), dtype=np.float32))
    hard = _limit_file_size(4096) if w.node == 1 else None  # its values: 150 x 64 bytes
    try:
        w.save(path)
    except CheckpointError as exc:
        error = str(exc)
    else:
        error = None
    finally:
        if hard is not None:
            _unlimit_file_size(hard)
    w.barrier()
    kept = checkpoint.load(path)[1].copy() if w.rank == 0 else None
    w.barrier()
    w.push(keys, np.ones((keys.shape[0], 16), dtype=np.float32))
    w.save(path)
    return error, kept


def test_a_full_disk_on_one_node_fails_the_save_everywhere_and_keeps_the_previous(tmp_path):
    path = str(tmp_path / "ck")
    results = adapm.run(_full_disk_on_node_1, args=(path,), nodes=2, num_keys=NUM_KEYS,
                        value_length=16)
    assert all(error for error, _ in results), results
    kept = results[0][1]
    first = np.repeat(np.arange(NUM_KEYS, dtype=np.float32)[:, None], 16, axis=1)
    assert np.array_equal(kept, first)
    _, values = checkpoint.load(path)
    assert np.array_equal(values, np.zeros((NUM_KEYS, 16), dtype=np.float32))
    assert sorted(os.listdir(path)) == sorted(["manifest.json",
                                               checkpoint.read_manifest(path)["data"]])


def _commit_on_a_full_disk(w, path):
    """Worker 0's commit finds the disk full while it writes manifest.json."""
    w.save(path)
    if w.rank == 0:
        real = checkpoint.commit

        def commit_on_full_disk(*args, **kwargs):
            hard = _limit_file_size(64)  # the parts are written: only the manifest is left
            try:
                return real(*args, **kwargs)
            finally:
                _unlimit_file_size(hard)
        checkpoint.commit = commit_on_full_disk
    try:
        w.save(path)
    except CheckpointError as exc:
        return str(exc)
    return None


def test_a_commit_cut_short_by_a_full_disk_leaves_nothing_behind(tmp_path):
    """write_json leaves its temporary file when the write fails: for manifest.json that
    is PATH/manifest.json.tmpPID, which no later save removes (remove_stale takes only
    v-... folders), taking room on a disk that is full already."""
    path = str(tmp_path / "ck")
    errors = adapm.run(_commit_on_a_full_disk, args=(path,), nodes=2, num_keys=NUM_KEYS)
    assert all(errors), errors
    checkpoint.load(path)  # the first save, whole
    assert not glob.glob(os.path.join(path, "manifest.json.tmp*")), os.listdir(path)


def _save_then_watch(w, path, watch):
    keys = np.arange(w.rank, w.num_keys, w.num_workers)
    w.set(keys, keys.astype(np.float32)[:, None])
    w.save(path)
    w.set(keys, -np.ones((keys.shape[0], 1), dtype=np.float32))
    if w.rank == 0:
        threading.Thread(target=watch, args=(path,), daemon=True).start()
    w.save(path)  # node 1 stalls while writing (failpoint); `watch` strikes then
    return "saved"


def _when_node_1_writes(path):
    deadline = time.monotonic() + 60
    while not glob.glob(os.path.join(path, "v-*-000002", "node-00001.values.npy.tmp*")):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _stop_node_1_server(path):
    if _when_node_1_writes(path):
        os.kill(sibling_named("adapm-node1"), signal.SIGSTOP)  # for good: teardown SIGKILLs it


def _kill_node_1_writer(path):
    if _when_node_1_writes(path):
        os.kill(sibling_named("adapm-w1"), signal.SIGKILL)  # the worker only; its server lives


@pytest.mark.parametrize("strike", [_stop_node_1_server, _kill_node_1_writer],
                         ids=["server-sigstopped", "writer-killed"])
def test_a_save_interrupted_mid_write_fails_loudly_and_keeps_the_previous(tmp_path,
                                                                          monkeypatch,
                                                                          strike):
    path = str(tmp_path / "ck")
    monkeypatch.setenv("ADAPM_FAILPOINTS", "1:stall_save=2@3")
    started = time.monotonic()
    with pytest.raises(AdapmError):
        adapm.run(_save_then_watch, args=(path, strike), nodes=2, num_keys=NUM_KEYS)
    assert time.monotonic() - started < 60
    monkeypatch.delenv("ADAPM_FAILPOINTS")
    _, values = checkpoint.load(path)
    assert np.array_equal(values[:, 0], np.arange(NUM_KEYS, dtype=np.float32))


# -- claim 5: malformed CHECKPOINT (and BARRIER) messages from a raw socket ---------------

class _RawWorker:
    """Worker 1 (of node 0, or of node 1), played by a bare DEALER socket: it says hello
    with the cluster's token, then sends whatever frames a test wants."""

    def __init__(self, ctx, address, token, node):
        self.token = token
        self.node = node
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, worker_identity(1, token))
        self.sock.connect(address)
        self.request = 0
        reply = self.ask(MsgType.HELLO, count=os.getpid())
        assert reply.type == MsgType.WELCOME

    def send(self, mtype, **fields):
        self.request += 1
        self.sock.send_multipart(Message(mtype, src_node=self.node, src_worker=1,
                                         request_id=self.request, token=self.token,
                                         **fields).encode())
        return self.request

    def ask(self, mtype, timeout=10.0, **fields):
        request = self.send(mtype, **fields)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.sock.poll(100):
                reply = protocol.decode(self.sock.recv_multipart())
                if reply.request_id == request:
                    return reply
        return None


@contextlib.contextmanager
def _raw_cluster(nodes):
    """Worker 0 (a real Worker, in this process) on node 0, and worker 1 (a raw socket):
    on node 0 too (nodes=1), or alone on node 1 (nodes=2)."""
    spec = ClusterSpec(num_keys=40, value_length=2, num_nodes=nodes,
                       workers_per_node=3 - nodes)
    with LocalCluster(spec) as cluster:
        w = adapm.Worker(cluster.worker_env(0))
        ctx = zmq.Context()
        try:
            yield w, _RawWorker(ctx, cluster.addresses[nodes - 1], w._view.cluster_token,
                                nodes - 1)
        finally:
            ctx.destroy(linger=0)
            w.finalize()


@pytest.fixture
def raw_cluster():
    with _raw_cluster(1) as both:
        yield both


BAD_CHECKPOINTS = [(0, 1), (-1, 1), (1 << 40, 1), (1, 0), (1, 5), (1, -1), (-5, 1 << 62)]


def test_malformed_checkpoint_messages_are_rejected(raw_cluster):
    w, raw = raw_cluster
    keys = np.arange(40)
    w.push(keys, np.ones((40, 2)))
    for save, phase in BAD_CHECKPOINTS:
        reply = raw.ask(MsgType.CHECKPOINT, arg0=save, arg1=phase)
        assert reply is not None and reply.type == MsgType.FAILED, (save, phase)
        assert reply.arg0 == FAIL_REJECTED
    assert w.stats()["node"]["malformed_messages"] >= len(BAD_CHECKPOINTS)
    np.testing.assert_array_equal(w.pull(keys), np.ones((40, 2)))  # still serving


def test_a_checkpoint_from_a_connection_that_is_not_a_worker_is_dropped(raw_cluster):
    w, raw = raw_cluster
    ctx = zmq.Context()
    try:
        stranger = ctx.socket(zmq.DEALER)
        stranger.setsockopt(zmq.LINGER, 0)
        stranger.setsockopt(zmq.IDENTITY, worker_identity(0) + b"x")
        stranger.connect(raw.sock.getsockopt(zmq.LAST_ENDPOINT).decode())
        before = w.stats()["node"]["malformed_messages"]
        # a BEGIN for save 1 as worker 1, from another connection; then as worker 0
        for src in (1, 0):
            stranger.send_multipart(Message(MsgType.CHECKPOINT, src_worker=src, arg0=1,
                                            arg1=1, request_id=7, token=raw.token).encode())
        deadline = time.monotonic() + 10
        while w.stats()["node"]["malformed_messages"] < before + 2:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        ctx.destroy(linger=0)
    # the node is not frozen by it: a wait_sync (which needs a sync round) answers
    raw.send(MsgType.GOODBYE)
    w.wait_sync()


@pytest.mark.parametrize("generation", [-1, (1 << 48) + 5],
                         ids=["negative", "in-the-checkpoint-range"])
def test_barrier_generations_outside_the_workers_range_are_rejected(generation):
    """LocalWorkers.on_barrier takes any generation: a negative one cannot be encoded
    into NODE_BARRIER (unsigned) and fails the whole cluster as an internal error; one of
    2**48 or more enters the coordinator's barrier of a checkpoint phase
    (checkpoint_phases.GENERATION_BASE: it is released as one, the worker never)."""
    with _raw_cluster(2) as (w, raw):  # the raw worker is node 1's only worker
        reply = raw.ask(MsgType.BARRIER, arg0=generation, timeout=5.0)
        assert reply is not None and reply.type == MsgType.FAILED and \
            reply.arg0 == FAIL_REJECTED, reply
        np.testing.assert_array_equal(w.pull(np.arange(4)), np.zeros((4, 2)))  # not failed
        raw.send(MsgType.GOODBYE)
