"""adapm-launch: start a cluster and run a training script in every worker.

    adapm-launch --nodes 2 --workers-per-node 2 --num-keys 100000 train.py --epochs 3

Three ways to start (docs/configuration.md has every option and variable):
- local: `--nodes N` runs the coordinator, N node servers and N x W workers here;
- per machine, torchrun-style: `--nnodes N --node-rank R --coordinator HOST:PORT` on
  each machine (read from SLURM_*, NODE_RANK/WORLD_SIZE or MASTER_ADDR/MASTER_PORT when
  present, so SLURM, Kubernetes or MPI can start it); node 0 hosts the coordinator;
- `--hosts FILE`: one host per line; runs the per-machine form on each over ssh.

Every output line is prefixed with its node and worker. Ctrl-C and SIGTERM tear
everything down; the first failing worker's exit code becomes the launcher's.

Every worker can call torch.distributed.init_process_group(backend) with no other argument:
its MASTER_ADDR is the coordinator's host (node 0's machine, where worker 0 hosts the
group's store), its MASTER_PORT --dist-port (default: the coordinator's port + 1 across
machines, a free port locally), never the coordinator's, so every machine derives the same
address without a message; RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE are set too."""

import hashlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

import click
import numpy as np

import adapm.checkpoint as checkpoint
from adapm.common import logs
from adapm.common.config import (
    ENV_DIST_PORT,
    ENV_LAUNCHER_PID,
    ENV_LOG_LEVEL,
    ENV_METRICS_PORT,
    MODES,
)
from adapm.common.errors import FAIL_STOPPED, AdapmError
from adapm.common.hostlist import first_host
from adapm.common.ports import parse_port
from adapm.common.process import stop_process
from adapm.node.control.metrics import node_port
from adapm.node.control.metrics import require as require_metrics
from adapm.ops.bootstrap import BOOTSTRAP, EXIT_CLUSTER_FAILED
from adapm.ops.cluster import (
    NOT_INHERITED,
    DistPortError,
    LocalCluster,
    Terminated,
    signals_unwind,
)
from adapm.ops.launch_input import ClusterId, ListenPort, Port, port_variable
from adapm.table.stats import format_summary
from adapm.table.stats import title as summary_title
from adapm.wire.cluster_secret import (
    ENV_CLUSTER_SECRET,
    ClusterSecret,
    check_secret_text,
    new_secret_text,
    read_secret_text,
)
from adapm.wire.security import ENV_CURVE_KEYS, CurveKeys, readable_by_others, without_secrets
from adapm.wire.spec import ClusterSpec

DEFAULT_COORDINATOR_PORT = 29650
SHUTDOWN_GRACE = 10.0  # seconds workers get to notice a node's failure before they are stopped
STOP_GRACE = 2.0       # seconds workers get to raise ClusterError after another one failed


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


def parse_optimizer(text):
    """NAME or NAME:KEY=VALUE,... (adapm.optim: sgd, adagrad, rowwise_adagrad, adam)."""
    if text is None:
        return None
    from adapm.table.optimizers import OPTIMIZERS
    name, _, rest = text.partition(":")
    if name not in OPTIMIZERS:
        raise click.BadParameter(f"{name!r}: use one of {', '.join(OPTIMIZERS)}, optionally "
                                 "with :KEY=VALUE,... (as adam:lr=0.01,eps=1e-8)")
    kwargs = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            kwargs[key.strip()] = float(value)
        except ValueError:
            raise click.BadParameter(f"{item!r} in {text!r}: KEY=NUMBER") from None
    try:
        return OPTIMIZERS[name](**kwargs)
    except (TypeError, ValueError) as exc:
        raise click.BadParameter(f"{text!r}: {exc}") from None


def table_init(init_text, optimizer_text, value_length):
    """The cluster's init: --init's rows, with --optimizer's state beside them (adapm.optim:
    Adagrad's accumulators at their start, not noise) when an optimizer is named."""
    init = parse_init(init_text)
    optimizer = parse_optimizer(optimizer_text)
    if optimizer is None:
        return init
    if not isinstance(value_length, int):
        raise click.BadParameter("--optimizer needs one --value-length for every key")
    try:
        optimizer.dim_of(value_length)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return optimizer.init(init)


