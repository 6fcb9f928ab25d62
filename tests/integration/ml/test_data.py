"""adapm.data.IntentLoader: the right keys at the right clocks, announced ahead."""
import time

import numpy as np
import pytest

import adapm
from adapm.data import FIRST_AHEAD, MAX_AHEAD, MIN_AHEAD, SAFETY, IntentLoader
from adapm.policy.intents import read_intent_log

pytestmark = pytest.mark.timeout(120)


class RecordingWorker:
    """Stands in for a Worker: a clock and a record of intent calls (in-process)."""

    def __init__(self, clock=0, reaction=0.0):
        self.clock = clock
        self.reaction = reaction  # what the node says it takes to act on an intent
        self.calls = []  # (clock when called, keys, start)

    def reaction_time(self):
        return self.reaction

    def intent(self, keys, start, end=None):
        assert end is None
        self.calls.append((self.clock, np.asarray(keys).copy(), start))

    def advance_clock(self):
        self.clock += 1
        return self.clock


def plan(n, rng=None):
    rng = rng or np.random.default_rng(0)
    return [rng.integers(0, 1000, size=5) for _ in range(n)]


@pytest.mark.parametrize("lookahead", [0, 1, 3, 10])
def test_each_batch_is_announced_lookahead_clocks_before_its_use(lookahead):
    w = RecordingWorker(clock=7)
    batches = plan(20)
    seen = []
    for batch in IntentLoader(w, batches, keys_of=lambda b: b, lookahead=lookahead):
        seen.append((w.clock, batch))
    assert [c for c, _ in seen] == list(range(7, 27))  # one clock per batch
    assert len(w.calls) == 20
    for i, (called_at, keys, start) in enumerate(w.calls):
        assert start == 7 + i                           # used at this clock
        np.testing.assert_array_equal(keys, batches[i])
        assert called_at == 7 + max(0, i - lookahead)   # announced `lookahead` ahead
    assert w.clock == 27


def one_node_loader_task(w):
    """IntentLoader on a worker whose intents change nothing: keys_of is never called,
    and batches are read one at a time (nothing is gained by reading ahead)."""
    called, produced, seen = [], [], []

    def batches():
        for batch in plan(6):
            produced.append(batch)
            yield batch

    for _ in IntentLoader(w, batches(), keys_of=lambda b: called.append(b) or b):
        seen.append(len(produced))
    return w.intents_matter, len(called), w.clock, w.stats()["intents"], seen


def test_where_intents_change_nothing_no_keys_are_computed():
    for nodes, mode in ((1, "adaptive"), (2, "static")):
        [result, *_] = adapm.run(one_node_loader_task, nodes=nodes, num_keys=1000,
                                 value_length=2, mode=mode)
        assert result == (False, 0, 6, 0, [1, 2, 3, 4, 5, 6])   # a clock step a batch
    # a worker that does not say (a stand-in) is announced to, as before
    w = RecordingWorker()
    for _ in IntentLoader(w, plan(3), keys_of=lambda b: b, lookahead=1):
        pass
    assert len(w.calls) == 3


def test_epochs_continue_the_clock_and_len_passes_through():
    w = RecordingWorker()
    loader = IntentLoader(w, plan(5), keys_of=lambda b: b, lookahead=2)
    assert len(loader) == 5
    for _ in range(3):
        for _ in loader:
            pass
    assert [start for _, _, start in w.calls] == list(range(15))


def test_generators_and_empty_batches_and_early_break():
    w = RecordingWorker()
    source = (np.arange(i % 3) for i in range(9))  # batches 0, 3, 6 have no keys
    for i, _ in enumerate(IntentLoader(w, source, keys_of=lambda b: b, lookahead=4)):
        if i == 6:
            break
    assert [start for _, _, start in w.calls] == [1, 2, 4, 5, 7, 8]
    assert w.clock == 6  # the batch in use when the loop broke was not finished


def test_default_lookahead_adapts_to_the_step_time():
    w = RecordingWorker()
    loader = IntentLoader(w, plan(200), keys_of=lambda b: b)
    assert loader.ahead() == FIRST_AHEAD
    for i, _ in enumerate(loader):
        time.sleep(0.005)  # a 5 ms step: 50 ms of batches is about 10 of them
        if i == 40:
            break
    assert 5 <= loader.ahead() <= 12
    fast = IntentLoader(w, plan(3000), keys_of=lambda b: b)
    for _ in fast:  # microsecond steps: capped
        pass
    assert fast.ahead() == MAX_AHEAD
    slow = IntentLoader(w, plan(3), keys_of=lambda b: b)
    slow.step_seconds = 2.0
    assert slow.ahead() == MIN_AHEAD


def test_default_lookahead_follows_the_nodes_reaction_time():
    """The node measures how long it takes to act on an intent; the loader keeps SAFETY
    times that much time of batches announced, whatever the step time."""
    for reaction, step in ((0.010, 0.001), (0.002, 0.0001), (0.040, 0.004)):
        loader = IntentLoader(RecordingWorker(reaction=reaction), plan(3), keys_of=lambda b: b)
        loader.step_seconds = step
        assert loader.ahead() == max(MIN_AHEAD, round(SAFETY * reaction / step))
    fast_node = IntentLoader(RecordingWorker(reaction=0.001), plan(3), keys_of=lambda b: b)
    slow_node = IntentLoader(RecordingWorker(reaction=0.02), plan(3), keys_of=lambda b: b)
    fast_node.step_seconds = slow_node.step_seconds = 0.001
    assert slow_node.ahead() > fast_node.ahead()


def test_bad_arguments():
    w = RecordingWorker()
    with pytest.raises(ValueError, match="lookahead"):
        IntentLoader(w, [], keys_of=lambda b: b, lookahead=-1)
    with pytest.raises(TypeError, match="keys_of"):
        IntentLoader(w, [], keys_of=None)


def loader_task(w, seed, lookahead):
    rng = np.random.default_rng(seed + w.rank)
    batches = [rng.integers(0, w.num_keys, size=rng.integers(1, 20)) for _ in range(60)]
    used = []
    for batch in IntentLoader(w, batches, keys_of=lambda b: b, lookahead=lookahead):
        used.append((w.clock, batch))
        w.push(batch, np.ones((batch.shape[0], 2)))
    w.wait_sync()
    w.barrier()
    return used, w.pull(np.arange(w.num_keys)), w.stats()


@pytest.mark.parametrize("lookahead", [None, 5])
def test_loader_intents_match_the_node_servers_record(tmp_path, monkeypatch, lookahead):
    """What the node servers received (ADAPM_INTENT_LOG) is exactly one intent per batch,
    for the batch's keys, at the clock at which the training loop used that batch."""
    log = tmp_path / "intents"
    monkeypatch.setenv("ADAPM_INTENT_LOG", str(log))
    results = adapm.run(loader_task, args=(11, lookahead), nodes=2, workers_per_node=1,
                        num_keys=300, value_length=2, mode="adaptive")
    total = np.zeros(300)
    for rank, (used, _, _) in enumerate(results):
        records = sorted((r for r in read_intent_log(f"{log}.node{rank}") if r[0] == rank),
                         key=lambda r: r[1])
        assert len(records) == len(used) == 60
        for (clock, batch), (_, start, end, keys) in zip(used, records):
            assert (start, end) == (clock, clock + 1)
            np.testing.assert_array_equal(keys, batch)
        for _, batch in used:
            np.add.at(total, batch, 1)
    for _, table, _ in results:  # and training through the loader loses nothing
        np.testing.assert_array_equal(table[:, 0], total)
