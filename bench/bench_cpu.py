"""B9 node-server CPU and B13 node-server share (docs/design/BENCHMARKS.md): CPU seconds of
all node servers per million key accesses, and the node servers' share of the cluster's
CPU (with the compiled data plane, and with ADAPM_DATA_PLANE=python), on the Zipf
workload (2 nodes x 2 workers, adaptive) and on B5's matrix factorisation (2 nodes x 1
worker, adaptive, 1 epoch), for this checkout and, with `--baseline PATH`, for another
checkout (the previous commit, built in place: `git worktree add PATH COMMIT && cd PATH
&& python setup.py build_ext --inplace`), in the same run.

Each measurement runs in a fresh process (with PYTHONPATH pointing at the checkout under
test): the node servers' CPU is the CPU of that process's children (node servers and
workers, all waited for) minus what the workers report for themselves. The same cluster
is also started once with workers that access nothing: its node servers' CPU (interpreter
start, imports, creating and initialising the table, forming the cluster, shutting down)
does not grow with the accesses, so it is subtracted, and the figure is what the accesses
cost. Without that, start-up is most of the figure at this size and hides the data plane.
Both are printed."""

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


def idle_worker(w, *_):
    """Accesses nothing: the cluster's fixed cost."""
    w.barrier()
    return 0, cpu_seconds(resource.RUSAGE_SELF)


def inner(workload, idle=False):
    """Run one workload in this process; print {"server_cpu_s", "accesses"} as JSON."""
    import adapm
    before = cpu_seconds(resource.RUSAGE_CHILDREN)
    if workload == "zipf":
        results = adapm.run(idle_worker if idle else zipf_worker, nodes=2, workers_per_node=2,
                            num_keys=100_000, value_length=16, mode="adaptive")
    else:
        from adapm.apps import mf
        opts = dict(MF_OPTS)
        num_keys, value_length = mf.table_shape(opts)
        results = adapm.run(idle_worker if idle else mf_worker, args=(opts,), nodes=2,
                            workers_per_node=1,
                            num_keys=num_keys, value_length=value_length, mode="adaptive",
                            init=mf.FactorInit(opts["rank"], 0.1, opts["seed"]))
    children = cpu_seconds(resource.RUSAGE_CHILDREN) - before
    workers = sum(cpu for _, cpu in results)
    print(json.dumps({"server_cpu_s": children - workers, "workers_cpu_s": workers,
                      "accesses": int(sum(n for n, _ in results)),
                      "adapm": os.path.dirname(adapm.__file__)}))


def run_inner(workload, checkout, idle, plane=None):
    environ = dict(os.environ)
    if plane:
        environ["ADAPM_DATA_PLANE"] = plane
    if checkout:
        environ["PYTHONPATH"] = os.pathsep.join(
            [checkout, os.path.join(checkout, "bench"), HERE])
    command = [sys.executable, os.path.join(HERE, "bench_cpu.py"), "--inner", workload]
    out = subprocess.run(command + (["--idle"] if idle else []), capture_output=True,
                         text=True, env=environ, check=True,
                         cwd=os.path.join(checkout, "bench") if checkout else HERE)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(workload, checkout=None, plane=None):
    """CPU s per million accesses, without and with the fixed cost; the raw figures, with
    the node servers' share of the cluster's CPU (B13: the servers' CPU less their fixed
    cost, over that plus the workers' CPU)."""
    figures = run_inner(workload, checkout, idle=False, plane=plane)
    fixed = run_inner(workload, checkout, idle=True, plane=plane)["server_cpu_s"]
    figures["fixed_server_cpu_s"] = fixed
    serving = max(0.0, figures["server_cpu_s"] - fixed)
    figures["server_share"] = serving / (serving + figures["workers_cpu_s"])
    per_million = 1e6 / figures["accesses"]
    return ((figures["server_cpu_s"] - fixed) * per_million,
            figures["server_cpu_s"] * per_million, figures)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--baseline", default=None, help="checkout of the previous commit")
    parser.add_argument("--inner", choices=("zipf", "mf"), default=None)
    parser.add_argument("--idle", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        return inner(args.inner, args.idle)
    payload = {}
    for workload in ("zipf", "mf"):
        ours, ours_total, figures = measure(workload)
        row = {"cpu_s_per_million": ours, "with_fixed_cost": ours_total, **figures}
        text = (f"{workload:4s} node servers: {ours:.3f} CPU s per million key accesses "
                f"({ours_total:.3f} with start-up)")
        share = figures["server_share"]
        python_share = measure(workload, plane="python")[2]["server_share"]
        row["python_plane_server_share"] = python_share
        line("B13", f"{workload:4s} node servers' share of the cluster's CPU: {share:.0%} "
             f"(with ADAPM_DATA_PLANE=python: {python_share:.0%}; target <= 10%)",
             verdict(share, 0.10, higher_is_better=False))
        if args.baseline:
            theirs, theirs_total, base = measure(workload, args.baseline)
            ratio = ours / theirs
            row.update(baseline_cpu_s_per_million=theirs, baseline_with_fixed_cost=theirs_total,
                       baseline=base, ratio=ratio)
            line("B9", f"{text} vs {theirs:.3f} ({theirs_total:.3f}) before: {ratio:.2f}x "
                 "(target <= 0.25x, the compiled data plane's)",
                 verdict(ratio, 0.25, higher_is_better=False))
        else:
            line("B9", text, "info")
        payload[workload] = row
    save("cpu", payload)
    return payload


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
