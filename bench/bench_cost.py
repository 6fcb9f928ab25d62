"""B14 cost at scale (docs/design/BENCHMARKS.md): node-server CPU seconds per million key
accesses and bytes sent per access, for the Zipf workload through IntentLoader at 1, 2, 4
and 8 nodes x 1 worker on this machine.

Every worker is paced at one step (a pull and a push of a batch) per PACE seconds, a rate
two cores sustain at 8 nodes, so that work driven by time (sync rounds, heartbeats) costs
the same per step at every size, as it would on machines of their own. The figures are
CPU accounting and bytes, not wall time. Node-server CPU: the CPU of the run's processes
(all children of a fresh process, waited for) less what the workers report for
themselves, less the same cluster's fixed cost (started with workers that access
nothing). Target: from 2 to 8 nodes, CPU per access <= 1.3x and bytes per access <= 2x."""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np
from bench_remote import zipf_keys

from common import line, save, verdict

HERE = os.path.dirname(os.path.abspath(__file__))
PACE = 0.010      # seconds per step, every worker
BATCH = 200
STEPS = 500


def _cpu(who):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def paced_task(w, steps, idle):
    """Zipf batches through IntentLoader, one step per PACE; (accesses, own CPU, stats)."""
    from adapm.data import IntentLoader
    rng = np.random.default_rng(100 + w.rank)
    plan = [zipf_keys(rng, w.num_keys, BATCH) for _ in range(steps)]
    ones = np.ones((BATCH, 16), dtype=np.float32)
    w.barrier()
    done = 0
    began = time.perf_counter()
    if not idle:
        next_step = time.perf_counter()
        for keys in IntentLoader(w, plan, keys_of=lambda keys: keys):
            w.pull(keys)
            w.push(keys, ones)
            done += 2 * BATCH
            next_step += PACE
            pause = next_step - time.perf_counter()
            if pause > 0:
                time.sleep(pause)
    step_s = (time.perf_counter() - began) / steps
    w.wait_sync()
    w.barrier()
    return done, _cpu(resource.RUSAGE_SELF), w.stats()["node"]["bytes_sent"], step_s


def inner(nodes, idle):
    import adapm
    before = _cpu(resource.RUSAGE_CHILDREN)
    results = adapm.run(paced_task, args=(STEPS, idle), nodes=nodes, workers_per_node=1,
                        num_keys=100_000, value_length=16, mode="adaptive")
    children = _cpu(resource.RUSAGE_CHILDREN) - before
    workers = sum(r[1] for r in results)
    print(json.dumps({"server_cpu_s": children - workers,
                      "accesses": int(sum(r[0] for r in results)),
                      "bytes_sent": int(sum(r[2] for r in results)),
                      "step_s": max(r[3] for r in results)}))


def run_inner(nodes, idle):
    command = [sys.executable, os.path.join(HERE, "bench_cost.py"), "--inner", str(nodes)]
    out = subprocess.run(command + (["--idle"] if idle else []), capture_output=True,
                         text=True, check=True, cwd=HERE)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(nodes):
    busy, idle = run_inner(nodes, False), run_inner(nodes, True)
    accesses = busy["accesses"]
    return {"nodes": nodes, "accesses": accesses,
            "server_cpu_s": busy["server_cpu_s"], "fixed_server_cpu_s": idle["server_cpu_s"],
            "cpu_s_per_million": (busy["server_cpu_s"] - idle["server_cpu_s"]) * 1e6 / accesses,
            "bytes_per_access": (busy["bytes_sent"] - idle["bytes_sent"]) / accesses,
            "step_s": busy["step_s"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", default="1,2,4,8")
    parser.add_argument("--inner", type=int, default=None)
    parser.add_argument("--idle", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.inner:
        return inner(args.inner, args.idle)
    rows = []
    for nodes in (int(n) for n in args.nodes.split(",")):
        row = measure(nodes)
        rows.append(row)
        line("B14", f"{nodes} nodes x 1 worker, paced {PACE * 1e3:.0f} ms/step: "
             f"{row['cpu_s_per_million']:.3f} node-server CPU s per million accesses, "
             f"{row['bytes_per_access']:.1f} bytes sent per access (slowest worker: "
             f"{row['step_s'] * 1e3:.1f} ms a step)", "info")
    by_nodes = {row["nodes"]: row for row in rows}
    if 2 in by_nodes and 8 in by_nodes:
        cpu = by_nodes[8]["cpu_s_per_million"] / by_nodes[2]["cpu_s_per_million"]
        sent = by_nodes[8]["bytes_per_access"] / by_nodes[2]["bytes_per_access"]
        line("B14", f"from 2 to 8 nodes: CPU per access {cpu:.2f}x (target <= 1.3x)",
             verdict(cpu, 1.3, higher_is_better=False))
        line("B14", f"from 2 to 8 nodes: bytes per access {sent:.2f}x (target <= 2x)",
             verdict(sent, 2.0, higher_is_better=False))
    path = save("cost", {"rows": rows, "pace_s": PACE, "environment_plane":
                         os.environ.get("ADAPM_DATA_PLANE", "compiled")})
    print(f"    results: {path}")
    return rows


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
