"""A training script for adapm-launch tests: usage launch_script.py ok|fail|wait DIR"""
import os
import sys
import time

import numpy as np

import adapm

how, marker_dir = sys.argv[1], sys.argv[2]
with adapm.worker() as w:
    w.push(np.arange(w.num_keys), np.ones((w.num_keys, 2)))
    w.barrier()
    print(f"rank {w.rank} of {w.num_workers} sees {w.pull(np.arange(w.num_keys)).sum():.0f}")
    if how == "fail" and w.rank == 1:
        print("failing on purpose", file=sys.stderr)
        sys.exit(5)
    if how == "wait":
        open(os.path.join(marker_dir, f"ready{w.rank}"), "w").close()
        while True:
            time.sleep(0.05)
    if how == "loop":  # access keys of every node until the cluster fails
        open(os.path.join(marker_dir, f"ready{w.rank}"), "w").close()
        keys = np.arange(w.num_keys)
        try:
            while True:
                w.push(keys, np.ones((w.num_keys, 2)))
                w.pull(keys)
                time.sleep(0.01)
        except adapm.ClusterError as exc:
            print(f"rank {w.rank} ClusterError at {time.time():.3f}: {exc}", flush=True)
            raise
    if how == "sums":  # every worker adds its rank + 1 to every key
        w.push(np.arange(w.num_keys), np.full((w.num_keys, 2), w.rank + 1.0))
        w.wait_sync()
        w.barrier()
        total = w.pull(np.arange(w.num_keys)).sum()
        print(f"rank {w.rank} of {w.num_workers} on node {w.node}: total {total:.0f}")
        # tests/system/test_join_secret.py: workers never join, so they never get the secret
        print(f"rank {w.rank} has the cluster secret: {'ADAPM_CLUSTER_SECRET' in os.environ}")
    if how == "ddp":  # tests/integration/test_distributed.py: DDP for the dense part, pushes
        # for rows
        import json
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).parent / "integration"))
        from test_distributed import ddp_task
        result = {key: value if key == "env" else value.tolist()
                  for key, value in ddp_task(w).items()}
        print(f"rank {w.rank} ddp {json.dumps(result)}", flush=True)
    w.barrier()