def restored_table(restore, num_keys, value_length, dtype, init_text, optimizer_text):
    """(num_keys, value_length, dtype, init) from the options, or from --restore's
    checkpoint where they are absent (adapm.checkpoint.table_shape)."""
    lengths = None if value_length is None else parse_value_length(value_length)
    if restore is None:
        if num_keys is None:
            raise click.UsageError("--num-keys is required (unless --restore)")
        init = table_init(init_text or "zeros", optimizer_text,
                          1 if lengths is None else lengths)
    elif init_text is not None or optimizer_text is not None:
        raise click.UsageError("--restore starts from the checkpoint's values (optimizer "
                               "state included): drop --init and --optimizer")
    else:
        init = None
    try:
        return checkpoint.table_shape(restore, num_keys, lengths, dtype, init)
    except checkpoint.CheckpointError as exc:
        raise click.UsageError(str(exc)) from None


def parse_value_length(text):
    """An integer, or a .npy file with one integer length per key."""
    if text.isdigit():
        return int(text)
    try:
        return np.load(text)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(
            f"{text!r} is neither an integer nor a .npy file: {exc}") from None


def _first_env(*names):
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    return None



# Where a per-machine launcher finds the number of nodes and its own node rank when the
# options do not say: the first variable set wins (docs/configuration.md).
NODE_COUNT_VARIABLES = ("ADAPM_NNODES", "SLURM_NNODES", "GROUP_WORLD_SIZE", "WORLD_SIZE")
NODE_RANK_VARIABLES = ("ADAPM_NODE_RANK", "SLURM_NODEID", "NODE_RANK", "GROUP_RANK",
                       "JOB_COMPLETION_INDEX")  # the last: a Kubernetes Indexed Job's pod
# SLURM's node lists, whose first host is node 0 (SLURM_NODEID 0): the srun step's, else
# the job's. A coordinator found there listens on DEFAULT_COORDINATOR_PORT.
NODE_LIST_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST")


def environ_coordinator(environ):
    """HOST:PORT of the coordinator from the environment, None where it says nothing:
    ADAPM_COORDINATOR, else MASTER_ADDR:MASTER_PORT, else the first host of SLURM's node
    list (port DEFAULT_COORDINATOR_PORT)."""
    if environ.get("ADAPM_COORDINATOR"):
        split_host_port(environ["ADAPM_COORDINATOR"], DEFAULT_COORDINATOR_PORT,
                        source="ADAPM_COORDINATOR=")
        return environ["ADAPM_COORDINATOR"]
    if environ.get("MASTER_ADDR"):
        if environ.get("MASTER_PORT"):
            port_variable("MASTER_PORT", environ["MASTER_PORT"])
        return f"{environ['MASTER_ADDR']}:{environ.get('MASTER_PORT', '')}"
    for name in NODE_LIST_VARIABLES:
        if environ.get(name):
            try:
                return f"{first_host(environ[name])}:{DEFAULT_COORDINATOR_PORT}"
            except ValueError as exc:
                raise click.UsageError(f"{name}: {exc}") from None
    return None


def machine_placement(environ):
    """(number of nodes, this machine's node rank) from the environment, None where it
    says nothing. WORLD_SIZE counts processes (torchrun, Kubernetes): it is the number
    of machines only where one process runs per machine, so LOCAL_WORLD_SIZE > 1 is
    refused, and so are variables that disagree on the number of nodes."""
    local = _int_variable(environ, "LOCAL_WORLD_SIZE")
    if local is not None and local > 1:
        raise click.UsageError(
            f"LOCAL_WORLD_SIZE={local}: this launcher was started {local} times per machine, "
            "but adapm-launch runs once per machine and starts --workers-per-node workers "
            "itself (torchrun --nproc-per-node 1, or --nnodes/--node-rank)")
    counts = {name: value for name in NODE_COUNT_VARIABLES
              if (value := _int_variable(environ, name)) is not None}
    for name, value in counts.items():  # 0 would read as "not said": a local cluster
        if value < 1:
            raise click.UsageError(f"{name}={value}: a cluster has at least one node")
    if len(set(counts.values())) > 1:
        said = ", ".join(f"{name}={value}" for name, value in counts.items())
        raise click.UsageError(f"the environment disagrees on the number of nodes ({said}; "
                               "WORLD_SIZE counts processes, not machines): pass --nnodes")
    ranks = [value for name in NODE_RANK_VARIABLES
             if (value := _int_variable(environ, name)) is not None]
    return (next(iter(counts.values()), None), ranks[0] if ranks else None)


