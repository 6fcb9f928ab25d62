"""The checkpoint format on its own (adapm.checkpoint), with tables made in this process
and no cluster: writing nodes' parts, committing, reading back, and every way a
checkpoint on disk can be incomplete, corrupt or not fit a cluster."""
import io
import json
import os

import numpy as np
import pytest

import adapm.checkpoint as checkpoint
import adapm.checkpoint.write as checkpoint_write
from adapm.checkpoint import Checkpoint, CheckpointError

import manifest_edits

pytestmark = pytest.mark.timeout(60)

INFO = {"num_keys": 10, "dtype": "float32", "value_length": 3, "mode": "adaptive",
        "nodes": 2, "workers_per_node": 1}


def values_of(keys, length=3):
    keys = np.asarray(keys, dtype=np.float32)
    return (keys[:, None] * 10 + np.arange(length, dtype=np.float32)).reshape(-1)


def two_node_tables(make_table, length=3):
    """Node 0 owns the even keys, node 1 the odd ones (as relocations might leave them)."""
    even, odd = np.arange(0, 10, 2), np.arange(1, 10, 2)
    return (make_table(10, length, owned=even, values=values_of(even, length), node=0,
                       num_nodes=2),
            make_table(10, length, owned=odd, values=values_of(odd, length), node=1,
                       num_nodes=2))


def save(path, tables, data="v-00000000000000ab-000001", info=INFO):
    for node, table in enumerate(tables):
        checkpoint.write_node_part(str(path), data, table.view, node)
    for rank in range(info["nodes"] * info["workers_per_node"]):
        checkpoint.write_worker_state(str(path), data, rank, clock=7 + rank)
    return checkpoint.commit(str(path), data, info)


def test_parts_commit_and_load_back_in_key_order(make_table, tmp_path):
    manifest = save(tmp_path, two_node_tables(make_table))
    assert [p["num_keys"] for p in manifest["parts"]] == [5, 5]
    assert manifest["clocks"] == [7, 8]
    keys, values = checkpoint.load(tmp_path)
    assert keys.tolist() == list(range(10))
    assert np.array_equal(values, values_of(range(10)).reshape(10, 3))
    # given keys come back in the given order, duplicates included
    some, picked = checkpoint.load(tmp_path, keys=[9, 0, 4, 9])
    assert np.array_equal(picked, values_of([9, 0, 4, 9]).reshape(4, 3))
    # the files are plain .npy: numpy alone reads them
    part = manifest["parts"][1]
    assert np.load(tmp_path / part["keys"]).tolist() == [1, 3, 5, 7, 9]


def test_one_part_with_every_key_loads_memory_mapped(make_table, tmp_path):
    table = make_table(6, 2, values=values_of(range(6), 2))
    checkpoint.write_node_part(str(tmp_path), "v-0000000000000001-000001", table.view, 0)
    checkpoint.write_worker_state(str(tmp_path), "v-0000000000000001-000001", 0, 0)
    checkpoint.commit(str(tmp_path), "v-0000000000000001-000001",
                      dict(INFO, num_keys=6, value_length=2, nodes=1))
    _, values = checkpoint.load(tmp_path)
    assert isinstance(values, np.memmap)
    assert np.array_equal(values, values_of(range(6), 2).reshape(6, 2))


def test_per_key_lengths_round_trip(make_table, tmp_path):
    lengths = np.array([1, 2, 3, 1, 2, 3], dtype=np.uint32)
    flat = np.arange(int(lengths.sum()), dtype=np.float64)
    table = make_table(6, lengths, dtype="float64", values=flat)
    data = "v-0000000000000002-000001"
    checkpoint.write_node_part(str(tmp_path), data, table.view, 0, lengths=lengths)
    checkpoint.write_worker_state(str(tmp_path), data, 0, 0)
    checkpoint.commit(str(tmp_path), data, dict(INFO, num_keys=6, value_length=None, nodes=1,
                                                dtype="float64"))
    saved = Checkpoint(tmp_path)
    assert saved.value_length.tolist() == lengths.tolist()
    _, values = saved.load()
    assert np.array_equal(values, flat)
    _, some = saved.load([5, 1])
    assert some.tolist() == [9.0, 10.0, 11.0, 1.0, 2.0]
    homes = list(saved.home_values(1, 2))  # keys 1, 3, 5 of a 2-node cluster
    assert [k.tolist() for k, _ in homes] == [[1, 3, 5]]
    assert homes[0][1].tolist() == [1.0, 2.0, 6.0, 9.0, 10.0, 11.0]


