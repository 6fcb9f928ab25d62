"""Checkpoints on disk: the format, writing one node's part, committing, and reading them
back with no cluster (docs/operations.md, "Checkpoints").

This module knows files and tables, not the network: the worker API (`Worker.save`) holds
the cluster still around it, node servers call `restore_home_keys` when they start from a
checkpoint, and `load` exports one to numpy.

A checkpoint is a folder PATH:

    PATH/manifest.json                 the checkpoint; written last and replaced atomically
    PATH/<data>/node-00000.keys.npy    the keys node 0 owned, uint64, ascending
    PATH/<data>/node-00000.values.npy  their values (optimizer state included): (n, L), or
                                       flat in key order when lengths differ per key
    PATH/<data>/node-00000.json        the part: its key count and each file's CRC-32
    PATH/<data>/worker-00000.json      worker 0's clock and optimizer state
    PATH/<data>/lengths.npy            per-key value lengths (only when they differ)

Files are standard `.npy` (numpy.load and any npy reader open them) and JSON. A save
writes a new <data> folder, then replaces manifest.json, then removes older folders, so
an interrupted save leaves the previous checkpoint whole: nothing reads a folder that
manifest.json does not name.

Reading trusts nothing in the manifest it can check, since a wrong field would restore
values into other keys: the manifest's own checksum (manifest_sha256) and every field's
type and range (read_manifest); every path confined to PATH/<data> and a regular file;
sizes and .npy headers against the fields (Checkpoint()); the parts holding every key
exactly once, in order (Checkpoint.parts, the one way to the values); CRC-32s (verify)."""

import datetime
import hashlib
import io
import json
import logging
import os
import re
import shutil
import stat
import threading
import time
import zlib

import numpy as np

from adapm.common.config import DTYPES, MODES
from adapm.common.errors import AdapmError
from adapm.table.shared_table import OWNED

log = logging.getLogger("adapm.checkpoint")

MANIFEST = "manifest.json"
PROGRESS_EVERY = 5.0    # seconds between progress lines of a long write
FORMAT = "adapm-checkpoint"
FORMAT_VERSION = 2      # 2: the manifest carries a checksum of itself (MANIFEST_CHECKSUM)
MANIFEST_CHECKSUM = "manifest_sha256"
READABLE_VERSIONS = (1, FORMAT_VERSION)  # 1: no MANIFEST_CHECKSUM, read with a warning
CHUNK_BYTES = 32 << 20  # values gathered and written per step (two such buffers in use)
WRITEBACK_BYTES = 1 << 20  # chunks at least this large are handed to the disk at once
_DATA_DIR = re.compile(r"^v-[0-9a-f]{16}-\d{6,}$")
_TEMPORARY = re.compile(r"^manifest\.json\.tmp\d+$")


class CheckpointError(AdapmError, ValueError):
    """A checkpoint that cannot be written, read, or restored into this cluster."""


# -- names ---------------------------------------------------------------------------

def data_dir_name(cluster_token, save):
    """The folder of one save: unique per cluster (its token) and save (its number), so
    that every node names it alike without a message."""
    return f"v-{cluster_token:016x}-{save:06d}"


def part_stem(node):
    return f"node-{node:05d}"


def worker_file(rank):
    return f"worker-{rank:05d}.json"


# -- writing -------------------------------------------------------------------------

def write_node_part(path, data, view, node, lengths=None, progress=None):
    """Write the keys `view`'s node owns, with their values, into PATH/data; returns the
    part's description (also written, last, as node-NNNNN.json: its presence says the
    part is complete). The node must hold still (no key may change owner meanwhile);
    a key that is not owned any more when it is read is an error, not a silent gap.

    `lengths`: per-key lengths (node 0 writes them once), or None for uniform ones.
    `progress(keys_done, keys_total, bytes_done)`: called after each chunk of values."""
    folder = os.path.join(path, data)
    os.makedirs(folder, exist_ok=True)
    stem = part_stem(node)
    keys = view.owned_keys()
    keys_crc, keys_bytes = _write_npy(os.path.join(folder, f"{stem}.keys.npy"),
                                      keys.dtype, keys.shape, _chunks_of(keys))
    uniform = view.uniform_length
    shape = (keys.shape[0], uniform) if uniform else (view.total_length(keys),)
    values_crc, values_bytes = _write_npy(
        os.path.join(folder, f"{stem}.values.npy"), view.dtype, shape,
        _owned_values(view, keys, node, progress))
    part = {"node": node, "num_keys": int(keys.shape[0]),
            "keys": f"{data}/{stem}.keys.npy", "values": f"{data}/{stem}.values.npy",
            "crc32": {"keys": keys_crc, "values": values_crc},
            "bytes": {"keys": keys_bytes, "values": values_bytes}}
    if lengths is not None:  # described by this part, checked like its own files
        crc, size = _write_npy(os.path.join(folder, "lengths.npy"), lengths.dtype,
                               lengths.shape, _chunks_of(lengths))
        part["lengths"] = {"file": f"{data}/lengths.npy", "crc32": crc, "bytes": size}
    write_json(os.path.join(folder, f"{stem}.json"), part)
    return part