def placement(nodes, nnodes, node_rank):
    """(number of nodes, this machine's node rank) of a launch per machine, from the
    options or else the environment (machine_placement); (None, None) or partial for a
    local cluster. Options that cannot be meant together are a usage error: without it,
    each of these ran a local cluster of one node, ignoring what was asked."""
    if nodes is not None and (nnodes is not None or node_rank is not None):
        raise click.UsageError("--nodes runs every node on this machine: drop --nnodes and "
                               "--node-rank (they run one node of a cluster across machines)")
    env_nnodes, env_rank = machine_placement(os.environ)
    if node_rank is not None and not (nnodes or env_nnodes):
        raise click.UsageError(f"--node-rank {node_rank} needs the number of nodes: --nnodes "
                               f"(or {', '.join(NODE_COUNT_VARIABLES)})")
    if nnodes is not None and node_rank is None and env_rank is None:
        raise click.UsageError(f"--nnodes {nnodes} needs this machine's --node-rank (or "
                               f"{', '.join(NODE_RANK_VARIABLES)})")
    return nnodes or env_nnodes, node_rank if node_rank is not None else env_rank


def _int_variable(environ, name):
    value = environ.get(name)
    if not value:
        return None
    if not value.isdigit():
        raise click.UsageError(f"{name}={value!r} is not a number")
    return int(value)


def split_host_port(text, default_port, source="--coordinator "):
    """(HOST, PORT) of HOST[:PORT]; a port that is no port (1 .. 65535) is a usage error
    naming `source`, the option or variable it came from."""
    host, sep, port = text.rstrip(":").rpartition(":")
    if not sep:
        return text.rstrip(":"), default_port
    try:
        return host, parse_port(port, lowest=1)
    except ValueError as exc:
        raise click.UsageError(f"{source}{text}: {exc}") from None


def route_address(host, port):
    """The local address this machine uses to reach host:port (a UDP connect sends no
    packet; it only asks the routing table)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((host, port))
            return probe.getsockname()[0]
    except OSError as exc:
        raise click.UsageError(f"no route to the coordinator {host}:{port}: {exc}") from None


def default_dist_port(coordinator_port):
    """Across machines, torch.distributed's port is the coordinator's port + 1: every
    machine knows the coordinator's address, so every machine derives the same port."""
    if not 0 < coordinator_port < 65535:
        raise click.UsageError(f"the coordinator's port {coordinator_port} gives no default "
                               "--dist-port (its port + 1): give --dist-port")
    return coordinator_port + 1


def check_dist_port(dist_port, coordinator_port, server_port):
    """torch.distributed's port must be neither the coordinator's nor the node servers'."""
    if dist_port == coordinator_port:
        raise click.UsageError(f"--dist-port {dist_port} is the coordinator's port: "
                               "torch.distributed needs a port of its own")
    if server_port.isdigit() and int(server_port) == dist_port:
        raise click.UsageError(f"--dist-port {dist_port} is the node servers' --port: "
                               "torch.distributed needs a port of its own")


def resolve(host):
    try:
        return socket.gethostbyname(host)
    except OSError as exc:
        raise click.UsageError(f"cannot resolve {host!r}: {exc}") from None


@click.command(context_settings={"help_option_names": ["-h", "--help"],
                                 "ignore_unknown_options": True,
                                 "allow_interspersed_args": False})
@click.option("--nodes", type=click.IntRange(min=1), default=None,
              help="local: run this many nodes on this machine (default 1)")
