"""B8 reaction and B10 miss cost (docs/design/BENCHMARKS.md).

B8: 2 nodes x 1 worker; the worker of node 0 announces a key it does not hold (homed on
node 1, nobody else intends it) for its current clock, then polls its table until the key
is usable there. p50/p99 of the time from intent to usable, against the raw pyzmq round
trip of a small message between two processes, measured in the same run.

B10: 2 nodes x 1 worker, batches of 128 keys through IntentLoader with its default
look-ahead: each worker works on a region of its own (homed on both nodes alike), uses a
set of keys in turns with the other worker (each holds them for a phase of steps, then the
other does), and a small hot set every step. Per mode (static, adaptive): the median step
time of steps with and without a miss (a pull that had to go to another node), the share
of steps with a miss in the second half of the run, and keys/s."""

import argparse
import multiprocessing
import os
import time

import numpy as np
import zmq

import adapm
from adapm.data import IntentLoader
from adapm.table.shared_table import OWNED, REPLICA, WORKER_SLOT
from adapm.wire.protocol import HEADER_BYTES

from common import line, save, verdict

D = 16
BATCH = 128
OWN_KEYS = 2000       # each worker's region
TURN_KEYS = 400       # used by one worker for PHASE steps, then by the other
HOT_KEYS = 32         # both, every step
PHASE = 50
HOT_PER_BATCH = 8
TURN_PER_BATCH = 24


# -- the raw reference ----------------------------------------------------------------

def _echo(address_out, stop):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    port = sock.bind_to_random_port("tcp://127.0.0.1")
    address_out.send(f"tcp://127.0.0.1:{port}")
    while not stop.is_set():
        if sock.poll(100):
            frames = sock.recv_multipart(copy=False)
            sock.send_multipart(frames, copy=False)
    sock.close(0)
    ctx.term()


