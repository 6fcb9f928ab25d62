"""Cluster-wide throughput of a user's script (issue 17, point 11): a launched run's
figures were visible per rank only. w.count_samples(n) counts in shared memory; the
statistics table at the end shows samples and samples/s per node and for the cluster."""
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import adapm
from adapm.table import stats as summary
from adapm.table.shared_table import WORKER_COUNTERS, WORKER_SLOT

pytestmark = pytest.mark.timeout(120)

LAUNCHER = str(Path(sys.executable).with_name("adapm-launch"))

SCRIPT = textwrap.dedent("""
    import time
    import numpy as np
    import adapm
    with adapm.worker() as w:
        w.count_samples(0)
        end = time.monotonic() + 1.0
        steps = 0
        while time.monotonic() < end:
            w.push(np.arange(10), np.ones((10, 1)))
            w.count_samples(100)
            steps += 1
            time.sleep(0.002)
        print(f"rank {w.rank} counted {100 * steps}", flush=True)
        w.barrier()
""")


def table_rows(text):
    """{node: row fields} of the statistics table in `text` (header included as 'node')."""
    rows = {}
    for line in text.splitlines():
        fields = line.split()
        if fields and (fields[0] in ("node", "all") or fields[0].isdigit()) and \
                len(fields) >= 10:
            rows[fields[0]] = fields
    return rows


def test_a_launched_scripts_samples_are_summed_over_the_cluster(tmp_path):
    script = tmp_path / "count.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([LAUNCHER, "--nodes", "2", "--num-keys", "10", str(script)],
                          capture_output=True, text=True, timeout=90, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    counted = sum(int(n) for n in re.findall(r"counted (\d+)", out))
    rows = table_rows(out)
    header = rows["node"]
    assert header[-2:] == ["samples", "samples/s"], out
    assert int(rows["all"][-2]) == counted, out
    rates = [float(rows[node][-1].replace(",", "")) for node in ("0", "1", "all")]
    assert rates[0] > 0 and rates[1] > 0 and rates[2] == pytest.approx(sum(rates[:2]), abs=2)
    # about 100 samples per ~2-3 ms step on each of 2 workers
    assert 0.5 * counted / 1.0 < rates[2] < 2.0 * counted / 1.0, out


def _count(w, n):
    w.count_samples(0)
    time.sleep(0.2)
    w.count_samples(n)
    with pytest.raises(ValueError):
        w.count_samples(-1)
    with pytest.raises(ValueError):
        w.count_samples(1.5)
    return True


def test_run_prints_the_samples_too(capfd):
    adapm.run(_count, args=(1000,), nodes=2, num_keys=4)
    err = capfd.readouterr().err
    rows = table_rows(err)
    assert rows["all"][-2] == "2000", err
    assert 5000 < float(rows["all"][-1].replace(",", "")) < 10000  # 2 x 1000 in ~0.2 s


def test_no_sample_columns_without_samples():
    numbers = dict.fromkeys(summary.REPORTED, 0)
    stats = summary.from_numbers([numbers[name] for name in summary.REPORTED])
    assert "samples" not in summary.format_summary({0: stats}, legend=False)


def test_a_nodes_rate_sums_its_workers_rates():
    counters = np.zeros((3, 64), dtype=np.uint64)
    slot = WORKER_SLOT
    # worker 0: 10 samples first, 1010 in all, over 2 s: 500/s; worker 1: 300 over 1 s
    counters[0, [slot["samples"], slot["samples_first"]]] = [1010, 10]
    counters[0, [slot["samples_start_ns"], slot["samples_last_ns"]]] = [1_000_000_000,
                                                                         3_000_000_000]
    counters[1, [slot["samples"], slot["samples_start_ns"], slot["samples_last_ns"]]] = \
        [300, 5_000_000_000, 6_000_000_000]
    # worker 2 never counted
    assert summary.sample_rate(counters) == pytest.approx(800.0)
    assert len(WORKER_COUNTERS) <= 64
