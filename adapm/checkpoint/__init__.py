"""Layer 3, checkpoint: checkpoints on disk. It knows files and tables, never the network:
format (names, the manifest and its checks), npy (the .npy files), write (a node's part, a
worker's state, the commit), read (Checkpoint, load: no cluster needed), restore (a
cluster started from a checkpoint).

Public (`__all__`): `adapm.checkpoint.load`, `Checkpoint`, `CheckpointError`. The other
names here are this layer's interface to the layers above (node, client, ops)."""

# The layers above use these names through `import adapm.checkpoint as checkpoint`.
from adapm.checkpoint.format import CheckpointError, data_dir_name, read_manifest  # noqa: F401
from adapm.checkpoint.read import Checkpoint, load
from adapm.checkpoint.restore import restore_home_keys, table_shape  # noqa: F401
from adapm.checkpoint.write import (  # noqa: F401
    WriteProgress,
    commit,
    remove_stale,
    write_node_part,
    write_worker_state,
)

__all__ = ["Checkpoint", "CheckpointError", "load"]
