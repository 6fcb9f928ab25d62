"""I1-I3: reading training data files (adapm.apps.readers), against the np.loadtxt-era readers.

Generated in a temporary folder (`--full`; the quick version, which run.py runs, a tenth
of each): I1 a MatrixMarket coordinate file of 10M entries (1M x 100k, float32 values),
I2 a tab-separated file of 2M triples (100k entities, 500 relations), I3 a Criteo TSV file
of 1M lines (label, 13 integer fields, 26 hexadecimal fields; 10% of the fields empty).

For each file:
- before: the reader the apps had (kept below as reference_*: mf's np.loadtxt, kge's
  line loop and np.unique over the names; for Criteo, which no app read, np.loadtxt with
  converters);
- pyarrow / numpy: adapm.apps.readers with pyarrow's multithreaded CSV reader and with the
  plain numpy path (USE_PYARROW = False), cache off: one parse of the text;
- first / cached: with the per-machine cache: the first read (parse and write the
  entry), then a read by another process of the machine (a fresh interpreter, as a worker
  is: memory-mapped, every array summed once so that its pages are really read);
- a run: the reads of one machine with W workers (`--workers`, default 4), as each app
  did them before: mf (embedded) parsed the file in the launching process and again in
  every worker (1 + W parses; under adapm-launch 2 per worker); kge under adapm-launch
  once in every worker (W); a Criteo reader in every worker (W). Now: the first read and
  the other processes' cached reads.
Every figure is the best of --repeat runs, with the speed-up over `before`; the target is
>= 10x (issue 11, item 5). Writes bench/results/input.json.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from adapm.apps import readers

from common import line, save, verdict

FULL = dict(mtx=10_000_000, triples=2_000_000, criteo=1_000_000)
TARGET = 10.0
CHUNK = 1_000_000  # lines generated at once


# -- the readers before (the apps' code as it was) ------------------------------------

def reference_matrix_market(path):
    """mf_data.read_matrix_market before: np.loadtxt of the body."""
    with open(path) as f:
        f.readline()
        text = f.readline()
        while text.startswith("%"):
            text = f.readline()
        rows, cols, nnz = (int(x) for x in text.split())
        data = np.loadtxt(f, ndmin=2) if nnz else np.empty((0, 3))
    r, c = data[:, 0].astype(np.int64) - 1, data[:, 1].astype(np.int64) - 1
    return rows, cols, r, c, data[:, 2].astype(np.float32)


def reference_triples(path):
    """kge.read_tsv and kge.index_names before: a line loop, np.unique over the names."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, 1):
            text = text.rstrip("\r\n")
            if not text.strip():
                continue
            fields = text.split("\t")
            if len(fields) != 3 or not all(fields):
                raise ValueError(f"{path}:{number}: malformed")
            rows.append(fields)
    named = np.array(rows, dtype=str).reshape(-1, 3)
    entities = np.unique(named[:, [0, 2]].reshape(-1))
    relations = np.unique(named[:, 1])
    ids = np.column_stack([np.searchsorted(entities, named[:, 0]),
                           np.searchsorted(relations, named[:, 1]),
                           np.searchsorted(entities, named[:, 2])]).astype(np.int64)
    return ids, entities, relations


def reference_criteo(path):
    """np.loadtxt with converters (no app read Criteo before)."""
    def dense(text):
        return int(text) if text else 0

    def sparse(text):
        return int(text, 16) if text else readers.MISSING

    converters = {0: float, **dict.fromkeys(range(1, 14), dense),
                  **dict.fromkeys(range(14, 40), sparse)}
    data = np.loadtxt(path, delimiter="\t", dtype=np.int64, converters=converters,
                      ndmin=2)
    return data[:, 0].astype(np.float32), data[:, 1:14].astype(np.float32), data[:, 14:]


# -- generated files ---------------------------------------------------------------------

def write_lines(f, columns, sep):
    """Byte-string columns (numpy S arrays of one length) joined by `sep`, a line each."""
    text = columns[0]
    for column in columns[1:]:
        text = np.char.add(np.char.add(text, sep), column)
    f.write(b"\n".join(text.tolist()) + b"\n")


def hex8(values):
    """uint32 values as 8 lowercase hex digits (S8)."""
    shifts = np.arange(28, -1, -4, dtype=np.uint32)
    digits = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    return digits[(values[:, None] >> shifts) & 0xF].view("S8").reshape(-1)


def generate_mtx(path, n, rng, rows=1_000_000, cols=100_000):
    with open(path, "wb") as f:
        f.write(b"%%MatrixMarket matrix coordinate real general\n% generated\n")
        f.write(f"{rows} {cols} {n}\n".encode())
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            r = rng.integers(1, rows + 1, m).astype("S")
            c = rng.integers(1, cols + 1, m).astype("S")
            v = rng.normal(size=m).astype(np.float32).astype("S")
            write_lines(f, [r, c, v], b" ")


def generate_triples(path, n, rng, entities=100_000, relations=500):
    with open(path, "wb") as f:
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            h = np.char.add(b"entity/", rng.integers(0, entities, m).astype("S"))
            r = np.char.add(b"relation/", rng.integers(0, relations, m).astype("S"))
            t = np.char.add(b"entity/", rng.integers(0, entities, m).astype("S"))
            write_lines(f, [h, r, t], b"\t")


def generate_criteo(path, n, rng, empty=0.1):
    with open(path, "wb") as f:
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            columns = [rng.integers(0, 2, m).astype("S")]
            for _ in range(readers.CRITEO_DENSE):
                column = np.minimum(rng.geometric(0.01, m) - 2, 10**6).astype("S")
                columns.append(np.where(rng.random(m) < empty, b"", column))
            for _ in range(readers.CRITEO_SPARSE):
                column = hex8(rng.integers(0, 2**32, m, dtype=np.uint64).astype(np.uint32))
                columns.append(np.where(rng.random(m) < empty, b"", column))
            write_lines(f, columns, b"\t")


