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
import sys

import click

from adapm.common import logs
from adapm.common.config import ENV_DIST_PORT, ENV_LOG_LEVEL, ENV_METRICS_PORT, MODES
from adapm.node.control.metrics import node_port
from adapm.node.control.metrics import require as require_metrics
from adapm.ops.launch_hosts import launch_hosts
from adapm.ops.launch_input import ClusterId, ListenPort, Port
from adapm.ops.launch_secrets import cluster_keys, machine_secret, shared_secret
from adapm.ops.launch_table import restored_table
from adapm.ops.launch_workers import launch
from adapm.ops.placement import (
    DEFAULT_COORDINATOR_PORT,
    check_dist_port,
    default_dist_port,
    environ_coordinator,
    placement,
    resolve,
    route_address,
    split_host_port,
)
from adapm.wire.cluster_secret import ENV_CLUSTER_SECRET, new_secret_text
from adapm.wire.spec import ClusterSpec


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


if __name__ == "__main__":
    main()