@click.option("--nnodes", type=click.IntRange(min=1), default=None,
              help="per machine: nodes in the cluster [SLURM_NNODES, WORLD_SIZE]")
@click.option("--node-rank", type=click.IntRange(min=0), default=None,
              help="per machine: this machine's node id [SLURM_NODEID, NODE_RANK, "
                   "JOB_COMPLETION_INDEX]")
@click.option("--coordinator", default=None,
              help="per machine: HOST:PORT of the coordinator, hosted by node 0 "
                   "[ADAPM_COORDINATOR, MASTER_ADDR:MASTER_PORT, first host of "
                   "SLURM_JOB_NODELIST]")
@click.option("--hosts", "hosts_file", type=click.Path(exists=True, dir_okay=False),
              default=None, help="file with one host per line: one node each, over ssh")
@click.option("--ssh-command", default="ssh", show_default=True,
              help="command that runs a command on a host: CMD HOST COMMAND")
@click.option("--remote-launcher", default="adapm-launch", show_default=True,
              help="adapm-launch as the hosts of --hosts find it")
@click.option("--workers-per-node", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--num-keys", type=int, default=None,
              help="keys are 0 .. num_keys-1 (required unless --restore)")
@click.option("--value-length", default=None,
              help="floats per key, or a .npy file of per-key lengths (default: 1, or the "
                   "checkpoint's)")
@click.option("--mode", type=click.Choice(MODES), default="adaptive", show_default=True)
@click.option("--init", "init_text", default=None,
              help="zeros (default), uniform:LOW:HIGH:SEED or normal:STD:SEED (the rows "
                   "only, with --optimizer)")
@click.option("--optimizer", "optimizer_text", default=None,
              help="the table holds rows with this adapm.optim optimizer's state beside "
                   "them (sgd, adagrad, rowwise_adagrad, adam[:KEY=VALUE,...]): --init "
                   "fills the rows, the state starts as the optimizer starts it")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None,
              help="float32 (default) or float64 (default with --restore: the checkpoint's)")
@click.option("--restore", type=click.Path(file_okay=False), default=None,
              help="start from the checkpoint in this folder (Worker.save), on any number of "
                   "nodes and workers; --num-keys, --value-length and --dtype default to "
                   "its own")
@click.option("--host", default=None,
              help="address the node servers listen on (local: 127.0.0.1; per machine: "
                   "the address that routes to the coordinator)")
@click.option("--port", type=ListenPort(), default="0", show_default=True,
              help="node server port: a number, 0 for any free port, or LOW-HIGH")
@click.option("--dist-port", type=Port(lowest=1), default=None,
              envvar=ENV_DIST_PORT,
              help="MASTER_PORT of the workers' torch.distributed group, on the "
                   "coordinator's host (default: local: a free port; per machine: the "
                   f"coordinator's port + 1) [{ENV_DIST_PORT}]")
@click.option("--cluster-id", type=ClusterId(), default=None,
              help="per machine: a name shared by all machines (default: from the "
                   "coordinator's address)")
@click.option("--secure", is_flag=True,
              help="authenticate and encrypt every connection (CURVE); local clusters get "
                   "fresh keys, clusters across machines need --keys-file")
@click.option("--keys-file", type=click.Path(dir_okay=False), default=None,
              help="CURVE keys shared by every machine (python -m adapm.wire.security FILE); "
                   "implies --secure")
@click.option("--secret-file", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              help="per machine: a file whose one line is the cluster secret every machine "
                   "shares ('-': standard input); what a node proves as it joins, so that "
                   "nobody else can join while the cluster forms (default: "
                   f"{ENV_CLUSTER_SECRET}; make one with python -m adapm.wire.cluster_secret)")
@click.option("--log-level", type=click.Choice(logs.LEVELS, case_sensitive=False),
              default=None, envvar=ENV_LOG_LEVEL,
              help=f"of the node servers' and workers' log lines (default {logs.DEFAULT_LEVEL}: "
                   f"start-up and shutdown; DEBUG: each part's detail) [{ENV_LOG_LEVEL}]")