def test_a_new_save_replaces_the_old_one_and_removes_its_files(make_table, tmp_path):
    tables = two_node_tables(make_table)
    save(tmp_path, tables, data="v-00000000000000ab-000001")
    tables[0].view._arena_array()[:] += 1  # node 0's keys change
    save(tmp_path, tables, data="v-00000000000000ab-000002")
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "v-00000000000000ab-000002"]
    _, values = checkpoint.load(tmp_path)
    assert np.array_equal(values[0], values_of([0])[:3] + 1)


def test_an_interrupted_save_leaves_the_previous_checkpoint_whole(make_table, tmp_path):
    tables = two_node_tables(make_table)
    save(tmp_path, tables, data="v-00000000000000ab-000001")
    before = checkpoint.load(tmp_path)[1].copy()
    # the next save: node 0 wrote its part, node 1 died before finishing (no part file)
    checkpoint.write_node_part(str(tmp_path), "v-00000000000000ab-000002", tables[0].view, 0)
    with pytest.raises(CheckpointError, match="node 1's part"):
        checkpoint.commit(str(tmp_path), "v-00000000000000ab-000002", INFO)
    assert np.array_equal(checkpoint.load(tmp_path)[1], before)
    # the leftover folder goes with the next complete save
    save(tmp_path, tables, data="v-00000000000000ab-000003")
    assert "v-00000000000000ab-000002" not in os.listdir(tmp_path)


def test_parts_that_do_not_add_up_are_not_committed(make_table, tmp_path):
    tables = two_node_tables(make_table)
    with pytest.raises(CheckpointError, match="hold 10 keys, the table has 11"):
        save(tmp_path, tables, info=dict(INFO, num_keys=11))
    with pytest.raises(CheckpointError, match="no manifest.json"):
        checkpoint.load(tmp_path)


def test_corruption_and_truncation_are_detected(make_table, tmp_path):
    manifest = save(tmp_path, two_node_tables(make_table))
    values_file = tmp_path / manifest["parts"][0]["values"]
    raw = bytearray(values_file.read_bytes())
    raw[-1] ^= 0x40
    values_file.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(tmp_path)
    checkpoint.load(tmp_path, verify=False)  # what the caller asked for
    values_file.write_bytes(bytes(raw[:-4]))
    with pytest.raises(CheckpointError, match="corrupt"):
        checkpoint.load(tmp_path)
    os.unlink(values_file)
    with pytest.raises(CheckpointError, match="missing"):
        checkpoint.load(tmp_path)


def test_a_manifest_that_is_not_ours_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match="not a folder"):
        checkpoint.load(tmp_path / "nothing")
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        checkpoint.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not an AdaPM checkpoint"):
        checkpoint.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "adapm-checkpoint",
                                                        "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        checkpoint.load(tmp_path)


def test_a_manifest_without_its_checksum_or_with_a_wrong_one_is_damaged(make_table,
                                                                         tmp_path):
    manifest = save(tmp_path, two_node_tables(make_table))
    assert manifest == checkpoint.read_manifest(tmp_path)
    assert manifest["manifest_sha256"] == manifest_edits.seal(manifest)["manifest_sha256"]
    manifest_edits.edit(tmp_path, lambda m: m.update(clocks=[7, 9]), reseal=False)
    with pytest.raises(CheckpointError, match="manifest.json: damaged: its contents"):
        Checkpoint(tmp_path)
    manifest_edits.edit(tmp_path, lambda m: m.pop("manifest_sha256"), reseal=False)
    with pytest.raises(CheckpointError, match="manifest.json: damaged: no manifest_sha256"):
        checkpoint.load(tmp_path)


def test_compatibility_is_checked_with_a_clear_error(make_table, tmp_path):
    save(tmp_path, two_node_tables(make_table))
    saved = Checkpoint(tmp_path)
    saved.check_compatible(10, 3, "float32")
    with pytest.raises(CheckpointError, match="holds 10 keys, the cluster has 11"):
        saved.check_compatible(11, 3, "float32")
    with pytest.raises(CheckpointError, match="float32 values, the cluster float64"):
        saved.check_compatible(10, 3, "float64")
    with pytest.raises(CheckpointError, match="length 3, the cluster 4"):
        saved.check_compatible(10, 4, "float32")
    with pytest.raises(CheckpointError, match="key 0 has value length 3 there, 2"):
        saved.check_compatible(10, np.array([2] + [3] * 9), "float32")
    with pytest.raises(CheckpointError, match=r"keys must lie in \[0, 10\)"):
        checkpoint.load(tmp_path, keys=[10])


