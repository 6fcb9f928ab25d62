"""Who may send a node server which message: checked for every message from the ROUTER
before any part sees it. Workers (routing identity W<rank>) send requests, and only a
registered worker of this node sends it control requests; peer servers (N<node>) send
forwarded requests, relocations and sync rounds. Every sender carries the cluster's
token."""

from adapm.common.errors import ProtocolError
from adapm.wire import protocol
from adapm.wire.protocol import MsgType, node_identity, worker_identity

WORKER_REQUESTS = {MsgType.HELLO, MsgType.BARRIER, MsgType.WAIT_SYNC, MsgType.INTENT,
                   MsgType.GOODBYE, MsgType.PULL, MsgType.PUSH, MsgType.SET, MsgType.LOCALIZE,
                   MsgType.REFRESH, MsgType.WAKE, MsgType.APPLY, MsgType.CHECKPOINT}
LOCAL_ONLY = {MsgType.BARRIER, MsgType.WAIT_SYNC, MsgType.INTENT, MsgType.GOODBYE,
              MsgType.LOCALIZE, MsgType.REFRESH, MsgType.WAKE, MsgType.CHECKPOINT}
FORWARDED_REQUESTS = {MsgType.FWD_PULL, MsgType.FWD_PUSH, MsgType.FWD_SET,
                      MsgType.FWD_APPLY}
PEER_REQUESTS = {MsgType.FWD_PULL, MsgType.FWD_PUSH, MsgType.FWD_SET, MsgType.FWD_APPLY,
                 MsgType.MOVE_REQUEST, MsgType.MOVE, MsgType.OWNER_UPDATE, MsgType.SYNC,
                 MsgType.SYNC_REPLY}


def check_sender(identity, msg, *, token, spec, node, registered):
    """Raise ProtocolError unless `msg`, from routing identity `identity`, is a request
    its sender may make of node `node`. registered(rank, identity): whether that is the
    connection that worker `rank` of this node said hello on."""
    if msg.token != token:
        raise ProtocolError(f"{msg.type.name} without the cluster's token (a connection "
                            "that is not a member)")
    if msg.type in WORKER_REQUESTS:
        if msg.src_worker >= spec.num_workers:
            raise ProtocolError(f"{msg.type.name} from worker {msg.src_worker}, of "
                                f"{spec.num_workers}")
        if identity != worker_identity(msg.src_worker, token):
            raise ProtocolError(f"{msg.type.name} with a sender that is not worker "
                                f"{msg.src_worker}")
        if msg.type in LOCAL_ONLY and not registered(msg.src_worker, identity):
            raise ProtocolError(f"{msg.type.name} from worker {msg.src_worker}, which is "
                                f"not a registered worker of node {node}")
    elif msg.type in PEER_REQUESTS:
        if msg.src_node >= spec.num_nodes or identity != node_identity(msg.src_node, token):
            raise ProtocolError(f"{msg.type.name} from an unknown peer")
        if msg.src_node == node:
            raise ProtocolError(f"{msg.type.name} claiming to come from this node itself")
        if msg.type in FORWARDED_REQUESTS and not 0 <= msg.requester < spec.num_workers:
            raise ProtocolError(f"{msg.type.name} for worker {msg.requester}")
    else:
        raise ProtocolError(f"{msg.type.name} is not a request for a node server")


def describe(msg):
    """'PUSH from worker 3 (node 1) for keys 10..99': for logs and failure reasons."""
    sender = f"node {msg.src_node}" if msg.src_worker == protocol.SERVER else \
        f"worker {msg.src_worker} (node {msg.src_node})"
    text = f"{msg.type.name} from {sender}"
    if msg.keys is not None and msg.keys.shape[0]:
        text += f" for {msg.keys.shape[0]} keys in {int(msg.keys.min())}.." \
                f"{int(msg.keys.max())}"
    return text
