"""A training script for adapm-launch --restore tests: checkpoint_script.py save|show PATH"""
import sys

import numpy as np

import adapm

how, path = sys.argv[1], sys.argv[2]
with adapm.worker() as w:
    keys = np.arange(w.num_keys)
    if how == "save":  # every worker adds its rank + 1 to every key, then saves
        w.push(keys, np.full((w.num_keys, w.value_length), w.rank + 1.0))
        manifest = w.save(path)
        print(f"rank {w.rank}: saved {manifest['num_keys']} keys from "
              f"{manifest['nodes']} nodes", flush=True)
    else:
        print(f"rank {w.rank} of {w.num_workers}: total {w.pull(keys).sum():.0f}", flush=True)
