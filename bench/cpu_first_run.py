#!/usr/bin/env python
"""The CPU default's whole run as a user starts it, on the plain path and on the fast path, first run and later.

The fast path (`training.fast_path=true`) compiles the encoder layers before the first step. Its training
is faster, but the compilation is paid where a user waits: all of it on a machine's first run (inductor's
cache empty), a few seconds on later runs (the cache filled). This script shows both against the plain
path, each a `gluetune train` process of its own, one at a time, in this order:

  fast, cold   the fast path with an empty inductor cache (TORCHINDUCTOR_CACHE_DIR a new folder)
  plain        the config as shipped
  fast, warm   the fast path again, with the cache the cold run filled

and prints for each the process's seconds, the training's (the Trainer's train_runtime, which leaves out
the compilation before it), the compilation's (the run's own `fast path: compiled in` line), the MCC
and the peak RSS. Usage:

    python bench/cpu_first_run.py [--glue_dir ../shared/data/glue] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from children import child_env
from machine import machine_line

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "glue_cola_minilm_cpu.yaml"
RUNS = (("fast, cold", ["training.fast_path=true"]), ("plain", []), ("fast, warm", ["training.fast_path=true"]))


def run(name: str, overrides: list[str], out: Path, cache: Path) -> dict:
    """One `gluetune train` process; its report from its exit (wall, peak RSS), its folder and its log."""
    cmd = [sys.executable, "-m", "gluetune", "train", "--config", str(CONFIG),
           *[a for o in [f"training.output_dir={out}", *overrides] for a in ("--set", o)]]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True,
                                   env=child_env(TORCHINDUCTOR_CACHE_DIR=str(cache)))
        _, status, usage = os.wait4(process.pid, 0)  # the child's own peak RSS (subprocess does not give it)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        log.seek(0)
        text = log.read()
    if process.returncode != 0:
        sys.exit(f"run {name!r} failed:\n{text[-3000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    compiled = re.search(r"fast path: compiled in (\d+) s", text)
    return {"process_s": wall, "train_s": metrics["train"]["runtime_s"],
            "compile_s": int(compiled.group(1)) if compiled else None,
            "mcc": metrics["validation"]["matthews_correlation"], "peak_rss_gb": usage.ru_maxrss / 1024**2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue_dir", default=str(ROOT / ".." / "shared" / "data" / "glue"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every run")
    args = parser.parse_args()
    overrides = [f"dataset.data_dir={Path(args.glue_dir).resolve()}", *args.set]

    print(machine_line())
    print(f"config: {CONFIG.relative_to(ROOT)}{', with ' + ' '.join(args.set) if args.set else ''}; one process at a time")
    print(f"{'run':12s} {'process_s':>9s} {'train_s':>8s} {'compile_s':>9s} {'mcc':>7s} {'peak_gb':>7s}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, extra) in enumerate(RUNS):
            r = run(name, [*overrides, *extra], Path(tmp) / f"run{index}", Path(tmp) / "inductor-cache")
            compile_s = "-" if r["compile_s"] is None else str(r["compile_s"])
            print(f"{name:12s} {r['process_s']:9.1f} {r['train_s']:8.1f} {compile_s:>9s} {r['mcc']:7.4f} "
                  f"{r['peak_rss_gb']:7.2f}", flush=True)


if __name__ == "__main__":
    main()
