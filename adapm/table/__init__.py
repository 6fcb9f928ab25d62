"""Layer 2, table: the node-local shared-memory parameter table (its own component, knowing
nothing of the network): segments created and attached, the compiled kernels, keys'
validation, key sets, initializers, the fused optimizers' definitions, and the statistics read
from the table's counters."""
