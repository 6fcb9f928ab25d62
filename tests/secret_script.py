"""A training script for --secure tests: records which secrets the worker process was
given, and which its script and the processes the script starts can see.

usage: secret_script.py DIR  (writes DIR/seen<RANK>.json)"""
import json
import os
import subprocess
import sys

import adapm

CHILD = "import json, os; print(json.dumps(dict(os.environ)))"


def child_environ():
    """The environment a process started by the script inherits."""
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return json.loads(out)


with open("/proc/self/environ", "rb") as f:  # what the launcher gave this process
    given = f.read().decode(errors="replace")
seen = {"given": given, "script": dict(os.environ), "child": child_environ()}
with adapm.worker() as w:
    w.push([0], [[1.0]])
    w.barrier()
    seen["pulled"] = float(w.pull([0]).sum())
    seen["script_with_worker"] = dict(os.environ)
    seen["child_with_worker"] = child_environ()
    with open(os.path.join(sys.argv[1], f"seen{w.rank}.json"), "w") as f:
        json.dump(seen, f)
    w.barrier()
