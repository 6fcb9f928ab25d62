"""Ctrl-C stops a run quietly (issue 17, point 11): the launcher signals every worker at
once, so no worker sees its peers vanish first. One at a time, a DDP worker whose peer
died mid-allreduce printed gloo's 20-line traceback before its own SIGTERM came."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from adapm.common.process import stop_processes

from conftest import wait_until_clean

pytestmark = pytest.mark.timeout(120)

LAUNCHER = str(Path(sys.executable).with_name("adapm-launch"))

SLOW_TO_DIE = textwrap.dedent("""
    import signal, sys, time
    def on_term(*_):
        with open(sys.argv[1], "a") as f:
            f.write(f"{time.monotonic()}\\n")
        time.sleep(0.5)  # a process that takes a while to go
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    open(sys.argv[1] + ".ready", "w").close()
    while True:
        time.sleep(0.05)
""")


def test_every_process_is_signalled_before_any_is_waited_for(tmp_path):
    files = [tmp_path / f"p{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", SLOW_TO_DIE, str(f)]) for f in files]
    deadline = time.monotonic() + 30
    while not all(Path(f"{f}.ready").exists() for f in files):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    stop_processes(procs, grace=5.0)
    times = [float(f.read_text()) for f in files]
    assert max(times) - min(times) < 0.3, times  # one at a time: 0.5 s apart each
    assert all(proc.returncode == 0 for proc in procs)


DDP_LOOP = textwrap.dedent("""
    import torch, torch.distributed as dist
    import adapm
    with adapm.worker() as w:
        dist.init_process_group("gloo")
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(64, 64))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        print("training", flush=True)
        while True:
            loss = model(torch.randn(256, 64)).pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
""")


@pytest.mark.parametrize("attempt", range(3))
def test_ctrl_c_on_a_ddp_run_prints_no_traceback(tmp_path, attempt):
    pytest.importorskip("torch")
    script = tmp_path / "loop.py"
    script.write_text(DDP_LOOP)
    proc = subprocess.Popen(
        [LAUNCHER, "--nodes", "2", "--workers-per-node", "1", "--num-keys", "10",
         str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=tmp_path, preexec_fn=lambda: (signal.signal(signal.SIGINT, signal.SIG_DFL),
                                          os.setpgrp()))
    lines = []
    while sum("training" in line for line in lines) < 2:  # both workers in DDP steps
        line = proc.stdout.readline()
        assert line, "".join(lines)
        lines.append(line)
    time.sleep(0.5 + 0.3 * attempt)
    os.killpg(proc.pid, signal.SIGINT)  # as the terminal's Ctrl-C does
    out = "".join(lines) + proc.communicate(timeout=60)[0]
    assert proc.returncode == 128 + signal.SIGINT, out
    assert "interrupted; stopping the cluster" in out
    assert "Traceback" not in out and "gloo" not in out, out
    segments, processes = wait_until_clean(timeout=15)
    assert not segments and not processes
