"""Writing a checkpoint: one node's part (its owned keys and their values, read from the
table in chunks under the keys' locks), a worker's state, the commit that makes a save
the checkpoint, and the removal of what earlier or interrupted saves left."""

import datetime
import json
import os
import shutil
import time

import numpy as np

from adapm.checkpoint.format import (
    DATA_DIR,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    TEMPORARY,
    CheckpointError,
    log,
    part_stem,
    read_json,
    read_part,
    sealed,
    worker_file,
)
from adapm.checkpoint.npy import write_npy

PROGRESS_EVERY = 5.0    # seconds between progress lines of a long write
CHUNK_BYTES = 32 << 20  # values gathered and written per step (two such buffers in use)


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
    keys_crc, keys_bytes = write_npy(os.path.join(folder, f"{stem}.keys.npy"),
                                      keys.dtype, keys.shape, _chunks_of(keys))
    uniform = view.uniform_length
    shape = (keys.shape[0], uniform) if uniform else (view.total_length(keys),)
    values_crc, values_bytes = write_npy(
        os.path.join(folder, f"{stem}.values.npy"), view.dtype, shape,
        _owned_values(view, keys, node, progress))
    part = {"node": node, "num_keys": int(keys.shape[0]),
            "keys": f"{data}/{stem}.keys.npy", "values": f"{data}/{stem}.values.npy",
            "crc32": {"keys": keys_crc, "values": values_crc},
            "bytes": {"keys": keys_bytes, "values": values_bytes}}
    if lengths is not None:  # described by this part, checked like its own files
        crc, size = write_npy(os.path.join(folder, "lengths.npy"), lengths.dtype,
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
    parts = [read_part(folder, node) for node in range(info["nodes"])]
    workers = info["nodes"] * info["workers_per_node"]
    states = [read_json(os.path.join(folder, worker_file(rank)), "worker state")
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


def _lengths_entry(parts, path):
    entry = next((part["lengths"] for part in parts if "lengths" in part), None)
    if entry is None:
        raise CheckpointError(f"checkpoint {path}: no node wrote the per-key lengths")
    return entry


def remove_stale(path, keep):
    """Remove the data folders of PATH that manifest.json does not name (earlier saves,
    and saves that were interrupted), and temporary files a cut-short write left."""
    for name in os.listdir(path):
        if name != keep and DATA_DIR.match(name):
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)
        elif TEMPORARY.match(name):
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
