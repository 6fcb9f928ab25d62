"""Checkpoints through real clusters (Worker.save, adapm.run(restore=...)): consistent
snapshots while keys relocate and replicate, restores onto other node and worker counts
bit for bit with optimizer state, and a node killed in the middle of writing."""
import glob
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from testpaths import TESTS

import adapm
import adapm.checkpoint as checkpoint
from adapm.checkpoint import CheckpointError
from adapm.common.errors import AdapmError
from adapm.common.process import sibling_named
from adapm.optim import Adagrad, Adam

from manifest_edits import read, rewrite_file, write

pytestmark = pytest.mark.timeout(180)

NUM_KEYS = 400
DIM = 4


def _train_adagrad(w, path, steps, seed):
    """Adagrad steps on random keys with intents (keys relocate and replicate), then a
    save; returns the values this worker pulls right after."""
    opt = Adagrad(lr=0.1)
    state = checkpoint.Checkpoint(path).optimizer_state(w.rank) if seed < 0 else None
    if state is not None:
        opt.load_state_dict(state)
    rng = np.random.default_rng(abs(seed) * 100 + w.rank)
    for _ in range(steps):
        keys = np.unique(rng.integers(0, NUM_KEYS, 40))
        w.intent(keys, w.clock, w.clock + 3)
        w.advance_clock()
        grads = rng.standard_normal((keys.shape[0], DIM)).astype(np.float32)
        w.apply_gradients(keys, grads, opt)
    manifest = w.save(path, optimizer=opt)
    return manifest["data"], w.stats()["relocations"], opt.steps


def _pull_all(w):
    return w.pull(np.arange(w.num_keys))


def _shuffle_and_save(w, path):
    """Restored: check the values, move keys about (localize), save again."""
    before = w.pull(np.arange(w.num_keys))
    rng = np.random.default_rng(w.rank)
    w.localize(rng.choice(w.num_keys, 60, replace=False))
    w.barrier()
    opt = Adagrad(lr=0.1)
    opt.load_state_dict(checkpoint.Checkpoint(path[0]).optimizer_state(w.rank))
    manifest = w.save(path[1], optimizer=opt)
    return before, manifest["optimizers"][w.rank]["steps"]


def test_stop_and_restore_onto_other_node_counts_bit_for_bit(tmp_path):
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    length = Adagrad(0.1).value_length(DIM)
    saved = adapm.run(_train_adagrad, args=(first, 25, 1), nodes=2, workers_per_node=2,
                      num_keys=NUM_KEYS, value_length=length,
                      init=Adagrad(0.1).init(("uniform", -0.5, 0.5, 7)))
    assert sum(relocated for _, relocated, _ in saved) > 0  # keys moved before the save
    keys, values = checkpoint.load(first)
    assert values.shape == (NUM_KEYS, length)
    assert (values[:, DIM:] > 0).any()  # Adagrad's accumulators are in it
    # 2 nodes x 2 workers -> 3 nodes x 1 worker: every worker reads the saved values,
    # moves keys about and saves again, with the optimizer's step count carried over
    restored = adapm.run(_shuffle_and_save, args=((first, second),), nodes=3,
                         restore=first)
    for before, steps in restored:
        assert before.tobytes() == values.tobytes()
        assert steps == 25
    manifest = checkpoint.read_manifest(second)
    assert manifest["nodes"] == 3 and len(manifest["parts"]) == 3
    assert manifest["optimizer_layout"] == {"dim": DIM, "state_length": DIM}  # Adagrad
    assert checkpoint.load(second)[1].tobytes() == values.tobytes()
    # -> 1 node
    [alone] = adapm.run(_pull_all, restore=second)
    assert alone.tobytes() == values.tobytes()


