"""A user script that runs a local cluster; tests drive it as a subprocess.

usage: cluster_script.py normal|raise|wait MARKER_DIR"""
import os
import sys
import time

import numpy as np

import adapm


def task(w, how, marker_dir):
    w.push(np.arange(10), np.ones((10, 2)))
    w.barrier()
    if how == "raise" and w.rank == 1:
        raise ValueError("task failed on purpose")
    if how == "wait":
        open(os.path.join(marker_dir, f"ready{w.rank}"), "w").close()
        while True:  # until the test signals or kills something
            time.sleep(0.05)
            w.pull([1, 2])
    w.barrier()
    return float(w.pull([3]).sum())


if __name__ == "__main__":
    how, marker_dir = sys.argv[1], sys.argv[2]
    try:
        results = adapm.run(task, args=(how, marker_dir), workers_per_node=2, num_keys=10,
                            value_length=2)
    except adapm.AdapmError as exc:
        print(f"{type(exc).__name__}: {exc}", flush=True)
        sys.exit(3)
    print("results", results, flush=True)
