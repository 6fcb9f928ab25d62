"""Layer 8, ops: starting and stopping clusters: adapm.run, adapm-launch, the cluster's
processes, input checks, the workers' bootstrap."""