def _count_pushes(w, path, rounds):
    """Every worker adds 1.0 to random keys (named by intents, so they are replicated
    and relocated meanwhile); returns its own additions per key, per save."""
    rng = np.random.default_rng(w.rank + 11)
    added = []
    for _ in range(rounds):
        mine = np.zeros(NUM_KEYS)
        for _ in range(30):
            keys = rng.integers(0, NUM_KEYS, 50)
            w.intent(np.unique(keys), w.clock, w.clock + 2)
            w.advance_clock()
            w.push(keys, np.ones((keys.shape[0], 1), dtype=np.float32))
            np.add.at(mine, keys, 1.0)
        w.save(path)
        added.append(mine)
    return added


@pytest.mark.parametrize("mode", ["adaptive", "replicate_only", "static"])
def test_a_save_holds_every_acknowledged_update_and_none_after(tmp_path, mode):
    path = str(tmp_path / "counts")
    results = adapm.run(_count_pushes, args=(path, 2), nodes=2, workers_per_node=2,
                        num_keys=NUM_KEYS, mode=mode)
    expected = sum(np.sum([r[s] for s in range(2)], axis=0) for r in results)
    _, values = checkpoint.load(path)
    assert np.array_equal(values[:, 0], expected)  # exact: sums of ones
    assert [d for d in os.listdir(path) if d.startswith("v-")] == \
        [checkpoint.read_manifest(path)["data"]]  # the first save's files are gone


def _adam_steps(w, path, start, stop, save_at):
    opt = Adam(lr=0.05)
    if start:
        opt.load_state_dict(checkpoint.Checkpoint(path).optimizer_state(w.rank))
        assert opt.steps == start
    for step in range(start, stop):
        rng = np.random.default_rng(step)
        keys = np.unique(rng.integers(0, 50, 20))
        w.apply_gradients(keys, rng.standard_normal((keys.shape[0], DIM)), opt)
        if step + 1 == save_at:
            w.save(path, optimizer=opt)
    return w.pull(np.arange(50))


def test_continuing_from_a_checkpoint_equals_never_stopping(tmp_path):
    path = str(tmp_path / "adam")
    length = Adam().value_length(DIM)
    common = dict(num_keys=50, value_length=length, dtype="float64")
    [straight] = adapm.run(_adam_steps, args=(path, 0, 20, 10), init=Adam().init(
        ("normal", 0.1, 3)), **common)
    [resumed] = adapm.run(_adam_steps, args=(path, 10, 20, None), restore=path, **common)
    assert resumed.tobytes() == straight.tobytes()  # rows, moments and Adam's t


def _set_save_set_save(w, path, watch):
    """Save 1 holds key k = k (+ rank offsets); save 2, with other values, is cut short
    by a node killed while writing (rank 0 watches and kills)."""
    keys = np.arange(w.rank, NUM_KEYS, w.num_workers)
    w.set(keys, keys.astype(np.float32)[:, None])
    w.save(path)
    w.set(keys, -np.ones((keys.shape[0], 1), dtype=np.float32))
    if w.rank == 0:
        threading.Thread(target=watch, args=(path,), daemon=True).start()
    w.save(path)  # never completes: node 1 is killed in the middle of writing
    return "saved"



def _kill_node_1_mid_write(path):
    deadline = time.monotonic() + 60
    while not glob.glob(os.path.join(path, "v-*-000002", "node-00001.values.npy.tmp*")):
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)
    for name in ("adapm-node1", "adapm-w1"):  # the whole node: server and worker
        os.kill(sibling_named(name), signal.SIGKILL)


def test_a_node_killed_mid_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "ck")
    monkeypatch.setenv("ADAPM_FAILPOINTS", "1:stall_save=2@30")
    with pytest.raises(AdapmError):
        adapm.run(_set_save_set_save, args=(path, _kill_node_1_mid_write), nodes=2,
                  num_keys=NUM_KEYS)
    monkeypatch.delenv("ADAPM_FAILPOINTS")
    assert glob.glob(os.path.join(path, "v-*-000002"))  # the cut-short save's leftovers
    _, values = checkpoint.load(path)
    assert np.array_equal(values[:, 0], np.arange(NUM_KEYS, dtype=np.float32))
    [pulled] = adapm.run(_pull_all_and_save, args=(path,), nodes=1, restore=path)
    assert np.array_equal(pulled[:, 0], np.arange(NUM_KEYS, dtype=np.float32))
    assert not glob.glob(os.path.join(path, "v-*-000002"))  # removed by the next save