def write_worker_state(path, data, rank, clock, optimizer=None, value_length=None):
    """A worker's own state beside the table: its clock, and its optimizer's (Adam's step
    count is the worker's) with the layout of the values, [row | state], when the table's
    value_length (uniform) fits it."""
    state = {"rank": rank, "clock": int(clock),
             "optimizer": None if optimizer is None else optimizer.state_dict()}
    if optimizer is not None and value_length:
        dim = optimizer.dim_of(value_length)
        state["optimizer"]["layout"] = {"dim": dim,
                                        "state_length": optimizer.state_length(dim)}
    write_json(os.path.join(path, data, worker_file(rank)), state)


def commit(path, data, info, remove=None):
    """Make PATH/data the checkpoint: check that every node's part and every worker's
    state is there and adds up, replace manifest.json atomically, then remove the folders
    of earlier (or interrupted) saves: now, or by `remove(path, data)` (Worker.save does
    it in a thread: deleting the files of the last checkpoint takes a while, and the new
    one is complete without it). `info`: num_keys, dtype, value_length, mode, nodes,
    workers_per_node. Returns the manifest."""
    folder = os.path.join(path, data)
    parts = [_read_part(folder, node) for node in range(info["nodes"])]
    workers = info["nodes"] * info["workers_per_node"]
    states = [_read_json(os.path.join(folder, worker_file(rank)), "worker state")
              for rank in range(workers)]
    saved = sum(part["num_keys"] for part in parts)
    if saved != info["num_keys"]:
        raise CheckpointError(f"checkpoint {path}: the nodes' parts hold {saved} keys, "
                              f"the table has {info['num_keys']}")
    value_length = info["value_length"]
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "data": data, "num_keys": info["num_keys"], "dtype": info["dtype"],
        "value_length": value_length if isinstance(value_length, int) else None,
        "lengths": None if isinstance(value_length, int) else _lengths_entry(parts, path),
        "mode": info["mode"], "nodes": info["nodes"],
        "workers_per_node": info["workers_per_node"],
        "clocks": [state["clock"] for state in states],
        "optimizers": [state["optimizer"] for state in states],
        "optimizer_layout": next((state["optimizer"].get("layout") for state in states
                                  if state["optimizer"]), None),
        "parts": parts,
    }
    manifest = sealed(manifest)
    write_json(os.path.join(path, MANIFEST), manifest)
    (remove or remove_stale)(path, data)
    return manifest


