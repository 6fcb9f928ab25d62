"""Intents too large for the intent ring travel as INTENT messages (Worker.intent): what
the node servers receive is what the caller meant, even when it reuses its buffer."""
import numpy as np
import pytest

import adapm
from adapm.policy.intents import read_intent_log

pytestmark = pytest.mark.timeout(120)


def reuse_buffer_task(w, rounds, n):
    buf = np.empty(n, dtype=np.uint64)
    for i in range(rounds):
        buf[:] = i                      # this batch's keys, in a buffer the loop reuses
        w.intent(buf, 1000 + i)         # too large for the ring: sent as INTENT
    w.barrier()
    return w.rank


def test_an_intent_sent_as_a_message_is_not_changed_by_reusing_the_keys_buffer(
        tmp_path, monkeypatch):
    """protocol.send passes messages of 64 KiB or more zero-copy; Worker.intent's
    fallback message carries `keys` as as_keys returned it, which for a contiguous
    int64/uint64 array is the caller's own memory. intent() returns at once ("never
    blocks"), so a caller that refills its buffer for the next batch changes what the
    node server receives for this one."""
    log = tmp_path / "intents"
    monkeypatch.setenv("ADAPM_INTENT_LOG", str(log))
    rounds, n = 12, 70_000              # 70000 keys > ring: always the message path
    adapm.run(reuse_buffer_task, args=(rounds, n), nodes=2, workers_per_node=1,
              num_keys=100, value_length=1, mode="adaptive")
    for node in range(2):
        records = read_intent_log(f"{log}.node{node}")
        assert len(records) == rounds
        wrong = [(start - 1000, sorted(set(keys.tolist()))) for _, start, _, keys in records
                 if set(keys.tolist()) != {start - 1000}]
        assert not wrong, f"node {node}: (batch, keys received) {wrong}"
