"""Layer 1, common: what every part of AdaPM uses and that knows nothing of tables, messages or
nodes: errors and failure codes, environment variables and modes, logs, processes, ports,
private files, host lists, fail points."""
