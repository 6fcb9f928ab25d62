"""A user script that runs a local cluster; tests drive it as a subprocess.

usage: cluster_script.py normal|raise|wait|hold MARKER_DIR"""
import os
import sys
import time

import numpy as np

import adapm


def hold_until_released(w, marker_dir, timeout=60):
    deadline = time.monotonic() + timeout
    while not os.path.exists(os.path.join(marker_dir, "release")):
        if time.monotonic() > deadline:
            raise TimeoutError("never released")
        time.sleep(0.05)
        w.pull([1, 2])  # keep using the cluster, as a training job would


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
    if how == "hold":  # a job that is none of the test's business, until it is released
        open(os.path.join(marker_dir, f"ready{w.rank}"), "w").close()
        hold_until_released(w, marker_dir)
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
