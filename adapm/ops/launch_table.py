"""adapm-launch's table options: --init, --optimizer, --value-length and --restore, read
into what ClusterSpec takes (errors are click's usage errors, naming the option)."""

import click
import numpy as np

import adapm.checkpoint as checkpoint


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
