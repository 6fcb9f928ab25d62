"""A worker's part of a checkpoint save (Worker.save): the phases every worker of the
cluster goes through together, its share of the files, and worker 0's commit.

The phases are control requests to the worker's node server (CHECKPOINT with BEGIN,
FREEZE, WRITTEN, THAW): between FREEZE and THAW no update changes the table, so every
node's part is one consistent snapshot."""

import logging
import os
import threading
import time

import numpy as np

import adapm.checkpoint as checkpoint
from adapm.common import failpoints
from adapm.table.optimizers import SparseOptimizer
from adapm.wire.collectives import BEGIN, FREEZE, THAW, WRITTEN
from adapm.wire.protocol import MsgType


class Saving:
    """Checkpoint saves of one worker.

    `view`: the node's table view; `control(mtype, reply_type, **fields)`: a request to
    the worker's node server; `drain()`: wait for this worker's updates in flight;
    `wait_sync()`: Worker.wait_sync; `node`, `rank`, `local_rank`: who saves;
    `mode`, `num_nodes`, `workers_per_node`: the cluster, for the manifest."""

    def __init__(self, view, control, drain, wait_sync, node, rank, local_rank, mode,
                 num_nodes, workers_per_node):
        self._view = view
        self._control = control
        self._drain = drain
        self._wait_sync = wait_sync
        self.node = node
        self.rank = rank
        self.local_rank = local_rank
        self.mode = mode
        self.num_nodes = num_nodes
        self.workers_per_node = workers_per_node
        self.saves = 0         # this worker's saves so far: the phases' generation
        self._cleanup = None   # the thread removing an earlier checkpoint's files

    def save(self, path, optimizer, clock):
        """Worker.save: the manifest once the checkpoint is complete (CheckpointError
        where this worker's part, or the commit, failed)."""
        self._check_optimizer(optimizer)
        path = os.path.abspath(os.fspath(path))
        self.wait_for_cleanup()
        self.saves += 1
        data = checkpoint.data_dir_name(self._view.cluster_token, self.saves)
        timer = _StepTimer()
        self._phase(BEGIN)   # every worker stopped updating ...
        self._wait_sync()    # ... and every replica's updates reached the owners
        self._phase(FREEZE)
        timer.lap("begin, sync and freeze")
        # From here on, every worker goes through every phase whatever fails: the others
        # learn of a failure from the missing part, and the cluster always thaws.
        error = _failure_of(self._write_part, path, data, optimizer, clock)
        timer.lap("writing")
        self._phase(WRITTEN)
        timer.lap("waiting for the other nodes")
        if self.rank == 0 and error is None:
            error = _failure_of(self._commit, path, data)
            timer.lap("commit")
        self._phase(THAW)
        timer.lap("thaw")
        logging.getLogger("adapm.checkpoint").debug("save %d to %s: %s", self.saves, path,
                                                    timer)
        if error is not None:
            raise checkpoint.CheckpointError(
                f"node {self.node}, worker {self.rank}: saving to {path} failed: "
                f"{error}") from error
        return self._saved_manifest(path, data)

    def wait_for_cleanup(self):
        """Wait for the removal of an earlier checkpoint's files (the next save and
        finalize() do)."""
        if self._cleanup is not None:
            self._cleanup.join()
            self._cleanup = None

    def _check_optimizer(self, optimizer):
        if optimizer is None:
            return
        if not isinstance(optimizer, SparseOptimizer):
            raise TypeError(f"optimizer must be an adapm.optim optimizer, got {optimizer!r}")
        if not self._view.uniform_length:
            raise ValueError("save(optimizer=...) needs a table with one value_length for "
                             "every key (the optimizer's layout)")
        optimizer.dim_of(self._view.uniform_length)  # ValueError when it does not fit

    def _phase(self, phase):
        self._drain()
        self._control(MsgType.CHECKPOINT, MsgType.CHECKPOINTED, generation=self.saves,
                      phase=phase)

    def _write_part(self, path, data, optimizer, clock):
        os.makedirs(os.path.join(path, data), exist_ok=True)
        if self.local_rank == 0:
            lengths = None
            if self.node == 0 and not self._view.uniform_length:
                lengths = self._view.key_lengths().astype(np.uint32)
            progress = checkpoint.WriteProgress(f"node {self.node}", path)
            stall = failpoints.for_node(self.node).argument("stall_save")
            if stall:  # tests: a node that stops in the middle of writing its part
                progress = _stalled(progress, int(stall.split("@")[0]),
                                    float(stall.split("@")[1]), self.saves)
            checkpoint.write_node_part(path, data, self._view, self.node, lengths, progress)
        checkpoint.write_worker_state(path, data, self.rank, clock, optimizer,
                                      self._view.uniform_length)

    def _commit(self, path, data):
        uniform = self._view.uniform_length
        checkpoint.commit(path, data, {
            "num_keys": self._view.num_keys, "dtype": str(self._view.dtype),
            "value_length": int(uniform) if uniform else None, "mode": self.mode,
            "nodes": self.num_nodes, "workers_per_node": self.workers_per_node},
            remove=self._remove_stale_soon)

    def _remove_stale_soon(self, path, data):
        """The files of earlier saves go in a thread; the next save or finalize() waits
        for it (a process that ends first leaves them to the next save to remove)."""
        self._cleanup = threading.Thread(target=checkpoint.remove_stale, args=(path, data),
                                         name="adapm-checkpoint-cleanup", daemon=True)
        self._cleanup.start()

    def _saved_manifest(self, path, data):
        """The committed manifest, read by every worker: a save that worker 0 could not
        commit (a node's part is missing) fails everywhere, with the reason."""
        try:
            manifest = checkpoint.read_manifest(path)
        except checkpoint.CheckpointError as exc:
            manifest, reason = None, str(exc)
        if manifest is not None and manifest.get("data") == data:
            return manifest
        if manifest is not None:
            reason = "worker 0 did not commit it"
        raise checkpoint.CheckpointError(
            f"node {self.node}, worker {self.rank}: the checkpoint at {path} was not "
            f"written ({reason}; see worker 0's error); the previous one, if any, is kept")


class _StepTimer:
    """Seconds per named step, for a log line."""

    def __init__(self):
        self.steps = []
        self.since = time.perf_counter()

    def lap(self, name):
        now = time.perf_counter()
        self.steps.append((name, now - self.since))
        self.since = now

    def __str__(self):
        return ", ".join(f"{name} {seconds:.3f} s" for name, seconds in self.steps)


def _failure_of(step, *args):
    """The exception `step(*args)` raised (any Exception), or None."""
    try:
        step(*args)
    except Exception as exc:  # noqa: BLE001 - the save reports it once every phase is done
        return exc
    return None


def _stalled(progress, save, seconds, this_save):
    """failpoint stall_save=SAVE@SECONDS: save number SAVE sleeps after its first chunk."""
    def report(done, total, written):
        if this_save == save:
            time.sleep(seconds)
        progress(done, total, written)
    return report
