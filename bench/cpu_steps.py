#!/usr/bin/env python
"""The CPU default's training steps per second under variants, side by side: a quick A/B for a speed idea.

`bench/cpu_cola.py` times whole runs (about 4 minutes each on 2 cores), and a shared machine's speed
drifts by 5-15 % between runs, more than most ideas gain. This script times only steady training steps
of the CPU default (`configs/glue_cola_minilm_cpu.yaml`, as `gluetune train` runs it on a CPU: no
evaluation or checkpoint in the window), each variant in its own process, in rounds (every variant
once per round, the order rotated), and prints each variant's median ms/step with its spread and its
ratio to the first variant (the median of the per-round ratios). A variant is a name and items:

  KEY=VALUE            a config override (`peft.lora_r=16`, `dataset.pad_to_multiple_of=16`)
  env:NAME=VALUE       an environment variable for its process (`env:OMP_WAIT_POLICY=ACTIVE`)
  src=PATH             the gluetune source tree it imports (another commit: `git archive C src | tar -x -C DIR`)

    python bench/cpu_steps.py --variant shipped --variant 'active env:OMP_WAIT_POLICY=ACTIVE'
    git archive tried/fused-lora src | tar -x -C /tmp/fused
    python bench/cpu_steps.py --variant shipped --variant 'fused src=/tmp/fused/src' --rounds 4
    python bench/cpu_steps.py --rounds 1 --profile     # where a step's time goes, by operator
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from children import child_env, every_trainer_adds
from machine import machine_line

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "glue_cola_minilm_cpu.yaml"
WARMUP_STEPS = 20  # left out: first batches, kernels built for new shapes
PROFILED_STEPS = 10
PROFILE_MARK = "--- profile ---"


def parse_variant(text: str) -> dict:
    name, *items = text.split()
    variant = {"name": name, "overrides": [], "env": {}, "src": str(ROOT / "src")}
    for item in items:
        if item.startswith("env:") and "=" in item:
            key, value = item[4:].split("=", 1)
            variant["env"][key] = value
        elif item.startswith("src="):
            variant["src"] = str(Path(item[4:]).resolve())
        elif "=" in item:
            variant["overrides"].append(item)
        else:
            sys.exit(f"--variant {text!r}: item {item!r} is not KEY=VALUE, env:NAME=VALUE or src=PATH")
    return variant


def child(glue_dir: str, steps: int, overrides: list[str], profile: bool) -> None:
    """One variant's process: the CPU default's training for `steps` steps; prints ms/step as JSON (and, with
    `profile`, torch's operator table of the last PROFILED_STEPS steps before it, after the timed window)."""
    import warnings

    import torch
    import transformers
    from transformers import TrainerCallback

    import gluetune
    from gluetune.config.run import load_config
    from gluetune.training.run import train
    from gluetune.training.speed.cpu import prepare_cpu_process

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    ends: list[float] = []
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) if profile else None

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())
            if profiler is not None and state.global_step == steps:
                profiler.start()
            if state.global_step >= steps + (PROFILED_STEPS if profiler is not None else 0):
                control.should_training_stop = True
                if profiler is not None:
                    profiler.stop()  # before the run's closing evaluation

    every_trainer_adds(Clock)
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(CONFIG, [f"dataset.data_dir={glue_dir}", f"training.output_dir={Path(tmp) / 'run'}",
                                      "training.eval_strategy=no", "training.save_strategy=no",
                                      "training.load_best_model_at_end=false", "training.report_to=none", *overrides])
        prepare_cpu_process(config.training)  # what `gluetune train` does on a CPU
        train(config)
    if profiler is not None:
        print(PROFILE_MARK)
        print(f"torch.profiler, {PROFILED_STEPS} steps after the timed window, by own CPU time "
              f"(per step: divide by {PROFILED_STEPS}):")
        print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
    timed = ends[WARMUP_STEPS:steps]
    print(json.dumps({"ms_per_step": 1000 * (timed[-1] - timed[0]) / (len(timed) - 1),
                      "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
                      "gluetune": str(Path(gluetune.__file__).parents[1])}))


def run_variant(variant: dict, args, profile: bool = False) -> dict:
    cmd = [sys.executable, __file__, "--child", "--glue_dir", args.glue_dir, "--steps", str(args.steps),
           *[a for o in variant["overrides"] for a in ("--set", o)], *(["--profile"] if profile else [])]
    result = subprocess.run(cmd, check=False, capture_output=True, text=True, env=child_env(variant["src"], **variant["env"]))
    if result.returncode != 0:
        sys.exit(f"variant {variant['name']} failed:\n{result.stderr[-3000:]}")
    output = result.stdout.strip()
    table = output.rsplit("\n", 1)[0].split(PROFILE_MARK + "\n", 1)[1] if PROFILE_MARK in output else ""
    return {**json.loads(output.splitlines()[-1]), "profile": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], help="NAME [ITEM ...] (see above); the first is the reference")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=200, help=f"training steps per process (the first {WARMUP_STEPS} untimed)")
    parser.add_argument("--glue_dir", default=str(ROOT / ".." / "shared" / "data" / "glue"))
    parser.add_argument("--profile", action="store_true",
                        help=f"print torch.profiler's operator table of {PROFILED_STEPS} steps of each variant (last round)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.glue_dir = str(Path(args.glue_dir).resolve())
    if args.child:
        return child(args.glue_dir, args.steps, args.set, args.profile)
    if args.steps <= WARMUP_STEPS + 1:
        sys.exit(f"--steps must be more than {WARMUP_STEPS + 1}")
    variants = [parse_variant(v) for v in args.variant] or [parse_variant("shipped")]

    print(machine_line())
    print(f"config: {CONFIG.relative_to(ROOT)}, training steps {WARMUP_STEPS}-{args.steps} timed; {args.rounds} rounds, "
          "one process at a time, order rotated")
    rounds: list[dict] = []
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[:r % len(variants)]
        results = {v["name"]: run_variant(v, args, profile=args.profile and r == args.rounds - 1) for v in order}
        rounds.append(results)
        print(f"round {r + 1}: " + ", ".join(f"{v['name']} {results[v['name']]['ms_per_step']:.1f}" for v in order)
              + " ms/step", flush=True)
    reference = variants[0]["name"]
    print(f"{'variant':16s} {'ms/step':>8s} {'min-max':>12s} {'x ' + reference:>12s} {'min-max':>12s} {'peak GB':>8s}  what")
    for v in variants:
        times = [r[v["name"]]["ms_per_step"] for r in rounds]
        ratios = [r[reference]["ms_per_step"] / r[v["name"]]["ms_per_step"] for r in rounds]
        what = " ".join([*v["overrides"], *(f"env:{k}={x}" for k, x in v["env"].items()),
                         *([f"src={v['src']}"] if v["src"] != str(ROOT / "src") else [])]) or "as shipped"
        print(f"{v['name']:16s} {statistics.median(times):8.1f} {min(times):5.1f}-{max(times):<6.1f} "
              f"{statistics.median(ratios):12.3f} {min(ratios):5.3f}-{max(ratios):<6.3f} "
              f"{max(r[v['name']]['peak_rss_gb'] for r in rounds):8.2f}  {what}")
    for v in variants:
        if rounds[-1][v["name"]]["profile"]:
            print(f"\n{v['name']}: {rounds[-1][v['name']]['profile']}")


if __name__ == "__main__":
    main()
