"""Layer 6, client (beside node, never importing it): the worker client of adapm.worker(): its
public API, the miss path, requests in flight, read-your-writes, sampling and saving."""
