"""B9 node-server CPU (../shared/docs/BENCHMARKS.md): CPU seconds of all node servers per
million key accesses, on the Zipf workload (2 nodes x 2 workers, adaptive) and on B5's
matrix factorisation (2 nodes x 1 worker, adaptive, 1 epoch), for this checkout and, with
`--baseline PATH`, for another checkout (the previous commit, built in place: `git worktree
add PATH COMMIT && cd PATH && python setup.py build_ext --inplace`), in the same run.

Each measurement runs in a fresh process (with PYTHONPATH pointing at the checkout under
test): the node servers' CPU is the CPU of that process's children (node servers and
workers, all waited for) minus what the workers report for themselves."""

import argparse
import json
import os
import resource
import subprocess
import sys

import numpy as np

from common import line, save, verdict

HERE = os.path.dirname(os.path.abspath(__file__))
MF_OPTS = dict(rows=100_000, cols=10_000, train=1_000_000, test=100_000, rank=16,
               noise=0.1, batch=256, lr=0.1, reg=0.01, lookahead=None, seed=0, epochs=1)


def cpu_seconds(who):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def zipf_worker(w):
    import bench_remote
    done, _, _ = bench_remote.zipf_task(w, 200, 500, 5, bench_remote.LOOKAHEAD)
    return done, cpu_seconds(resource.RUSAGE_SELF)


def mf_worker(w, opts):
    from adapm.apps import mf
    result = mf.train(w, opts)
    accesses = result["accesses"]  # keys pulled and pushed while training, by place
    return accesses["local"] + accesses["remote"], cpu_seconds(resource.RUSAGE_SELF)


def inner(workload):
    """Run one workload in this process; print {"server_cpu_s", "accesses"} as JSON."""
    import adapm
    before = cpu_seconds(resource.RUSAGE_CHILDREN)
    if workload == "zipf":
        results = adapm.run(zipf_worker, nodes=2, workers_per_node=2, num_keys=100_000,
                            value_length=16, mode="adaptive")
    else:
        from adapm.apps import mf
        opts = dict(MF_OPTS)
        num_keys, value_length = mf.table_shape(opts)
        results = adapm.run(mf_worker, args=(opts,), nodes=2, workers_per_node=1,
                            num_keys=num_keys, value_length=value_length, mode="adaptive",
                            init=mf.FactorInit(opts["rank"], 0.1, opts["seed"]))
    children = cpu_seconds(resource.RUSAGE_CHILDREN) - before
    workers = sum(cpu for _, cpu in results)
    print(json.dumps({"server_cpu_s": children - workers,
                      "accesses": int(sum(n for n, _ in results)),
                      "adapm": os.path.dirname(adapm.__file__)}))


def measure(workload, checkout=None):
    environ = dict(os.environ)
    if checkout:
        environ["PYTHONPATH"] = os.pathsep.join(
            [checkout, os.path.join(checkout, "bench"), HERE])
    out = subprocess.run([sys.executable, os.path.join(HERE, "bench_cpu.py"), "--inner",
                          workload], capture_output=True, text=True, env=environ, check=True,
                         cwd=os.path.join(checkout, "bench") if checkout else HERE)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    return figures["server_cpu_s"] / figures["accesses"] * 1e6, figures


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", default=None, help="checkout of the previous commit")
    parser.add_argument("--inner", choices=("zipf", "mf"), default=None)
    args = parser.parse_args(argv)
    if args.inner:
        return inner(args.inner)
    payload = {}
    for workload in ("zipf", "mf"):
        ours, figures = measure(workload)
        row = {"cpu_s_per_million": ours, **figures}
        text = f"{workload:4s} node servers: {ours:.2f} CPU s per million key accesses"
        if args.baseline:
            theirs, base = measure(workload, args.baseline)
            ratio = ours / theirs
            row.update(baseline_cpu_s_per_million=theirs, baseline=base, ratio=ratio)
            line("B9", f"{text} vs {theirs:.2f} before: {ratio:.2f}x (target <= 0.5x)",
                 verdict(ratio, 0.5, higher_is_better=False))
        else:
            line("B9", text, "info")
        payload[workload] = row
    save("cpu", payload)
    return payload


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
