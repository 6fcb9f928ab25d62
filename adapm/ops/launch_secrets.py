"""adapm-launch's secrets: the cluster's CURVE keys (--secure, --keys-file,
ADAPM_CURVE_KEYS) and the cluster secret a node proves as it joins (--secret-file,
ADAPM_CLUSTER_SECRET)."""

import os

import click

from adapm.wire.cluster_secret import (
    ENV_CLUSTER_SECRET,
    ClusterSecret,
    check_secret_text,
    read_secret_text,
)
from adapm.wire.security import ENV_CURVE_KEYS, CurveKeys, readable_by_others


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
