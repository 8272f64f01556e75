#!/usr/bin/env python
"""QLoRA on the CPU: the SmolLM2-135M recipe (configs/glue_cola_smollm2_cpu.yaml) on a 4-bit base
against the same recipe on the full-precision base, same seed and data.

Each run goes in its own process (so its peak RSS is its own) and differs from the other only by
`model.quantization: 4bit` and `training.optim: paged_adamw_8bit` (bitsandbytes' 8-bit AdamW; not
paged on a CPU). Prints the machine, then per run: training time, peak RSS, validation MCC and
accuracy (all 1,043 CoLA validation sentences, best epoch), and the MCC difference.

    python bench/cpu_qlora.py --train_samples 2000 --epochs 1      # what docs/qlora.md reports

The last line is `RESULT mcc_full=.. mcc_4bit=.. mcc_gap=.. peak_rss_full_gb=.. peak_rss_4bit_gb=..`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from children import child_env  # bench/children.py and bench/machine.py (the scripts run as python bench/<name>.py)
from machine import cpu_name

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "glue_cola_smollm2_cpu.yaml"
RUNS = {"full": [], "4bit": ["model.quantization=4bit", "training.optim=paged_adamw_8bit"]}


def one_run(name: str, glue_dir: Path, train_samples: int | None, epochs: float, seed: int, out: Path) -> dict:
    from gluetune.config.run import load_config
    from gluetune.training.run import train
    from gluetune.training.speed.cpu import prepare_cpu_process

    overrides = [f"dataset.data_dir={glue_dir}", f"training.output_dir={out}", f"training.num_train_epochs={epochs}",
                 f"training.seed={seed}", "training.report_to=none", *RUNS[name]]
    if train_samples:
        overrides.append(f"dataset.max_train_samples={train_samples}")
    config = load_config(CONFIG, overrides)
    prepare_cpu_process(config.training)  # what `gluetune train` does on a CPU (cli.run_train)
    metrics = train(config).metrics
    return {"train_s": metrics["train"]["runtime_s"], "samples_per_s": metrics["train"]["samples_per_second"],
            "mcc": metrics["validation"]["matthews_correlation"], "accuracy": metrics["validation"]["accuracy"],
            "best_epoch": metrics["best_epoch"]}


def run_in_child(name: str, args) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--glue_dir", str(args.glue_dir), "--epochs", str(args.epochs),
           "--seed", str(args.seed), "--train_samples", str(args.train_samples or 0)]
    # Passive OpenMP waits for both runs: what `gluetune train` sets for a quantized base (see
    # model.quantization.wait_passively_on_cpu), here for the full-precision run too, so that the times compare.
    env = child_env()
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    log_dir = Path(args.log_dir or tempfile.mkdtemp())
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{name}.log"  # the run's progress, to follow it
    with open(log, "w") as stderr:
        result = subprocess.run(cmd, check=False, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env)
    if result.returncode != 0:
        sys.exit(f"run {name} failed:\n{log.read_text()[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue_dir", type=Path, default=ROOT / ".." / "shared" / "data" / "glue")
    parser.add_argument("--train_samples", type=int, default=2000, help="training examples (0: all 8,551)")
    parser.add_argument("--epochs", type=float, default=1)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--only", choices=list(RUNS), help="one run (to time it)")
    parser.add_argument("--log_dir", help="where each run's log goes (default: a temporary folder)")
    parser.add_argument("--child", choices=list(RUNS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.glue_dir = args.glue_dir.resolve()

    if args.child:  # child process: one run, its report as JSON on the last line
        import warnings

        warnings.filterwarnings("ignore")
        with tempfile.TemporaryDirectory() as tmp:
            report = one_run(args.child, args.glue_dir, args.train_samples, args.epochs, args.seed, Path(tmp) / "run")
        report["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB
        print(json.dumps(report))
        return

    import torch

    from gluetune.files import installed_version
    from gluetune.model import quantization  # noqa: F401 (before bitsandbytes: quiets its warning about a kernel gluetune never uses)

    bnb_version = installed_version("bitsandbytes")

    print(f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), "
          f"bitsandbytes {bnb_version}, python {platform.python_version()}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')}")
    subset = f"{args.train_samples} training examples" if args.train_samples else "all 8,551 training examples"
    print(f"config: {CONFIG.relative_to(ROOT)}, {subset}, {args.epochs:g} epoch(s), seed {args.seed}; "
          "validation: all 1,043 sentences")
    reports = {}
    for name in [args.only] if args.only else list(RUNS):
        r = reports[name] = run_in_child(name, args)
        label = "4-bit NF4 base + paged_adamw_8bit" if name == "4bit" else "full-precision base + adamw_torch"
        print(f"{label:36s} train_s={r['train_s']:.0f} samples/s={r['samples_per_s']:.2f} "
              f"peak_rss_gb={r['peak_rss_gb']:.2f} mcc={r['mcc']:.4f} accuracy={r['accuracy']:.4f} "
              f"best_epoch={r['best_epoch']}", flush=True)
    if len(reports) == 2:
        full, quant = reports["full"], reports["4bit"]
        gap = quant["mcc"] - full["mcc"]
        print(f"RESULT mcc_full={full['mcc']:.4f} mcc_4bit={quant['mcc']:.4f} mcc_gap={gap:+.4f} "
              f"peak_rss_full_gb={full['peak_rss_gb']:.2f} peak_rss_4bit_gb={quant['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()