def manifest_checksum(manifest):
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces), its own checksum
    left out: JSON read back gives the same text, whatever indentation the file has."""
    body = {name: value for name, value in manifest.items() if name != MANIFEST_CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def sealed(manifest):
    """The manifest with its checksum."""
    return dict(manifest, **{MANIFEST_CHECKSUM: manifest_checksum(manifest)})


def _lengths_entry(parts, path):
    entry = next((part["lengths"] for part in parts if "lengths" in part), None)
    if entry is None:
        raise CheckpointError(f"checkpoint {path}: no node wrote the per-key lengths")
    return entry


def remove_stale(path, keep):
    """Remove the data folders of PATH that manifest.json does not name (earlier saves,
    and saves that were interrupted), and temporary files a cut-short write left."""
    for name in os.listdir(path):
        if name != keep and _DATA_DIR.match(name):
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)
        elif _TEMPORARY.match(name):
            try:
                os.unlink(os.path.join(path, name))
            except OSError:
                pass


def write_json(filename, obj):
    """Write JSON atomically and durably: a temporary file, fsync, rename, fsync of the
    folder. A reader sees the old file or the new one, never a part of either."""
    tmp = f"{filename}.tmp{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(os.path.dirname(filename))


def _fsync_dir(folder):
    fd = os.open(folder or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _chunks_of(array):
    flat = array.reshape(-1)
    step = max(1, CHUNK_BYTES // max(flat.itemsize, 1))
    for start in range(0, flat.shape[0], step):
        yield flat[start:start + step]


def _owned_values(view, keys, node, progress=None):
    """The values of `keys` in key order, a chunk at a time, read under each key's lock
    from this node's table. Two buffers alternate, so that one is filled while the other
    is written."""
    if keys.shape[0] == 0:
        return
    if view.uniform_length:
        per_key = view.uniform_length
    else:
        lengths = np.empty(keys.shape[0], dtype=np.uint64)
        view.lengths_of(keys, lengths)
        per_key = max(1, int(lengths.max()))
    step = max(1, CHUNK_BYTES // (per_key * view.dtype.itemsize))
    buffers = [np.empty(step * per_key, dtype=view.dtype) for _ in range(2)]
    misses = np.empty(step, dtype=np.uint64)  # pull writes uint64 indices
    written = 0
    for i, start in enumerate(range(0, keys.shape[0], step)):
        chunk = keys[start:start + step]
        total = view.total_length(chunk)
        out = buffers[i % 2][:total]
        missed = view.pull(chunk, out, misses, True)
        if missed:
            key = int(chunk[misses[0]])
            raise CheckpointError(f"node {node}: key {key} stopped being owned here while "
                                  "the checkpoint was written (a relocation during a save)")
        yield out
        written += out.nbytes
        if progress is not None:
            progress(min(start + step, keys.shape[0]), keys.shape[0], written)


def _write_npy(filename, dtype, shape, chunks):
    """Write an .npy file from chunks (a temporary name, renamed once complete and
    synced); returns (CRC-32 of the whole file, its size). The write runs in a second
    thread, overlapping the CRC and the next chunk's gathering in this one (zlib and
    file writes release the GIL)."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
        "shape": tuple(int(n) for n in shape)})
    tmp = f"{filename}.tmp{os.getpid()}"
    writer = _ChunkWriter(tmp)
    try:
        writer.put(header.getvalue())
        for chunk in chunks:
            writer.put(chunk)
        crc, size = writer.finish()
    except BaseException:
        writer.abandon()
        raise
    os.replace(tmp, filename)
    return crc, size


class _ChunkWriter:
    """Appends buffers to a file from a thread of its own, at most one buffer ahead: the
    caller may refill a buffer once the next put() returns (two buffers alternate). The
    CRC is taken in the caller's thread, in parallel with the previous buffer's write."""

    def __init__(self, filename):
        self.file = open(filename, "wb", buffering=0)
        self.filename = filename
        self.crc = 0
        self.size = 0
        self.error = None
        self.thread = None

    def put(self, buffer):
        data = memoryview(buffer).cast("B")
        self.crc = zlib.crc32(data, self.crc)
        self._join()
        self.thread = threading.Thread(target=self._write, args=(data,), daemon=True)
        self.thread.start()

    def _write(self, data):
        try:
            view = data
            while view.nbytes:  # a raw write may write less than asked
                written = self.file.write(view)
                view = view[written:]
            if data.nbytes >= WRITEBACK_BYTES:
                # Start writing this chunk to the disk now (asynchronously), not all at
                # the final fsync: the disk works while the next chunk is prepared.
                os.posix_fadvise(self.file.fileno(), self.size, data.nbytes,
                                 os.POSIX_FADV_DONTNEED)
            self.size += data.nbytes
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            self.error = exc

    def _join(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None
        if self.error is not None:
            raise self.error

    def finish(self):
        self._join()
        os.fsync(self.file.fileno())
        self.file.close()
        return self.crc, self.size

    def abandon(self):
        if self.thread is not None:
            self.thread.join()
        self.file.close()
        try:
            os.unlink(self.filename)
        except OSError:
            pass


class WriteProgress:
    """The progress of one node's write, as a log line every few seconds and one at the
    end (with the rate), for write_node_part's `progress`."""

    def __init__(self, who, path, every=PROGRESS_EVERY):
        self.who = who
        self.path = path
        self.every = every
        self.started = self.reported = time.monotonic()

    def __call__(self, done, total, written):
        now = time.monotonic()
        if done < total and now - self.reported < self.every:
            return
        self.reported = now
        seconds = max(now - self.started, 1e-9)
        log.info("%s: checkpoint %s: %d of %d keys written (%.0f%%, %.1f MB, %.0f MB/s)",
                 self.who, self.path, done, total, 100.0 * done / max(total, 1),
                 written / 1e6, written / 1e6 / seconds)


# -- reading -------------------------------------------------------------------------

def _read_json(filename, what):
    try:
        with open(filename) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{filename}: missing ({what})") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{filename}: unreadable {what}: {exc}") from None


def _read_part(folder, node):
    part = _read_json(os.path.join(folder, f"{part_stem(node)}.json"),
                      f"node {node}'s part: the node did not finish writing it")
    if part.get("node") != node:
        raise CheckpointError(f"{folder}: node {node}'s part names node {part.get('node')}")
    return part


