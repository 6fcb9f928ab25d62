"""Runs every benchmark: `tox -e bench` (quick) or `tox -e bench -- --full`.
B7 (bench_scale.py) needs a core per process and is run on its own; B9 (bench_cpu.py)
prints absolute figures here, and compares with `--baseline CHECKOUT` when run alone."""
import sys

import bench_checkpoint
import bench_cpu
import bench_ctr
import bench_input
import bench_mf
import bench_miss
import bench_plane
import bench_remote
import bench_twotower
import bench_word2vec

import bench_local
import bench_memory

if __name__ == "__main__":
    argv = sys.argv[1:]
    full = [a for a in argv if a == "--full"]
    bench_local.main(full)
    bench_memory.main(full)
    bench_remote.main(argv)
    bench_plane.main([])
    bench_mf.main(full)
    bench_miss.main(full)
    bench_cpu.main([])
    bench_input.main(full)
    bench_ctr.main([])
    bench_twotower.main([])
    bench_word2vec.main([])
    bench_checkpoint.main([])