def raw_round_trips(rounds, payload_bytes=64):
    """Round trips (seconds) of a header plus `payload_bytes` between two processes."""
    mp = multiprocessing.get_context("spawn")
    receive, send = mp.Pipe(duplex=False)
    stop = mp.Event()
    proc = mp.Process(target=_echo, args=(send, stop))
    proc.start()
    address = receive.recv()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(address)
    header, payload = bytes(HEADER_BYTES), bytes(payload_bytes)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        sock.send_multipart([header, payload])
        sock.recv_multipart()
        times.append(time.perf_counter() - start)
    sock.close(0)
    ctx.term()
    stop.set()
    proc.join(5)
    return np.array(times[rounds // 10:])


# -- B8 -------------------------------------------------------------------------------

def reaction_task(w, trials):
    """Worker 0 announces one key at a time that node 1 owns and nobody else wants."""
    if w.rank != 0:
        w.barrier()
        return None
    state = np.empty(1, dtype=np.uint8)
    times = []
    for trial in range(trials):
        key = np.array([2 * trial + 1], dtype=np.uint64)  # homed on node 1
        start = time.perf_counter()
        w.intent(key, w.clock)
        while True:
            w._view.states_of(key, state)  # the table itself: no message, no side effect
            if state[0] in (OWNED, REPLICA):
                break
            if time.perf_counter() - start > 5:
                raise TimeoutError(f"key {int(key[0])} never arrived")
            os.sched_yield()  # leave the cores to the node servers (2 of them, 2 cores here)
        times.append(time.perf_counter() - start)
        w.advance_clock()
    w.barrier()
    return times


def bench_b8(trials):
    raw = raw_round_trips(300)
    times = np.array(adapm.run(reaction_task, args=(trials,), nodes=2, num_keys=4 * trials,
                               value_length=D, mode="adaptive")[0])
    p50, p99, raw50 = (np.percentile(times, 50), np.percentile(times, 99),
                       np.percentile(raw, 50))
    ratio = p99 / raw50
    line("B8", f"reaction: intent to usable p50 {p50 * 1e6:.0f} us, p99 {p99 * 1e6:.0f} us; "
               f"raw round trip {raw50 * 1e6:.0f} us: p99 {ratio:.1f} round trips "
               "(target <= 2)", verdict(ratio, 2.0, higher_is_better=False))
    return {"reaction_s": times.tolist(), "raw_s": raw.tolist(), "p99_round_trips": ratio}


# -- B10 ------------------------------------------------------------------------------

def b10_batches(rank, steps, seed=7):
    rng = np.random.default_rng(seed + rank)
    hot = np.arange(HOT_KEYS)
    turn = np.arange(HOT_KEYS, HOT_KEYS + TURN_KEYS)
    first_own = HOT_KEYS + TURN_KEYS + rank * OWN_KEYS
    own = np.arange(first_own, first_own + OWN_KEYS)
    for step in range(steps):
        mine = (step // PHASE) % 2 == rank
        parts = [rng.choice(hot, HOT_PER_BATCH, replace=False)]
        if mine:
            parts.append(rng.choice(turn, TURN_PER_BATCH, replace=False))
        rest = BATCH - sum(p.shape[0] for p in parts)
        parts.append(rng.choice(own, rest, replace=False))
        yield np.concatenate(parts)


def miss_task(w, steps):
    remote = WORKER_SLOT["pulls_remote"]
    grads = np.full((BATCH, D), -1e-3, dtype=np.float32)
    out = np.empty((BATCH, D), dtype=np.float32)
    times, missed = [], []
    loader = IntentLoader(w, list(b10_batches(w.rank, steps)), keys_of=lambda b: b)
    last = time.perf_counter()
    for keys in loader:
        before = w._view.counter_get(w.local_rank, remote)  # the worker's own counter
        w.pull(keys, out=out)
        missed.append(w._view.counter_get(w.local_rank, remote) > before)
        w.push(keys, grads)
        now = time.perf_counter()
        times.append(now - last)  # the whole step: intents, clock, pull, push
        last = now
    w.wait_sync()
    w.barrier()
    return np.array(times), np.array(missed)


def bench_b10(steps):
    results = {}
    for mode in ("static", "adaptive"):
        started = time.perf_counter()
        per_worker = adapm.run(miss_task, args=(steps,), nodes=2, num_keys=HOT_KEYS +
                               TURN_KEYS + 2 * OWN_KEYS, value_length=D, mode=mode)
        wall = time.perf_counter() - started
        times = np.concatenate([t[1:] for t, _ in per_worker])  # the first includes start
        missed = np.concatenate([m[1:] for _, m in per_worker])
        second = np.concatenate([m[len(m) // 2:] for _, m in per_worker])
        keys_s = sum(steps * BATCH / t.sum() for t, _ in per_worker)  # both workers
        hit = float(np.median(times[~missed])) if (~missed).any() else float("nan")
        miss = float(np.median(times[missed])) if missed.any() else float("nan")
        results[mode] = {"median_step_hit_s": hit, "median_step_miss_s": miss,
                         "miss_share_second_half": float(second.mean()), "keys_per_s": keys_s,
                         "wall_s": wall}
        line("B10", f"{mode:9s} step: {hit * 1e6:6.0f} us all local, {miss * 1e6:6.0f} us with "
                    f"a miss; {100 * second.mean():5.1f}% of steps miss in the second half; "
                    f"{keys_s / 1e6:.2f}M keys/s", "info")
    static, adaptive = results["static"], results["adaptive"]
    ratio = adaptive["median_step_miss_s"] / static["median_step_miss_s"]
    line("B10", f"adaptive step with a miss vs static's remote step: {ratio:.2f}x "
                "(target <= 1.1x)", verdict(ratio, 1.1, higher_is_better=False))
    share = adaptive["miss_share_second_half"]
    line("B10", f"adaptive: {100 * share:.1f}% of steps miss in the second half "
                "(target <= 2%)", verdict(share, 0.02, higher_is_better=False))
    speed = adaptive["keys_per_s"] / static["keys_per_s"]
    line("B10", f"adaptive vs static: {speed:.2f}x keys/s (target >= 2x)", verdict(speed, 2.0))
    results.update(miss_vs_static=ratio, speedup=speed)
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--only", choices=("b8", "b10"), default=None)
    args = parser.parse_args(argv)
    steps = 6000 if args.full else 2000
    payload = {}
    if args.only in (None, "b8"):
        payload["b8"] = bench_b8(400 if args.full else 150)
    if args.only in (None, "b10"):
        payload["b10"] = bench_b10(steps)
    save("miss", payload)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