def test_table_shape_takes_the_checkpoints_and_checks_given_ones(make_table, tmp_path):
    save(tmp_path, two_node_tables(make_table))
    num_keys, length, dtype, init = checkpoint.table_shape(str(tmp_path), None, None, None,
                                                           None)
    assert (num_keys, length, dtype) == (10, 3, "float32")
    assert init == ("checkpoint", str(tmp_path))
    with pytest.raises(CheckpointError, match="value_length"):
        checkpoint.table_shape(str(tmp_path), 10, 5, None, None)
    with pytest.raises(ValueError, match="init and restore exclude"):
        checkpoint.table_shape(str(tmp_path), None, None, None, ("normal", 1.0, 0))
    with pytest.raises(ValueError, match="num_keys is required"):
        checkpoint.table_shape(None, None, None, None, None)


def test_a_write_that_fails_leaves_no_file_behind(make_table, tmp_path, monkeypatch):
    table = make_table(50, 4)

    def chunks_then_fail(*_):
        yield np.zeros(4, dtype=np.float32)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_write, "_owned_values", chunks_then_fail)
    with pytest.raises(OSError, match="No space"):
        checkpoint.write_node_part(str(tmp_path), "v-0000000000000003-000001", table.view, 0)
    left = os.listdir(tmp_path / "v-0000000000000003-000001")
    assert left == ["node-00000.keys.npy"]  # no values file, temporary or not; no part


def test_progress_is_reported_per_chunk(make_table, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint_write, "CHUNK_BYTES", 64)  # 4 keys of 4 floats per chunk
    table = make_table(10, 4, values=np.arange(40, dtype=np.float32))
    calls = []
    checkpoint.write_node_part(str(tmp_path), "v-0000000000000004-000001", table.view, 0,
                               progress=lambda *a: calls.append(a))
    assert calls == [(4, 10, 64), (8, 10, 128), (10, 10, 160)]
    part = np.load(tmp_path / "v-0000000000000004-000001" / "node-00000.values.npy")
    assert np.array_equal(part.reshape(-1), np.arange(40, dtype=np.float32))


# -- the parts must hold every key exactly once (issue 17) --------------------------------

def _rewrite_keys_of_part_1(keys_of, values_of_part=None):
    """A change of node 1's keys file (and values file), their CRC-32s and sizes updated:
    consistent checksums, inconsistent keys."""
    def change(path, manifest):
        part = manifest["parts"][1]
        keys = np.load(path / part["keys"])
        values = np.load(path / part["values"])
        manifest_edits.rewrite_file(path, part, "keys", _npy_bytes(keys_of(keys)))
        if values_of_part is not None:
            manifest_edits.rewrite_file(path, part, "values", _npy_bytes(values_of_part(values)))
    return change


def _npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _key_replaced(keys):
    keys = keys.copy()
    keys[0] = 0  # node 0 holds key 0 too, and no part holds key 1
    return np.sort(keys)


def _key_out_of_range(keys):
    keys = keys.copy()
    keys[-1] = 11  # past num_keys (10); key 9 in no part
    return keys


BAD_PARTS = {
    "num_keys-raised": (lambda path, m: m.update(num_keys=15), "hold 10 keys, num_keys says 15"),
    "part-dropped": (lambda path, m: m.update(parts=m["parts"][:1], nodes=1, clocks=[7],
                                              optimizers=[None]),
                     "hold 5 keys, num_keys says 10"),
    "key-in-two-parts": (_rewrite_keys_of_part_1(_key_replaced), "key 0 is in two parts"),
    "key-out-of-range": (_rewrite_keys_of_part_1(_key_out_of_range), r"key 11 .*\[0, 10\)"),
    # a consistent pairing of keys and values, but not in the format's order
    "keys-unsorted": (_rewrite_keys_of_part_1(lambda k: k[::-1], lambda v: v[::-1]),
                      "not strictly ascending"),
}


@pytest.mark.parametrize("name", BAD_PARTS)
def test_parts_must_hold_every_key_exactly_once(make_table, tmp_path, name):
    """Before the fix, load() returned uninitialised memory for keys no part holds, and
    wrong values from a keys file out of order (which a restore took right); now every
    reader refuses such parts, through one check."""
    change, reason = BAD_PARTS[name]
    save(tmp_path, two_node_tables(make_table))
    manifest = manifest_edits.read(tmp_path)
    change(tmp_path, manifest)
    manifest_edits.write(tmp_path, manifest)
    readers = {
        "load": lambda: checkpoint.load(tmp_path),
        "load unverified": lambda: checkpoint.load(tmp_path, keys=[1, 9], verify=False),
        "verify": lambda: Checkpoint(tmp_path).verify(),
        "home_values": lambda: list(Checkpoint(tmp_path).home_values(1, 2)),
    }
    for reader, read in readers.items():
        with pytest.raises(CheckpointError, match=reason):
            result = read()
            print(f"{reader}: read {result}")


