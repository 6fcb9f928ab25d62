"""adapm-launch --hosts FILE: the per-machine launcher started on every host over ssh,
with this launcher's options, the cluster secret on its standard input."""

import os
import shlex
import signal
import subprocess
import threading

import click

from adapm.common.process import stop_process
from adapm.ops.cluster import Terminated, signals_unwind
from adapm.ops.launch_workers import SHUTDOWN_GRACE, start_pump, wait_first_failure
from adapm.ops.placement import DEFAULT_COORDINATOR_PORT


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
                start_pump(procs[-1].stdout, f"[{host}]", lock)
            failure = wait_first_failure(procs)
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