def read_manifest(path):
    """The manifest of the checkpoint at PATH, checked for what readers rely on."""
    filename = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise CheckpointError(f"no checkpoint at {path}: not a folder")
    if not os.path.exists(filename):
        raise CheckpointError(f"no checkpoint at {path}: no {MANIFEST} (never completed)")
    manifest = _read_json(filename, "checkpoint manifest")
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise CheckpointError(f"{filename} is not an AdaPM checkpoint manifest (format "
                              f"{_shown(got)})")
    version = manifest.get("format_version")
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{filename}: format version {_shown(version)}, this AdaPM "
                              f"reads versions {', '.join(map(str, READABLE_VERSIONS))}")
    if version == FORMAT_VERSION:
        _check_checksum(manifest, filename)
    elif MANIFEST_CHECKSUM in manifest:  # version 1 never had one: its version changed
        raise CheckpointError(f"{filename}: damaged: format version 1 with a "
                              f"{MANIFEST_CHECKSUM}")
    else:  # an earlier AdaPM's: its fields are still checked against its files
        log.warning("%s: format version 1 (an earlier AdaPM): the manifest has no checksum "
                    "of its own; its fields are checked against the files only", filename)
    _check_fields(manifest, filename)
    return manifest


def _check_checksum(manifest, filename):
    """Every field is checked against the files where a file can say it (shapes, sizes,
    CRCs), but not every field can: the checksum finds a changed bit anywhere."""
    saved = manifest.get(MANIFEST_CHECKSUM)
    if saved is None:
        raise CheckpointError(f"{filename}: damaged: no {MANIFEST_CHECKSUM}")
    if saved != manifest_checksum(manifest):
        raise CheckpointError(f"{filename}: damaged: its contents do not match its "
                              f"{MANIFEST_CHECKSUM}")


# -- the manifest's fields: each of the type and range readers rely on --------------------

COUNT_LIMIT = 1 << 63  # key counts, sizes, clocks: more is damage (and no int64 holds it)


def _shown(value):
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _is_count(value, low=0, high=COUNT_LIMIT):
    return type(value) is int and low <= value < high  # not a bool, a float, a string


def _is_crc(value):
    return _is_count(value, 0, 1 << 32)


def _field(obj, name, where, ok, what):
    """obj[name] once it is there and ok(it), else a CheckpointError naming it."""
    if name not in obj:
        raise CheckpointError(f"{where}: no {name!r}")
    value = obj[name]
    if not ok(value):
        raise CheckpointError(f"{where}: {name!r} must be {what}, not {_shown(value)}")
    return value


def _object(value, where):
    if not isinstance(value, dict):
        raise CheckpointError(f"{where} must be an object, not {_shown(value)}")
    return value


def _in_data(data):
    """Whether a path is a plain file name in the folder `data`, relative: nothing else
    may be read (an absolute path or `..` would read any file, /dev/zero for ever)."""
    def ok(path):
        if not isinstance(path, str) or "\0" in path:
            return False
        folder, _, name = path.partition("/")
        return folder == data and name not in ("", ".", "..") and "/" not in name
    return ok


def _check_fields(manifest, where):
    """Every field of the manifest: its type, its range, and how fields fit each other
    (one part per node, a clock per worker); the files are checked against it later."""
    _field(manifest, "created", where, lambda v: isinstance(v, str), "a string")
    data = _field(manifest, "data", where,
                  lambda v: isinstance(v, str) and _DATA_DIR.match(v) is not None,
                  "a data folder's name, v-<cluster>-<save>")
    _field(manifest, "num_keys", where, _is_count, "a count")
    _field(manifest, "dtype", where, lambda v: v in DTYPES, f"one of {DTYPES}")
    uniform = _field(manifest, "value_length", where,
                     lambda v: v is None or _is_count(v, 1, 1 << 32), "null or a length >= 1")
    lengths = _field(manifest, "lengths", where, lambda v: v is None or isinstance(v, dict),
                     "null or the per-key lengths' file")
    if (uniform is None) == (lengths is None):
        raise CheckpointError(f"{where}: 'value_length' or 'lengths' must be given (only "
                              "one)")
    if lengths is not None:
        _check_file_entry(lengths, data, f"{where}: lengths")
    _field(manifest, "mode", where, lambda v: v in MODES, f"one of {MODES}")
    nodes = _field(manifest, "nodes", where, lambda v: _is_count(v, 1), "a count >= 1")
    workers = nodes * _field(manifest, "workers_per_node", where, lambda v: _is_count(v, 1),
                             "a count >= 1")
    _field(manifest, "clocks", where, lambda v: isinstance(v, list) and len(v) == workers
           and all(_is_count(c) for c in v),
           f"a list of {workers} clocks, one per worker (nodes x workers_per_node)")
    _field(manifest, "optimizers", where, lambda v: isinstance(v, list) and len(v) == workers
           and all(s is None or _is_optimizer_state(s) for s in v),
           f"a list of {workers} optimizer states or nulls, one per worker (nodes x "
           "workers_per_node)")
    _field(manifest, "optimizer_layout", where, lambda v: v is None or _is_layout(v),
           "null or {dim, state_length}")
    parts = _field(manifest, "parts", where,
                   lambda v: isinstance(v, list) and len(v) == nodes,
                   f"a list of {nodes} parts, one per node")
    for node, part in enumerate(parts):
        _check_part(part, node, data, f"{where}: parts[{node}]")


