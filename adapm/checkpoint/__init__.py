"""Layer 3, checkpoint: checkpoints on disk (the format, writing a node's part, committing,
reading back with no cluster, restoring a node's home keys). It knows files and tables,
never the network. Public: `adapm.checkpoint.load`, `Checkpoint`, `CheckpointError`."""

from adapm.checkpoint.files import Checkpoint, CheckpointError, load

__all__ = ["Checkpoint", "CheckpointError", "load"]