# -- timing ----------------------------------------------------------------------------

def best(fn, repeat):
    seconds = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        seconds = min(seconds, time.perf_counter() - start)
    return seconds


def with_backend(use_pyarrow, fn):
    def run():
        saved = readers.USE_PYARROW
        readers.USE_PYARROW = use_pyarrow
        try:
            return fn()
        finally:
            readers.USE_PYARROW = saved
    return run


WORKER = """
import json, sys, time
import numpy as np
from adapm.apps import readers
start = time.perf_counter()
found = getattr(readers, sys.argv[1])(sys.argv[2], cache=True, **json.loads(sys.argv[3]))
total = sum(float(np.asarray(a).sum()) for a in found if isinstance(a, np.ndarray)
            and a.dtype.kind in "iuf")
print(json.dumps({"seconds": time.perf_counter() - start, "parses": sum(
    readers.PARSES.values())}))
"""


def cached_read(reader, path, options, cache, repeat):
    """Seconds of a cached read in a fresh process (a worker's), best of `repeat`."""
    env = dict(os.environ, **{readers.CACHE_ENV: cache})
    seconds = float("inf")
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", WORKER, reader, path,
                              json.dumps(options)], env=env,
                             capture_output=True, text=True, check=True).stdout
        result = json.loads(out)
        if result["parses"]:
            raise RuntimeError(f"a cached read of {path} parsed the text")
        seconds = min(seconds, result["seconds"])
    return seconds


def measure(tag, what, path, reader, options, reference, workers, repeat, folder,
            launcher):
    """options: the reader's, as the app calls it; launcher: the app parsed the file in
    the launching process too (mf)."""
    def fn(path, **more):
        return getattr(readers, reader)(path, **options, **more)

    size = os.path.getsize(path) / 1e6
    before = best(lambda: reference(path), repeat)
    row = {"file": what, "mb": size, "before_s": before}
    line(tag, f"{what} ({size:,.0f} MB): before {before:.2f} s", "info")
    backends = [("pyarrow", True), ("numpy", False)] if readers.pyarrow_csv() is not None \
        else [("numpy", False)]
    for name, use in backends:
        os.environ[readers.CACHE_ENV] = "off"
        seconds = best(with_backend(use, lambda: fn(path)), repeat)
        row[f"{name}_s"] = seconds
        speed = before / seconds
        line(tag, f"  {name:8s} one parse {seconds:6.2f} s: {speed:5.1f}x (target >= "
                  f"{TARGET:g}x)", verdict(speed, TARGET))
    cache = os.path.join(folder, "cache")
    os.environ[readers.CACHE_ENV] = cache
    first = best(lambda: fn(path, cache=True), 1)  # parse and write the entry
    cached = cached_read(reader, path, options, cache, repeat)
    row.update(first_s=first, cached_s=cached, workers=workers)
    speed = before / cached
    line(tag, f"  first read {first:.2f} s (parse, write the cache); a worker's cached "
              f"read {cached:.3f} s: {speed:,.0f}x (target >= {TARGET:g}x)",
         verdict(speed, TARGET))
    readers_of_run = workers + 1 if launcher else workers
    run_before = readers_of_run * before
    run_now = first + (readers_of_run - 1) * cached
    row.update(run_before_s=run_before, run_now_s=run_now)
    who = f"1 + {workers}" if launcher else f"{workers}"
    line(tag, f"  a run's reads on one machine ({who} processes): {run_before:.1f} s -> "
              f"{run_now:.2f} s: {run_before / run_now:.1f}x (target >= {TARGET:g}x)",
         verdict(run_before / run_now, TARGET))
    os.environ.pop(readers.CACHE_ENV, None)
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true",
                        help="10M entries, 2M triples, 1M Criteo lines (default: a tenth)")
    parser.add_argument("--workers", type=int, default=4, help="workers of a run (a run)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--only", choices=("mtx", "triples", "criteo"), default=None)
    args = parser.parse_args(argv)
    sizes = {k: v if args.full else v // 10 for k, v in FULL.items()}
    rng = np.random.default_rng(0)
    saved_env = os.environ.get(readers.CACHE_ENV)
    payload = {"backend": readers.backend(), "sizes": sizes, "rows": {}}
    try:
        with tempfile.TemporaryDirectory(prefix="adapm-bench-input-") as folder:
            jobs = [("I1", "mtx", f"MatrixMarket, {sizes['mtx']:,} entries", generate_mtx,
                     "read_matrix_market", {"dtype": "float32"}, reference_matrix_market,
                     True),
                    ("I2", "triples", f"triples TSV, {sizes['triples']:,} lines",
                     generate_triples, "read_triples", {}, reference_triples, False),
                    ("I3", "criteo", f"Criteo TSV, {sizes['criteo']:,} lines",
                     generate_criteo, "read_criteo", {}, reference_criteo, False)]
            for tag, key, what, generate, reader, options, reference, launcher in jobs:
                if args.only not in (None, key):
                    continue
                path = os.path.join(folder, f"input.{key}")
                generate(path, sizes[key], rng)
                payload["rows"][key] = measure(tag, what, path, reader, options, reference,
                                               args.workers, args.repeat, folder, launcher)
                os.unlink(path)
    finally:
        if saved_env is None:
            os.environ.pop(readers.CACHE_ENV, None)
        else:
            os.environ[readers.CACHE_ENV] = saved_env
    save("input", payload)


if __name__ == "__main__":
    main()