def _is_optimizer_state(state):  # the rest is the optimizer's to check (load_state_dict)
    return isinstance(state, dict) and isinstance(state.get("name"), str)


def _is_layout(layout):
    return isinstance(layout, dict) and _is_count(layout.get("dim"), 1) and \
        _is_count(layout.get("state_length"))


def _check_part(part, node, data, where):
    _object(part, where)
    _field(part, "node", where, lambda v: _is_count(v) and v == node, f"{node}")
    _field(part, "num_keys", where, _is_count, "a count")
    for kind in ("keys", "values"):
        _field(part, kind, where, _in_data(data), f"a file in {data}/")
    _field(part, "crc32", where, lambda v: isinstance(v, dict) and _is_crc(v.get("keys"))
           and _is_crc(v.get("values")), "the CRC-32s of keys and values")
    _field(part, "bytes", where, lambda v: isinstance(v, dict) and _is_count(v.get("keys"))
           and _is_count(v.get("values")), "the sizes of keys and values")
    if "lengths" in part:  # node 0 wrote them; the manifest's own entry is the one read
        _check_file_entry(part["lengths"], data, f"{where}: lengths")


def _check_file_entry(entry, data, where):
    _object(entry, where)
    _field(entry, "file", where, _in_data(data), f"a file in {data}/")
    _field(entry, "crc32", where, _is_crc, "a CRC-32")
    _field(entry, "bytes", where, _is_count, "a size")