# -- malformed manifests: every field, several bad values each (issue 17) -----------------

MISSING = object()  # the field left out
BAD_VALUES = [MISSING, None, [], {}, "7", 7.5, True, -1, 2**64]
DATA = "v-00000000000000ab-000001"
ESCAPES = ["/dev/zero", "../../../etc/passwd", f"{DATA}/../manifest.json",
           f"{DATA}/../../outside.npy", "node-00001.keys.npy", f"./{DATA}/node-00001.keys.npy"]
UNIFORM_FIELDS = {
    "format": ["adapm", 2], "format_version": [0, 3], "created": [], "data": ["", "..", "/tmp"],
    "num_keys": [10**12, 11], "dtype": ["int8", "object", "<f4"], "value_length": [0, 2],
    "lengths": [], "mode": ["fast"], "nodes": [0, 1, 3, 10**9], "workers_per_node": [0, 2],
    "clocks": [[1], [1, 2, 3]], "clocks.0": [], "optimizers": [[None]], "optimizers.0": [[1]],
    "optimizer_layout": [{"dim": 1}], "parts": [[{}]], "parts.0": [], "parts.1": [],
    "parts.1.node": [0, 2], "parts.1.num_keys": [4, 6, 10**12], "parts.1.keys": ESCAPES,
    "parts.1.values": ESCAPES, "parts.1.crc32": [{"keys": 1}],
    "parts.1.crc32.keys": [2**32, 1], "parts.1.crc32.values": [2**32],
    "parts.1.bytes": [{"keys": 1}], "parts.1.bytes.keys": [0, 10**12],
    "parts.1.bytes.values": [1],
}
RAGGED_FIELDS = {
    "value_length": [1], "lengths": [], "lengths.file": ESCAPES, "lengths.crc32": [2**32, 0],
    "lengths.bytes": [0], "parts.0.lengths": [], "parts.0.lengths.file": ESCAPES,
    "parts.0.lengths.crc32": [2**32], "parts.0.lengths.bytes": [2**64],
}
VALID = {("created", "7"), ("lengths", None), ("optimizer_layout", None),
         ("optimizers.0", None), ("value_length", None), ("parts.0.lengths", MISSING)}


def _ragged_save(make_table, path):
    lengths = np.array([1, 2, 3, 1, 2, 3], dtype=np.uint32)
    table = make_table(6, lengths, values=np.arange(int(lengths.sum()), dtype=np.float32))
    checkpoint.write_node_part(str(path), DATA, table.view, 0, lengths=lengths)
    checkpoint.write_worker_state(str(path), DATA, 0, 0)
    return checkpoint.commit(str(path), DATA, dict(INFO, num_keys=6, value_length=None,
                                                   nodes=1))


