"""The checkpoint format: the names of its files and folders, the manifest's checksum, and
reading the manifest back with every check its readers rely on.

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
type and range (read_manifest, here); every path confined to PATH/<data> and a regular
file; sizes and .npy headers against the fields (read.Checkpoint()); the parts holding
every key exactly once, in order (Checkpoint.parts, the one way to the values); CRC-32s
(Checkpoint.verify)."""

import hashlib
import json
import logging
import os
import re

from adapm.common.config import DTYPES, MODES
from adapm.common.errors import AdapmError

log = logging.getLogger("adapm.checkpoint")

MANIFEST = "manifest.json"
FORMAT = "adapm-checkpoint"
FORMAT_VERSION = 2      # 2: the manifest carries a checksum of itself (MANIFEST_CHECKSUM)
MANIFEST_CHECKSUM = "manifest_sha256"
READABLE_VERSIONS = (1, FORMAT_VERSION)  # 1: no MANIFEST_CHECKSUM, read with a warning
DATA_DIR = re.compile(r"^v-[0-9a-f]{16}-\d{6,}$")
TEMPORARY = re.compile(r"^manifest\.json\.tmp\d+$")


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


# -- the manifest's checksum ----------------------------------------------------------

def manifest_checksum(manifest):
    """sha256 of the manifest's canonical JSON (sorted keys, no spaces), its own checksum
    left out: JSON read back gives the same text, whatever indentation the file has."""
    body = {name: value for name, value in manifest.items() if name != MANIFEST_CHECKSUM}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def sealed(manifest):
    """The manifest with its checksum."""
    return dict(manifest, **{MANIFEST_CHECKSUM: manifest_checksum(manifest)})


# -- reading -------------------------------------------------------------------------

def read_json(filename, what):
    try:
        with open(filename) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{filename}: missing ({what})") from None
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{filename}: unreadable {what}: {exc}") from None


def read_part(folder, node):
    part = read_json(os.path.join(folder, f"{part_stem(node)}.json"),
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
    manifest = read_json(filename, "checkpoint manifest")
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
                  lambda v: isinstance(v, str) and DATA_DIR.match(v) is not None,
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