@click.option("--metrics-port", type=Port(), default=None,
              envvar=ENV_METRICS_PORT,
              help="node servers serve Prometheus metrics on --host at this port, the i-th "
                   "node of this machine at PORT + i (0: any free port, logged); needs "
                   f"pip install 'adapm[metrics]' [{ENV_METRICS_PORT}]")
@click.option("-m", "module", default=None, help="run a module (as python -m) instead of a script")
@click.argument("script_and_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def main(ctx, nodes, nnodes, node_rank, coordinator, hosts_file, ssh_command, remote_launcher,
         workers_per_node, num_keys, value_length, mode, init_text, optimizer_text, dtype,
         host, port, dist_port, cluster_id, secure, keys_file, module, script_and_args,
         restore, log_level=None, metrics_port=None, secret_file=None):
    """Run SCRIPT [ARGS]... (or -m MODULE [ARGS]...) in every worker of a cluster."""
    if log_level:  # every process started finds it in its environment
        os.environ[ENV_LOG_LEVEL] = logs.parse_level(log_level)
    logs.configure(None, "[adapm-launch]")
    if module is None and not script_and_args:
        raise click.UsageError("give a SCRIPT to run, or -m MODULE")
    target = ["-m", module, *script_and_args] if module else list(script_and_args)
    multi_machine = hosts_file is not None or node_rank is not None or nnodes is not None
    num_keys, lengths, dtype, init = restored_table(
        restore, num_keys, value_length, dtype, init_text, optimizer_text)
    common = dict(num_keys=num_keys, value_length=lengths,
                  workers_per_node=workers_per_node, dtype=dtype, init=init,
                  mode=mode, curve=cluster_keys(secure, keys_file, multi_machine))
    if hosts_file:
        sys.exit(launch_hosts(ctx, hosts_file, ssh_command, remote_launcher, coordinator,
                              target, shared_secret(secret_file) or new_secret_text()))
    if metrics_port is not None:
        try:
            require_metrics()
            node_port(metrics_port, (nodes or 1) - 1)  # the last node's port is a port
        except ImportError as exc:
            raise click.UsageError(str(exc)) from None
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--metrics-port") from None
    nnodes, node_rank = placement(nodes, nnodes, node_rank)
    if nodes is None and (node_rank is not None and nnodes):
        sys.exit(launch_machine(common, nnodes, node_rank, coordinator, host, port,
                                dist_port, cluster_id, target, metrics_port=metrics_port,
                                secret_file=secret_file))
    try:
        spec = ClusterSpec(num_nodes=nodes or 1, host=host or "127.0.0.1", **common)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    if dist_port is not None:  # else a free port (the coordinator's port is random here)
        check_dist_port(dist_port, None, port)
    sys.exit(launch(spec, target, port=port, dist_port=dist_port or 0,
                    metrics_port=metrics_port))


def cluster_keys(secure, keys_file, shared):
    """The cluster's CURVE keys, or None. `shared`: every machine must use the same."""
    if keys_file:
        try:
            keys = CurveKeys.load(keys_file)
        except (OSError, ValueError) as exc:
            raise click.BadParameter(f"--keys-file {keys_file}: {exc}") from None
        mode = readable_by_others(keys_file)
        if mode is not None:
            click.echo(f"adapm-launch: warning: --keys-file {keys_file} can be read by others "
                       f"than its owner (mode {mode:04o}): chmod 600 it", err=True)
        return keys
    try:
        from_env = CurveKeys.from_environ()
    except ValueError as exc:  # its value stays out of the message: it holds secrets
        raise click.UsageError(f"{ENV_CURVE_KEYS}: {exc}") from None
    if from_env is not None:
        return from_env
    if not secure:
        return None
    if shared:
        raise click.UsageError("--secure across machines needs --keys-file (make one with "
                               "python -m adapm.wire.security FILE and copy it to every machine)")
    return CurveKeys.generate()


def shared_secret(secret_file):
    """The secret text of --secret-file or ADAPM_CLUSTER_SECRET, checked; None if neither."""
    try:
        if secret_file is not None:
            return read_secret_text(secret_file)
        text = os.environ.get(ENV_CLUSTER_SECRET, "")
        return check_secret_text(text, ENV_CLUSTER_SECRET) if text.strip() else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--secret-file / "
                                 f"{ENV_CLUSTER_SECRET}") from None