class Checkpoint:
    """A checkpoint on disk, read with no cluster: its manifest, its parts memory-mapped,
    checksums verified on request."""

    def __init__(self, path):
        self.path = os.path.abspath(path)
        self._real_path = os.path.realpath(self.path)
        self.manifest = read_manifest(self.path)
        self.num_keys = int(self.manifest["num_keys"])
        self.dtype = np.dtype(self.manifest["dtype"])
        self._lengths = None
        self._covered = False  # _check_coverage passed
        self._check_files()

    def _check_files(self):
        """The manifest against its files' sizes and .npy headers (a few bytes each): parts
        per node, each part's key count, dtype and value_length. A manifest that does not
        describe its files would restore values into other keys."""
        manifest, parts = self.manifest, self.manifest["parts"]
        uniform = manifest["value_length"]
        for part in parts:
            n = part["num_keys"]
            self._check_npy(part["keys"], part["bytes"]["keys"], np.uint64, (n,),
                            "the part's num_keys")
            self._check_npy(part["values"], part["bytes"]["values"], self.dtype,
                            (n, uniform) if uniform is not None else None,
                            "the part's num_keys, value_length, dtype")
        total = sum(part["num_keys"] for part in parts)
        if total != self.num_keys:
            raise CheckpointError(f"{self.path}/{MANIFEST}: the parts hold {total} keys, "
                                  f"num_keys says {self.num_keys}")
        if uniform is None:
            entry = manifest["lengths"]
            self._check_npy(entry["file"], entry["bytes"], None, (self.num_keys,),
                            "num_keys")

    def _check_npy(self, relative, size, dtype, shape, what):
        """That the file has the manifest's size, and an .npy header of `dtype` (None: an
        integer one) and `shape` (None: 1-D) whose data fills the rest of the file; `what`:
        the fields that say so."""
        filename = self._file(relative)
        actual = self._regular_file_size(filename)
        if actual != size:
            raise CheckpointError(f"{filename}: corrupt ({actual} bytes, the manifest says "
                                  f"{size} bytes)")
        got_dtype, got_shape, data_bytes = _npy_header(filename)
        wrong_dtype = got_dtype.kind not in "iu" if dtype is None else got_dtype != dtype
        wrong_shape = len(got_shape) != 1 if shape is None else got_shape != shape
        if wrong_dtype or wrong_shape:
            want_shape = "1-D" if shape is None else str(shape)
            want_dtype = "integers" if dtype is None else np.dtype(dtype)
            raise CheckpointError(f"{filename}: holds {got_shape} {got_dtype}, the manifest "
                                  f"says {want_shape} {want_dtype} ({what})")
        if data_bytes != actual:
            raise CheckpointError(f"{filename}: corrupt ({actual} bytes, its header "
                                  f"says {data_bytes})")

    def _regular_file_size(self, filename):
        """The size of a file that lies inside the checkpoint folder, symlinks resolved,
        and is a regular one: a FIFO would make every read wait for a writer, a device
        or a file elsewhere is no part of the checkpoint. Checked before any read."""
        real = os.path.realpath(filename)
        if os.path.commonpath([real, self._real_path]) != self._real_path:
            raise CheckpointError(f"{filename}: leads outside the checkpoint folder (to "
                                  f"{real})")
        try:
            info = os.stat(real)
        except FileNotFoundError:
            raise CheckpointError(f"{filename}: missing") from None
        if not stat.S_ISREG(info.st_mode):
            raise CheckpointError(f"{filename}: not a regular file")
        return info.st_size

    @property
    def value_length(self):
        """An int when every key has the same length, else the per-key lengths."""
        if self.manifest["value_length"] is not None:
            return int(self.manifest["value_length"])
        if self._lengths is None:  # small (4 bytes a key): checked whenever it is read
            entry = self.manifest["lengths"]
            self._verify_file(entry["file"], entry["crc32"], entry["bytes"])
            lengths = self._load(entry["file"])
            if lengths.shape[0] and (int(lengths.min()) < 1 or int(lengths.max()) >= 2**32):
                raise CheckpointError(f"{self._file(entry['file'])}: value lengths must lie "
                                      "in [1, 2**32)")
            self._lengths = lengths
        return self._lengths

    def _file(self, relative):
        return os.path.join(self.path, relative)

    def verify(self):
        """Check every file's CRC-32 and size against the manifest (reads everything), then
        that the parts hold every key exactly once."""
        for part in self.manifest["parts"]:
            for kind in ("keys", "values"):
                self._verify_file(part[kind], part["crc32"][kind], part["bytes"][kind])
        if self.manifest["lengths"] is not None:
            self.value_length  # noqa: B018 - reading the lengths verifies them
        self._check_coverage()

    def _verify_file(self, relative, expected_crc, expected_size):
        filename = self._file(relative)
        crc, size = _file_crc(filename)
        if size != expected_size or crc != expected_crc:
            raise CheckpointError(
                f"{filename}: corrupt (CRC-32 {crc:08x}, {size} bytes; the manifest says "
                f"{expected_crc:08x}, {expected_size} bytes)")

    def parts(self):
        """(node, keys, values) of every part, memory-mapped: values (n, L), or flat. The
        one way to the values (load and a restore read through it): the parts are checked
        first to hold every key exactly once."""
        self._check_coverage()
        for part in self.manifest["parts"]:
            yield part["node"], self._load(part["keys"]), self._load(part["values"])

    def _check_coverage(self):
        """That every key of [0, num_keys) is in exactly one part, each part's keys in
        ascending order, with as many values as their lengths add up to: readers find keys
        by binary search and fill arrays key by key, and a key in no part would leave
        memory unwritten. Reads the keys files once (8 bytes a key)."""
        if self._covered:
            return
        lengths = self.value_length
        seen = np.zeros(self.num_keys, dtype=bool)
        for part in self.manifest["parts"]:
            filename = self._file(part["keys"])
            keys = self._load(part["keys"])
            _check_ascending(keys, self.num_keys, filename)
            twice = np.flatnonzero(seen[keys])
            if twice.shape[0]:
                raise CheckpointError(f"{filename}: key {int(keys[twice[0]])} is in two parts")
            seen[keys] = True
            if not isinstance(lengths, int):
                total = int(np.asarray(lengths, dtype=np.int64)[keys].sum())
                values = self._load(part["values"])
                if values.shape[0] != total:
                    raise CheckpointError(f"{self._file(part['values'])}: {values.shape[0]} "
                                          f"values, its keys' lengths add up to {total}")
        # The parts' key counts add up to num_keys (_check_files): with no key twice and
        # none out of range, every key is in one.
        self._covered = True

    def _load(self, relative):
        filename = self._file(relative)
        try:
            return np.load(filename, mmap_mode="r")
        except FileNotFoundError:
            raise CheckpointError(f"{filename}: missing") from None
        except ValueError as exc:
            raise CheckpointError(f"{filename}: not a readable .npy file: {exc}") from None

    def check_compatible(self, num_keys, value_length, dtype):
        """A clear error unless a table of these keys, lengths and dtype can be restored
        from this checkpoint."""
        where = f"checkpoint {self.path}"
        if num_keys != self.num_keys:
            raise CheckpointError(f"{where} holds {self.num_keys} keys, the cluster has "
                                  f"{num_keys} (num_keys)")
        if np.dtype(dtype) != self.dtype:
            raise CheckpointError(f"{where} holds {self.dtype} values, the cluster "
                                  f"{np.dtype(dtype)} (dtype)")
        mine, theirs = value_length, self.value_length
        if isinstance(mine, (int, np.integer)) and isinstance(theirs, int):
            if int(mine) != theirs:
                raise CheckpointError(f"{where} holds values of length {theirs}, the cluster "
                                      f"{int(mine)} (value_length)")
            return
        mine = np.broadcast_to(np.asarray(mine, dtype=np.int64), (num_keys,))
        theirs = np.broadcast_to(np.asarray(theirs, dtype=np.int64), (num_keys,))
        differ = np.flatnonzero(mine != theirs)
        if differ.shape[0]:
            key = int(differ[0])
            raise CheckpointError(f"{where}: key {key} has value length {int(theirs[key])} "
                                  f"there, {int(mine[key])} in the cluster (value_length; "
                                  f"{differ.shape[0]} keys differ)")

    def worker_clock(self, rank):
        clocks = self.manifest.get("clocks") or []
        return clocks[rank] if rank < len(clocks) else None

    def optimizer_state(self, rank=0):
        """The optimizer state worker `rank` saved (`SparseOptimizer.load_state_dict`), or,
        restored onto more workers than saved, that of worker rank % saved; None if the
        save named no optimizer."""
        states = self.manifest.get("optimizers") or []
        return states[rank % len(states)] if states else None

    # -- values --------------------------------------------------------------------

    def load(self, keys=None):
        """(keys, values): every key in key order when keys is None, else the given keys
        in the given order. Values are (n, L), or flat when lengths differ per key. A
        checkpoint with one part that holds every key is returned memory-mapped."""
        if keys is None:
            return self._load_all()
        keys = _as_keys(keys, self.num_keys)
        lengths = self.value_length
        # np.empty: parts() holds every key exactly once, so every row is written.
        if isinstance(lengths, int):
            out = np.empty((keys.shape[0], lengths), dtype=self.dtype)
            for _, part_keys, part_values in self.parts():
                pos, found = _positions(part_keys, keys)
                out[found] = part_values[pos[found]]
            return keys, out
        lengths = np.asarray(lengths, dtype=np.int64)
        starts = np.cumsum(lengths[keys]) - lengths[keys]
        out = np.empty(int(lengths[keys].sum()), dtype=self.dtype)
        for _, part_keys, part_values in self.parts():
            pos, found = _positions(part_keys, keys)
            offsets = np.cumsum(lengths[part_keys]) - lengths[part_keys]
            src = _segments(offsets[pos[found]], lengths[keys[found]])
            dst = _segments(starts[found], lengths[keys[found]])
            out[dst] = part_values[src]
        return keys, out

    def _load_all(self):
        keys = np.arange(self.num_keys, dtype=np.uint64)
        parts = list(self.parts())
        if len(parts) == 1 and parts[0][1].shape[0] == self.num_keys:
            return keys, parts[0][2]  # one node held everything, in key order
        return self.load(keys)

    def home_values(self, node, num_nodes):
        """For a node of a cluster of `num_nodes` starting from this checkpoint: its home
        keys (key % num_nodes == node), part by part, as (keys ascending, flat values)."""
        lengths = self.value_length
        for _, part_keys, part_values in self.parts():
            mine = np.flatnonzero(part_keys % np.uint64(num_nodes) == np.uint64(node))
            if mine.shape[0] == 0:
                continue
            if mine.shape[0] == part_keys.shape[0]:  # the whole part: no gather
                yield np.asarray(part_keys), part_values.reshape(-1)
                continue
            keys = np.ascontiguousarray(part_keys[mine])
            if isinstance(lengths, int):
                yield keys, np.ascontiguousarray(part_values[mine]).reshape(-1)
            else:
                lens = np.asarray(lengths, dtype=np.int64)[part_keys]
                offsets = np.cumsum(lens) - lens
                yield keys, np.ascontiguousarray(part_values[_segments(offsets[mine],
                                                                       lens[mine])])


