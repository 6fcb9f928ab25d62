"""The per-machine cache of parsed input: a reader's arrays kept as .npy files, keyed by
the file's real path, size, mtime and inode and the reader's options, memory-mapped by
every later read on the machine (adapm.apps.readers has the whole story)."""

import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
import tempfile
import time
import warnings

import numpy as np

CACHE_ENV = "ADAPM_INPUT_CACHE"
CACHE_OFF = ("off", "0", "no", "false", "none")
CACHE_FORMAT = 1              # bump when what an entry holds changes
STALE_TMP_S = 3600            # a writer's temporary folder older than this was abandoned


def cache_dir():
    """The cache folder (ADAPM_INPUT_CACHE, default $TMPDIR/adapm-input-UID), or None
    where ADAPM_INPUT_CACHE turns it off."""
    value = os.environ.get(CACHE_ENV, "").strip()
    if value.lower() in CACHE_OFF:
        return None
    return value or os.path.join(tempfile.gettempdir(), f"adapm-input-{os.getuid()}")


def _digest(value):
    return hashlib.sha256(json.dumps(value).encode()).hexdigest()[:20]


def _stat_key(st):
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def cached(kind, path, params, parse):
    """parse() -> (arrays, meta) once per machine: the cached arrays (memory-mapped) where
    an entry for this file exists, else parse() under the file's lock, kept as an entry."""
    root = cache_dir()
    if root is None:
        return parse()
    if not _private(root):
        warnings.warn(f"adapm.apps.readers: no cache for {path}: {root} is not a folder of this "
                      "user's that only it can write to", RuntimeWarning, stacklevel=3)
        return parse()
    st = os.stat(path)
    real = os.path.realpath(path)
    ident = _digest([kind, real, params])  # the file read with these options
    entry = os.path.join(root, f"{kind}-{ident}-{_digest([CACHE_FORMAT, _stat_key(st)])}")
    found = _load_entry(entry)
    if found is not None:
        return found
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        lock = open(os.path.join(root, f"{kind}-{ident}.lock"), "a")
    except OSError as exc:
        warnings.warn(f"adapm.apps.readers: no cache for {path} ({exc}); every process parses "
                      "it", RuntimeWarning, stacklevel=3)
        return parse()
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        found = _load_entry(entry)  # the process we waited for may have written it
        if found is not None:
            return found
        arrays, meta = parse()
        if _stat_key(os.stat(path)) != _stat_key(st):
            return arrays, meta  # changed while we read it: not kept
        try:
            _write_entry(root, entry, arrays, meta, real, st)
        except OSError as exc:
            warnings.warn(f"adapm.apps.readers: could not cache {path} in {root} ({exc})",
                          RuntimeWarning, stacklevel=3)
            return arrays, meta
        _prune(root, keep=entry)
        found = _load_entry(entry)
        return found if found is not None else (arrays, meta)


def _private(root):
    """Whether root is absent (to be made) or a folder of this user's that nobody else
    can write to (entries planted by others would be read as training data)."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return True
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid() and not st.st_mode & 0o022


def _load_entry(entry):
    """(arrays memory-mapped read-only, meta) of a cache entry, or None."""
    try:
        with open(os.path.join(entry, "meta.json")) as f:
            info = json.load(f)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, ValueError):
        info = None
    try:
        arrays = {}
        for name in info["arrays"]:
            array = np.load(os.path.join(entry, f"{name}.npy"), mmap_mode="r",
                            allow_pickle=False)
            arrays[name] = array.view(np.ndarray)  # a plain array; the map lives on
        return arrays, info["meta"]
    except (OSError, ValueError, KeyError, TypeError):  # damaged: drop it, parse again
        shutil.rmtree(entry, ignore_errors=True)
        return None


def _write_entry(root, entry, arrays, meta, source, st):
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=root)
    try:
        for name, array in arrays.items():
            np.save(os.path.join(tmp, f"{name}.npy"), np.ascontiguousarray(array),
                    allow_pickle=False)
        with open(os.path.join(tmp, "meta.json"), "w") as f:  # last: marks it complete
            json.dump({"source": source, "stat": _stat_key(st), "arrays": list(arrays),
                       "meta": meta}, f)
        os.rename(tmp, entry)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and os.path.isdir(entry):
            return
        raise


def _prune(root, keep):
    """Remove the other entries of `keep`'s file and options, entries whose file changed or
    is gone, and temporary folders of writers that died. (Processes that still map a removed
    entry keep their maps.)"""
    prefix = keep.rsplit("-", 1)[0]
    now = time.time()
    for name in os.listdir(root):
        path = os.path.join(root, name)
        try:
            if name.startswith(".tmp-"):
                if now - os.stat(path).st_mtime > STALE_TMP_S:
                    shutil.rmtree(path, ignore_errors=True)
                continue
            if name.endswith(".lock") or path == keep:
                continue
            if path.rsplit("-", 1)[0] == prefix:
                shutil.rmtree(path, ignore_errors=True)
                continue
            with open(os.path.join(path, "meta.json")) as f:
                info = json.load(f)
            try:
                current = _stat_key(os.stat(info["source"]))
            except FileNotFoundError:
                current = None
            if current != info["stat"]:
                shutil.rmtree(path, ignore_errors=True)
                if current is None:  # the file is gone: nobody will wait on its lock
                    lock = path.rsplit("-", 1)[0] + ".lock"
                    if os.path.exists(lock):
                        os.unlink(lock)
        except (OSError, ValueError, KeyError):
            continue
