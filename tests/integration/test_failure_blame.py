"""A failure names its cause (issue 17, point 6): a node stalled past the node timeout is
reported as that node, not as "node 0: server died (exit code 3)", which only said that
node 0's server ended because the cluster had failed."""
import glob
import os
import signal
import threading
import time

import numpy as np
import pytest

import adapm
from adapm.common.errors import AdapmError
from adapm.common.process import sibling_named

pytestmark = pytest.mark.timeout(120)

NUM_KEYS = 2000


def _stop_node_1_when_it_writes(path):
    """SIGSTOP node 1's server, for good, once its worker writes its part of save 2
    (teardown SIGKILLs it)."""
    deadline = time.monotonic() + 60
    while not glob.glob(os.path.join(path, "v-*-000002", "node-00001.values.npy.tmp*")):
        if time.monotonic() > deadline:
            return
        time.sleep(0.01)
    os.kill(sibling_named("adapm-node1"), signal.SIGSTOP)


def _save_twice(w, path):
    keys = np.arange(w.rank, w.num_keys, w.num_workers)
    w.set(keys, keys.astype(np.float32)[:, None])
    w.save(path)
    if w.rank == 0:
        threading.Thread(target=_stop_node_1_when_it_writes, args=(path,),
                         daemon=True).start()
    w.save(path)  # node 1 stalls while writing (failpoint), and is stopped then
    return "saved"


def _stop_node_1_then_wait(w):
    if w.rank == 0:
        w.barrier()
        os.kill(sibling_named("adapm-node1"), signal.SIGSTOP)
    else:
        w.barrier()
    w.barrier()  # node 1's server never arrives
    return "passed"


def test_a_node_stalled_during_a_save_is_blamed(tmp_path, monkeypatch):
    path = str(tmp_path / "ck")
    monkeypatch.setenv("ADAPM_FAILPOINTS", "1:stall_save=2@3")
    with pytest.raises(AdapmError) as caught:
        adapm.run(_save_twice, args=(path,), nodes=2, num_keys=NUM_KEYS, summary=False)
    text = str(caught.value)
    assert "node 1 stopped responding" in text, text
    assert "server died" not in text, text


def test_a_node_stalled_in_a_barrier_is_blamed():
    with pytest.raises(AdapmError) as caught:
        adapm.run(_stop_node_1_then_wait, nodes=2, num_keys=10, summary=False)
    text = str(caught.value)
    assert "node 1 stopped responding" in text, text
    assert "server died" not in text, text
