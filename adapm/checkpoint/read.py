"""Reading a checkpoint with no cluster: `Checkpoint` (the manifest checked against its
files, the parts memory-mapped, checksums verified on request) and `load`."""

import os
import stat

import numpy as np

from adapm.checkpoint.format import MANIFEST, CheckpointError, read_manifest
from adapm.checkpoint.npy import file_crc, npy_header


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
        got_dtype, got_shape, data_bytes = npy_header(filename)
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
        crc, size = file_crc(filename)
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
