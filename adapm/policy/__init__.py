"""Layer 5, policy: decisions without I/O: the adaptive manager (clock speeds, action windows,
retention), the node's record of its workers' intents, and where keys live (homes, ownership
records, routes)."""
