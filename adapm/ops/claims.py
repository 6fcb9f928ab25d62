"""Holding a node of a cluster on this machine while its processes run, so that a second
launch of the same node fails at once instead of taking over the first one's table."""

import errno
import hashlib
import socket

from adapm.table.shared_table import segment_name


def claim_node(cluster_id, node):
    """Hold node `node` of cluster `cluster_id` on this machine for as long as the socket
    returned stays open: FileExistsError while another process holds it. The segment's
    name cannot tell that a node runs: it goes once the node's workers attached. So the
    claim is a Unix socket bound to an abstract name (Linux) derived from the segment's
    name: no other process can bind it meanwhile, and the kernel frees it as its holder
    ends, however it ends (SIGKILL too), leaving nothing behind."""
    name = segment_name(cluster_id, node)
    digest = hashlib.sha256(name.encode()).hexdigest()[:40]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(f"\0adapm-node-{digest}".encode())
    except OSError as exc:
        sock.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        raise FileExistsError(f"node {node} of cluster {cluster_id} already runs on this "
                              "machine") from None
    return sock
