"""Runs every benchmark: `tox -e bench` (quick) or `tox -e bench -- --full`.
B7 (bench_scale.py) needs a core per process and is run on its own."""
import sys

import bench_mf
import bench_remote

import bench_local
import bench_memory

if __name__ == "__main__":
    argv = sys.argv[1:]
    full = [a for a in argv if a == "--full"]
    bench_local.main(full)
    bench_memory.main(full)
    bench_remote.main(argv)
    bench_mf.main(full)
