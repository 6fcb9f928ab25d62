"""Type stub of the worker's compiled miss path (src/_miss_path.pyx); adapm.client.miss_path
uses it and is its reference."""
import enum

import numpy as np

class Status(enum.IntEnum):
    FALLBACK = 0    # pull: nothing sent; the Python path serves the call
    STARTED = 1     # pull: requests sent
    DONE = 2        # wait: every missed key placed
    IDLE = 3        # wait: nothing arrived within the timeout (or a signal)
    FOREIGN = 4     # wait: a message not for this call (take_message)
    HANDOFF = 5     # wait: a message for this call that is not a clean answer

class CompiledMissPath:
    bytes_sent: int
    bytes_to_node: int
    bytes_received: int
    placed: int     # replies placed in callers' buffers
    dropped: int    # messages of more frames than any legal one
    def __init__(self, functions: dict, view: object, node: int, num_nodes: int, rank: int,
                 token: int, sockets: dict) -> None: ...
    def pull(self, keys: np.ndarray, out: np.ndarray, misses: np.ndarray, nmiss: int,
             first_request: int) -> int: ...
    @property
    def requests(self) -> int: ...
    def send_update(self, keys: np.ndarray, rows: np.ndarray, misses: np.ndarray, nmiss: int,
                    mtype: int, params: np.ndarray | None, first_request: int,
                    order_out: np.ndarray) -> int: ...
    def requests_of(self, counts_out: np.ndarray) -> None: ...
    def wait(self, timeout_ms: int) -> int: ...
    def take_message(self) -> list[bytes]: ...
    def take_call(self) -> list[tuple[int, int, list[int], int]]: ...
    def abandon(self) -> None: ...
