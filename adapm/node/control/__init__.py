"""The node server's control plane: the coordinator, this node's workers, the checkpoint phases,
metrics and activity lines."""