def _pull_all_and_save(w, path):
    values = w.pull(np.arange(w.num_keys))
    w.save(path)
    return values


def _save_badly_then_well(w, bad, good):
    """A save that cannot be written fails in every worker, with a reason, and loses
    nothing: training goes on and the next save works."""
    try:
        w.save(bad)
    except CheckpointError as exc:
        error = str(exc)
    else:
        error = None
    w.push(np.array([w.rank]), np.ones((1, 1), dtype=np.float32))
    w.save(good)
    return error


def test_a_save_that_cannot_be_written_fails_everywhere_and_loses_nothing(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    errors = adapm.run(_save_badly_then_well, args=(str(blocker / "ck"), str(tmp_path / "ok")),
                       nodes=2, workers_per_node=2, num_keys=NUM_KEYS)
    assert all(error and "saving to" in error or "was not written" in error
               for error in errors)
    assert "node 0, worker 0" in errors[0]
    _, values = checkpoint.load(tmp_path / "ok")
    assert values[:4, 0].tolist() == [1.0] * 4


def test_a_restore_that_does_not_fit_is_refused_before_anything_starts(tmp_path):
    path = str(tmp_path / "small")
    adapm.run(_pull_all_and_save, args=(path,), num_keys=30, value_length=2)
    with pytest.raises(CheckpointError, match="holds 30 keys, the cluster has 31"):
        adapm.run(_pull_all, num_keys=31, restore=path)
    with pytest.raises(CheckpointError, match="float32 values, the cluster float64"):
        adapm.run(_pull_all, dtype="float64", restore=path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        adapm.run(_pull_all, restore=str(tmp_path / "none"))


# -- adapm-launch --restore --------------------------------------------------------------

LAUNCHER = str(Path(sys.executable).with_name("adapm-launch"))
SCRIPT = str(TESTS / "checkpoint_script.py")


def _launch(*args, cwd):
    return subprocess.run([LAUNCHER, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120, cwd=cwd)


def test_launch_saves_and_restores_onto_another_node_count(tmp_path):
    path = str(tmp_path / "ck")
    saved = _launch("--nodes", "2", "--workers-per-node", "2", "--num-keys", "40",
                    "--value-length", "3", SCRIPT, "save", path, cwd=tmp_path)
    assert saved.returncode == 0, saved.stdout
    assert "rank 3: saved 40 keys from 2 nodes" in saved.stdout
    # every worker added rank + 1 to 40 x 3 values: (1 + 2 + 3 + 4) * 120 = 1200
    shown = _launch("--nodes", "3", "--restore", path, SCRIPT, "show", path, cwd=tmp_path)
    assert shown.returncode == 0, shown.stdout
    for rank in range(3):
        assert f"rank {rank} of 3: total 1200" in shown.stdout
    refused = _launch("--restore", path, "--num-keys", "41", SCRIPT, "show", path,
                      cwd=tmp_path)
    assert refused.returncode == 2
    assert "holds 40 keys, the cluster has 41" in refused.stdout
    refused = _launch("--restore", path, "--init", "normal:1:0", SCRIPT, "show", path,
                      cwd=tmp_path)
    assert refused.returncode == 2 and "drop --init" in refused.stdout


def _set_ragged(w, path):
    keys = np.arange(w.rank, w.num_keys, w.num_workers)
    lengths = 1 + keys % 3
    w.set(keys, np.repeat(keys.astype(np.float32), lengths) + 0.25)
    w.save(path)
    return w.pull(np.arange(w.num_keys))


def test_per_key_lengths_save_and_restore_across_node_counts(tmp_path):
    path = str(tmp_path / "ragged")
    lengths = 1 + np.arange(60) % 3
    before = adapm.run(_set_ragged, args=(path,), nodes=2, workers_per_node=2, num_keys=60,
                       value_length=lengths)
    assert checkpoint.Checkpoint(path).value_length.tolist() == lengths.tolist()
    after = adapm.run(_pull_all, nodes=3, restore=path)[2]
    assert after.tobytes() == before[0].tobytes() == checkpoint.load(path)[1].tobytes()


def _stall_repeatedly(stop, victim):
    """SIGSTOP / SIGCONT node 1's server, 200 ms each, until told to stop."""
    while not stop.is_set():
        os.kill(victim, signal.SIGSTOP)
        time.sleep(0.2)
        os.kill(victim, signal.SIGCONT)
        time.sleep(0.05)


def _count_pushes_with_a_stalling_node(w, path):
    stop = threading.Event()
    if w.rank == 0:
        threading.Thread(target=_stall_repeatedly, args=(stop, sibling_named("adapm-node1")),
                         daemon=True).start()
    try:
        return _count_pushes(w, path, 2)
    finally:
        stop.set()
        time.sleep(0.3)  # the stalling thread ends with a SIGCONT


@pytest.mark.parametrize("seed", range(2))
def test_a_save_stays_exact_while_a_node_server_stalls_again_and_again(tmp_path, seed):
    path = str(tmp_path / f"stalled{seed}")
    results = adapm.run(_count_pushes_with_a_stalling_node, args=(path,), nodes=2,
                        workers_per_node=2, num_keys=NUM_KEYS)
    expected = sum(np.sum(r, axis=0) for r in results)
    assert np.array_equal(checkpoint.load(path)[1][:, 0], expected)


# -- reading checks the manifest against the files (issue 17) -----------------------------

def _set_distinct(w, path):
    """Key k holds k * 10 + j at value j: a value read for the wrong key shows."""
    keys = np.arange(w.rank, w.num_keys, w.num_workers)
    w.set(keys, keys[:, None] * 10.0 + np.arange(w.value_length))
    w.save(path)


def _distinct(num_keys, length):
    return (np.arange(num_keys)[:, None] * 10.0 + np.arange(length)).astype(np.float32)


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _value_length_2(path, manifest):
    manifest["value_length"] = 2


def _values_of_part_0_reshaped(path, manifest):
    """Node 0's values (100 x 3) as 150 x 2, with the manifest's CRC-32 and size of it."""
    part = manifest["parts"][0]
    values = np.load(os.path.join(path, part["values"]))
    rewrite_file(path, part, "values", _npy_bytes(values.reshape(-1, 2)))


def _both(path, manifest):
    _values_of_part_0_reshaped(path, manifest)
    _value_length_2(path, manifest)


@pytest.mark.parametrize("change, reseal, reason", [
    (_value_length_2, False, "manifest.json: damaged"),  # a flipped bit: 3 -> 2
    (_value_length_2, True, r"\(100, 3\) float32, the manifest says \(100, 2\)"),
    (_values_of_part_0_reshaped, True, r"\(150, 2\) float32, the manifest says \(100, 3\)"),
    (_both, True, r"\(150, 2\) float32, the manifest says \(100, 2\)"),
], ids=["value_length-flipped", "value_length-resealed", "values-reshaped", "both"])
def test_a_restore_checks_the_manifest_against_the_files(tmp_path, change, reseal, reason):
    """value_length and the values files' shapes must agree with each other and with the
    part's key count; and the manifest has a checksum of its own (before the fix a
    manifest that said 2 where the files hold 3 restored 194 of 200 keys shifted)."""
    path = str(tmp_path / "ck")
    adapm.run(_set_distinct, args=(path,), nodes=2, num_keys=200, value_length=3)
    assert np.array_equal(checkpoint.load(path)[1], _distinct(200, 3))
    manifest = read(path)
    change(path, manifest)
    write(path, manifest, reseal)
    try:
        [pulled, _, _] = adapm.run(_pull_all, nodes=3, restore=path)
    except CheckpointError as exc:
        assert re.search(reason, str(exc)), str(exc)
    else:
        wrong = (pulled != _distinct(200, 3)[:, :pulled.shape[1]]).any(axis=1).sum()
        pytest.fail(f"restored with {wrong} of 200 keys wrong")


def _copy_outside(path, manifest, relative):
    """The file's bytes, copied outside the checkpoint folder (its CRC-32 still fits)."""
    outside = os.path.join(os.path.dirname(path), "outside")
    os.makedirs(outside, exist_ok=True)
    copy = os.path.join(outside, os.path.basename(relative))
    with open(os.path.join(path, relative), "rb") as src, open(copy, "wb") as dst:
        dst.write(src.read())
    return copy


def _dev_zero(path, manifest):
    part = manifest["parts"][1]
    part["values"] = "/dev/zero"
    part["crc32"]["values"] = part["bytes"]["values"] = 0


def _escaping(path, manifest):
    part = manifest["parts"][1]
    _copy_outside(path, manifest, part["values"])
    part["values"] = f"{manifest['data']}/../../outside/node-00001.values.npy"


def _symlink_out(path, manifest):
    relative = manifest["parts"][1]["values"]
    copy = _copy_outside(path, manifest, relative)
    os.unlink(os.path.join(path, relative))
    os.symlink(copy, os.path.join(path, relative))


def _fifo(path, manifest):
    part = manifest["parts"][1]
    part["values"] = f"{manifest['data']}/fifo.npy"
    os.mkfifo(os.path.join(path, part["values"]))
    part["crc32"]["values"] = part["bytes"]["values"] = 0


@pytest.mark.timeout(30)
@pytest.mark.parametrize("change, reason", [
    (_dev_zero, r"'values' must be a file in v-[0-9a-f]+-\d+/"),
    (_escaping, r"'values' must be a file in v-[0-9a-f]+-\d+/"),
    (_symlink_out, "leads outside the checkpoint"),
    (_fifo, "not a regular file"),
], ids=["dev-zero", "dot-dot", "symlink-out", "fifo"])
def test_a_restore_from_a_manifest_with_a_bad_path_fails_at_once(tmp_path, change, reason):
    """Paths in the manifest stay inside the checkpoint's data folder, and name regular
    files (before the fix, /dev/zero hung load() for ever and failed a restore after 69 s
    with "cluster did not form"; a path out of the folder was followed)."""
    path = str(tmp_path / "ck")
    adapm.run(_set_distinct, args=(path,), nodes=2, num_keys=200, value_length=3)
    manifest = read(path)
    change(path, manifest)
    write(path, manifest)
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=reason):
        adapm.run(_pull_all, nodes=2, restore=path)
    assert time.monotonic() - started < 10


def _key_0_in_both_parts(path, manifest):
    """Node 1's keys file says key 0 where it held key 1 (CRC-32 updated): only reading
    the keys shows it, which the node servers do (adapm.run reads the manifest and the
    files' headers)."""
    part = manifest["parts"][1]
    keys = np.load(os.path.join(path, part["keys"]))
    keys[0] = 0
    rewrite_file(path, part, "keys", _npy_bytes(np.sort(keys)))


@pytest.mark.timeout(30)
def test_a_restore_that_the_node_servers_refuse_fails_at_once_with_the_reason(tmp_path):
    path = str(tmp_path / "ck")
    adapm.run(_set_distinct, args=(path,), nodes=2, num_keys=200, value_length=3)
    manifest = read(path)
    _key_0_in_both_parts(path, manifest)
    write(path, manifest)
    checkpoint.Checkpoint(path)  # the manifest and the headers are fine
    started = time.monotonic()
    with pytest.raises(AdapmError, match="node-00001.keys.npy: key 0 is in two parts"):
        adapm.run(_pull_all, nodes=3, restore=path)
    assert time.monotonic() - started < 10
