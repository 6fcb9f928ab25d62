"""B11 CTR (docs/design/BENCHMARKS.md): the ctr app (hashed EmbeddingBag rows with fused
Adagrad in the parameter server, the MLPs under DistributedDataParallel), 2 nodes x 1
worker on this machine, against the same model as one process with torch.nn.EmbeddingBag
(sparse gradients) and torch.optim.Adagrad, on the same generated data, batch size and
number of epochs, in the same run. Targets (issue 20): >= 1.3x its samples/s; test AUC
within 0.01.

Writes bench/results/ctr.json."""

import argparse

from adapm.apps import ctr

from common import line, save, verdict

B11 = dict(train=300_000, test=30_000, fields=8, vocab=50_000, max_bag=3, buckets=200_000,
           dim=16, epochs=1, batch=2048, lr=0.05, lookahead=None, seed=0, data=None,
           test_data=None, worker_json=None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--modes", default="adaptive,static")
    args = parser.parse_args(argv)
    rows = {"plain": ctr.train_plain(dict(B11))}
    for mode in args.modes.split(","):
        rows[mode] = ctr.run(dict(B11), nodes=2, workers_per_node=1, mode=mode)
        rows[mode].pop("towers", None)
    for name, row in rows.items():
        where = "" if name == "plain" else (
            f", {row['local_share']:6.1%} local, {row['bytes_sent'] / 1e6:7.1f} MB sent")
        line("B11", f"{name:9s} {row['data_points_per_s'] / 1e3:7.1f}k samples/s, test AUC "
                    f"{row['auc_after']:.4f}, log loss {row['logloss_after']:.4f}{where}",
             "info")
    plain, adaptive = rows["plain"], rows.get("adaptive")
    if adaptive is not None:
        speed = adaptive["data_points_per_s"] / plain["data_points_per_s"]
        line("B11", f"adaptive, 2 nodes x 1 worker vs one torch process: {speed:.2f}x "
                    "samples/s (target >= 1.3x)", verdict(speed, 1.3))
        gap = abs(adaptive["auc_after"] - plain["auc_after"])
        line("B11", f"test AUC {adaptive['auc_after']:.4f} vs {plain['auc_after']:.4f}: "
                    f"{gap:.4f} apart (target <= 0.01)", verdict(gap, 0.01,
                                                               higher_is_better=False))
    save("ctr", {"B11": rows, "opts": B11})
    return rows


if __name__ == "__main__":
    main()
