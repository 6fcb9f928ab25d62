"""Where a per-machine launch (--nnodes/--node-rank/--coordinator) sits: the number of
nodes, this machine's node rank and the coordinator's address, from the options or from
the variables SLURM, torchrun, Kubernetes or MPI set; and the addresses and ports derived
from them. Every inconsistency is a usage error."""

import os
import socket

import click

from adapm.common.hostlist import first_host
from adapm.common.ports import parse_port
from adapm.ops.launch_input import port_variable

DEFAULT_COORDINATOR_PORT = 29650

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
