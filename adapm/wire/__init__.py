"""Layer 4, wire: what crosses between processes: the message format (the one module that knows
byte layouts), CURVE security, the cluster secret, the cluster's spec and the worker's
environment."""
