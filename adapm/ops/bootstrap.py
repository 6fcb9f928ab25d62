"""How adapm-launch starts a worker: `python -c BOOTSTRAP SCRIPT|-m MODULE ARGS...`.

Takes the cluster's keys out of the environment (so that nothing the script starts
inherits them), names the process (adapm-wRANK), makes it die with the launcher, then runs
the user's script or module as __main__ with its own arguments and the same sys.path as
`python SCRIPT ARGS` (the script's folder first) or `python -m MODULE ARGS` (the current
folder first)."""

import os
import runpy
import sys
import traceback

from adapm.common.config import ENV_LAUNCHER_PID, ENV_RANK
from adapm.common.errors import ClusterError
from adapm.common.process import die_with_parent, set_process_name
from adapm.wire.security import claim_client_keys

# `python -c` puts the current folder first on sys.path; drop it before importing adapm,
# so that a source checkout in the current folder cannot shadow the installed package.
BOOTSTRAP = "import sys; del sys.path[0]; from adapm.ops.bootstrap import main; main(sys.argv[1:])"

# Exit code of a worker that stopped because the cluster failed (an uncaught ClusterError):
# a consequence of another failure, which adapm-launch reports in preference to this one.
EXIT_CLUSTER_FAILED = 75


def main(argv):
    claim_client_keys()
    die_with_parent(int(os.environ.get(ENV_LAUNCHER_PID, os.getppid())))
    set_process_name(f"adapm-w{os.environ.get(ENV_RANK, '')}")
    try:
        run_target(argv)
    except ClusterError:
        traceback.print_exc()
        sys.exit(EXIT_CLUSTER_FAILED)


def run_target(argv):
    if len(argv) >= 2 and argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    sys.exit("adapm.ops.bootstrap is started by adapm-launch")
