"""Shared pieces of the benchmarks: timing, the printed figure lines and the JSON results.

Every speed target is a ratio against a reference measured in the same run
(docs/design/BENCHMARKS.md); a miss is printed as honestly as a pass."""

import json
import os
import platform
import time

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def rate(items, fn, repeat=3):
    """Best-of-`repeat` items per second of fn() (one call processes `items`)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return items / best


def verdict(value, target, floor=None, higher_is_better=True):
    ok = value >= target if higher_is_better else value <= target
    if ok:
        return "PASS"
    if floor is not None and (value >= floor if higher_is_better else value <= floor):
        return "below target, above floor"
    return "MISS"


def line(bench_id, text, status):
    print(f"{bench_id:3s} {text}  [{status}]", flush=True)


def save(name, payload):
    os.makedirs(RESULTS_DIR, exist_ok=True)
    payload = dict(payload)
    payload["machine"] = {"python": platform.python_version(), "cpus": os.cpu_count(),
                          "platform": platform.platform()}
    payload["time"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    path = os.path.join(RESULTS_DIR, f"{name}.json")
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
    return path
