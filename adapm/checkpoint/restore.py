"""A cluster started from a checkpoint: the table's shape taken from it (and checked), and
a starting node's home keys installed from it."""

from adapm.checkpoint.format import CheckpointError
from adapm.checkpoint.read import Checkpoint
from adapm.table.shared_table import OWNED


def restore_home_keys(table, path, node, num_nodes, num_keys, value_length, dtype):
    """Install a starting node's home keys from the checkpoint (as owned), after checking
    that it fits and is not corrupt. Returns how many keys were installed."""
    checkpoint = Checkpoint(path)
    checkpoint.check_compatible(num_keys, value_length, dtype)
    checkpoint.verify()
    installed = 0
    for keys, values in checkpoint.home_values(node, num_nodes):
        table.install(keys, OWNED, values)
        installed += keys.shape[0]
    expected = len(range(node, num_keys, num_nodes))
    if installed != expected:
        raise CheckpointError(f"checkpoint {path}: node {node} found {installed} of its "
                              f"{expected} keys")
    return installed


def table_shape(restore, num_keys, value_length, dtype, init):
    """(num_keys, value_length, dtype, init) of a cluster started by adapm.run or
    adapm-launch: from `restore` (a checkpoint path) where not given, and checked against
    it where given; the defaults (1 float32 per key, zeros) without a checkpoint."""
    if restore is None:
        if num_keys is None:
            raise ValueError("num_keys is required (unless restoring a checkpoint)")
        return (num_keys, 1 if value_length is None else value_length,
                "float32" if dtype is None else dtype, init)
    if init is not None:
        raise ValueError("init and restore exclude each other: a restored table starts "
                         "from the checkpoint's values")
    saved = Checkpoint(restore)
    num_keys = saved.num_keys if num_keys is None else num_keys
    value_length = saved.value_length if value_length is None else value_length
    dtype = str(saved.dtype) if dtype is None else dtype
    saved.check_compatible(num_keys, value_length, dtype)
    return num_keys, value_length, dtype, ("checkpoint", saved.path)