def machine_secret(secret_file, curve, cluster_id, coordinator):
    """The secret this machine's node proves as it joins: --secret-file, else
    ADAPM_CLUSTER_SECRET, else one derived from the CURVE keys of a secure cluster, else
    (with a warning) one anybody can derive from the launch options."""
    text = shared_secret(secret_file)
    if text is not None:
        return ClusterSecret.from_text(text, "the cluster secret")
    if curve is not None:
        return ClusterSecret.from_curve(curve)
    click.echo(f"adapm-launch: WARNING: no cluster secret ({ENV_CLUSTER_SECRET} or "
               f"--secret-file): until the cluster has formed, anyone who can reach the "
               f"coordinator at {coordinator} could join it as a missing node and change "
               f"any key. Give every machine the same secret (python -m "
               f"adapm.wire.cluster_secret makes one), or use --secure.", err=True)
    return ClusterSecret.public_for(cluster_id)


def launch_machine(common, nnodes, node_rank, coordinator, host, port, dist_port, cluster_id,
                   target, metrics_port=None, secret_file=None):
    """This machine's node of a cluster that spans machines."""
    coordinator = coordinator or environ_coordinator(os.environ)
    if not coordinator:
        raise click.UsageError("--coordinator HOST:PORT is needed with --node-rank")
    coord_host, coord_port = split_host_port(coordinator, DEFAULT_COORDINATOR_PORT)
    coord_ip = resolve(coord_host)
    listen = host or route_address(coord_ip, coord_port)
    cluster_id = cluster_id or hashlib.sha256(
        f"{coord_ip}:{coord_port}/{nnodes}".encode()).hexdigest()[:12]
    if not 0 <= node_rank < nnodes:
        raise click.UsageError(f"--node-rank {node_rank} outside 0..{nnodes - 1}")
    # MASTER_PORT/MASTER_ADDR in this launcher's environment named the coordinator: the
    # workers' torch.distributed group gets another port on the same host.
    dist_port = dist_port or default_dist_port(coord_port)
    check_dist_port(dist_port, coord_port, port)
    secret = machine_secret(secret_file, common["curve"], cluster_id, coordinator)
    try:
        spec = ClusterSpec(num_nodes=nnodes, host=listen, cluster_id=cluster_id,
                           secret=secret, **common)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return launch(spec, target, nodes=[node_rank], port=port,
                  coordinator=f"tcp://{coord_ip}:{coord_port}", dist_host=coord_ip,
                  dist_port=dist_port, metrics_port=metrics_port)


