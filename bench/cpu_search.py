"""A real search on this CPU over the MiniLM CPU default (learning rate, rank, epochs), short trials
(a slice of CoLA's training set, 1-3 epochs), once without pruning and once with the median pruner:
the wall time each took, their best trials, and the best of the pruned search confirmed over seeds.

    python bench/cpu_search.py --glue_dir ../shared/data/glue --trials 6 --train_samples 1000 --out bench-search
    python bench/cpu_search.py --glue_dir ../shared/data/glue --trials 6 --train_samples 1000 --epochs 3 \
        --space bench/spaces/minilm_cpu_lr_rank.yaml --out bench-search-3ep
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

# bench/machine.py, importable because the scripts run as python bench/<name>.py
from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]


def search(out: Path, pruner: str, args, confirm: bool) -> float:
    command = [sys.executable, "-m", "gluetune", "search", "--config", str(ROOT / "configs/glue_cola_minilm_cpu.yaml"),
               "--set", f"dataset.data_dir={args.glue_dir}", "--set", f"dataset.max_train_samples={args.train_samples}",
               "--space", str(args.space), "--trials", str(args.trials), "--seed", "0",
               "--startup_trials", str(args.startup_trials), "--pruner", pruner, "--search_dir", str(out / pruner)]
    if args.epochs:
        command += ["--set", f"training.num_train_epochs={args.epochs}"]
    if confirm:
        command += ["--confirm_seeds", args.confirm_seeds]
    print("$ " + " ".join(command), flush=True)
    started = time.time()
    subprocess.run(command, check=True)
    return time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--glue_dir", default=str(ROOT.parent / "shared/data/glue"))
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--startup_trials", type=int, default=2)
    parser.add_argument("--train_samples", type=int, default=1000)
    parser.add_argument("--confirm_seeds", default="1,2,3")
    parser.add_argument("--space", type=Path, default=ROOT / "bench/spaces/minilm_cpu.yaml")
    # every trial this many epochs (with a space without epochs, e.g. bench/spaces/minilm_cpu_lr_rank.yaml):
    # a pruner can then stop a trial before its last evaluation
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("bench-search"))
    args = parser.parse_args()
    import torch

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}", flush=True)
    plain = search(args.out, "none", args, confirm=False)
    pruned = search(args.out, "median", args, confirm=False)
    confirmed = search(args.out, "median", args, confirm=True)  # the study is complete: only the confirmation runs
    print(f"{args.trials} trials of {args.train_samples} training examples: without pruning {plain:.0f} s, with the "
          f"median pruner {pruned:.0f} s ({1 - pruned / plain:.0%} less); confirming the best over seeds "
          f"{args.confirm_seeds}: {confirmed:.0f} s")


if __name__ == "__main__":
    main()
