"""The node server's data plane: serving remote requests, routing, relocation, sync rounds,
replica copies and their holders, and the waits on rounds."""