def launch_hosts(ctx, hosts_file, ssh_command, remote_launcher, coordinator, target, secret):
    """Start the per-machine form on every host of the file over ssh. Each is handed the
    cluster secret on its standard input (--secret-file -): not on a command line, which
    other users of the host could read."""
    with open(hosts_file) as f:
        hosts = [line.split("#")[0].strip() for line in f]
    hosts = [h for h in hosts if h]
    if not hosts:
        raise click.UsageError(f"{hosts_file} names no host")
    coordinator = coordinator or f"{hosts[0]}:{DEFAULT_COORDINATOR_PORT}"
    procs = []
    lock = threading.Lock()
    with signals_unwind():
        try:
            for rank, host in enumerate(hosts):
                remote = remote_command(ctx, remote_launcher, len(hosts), rank, coordinator,
                                        target)
                procs.append(subprocess.Popen(
                    [*shlex.split(ssh_command), host, shlex.join(remote)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT, start_new_session=True))
                _hand_secret(procs[-1], secret)
                _start_pump(procs[-1].stdout, f"[{host}]", lock)
            failure = _wait_first_failure(procs)
            return 0 if failure is None else failure[1]
        except KeyboardInterrupt:
            return 128 + signal.SIGINT
        except Terminated as exc:
            return 128 + exc.signum
        finally:
            for proc in procs:  # SIGTERM reaches the remote launchers through ssh
                stop_process(proc, grace=SHUTDOWN_GRACE, group=True)


def _hand_secret(proc, secret):
    try:
        proc.stdin.write(f"{secret}\n".encode())
        proc.stdin.close()
    except OSError:
        pass  # it exited already: its exit code says why


# Options of this launcher that the per-machine launchers of --hosts get otherwise or not.
NOT_PASSED_TO_HOSTS = {"hosts_file", "ssh_command", "remote_launcher", "coordinator", "nodes",
                       "nnodes", "node_rank", "module", "script_and_args", "host",
                       "secret_file"}


def remote_command(ctx, remote_launcher, nnodes, rank, coordinator, target):
    """The per-machine launcher command (argv) that --hosts runs on host number `rank`."""
    return [remote_launcher, "--nnodes", str(nnodes), "--node-rank", str(rank),
            "--coordinator", coordinator, "--secret-file", "-",
            *_passed_options(ctx, NOT_PASSED_TO_HOSTS),
            *target]


def _passed_options(ctx, drop):
    """The command line options given to this launcher, as arguments for another."""
    args = []
    for param in ctx.command.params:
        if param.name in drop or not isinstance(param, click.Option):
            continue
        source = ctx.get_parameter_source(param.name)
        if source in (click.core.ParameterSource.DEFAULT, None):
            continue
        args += _as_arguments(param, ctx.params[param.name])
    return args


def _as_arguments(param, value):
    if param.is_flag:  # a flag takes no value: `--secure True` would make True the script
        return [param.opts[0]] if value else []
    if param.name == "keys_file":
        # The file this launcher checked, by a name that does not depend on the folder a
        # command starts in (ssh starts in the home folder).
        return [param.opts[0], os.path.abspath(value)]
    return [param.opts[0], str(value)]


def _pump(stream, prefix, out, lock, own=None):
    """Copy a process's output line by line, each line prefixed; a line that begins
    with `own` (a worker's log lines: [node N worker R]) already says who wrote it and is
    copied as it is, as adapm.run prints it."""
    for raw in iter(stream.readline, b""):
        text = raw.decode(errors="replace").rstrip("\n")
        line = text if own and text.startswith(own) else f"{prefix} {text}"
        with lock:
            out.write(f"{line}\n")
            out.flush()
    stream.close()


def _start_pump(stream, prefix, lock, own=None):
    pump = threading.Thread(target=_pump, args=(stream, prefix, sys.stdout, lock, own),
                            daemon=True)
    pump.start()
    return pump


def worker_bootstrap():
    """BOOTSTRAP, with the worker's log lines configured (adapm.common.logs.configure_worker:
    level and prefix from its environment) before the script runs, once BOOTSTRAP has
    dropped the current folder from sys.path."""
    head, anchor, tail = BOOTSTRAP.partition("from adapm.ops.bootstrap import")
    if not anchor:
        return BOOTSTRAP
    configure = "from adapm.common.logs import configure_worker; configure_worker(); "
    return f"{head}{configure}{anchor}{tail}"


def _wait_first_failure(procs, servers=None, sweep=0.01, grace=2.0):
    """Wait for every worker; return (rank, code) of the failure to report, or None.

    A worker that only stopped because the cluster failed (EXIT_CLUSTER_FAILED) is a
    consequence: for `grace` seconds the others may still show the cause, which wins.
    A node server that fails (servers: node -> process) is reported as ("node N", 1) once
    the workers had SHUTDOWN_GRACE seconds to stop by themselves."""
    waiting = dict(enumerate(procs))
    consequence, deadline = None, None
    server_failure, stop_by = None, None
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
        if consequence is not None and time.monotonic() > deadline and server_failure is None:
            return consequence
        for node, proc in (servers or {}).items():
            if server_failure is None and proc.exitcode not in (None, 0):
                server_failure = (f"node {node}", 1)
                stop_by = time.monotonic() + SHUTDOWN_GRACE
                print(f"adapm-launch: node {node}'s server failed (exit code "
                      f"{proc.exitcode})", file=sys.stderr, flush=True)
        if server_failure is not None and time.monotonic() > stop_by:
            return server_failure
        time.sleep(sweep)
    return server_failure or consequence


def launch(spec, target, nodes=None, port="0", coordinator=None, dist_host=None,
           dist_port=0, metrics_port=None):
    """Run `target` (bootstrap arguments) in every worker of the given nodes (default:
    all) on this machine; return the exit code. `dist_host`, `dist_port`: the workers'
    MASTER_ADDR and MASTER_PORT (default: the spec's host and a free port).
    `metrics_port`: the node servers' Prometheus port (adapm.node.control.metrics), None: none.
    At the end it prints the statistics of every node where node 0 runs here (the
    coordinator collects them), else of this machine's nodes."""
    procs, lock = [], threading.Lock()
    ranks = []
    grace = 0.0
    with signals_unwind():
        cluster = None
        try:
            cluster = LocalCluster(spec, nodes=nodes, coordinator=coordinator, port=port,
                                   dist_host=dist_host, dist_port=dist_port,
                                   metrics_port=metrics_port)
            cluster.start()
            for node in cluster.nodes:
                for local in range(spec.workers_per_node):
                    rank = node * spec.workers_per_node + local
                    # A worker gets the keys of a client only, never the four keys this
                    # launcher may have been given in ADAPM_CURVE_KEYS.
                    env = dict(without_secrets(os.environ), **cluster.worker_environ(rank))
                    for name in NOT_INHERITED:
                        env.pop(name, None)
                    env[ENV_LAUNCHER_PID] = str(os.getpid())
                    # Each worker leads a session of its own, so that teardown reaches what
                    # the script starts too; signals reach workers through the launcher.
                    procs.append(subprocess.Popen(
                        [sys.executable, "-c", worker_bootstrap(), *target], env=env,
                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, start_new_session=True))
                    ranks.append(rank)
                    _start_pump(procs[-1].stdout, f"[n{node} w{rank}]", lock,
                                own=logs.worker_prefix(node, rank))
            failure = _wait_first_failure(procs, cluster.servers)
            if failure is None:
                _await_shutdown(cluster)
                return 0
            who, code = failure
            if isinstance(who, int):
                cluster.fail(FAIL_STOPPED, ranks[who])
                who = f"worker {ranks[who]}"
            grace = STOP_GRACE
            print(f"adapm-launch: {who} failed with exit code {code}; stopping the cluster",
                  file=sys.stderr, flush=True)
            return code if code > 0 else 128 - code
        except DistPortError as exc:
            print(f"adapm-launch: {exc}; choose another with --dist-port (or "
                  f"{ENV_DIST_PORT}; across machines it defaults to the coordinator's port "
                  "+ 1)", file=sys.stderr, flush=True)
            return 1
        except (AdapmError, ValueError, OSError) as exc:
            print(f"adapm-launch: {exc}", file=sys.stderr, flush=True)
            return 1
        except KeyboardInterrupt:
            print("adapm-launch: interrupted; stopping the cluster", file=sys.stderr, flush=True)
            return 128 + signal.SIGINT
        except Terminated as exc:
            print("adapm-launch: terminated; stopping the cluster", file=sys.stderr, flush=True)
            return 128 + exc.signum
        finally:
            if cluster is not None:
                if cluster.tables and procs:
                    per_node, missing = cluster.final_stats()
                    print(f"adapm-launch: {summary_title(per_node, spec.mode, missing)}:\n"
                          f"{format_summary(per_node)}", file=sys.stderr, flush=True)
                cluster.teardown(procs, groups=True, grace=grace)


def _await_shutdown(cluster):
    """Every local worker finished: keep serving until every node is done (the
    coordinator then shuts all servers down), so that remote workers can still reach
    the keys this node owns."""
    while any(proc.exitcode is None for proc in cluster.servers.values()):
        for proc in cluster.servers.values():
            proc.join(0.1)
    for node, proc in cluster.servers.items():
        if proc.exitcode != 0:
            raise AdapmError(f"node {node}'s server ended with exit code {proc.exitcode}")


if __name__ == "__main__":
    main()