def _fields(obj, prefix=""):
    """The path of every field of a manifest, list indices as N."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(
        obj, list) else ()
    for name, value in items:
        path = f"{prefix}{'N' if isinstance(name, int) else name}"
        yield path
        if path != "optimizers.N":  # an optimizer's own state is the optimizer's to check
            yield from _fields(value, path + ".")


def _set(manifest, field, value):
    *outer, last = [int(n) if n.isdigit() else n for n in field.split(".")]
    for name in outer:
        manifest = manifest[name]
    if value is MISSING:
        del manifest[last]
    else:
        manifest[last] = value


def _check_refused(path, original, field, values):
    names = [n for n in field.split(".") if not n.isdigit()]
    for value in values:
        if any(f == field and type(v) is type(value) and v == value for f, v in VALID):
            continue
        manifest = json.loads(original)
        _set(manifest, field, value)
        manifest_edits.write(path, manifest)
        for read in (lambda: checkpoint.load(path), lambda: Checkpoint(path).verify()):
            with pytest.raises(CheckpointError) as caught:
                read()
                pytest.fail(f"{field} = {value!r} was read")
            message = str(caught.value)
            assert any(n in message or n.replace("_", " ") in message for n in names), \
                (field, value, message)


@pytest.mark.parametrize("field", UNIFORM_FIELDS)
def test_a_malformed_field_is_a_checkpoint_error(make_table, tmp_path, field):
    """Every field of a real manifest, given bad types and values (its checksum made to
    fit): a CheckpointError naming the field, never an AttributeError, KeyError,
    TypeError, IndexError or MemoryError, nor a file read outside the checkpoint."""
    save(tmp_path, two_node_tables(make_table))
    original = (tmp_path / "manifest.json").read_text()
    _check_refused(tmp_path, original, field, BAD_VALUES + UNIFORM_FIELDS[field])


@pytest.mark.parametrize("field", RAGGED_FIELDS)
def test_a_malformed_field_of_per_key_lengths_is_a_checkpoint_error(make_table, tmp_path,
                                                                    field):
    _ragged_save(make_table, tmp_path)
    original = (tmp_path / "manifest.json").read_text()
    _check_refused(tmp_path, original, field, BAD_VALUES + RAGGED_FIELDS[field])


def test_the_table_of_malformed_fields_covers_every_field(make_table, tmp_path):
    uniform = save(tmp_path / "uniform", two_node_tables(make_table))
    ragged = _ragged_save(make_table, tmp_path / "ragged")
    listed = {f.replace(".0", ".N").replace(".1", ".N") for f in [*UNIFORM_FIELDS,
                                                                    *RAGGED_FIELDS]}
    every = set(_fields(uniform)) | set(_fields(ragged))
    assert every - {"manifest_sha256"} == listed


@pytest.mark.parametrize("text", ["[]", '"adapm-checkpoint"', "null", "7"])
def test_a_manifest_that_is_no_json_object_is_a_checkpoint_error(tmp_path, text):
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(CheckpointError, match="not an AdaPM checkpoint manifest"):
        checkpoint.load(tmp_path)


@pytest.mark.parametrize("checksum", [None, 7, [], "0" * 64])
def test_a_malformed_checksum_says_the_manifest_is_damaged(make_table, tmp_path, checksum):
    save(tmp_path, two_node_tables(make_table))
    manifest_edits.edit(tmp_path, lambda m: m.update(manifest_sha256=checksum), reseal=False)
    with pytest.raises(CheckpointError, match="manifest.json: damaged"):
        Checkpoint(tmp_path).verify()


def test_paths_that_lead_out_of_the_checkpoint_are_refused(make_table, tmp_path):
    """A part's file must be a regular file inside the checkpoint: not a symlink out of it,
    not a FIFO (reading one waits for a writer for ever), not a device."""
    path = tmp_path / "ck"
    manifest = save(path, two_node_tables(make_table))
    keys_file = path / manifest["parts"][1]["keys"]
    outside = tmp_path / "outside.npy"
    outside.write_bytes(keys_file.read_bytes())  # the same bytes: every CRC fits
    keys_file.unlink()
    keys_file.symlink_to(outside)
    with pytest.raises(CheckpointError, match="leads outside the checkpoint"):
        checkpoint.load(path)
    keys_file.unlink()
    os.mkfifo(keys_file)
    manifest_edits.edit(path, lambda m: m["parts"][1]["bytes"].update(keys=0))
    with pytest.raises(CheckpointError, match="not a regular file"):
        checkpoint.load(path)
    keys_file.unlink()
    keys_file.symlink_to("/dev/zero")
    with pytest.raises(CheckpointError, match="leads outside the checkpoint"):
        checkpoint.load(path)
    keys_file.unlink()
    keys_file.symlink_to(path / manifest["parts"][0]["keys"])  # inside: read, then refused
    with pytest.raises(CheckpointError, match="in two parts|corrupt"):
        checkpoint.load(path)


def _as_version_1(manifest):
    """What an earlier AdaPM wrote: format version 1, no checksum of the manifest."""
    manifest["format_version"] = 1
    manifest.pop("manifest_sha256")


def test_a_checkpoint_of_an_earlier_adapm_is_read_with_a_warning(make_table, tmp_path,
                                                                 caplog):
    save(tmp_path, two_node_tables(make_table))
    keys, values = checkpoint.load(tmp_path)
    manifest_edits.edit(tmp_path, _as_version_1, reseal=False)
    again_keys, again = checkpoint.load(tmp_path)
    assert np.array_equal(again_keys, keys) and np.array_equal(again, values)
    assert "format version 1 (an earlier AdaPM)" in caplog.text
    # its fields are still checked against the files
    manifest_edits.edit(tmp_path, lambda m: m.update(value_length=2), reseal=False)
    with pytest.raises(CheckpointError):
        checkpoint.load(tmp_path)


def test_a_version_changed_to_1_does_not_skip_the_checksum(make_table, tmp_path):
    save(tmp_path, two_node_tables(make_table))
    manifest_edits.edit(tmp_path, lambda m: m.update(format_version=1), reseal=False)
    with pytest.raises(CheckpointError, match="damaged: format version 1 with a"):
        checkpoint.load(tmp_path)
