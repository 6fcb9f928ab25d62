"""adapm-launch: start a cluster and run a training script in every worker.

    adapm-launch --workers-per-node 2 --num-keys 100000 --value-length 16 train.py --epochs 3

The launcher starts the node server(s), then one process per worker running the script
(or `-m module`) with the ADAPM_* environment that adapm.worker() attaches with. Every
output line is prefixed with its node and worker. Ctrl-C and SIGTERM are forwarded as a
teardown of everything; the first failing worker's exit code becomes the launcher's.
All options are documented in docs/configuration.md."""

import os
import signal
import subprocess
import sys
import threading
import time

import click
import numpy as np

from adapm.bootstrap import BOOTSTRAP, EXIT_CLUSTER_FAILED
from adapm.cluster import LocalCluster, Terminated, signals_unwind
from adapm.config import ENV_LAUNCHER_PID, MODES, ClusterSpec
from adapm.errors import AdapmError


def parse_init(text):
    """zeros | uniform:LOW:HIGH:SEED | normal:STD:SEED"""
    parts = text.split(":")
    try:
        if parts == ["zeros"]:
            return "zeros"
        if parts[0] == "uniform" and len(parts) == 4:
            return ("uniform", float(parts[1]), float(parts[2]), int(parts[3]))
        if parts[0] == "normal" and len(parts) == 3:
            return ("normal", float(parts[1]), int(parts[2]))
    except ValueError:
        pass
    raise click.BadParameter(f"{text!r}: use zeros, uniform:LOW:HIGH:SEED or normal:STD:SEED")


def parse_value_length(text):
    """An integer, or a .npy file with one integer length per key."""
    if text.isdigit():
        return int(text)
    try:
        return np.load(text)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(
            f"{text!r} is neither an integer nor a .npy file: {exc}") from None


def _pump(stream, prefix, out, lock):
    """Copy a worker's output line by line, prefixed with its node and worker."""
    for raw in iter(stream.readline, b""):
        text = raw.decode(errors="replace").rstrip("\n")
        with lock:
            out.write(f"{prefix} {text}\n")
            out.flush()
    stream.close()


def _wait_first_failure(procs, sweep=0.01, grace=2.0):
    """Wait for every worker; return (rank, code) of the failure to report, or None.

    A worker that only stopped because the cluster failed (EXIT_CLUSTER_FAILED) is a
    consequence: for `grace` seconds the others may still show the cause, which wins."""
    waiting = dict(enumerate(procs))
    consequence, deadline = None, None
    while waiting:
        for rank, proc in list(waiting.items()):
            code = proc.poll()
            if code is None:
                continue
            del waiting[rank]
            if code == EXIT_CLUSTER_FAILED:
                if consequence is None:
                    consequence, deadline = (rank, code), time.monotonic() + grace
            elif code != 0:
                return rank, code
        if consequence is not None and time.monotonic() > deadline:
            return consequence
        time.sleep(sweep)
    return consequence


@click.command(context_settings={"help_option_names": ["-h", "--help"],
                                 "ignore_unknown_options": True,
                                 "allow_interspersed_args": False})
@click.option("--nodes", default=1, show_default=True, help="number of nodes")
@click.option("--workers-per-node", default=1, show_default=True)
@click.option("--num-keys", type=int, required=True, help="keys are 0 .. num_keys-1")
@click.option("--value-length", default="1", show_default=True,
              help="floats per key, or a .npy file of per-key lengths")
@click.option("--mode", type=click.Choice(MODES), default="adaptive", show_default=True)
@click.option("--init", "init_text", default="zeros", show_default=True,
              help="zeros, uniform:LOW:HIGH:SEED or normal:STD:SEED")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32",
              show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True,
              help="interface the node servers listen on")
@click.option("-m", "module", default=None, help="run a module (as python -m) instead of a script")
@click.argument("script_and_args", nargs=-1, type=click.UNPROCESSED)
def main(nodes, workers_per_node, num_keys, value_length, mode, init_text, dtype, host,
         module, script_and_args):
    """Run SCRIPT [ARGS]... (or -m MODULE [ARGS]...) in every worker of a new cluster."""
    if module is None and not script_and_args:
        raise click.UsageError("give a SCRIPT to run, or -m MODULE")
    target = ["-m", module, *script_and_args] if module else list(script_and_args)
    try:
        spec = ClusterSpec(num_keys=num_keys, value_length=parse_value_length(value_length),
                           num_nodes=nodes, workers_per_node=workers_per_node, dtype=dtype,
                           init=parse_init(init_text), mode=mode, host=host)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    sys.exit(launch(spec, target))


def launch(spec, target):
    """Run `target` (bootstrap arguments) in every worker; return the exit code."""
    procs, pumps, lock = [], [], threading.Lock()
    with signals_unwind():
        cluster = LocalCluster(spec)
        try:
            cluster.start()
            for rank in range(spec.num_workers):
                env = dict(os.environ, **cluster.worker_env(rank).to_environ())
                env[ENV_LAUNCHER_PID] = str(os.getpid())
                # Each worker leads a session of its own, so that teardown reaches what
                # the script starts too; signals reach workers through the launcher.
                procs.append(subprocess.Popen(
                    [sys.executable, "-c", BOOTSTRAP, *target], env=env,
                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    start_new_session=True))
            for rank, proc in enumerate(procs):
                node, local = divmod(rank, spec.workers_per_node)
                pump = threading.Thread(target=_pump, daemon=True,
                                        args=(proc.stdout, f"[n{node} w{rank}]", sys.stdout, lock))
                pump.start()
                pumps.append(pump)
            failure = _wait_first_failure(procs)
            if failure is None:
                return 0
            rank, code = failure
            print(f"adapm-launch: worker {rank} failed with exit code {code}; stopping the "
                  "cluster", file=sys.stderr, flush=True)
            return code if code > 0 else 128 - code
        except AdapmError as exc:
            print(f"adapm-launch: {exc}", file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt:
            print("adapm-launch: interrupted; stopping the cluster", file=sys.stderr, flush=True)
            return 128 + signal.SIGINT
        except Terminated as exc:
            print("adapm-launch: terminated; stopping the cluster", file=sys.stderr, flush=True)
            return 128 + exc.signum
        finally:
            cluster.teardown(procs, groups=True)
            for pump in pumps:
                pump.join(2.0)


if __name__ == "__main__":
    main()
