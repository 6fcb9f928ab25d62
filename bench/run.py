"""Runs every benchmark: `tox -e bench` (quick) or `tox -e bench -- --full`."""
import sys

import bench_local
import bench_memory

if __name__ == "__main__":
    argv = sys.argv[1:]
    bench_local.main(argv)
    bench_memory.main([a for a in argv if a == "--full"])
