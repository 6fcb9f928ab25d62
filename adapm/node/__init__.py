"""Layer 6, node: the node server process. `control/` is its control plane (membership,
coordinator, local workers, barriers, checkpoints, metrics, activity logs); `data/` is its
data plane (remote requests, routing, relocation, sync rounds, replicas); `server.py` runs
both."""
