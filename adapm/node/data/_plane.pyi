"""Type stub of the compiled data plane (src/_plane.pyx; adapm.node.data.plane uses it)."""

EVENTS: dict[str, int]  # the kinds of take_events' events, by name

class PlaneFault(Exception): ...

class Plane:
    enabled: bool
    bytes_received: int
    bytes_sent: int
    served: int
    unroutable: int
    nbytes: int
    events_full: bool
    can_send_rounds: bool
    def __init__(self, functions: dict, socket: int, view: object, table: dict, node: int,
                 num_nodes: int, num_workers: int, workers_per_node: int) -> None: ...
    def admit(self, token: int, worker_ids: list, node_ids: list,
              peers: dict | None = None) -> None: ...
    def serve_rounds(self, holder_bits: object, seen_version: object, synced: object,
                     pending_set: object, moving_set: object) -> None: ...
    def send_round(self, round_id: int, keys: object, kinds: object) -> tuple[object, int]: ...
    def take_events(self) -> list[tuple[int, int, int]]: ...
    def drain(self, budget: int) -> tuple[int, list | None]: ...
