"""What adapm-launch accepts on its command line and from its environment, checked before
anything starts: each bad value is a usage error (exit code 2) that names the option or
variable and says what it accepts (docs/configuration.md)."""

import click

from adapm.common.config import check_cluster_id
from adapm.common.ports import parse_listen_port, parse_port


def _from_where(param, ctx):
    """' (from VARIABLE)' where the value came from an environment variable, else ''."""
    if ctx is None or param is None or param.envvar is None or \
            ctx.get_parameter_source(param.name) != click.core.ParameterSource.ENVIRONMENT:
        return ""
    return f" (from {param.envvar})"


class Port(click.ParamType):
    """A port, `lowest` .. 65535 (0: any free port)."""

    name = "port"

    def __init__(self, lowest=0):
        self.lowest = lowest

    def convert(self, value, param, ctx):
        try:
            return parse_port(value, self.lowest)
        except ValueError as exc:
            self.fail(f"{exc}{_from_where(param, ctx)}", param, ctx)


class ListenPort(click.ParamType):
    """What node servers listen on: a port, 0 (any free port) or a range LOW-HIGH; kept
    as the text that adapm.node.control.coordinator.bind_address takes."""

    name = "port"

    def convert(self, value, param, ctx):
        try:
            low, high = parse_listen_port(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return str(low) if low == high else f"{low}-{high}"


def port_variable(name, value, lowest=1):
    """The port in environment variable `name` (its `value`), as a usage error naming it."""
    try:
        return parse_port(value, lowest)
    except ValueError as exc:
        raise click.UsageError(f"{name}={value}: {exc}") from None


class ClusterId(click.ParamType):
    """A name for a cluster (adapm.common.config.CLUSTER_ID_RULE)."""

    name = "id"

    def convert(self, value, param, ctx):
        try:
            return check_cluster_id(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