def _npy_header(filename):
    """(dtype, shape, the file's size by the header) of an .npy file, from its header."""
    try:
        with open(filename, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy version {version} (1.0 or 2.0 expected)")
            offset = f.tell()
    except FileNotFoundError:
        raise CheckpointError(f"{filename}: missing") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{filename}: not a readable .npy file: {exc}") from None
    if fortran or dtype.hasobject or dtype.names is not None:
        raise CheckpointError(f"{filename}: a Fortran-order or structured array")
    return dtype, shape, offset + int(np.prod(shape, dtype=object)) * dtype.itemsize


def _file_crc(filename):
    crc, size = 0, 0
    try:
        with open(filename, "rb", buffering=0) as f:
            buffer = bytearray(CHUNK_BYTES)
            while True:
                n = f.readinto(buffer)
                if not n:
                    return crc, size
                crc = zlib.crc32(memoryview(buffer)[:n], crc)
                size += n
    except FileNotFoundError:
        raise CheckpointError(f"{filename}: missing") from None


def _check_ascending(keys, num_keys, filename):
    if keys.shape[0] > 1:
        down = np.flatnonzero(keys[1:] <= keys[:-1])
        if down.shape[0]:
            at = int(down[0])
            raise CheckpointError(f"{filename}: keys not strictly ascending (key "
                                  f"{int(keys[at + 1])} after {int(keys[at])})")
    if keys.shape[0] and int(keys[-1]) >= num_keys:
        raise CheckpointError(f"{filename}: key {int(keys[-1])} outside [0, {num_keys})")


def _as_keys(keys, num_keys):
    keys = np.asarray(keys)
    if keys.ndim != 1 or (keys.size and keys.dtype.kind not in "iu"):
        raise CheckpointError(f"keys must be a 1-D integer array, got {keys.shape} {keys.dtype}")
    if keys.size and (int(keys.min()) < 0 or int(keys.max()) >= num_keys):
        raise CheckpointError(f"keys must lie in [0, {num_keys}), got {int(keys.min())}.."
                              f"{int(keys.max())}")
    return keys.astype(np.uint64)


def _positions(sorted_keys, keys):
    """Where each of `keys` lies in `sorted_keys`, and whether it is there at all."""
    pos = np.searchsorted(sorted_keys, keys)
    pos[pos >= sorted_keys.shape[0]] = 0
    found = sorted_keys[pos] == keys if sorted_keys.shape[0] else np.zeros(keys.shape, bool)
    return pos, found


def _segments(starts, lengths):
    """Flat indices of the segments [start, start + length)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    first = np.cumsum(lengths) - lengths
    return np.repeat(np.asarray(starts, dtype=np.int64) - first, lengths) + np.arange(total)


def load(path, keys=None, verify=True):
    """The keys and values of the checkpoint at PATH, with no cluster: every key in key
    order (keys=None) or the given keys in their order. Values are (n, L) numpy arrays
    (flat for per-key lengths), memory-mapped when one node's part holds every key.
    `verify`: check every file's CRC-32 first (reads the whole checkpoint once)."""
    checkpoint = Checkpoint(path)
    if verify:
        checkpoint.verify()
    return checkpoint.load(keys)


def restore_home_keys(table, path, node, num_nodes, num_keys, value_length, dtype):
    """Install a starting node's home keys from the checkpoint (as owned), after checking
    that it fits and is not corrupt. Returns how many keys were installed."""
    checkpoint = Checkpoint(path)
    checkpoint.check_compatible(num_keys, value_length, dtype)
    checkpoint.verify()
    installed = 0
    for keys, values in checkpoint.home_values(node, num_nodes):
        table.install(keys, OWNED, values)
        installed += keys.shape[0]
    expected = len(range(node, num_keys, num_nodes))
    if installed != expected:
        raise CheckpointError(f"checkpoint {path}: node {node} found {installed} of its "
                              f"{expected} keys")
    return installed


def table_shape(restore, num_keys, value_length, dtype, init):
    """(num_keys, value_length, dtype, init) of a cluster started by adapm.run or
    adapm-launch: from `restore` (a checkpoint path) where not given, and checked against
    it where given; the defaults (1 float32 per key, zeros) without a checkpoint."""
    if restore is None:
        if num_keys is None:
            raise ValueError("num_keys is required (unless restoring a checkpoint)")
        return (num_keys, 1 if value_length is None else value_length,
                "float32" if dtype is None else dtype, init)
    if init is not None:
        raise ValueError("init and restore exclude each other: a restored table starts "
                         "from the checkpoint's values")
    saved = Checkpoint(restore)
    num_keys = saved.num_keys if num_keys is None else num_keys
    value_length = saved.value_length if value_length is None else value_length
    dtype = str(saved.dtype) if dtype is None else dtype
    saved.check_compatible(num_keys, value_length, dtype)
    return num_keys, value_length, dtype, ("checkpoint", saved.path)
