"""Type stub of the compiled data plane (src/_plane.pyx; adapm.node.data.plane uses it)."""

class PlaneFault(Exception): ...

class Plane:
    enabled: bool
    bytes_received: int
    bytes_sent: int
    served: int
    unroutable: int
    nbytes: int
    def __init__(self, functions: dict, socket: int, view: object, table: dict, node: int,
                 num_nodes: int, num_workers: int, workers_per_node: int) -> None: ...
    def admit(self, token: int, worker_ids: list, node_ids: list) -> None: ...
    def drain(self, budget: int) -> tuple[int, list | None]: ...
