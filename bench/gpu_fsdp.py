"""gluetune's own training sharded with FSDP2 (configs/accelerate/fsdp.yaml) on the GPUs, against one process.

    bash bench/gpu_device.sh fsdp            # on a GPU machine (stage first: bash bench/gpu_device.sh stage)
    python bench/gpu_fsdp.py --smoke         # a rehearsal on a CPU: accelerate runs it as DDP, and says so

accelerate shards only on GPUs: on a CPU its processes are MULTI_CPU and never FSDP (accelerate 1.16,
state.py), so this is where gluetune's `train()` runs sharded. It trains the reference recipe (LoRA r 8
on q/k/v/o, dropout off, fp32) on a random-weight Qwen2.5-1.5B (--smoke: a tiny one) for one epoch of 256
CoLA sentences, under `accelerate launch --config_file configs/accelerate/fsdp.yaml` on every GPU and as
one plain process, the same effective batch of 32 in both. It checks, one line each: the run said FSDP2
(not the DDP fallback), its folder holds an ordinary peft adapter, it predicts like the one-process run
(validation logits within 1e-3: sharding changes only the order of float sums), and `gluetune predict`
loads it. Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT / ".." / "shared"
sys.path.insert(0, str(Path(__file__).parent))

from children import child_env  # (the bench folder is not a package)
from gpu_qwen import build_random_model

EFFECTIVE_BATCH = 32


def logits(folder: Path) -> dict[int, list[float]]:
    rows = (json.loads(line) for line in (folder / "validation_predictions.jsonl").read_text().splitlines())
    return {row["idx"]: row["logits"] for row in rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--glue_dir", default=str(SHARED / "data" / "glue"))
    parser.add_argument("--tokenizer", default=str(SHARED / "assets" / "qwen2.5-tokenizer"))
    parser.add_argument("--model_config", default=str(SHARED / "assets" / "qwen2.5-configs" / "Qwen2.5-1.5B"))
    parser.add_argument("--smoke", action="store_true", help="a tiny model and 2 CPU processes (no sharding: DDP)")
    args = parser.parse_args()

    import torch

    gpus = torch.cuda.device_count()
    if not gpus and not args.smoke:
        print("gpu_fsdp: no CUDA device here; accelerate shards only on GPUs (--smoke rehearses on the CPU)")
        return 0
    processes = gpus or 2
    if EFFECTIVE_BATCH % processes:
        print(f"gpu_fsdp: {processes} GPUs do not divide the effective batch of {EFFECTIVE_BATCH}; "
              "use CUDA_VISIBLE_DEVICES to pick 1, 2, 4 or 8")
        return 1
    work = Path(tempfile.mkdtemp(prefix="gluetune-fsdp-"))
    model = work / "model"
    build_random_model(Path(args.model_config), Path(args.tokenizer), model, args.smoke)
    env = child_env(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")

    def train(out: Path, launcher: list[str], per_device: int) -> subprocess.CompletedProcess:
        sets = [f"model.name_or_path={model}", f"dataset.data_dir={args.glue_dir}", "dataset.max_train_samples=256",
                "dataset.max_eval_samples=128", "training.num_train_epochs=1", "peft.lora_dropout=0",
                "training.bf16=false", "training.tf32=false", "training.gradient_accumulation_steps=1",
                f"training.per_device_train_batch_size={per_device}", "training.report_to=none",
                f"training.output_dir={out}"]
        command = [*launcher, "train.py", "--config", "configs/glue_cola_qwen.yaml",
                   *[arg for value in sets for arg in ("--set", value)]]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)

    one = train(work / "one", [sys.executable], EFFECTIVE_BATCH)
    if one.returncode:
        print(f"gpu_fsdp: FAILED: the one-process run exited {one.returncode}:\n{one.stderr[-3000:]}")
        return 1
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", str(processes),
              "--main_process_port", "29731"]
    sharded = train(work / "sharded", launch, EFFECTIVE_BATCH // processes)
    if sharded.returncode:
        print(f"gpu_fsdp: FAILED: the FSDP run exited {sharded.returncode}:\n{sharded.stderr[-3000:]}")
        return 1
    said = [line for line in sharded.stderr.splitlines() if "effective batch" in line]
    device = torch.cuda.get_device_name(0) if gpus else "cpu (smoke)"
    print(f"gpu_fsdp: {device}, {processes} process(es): {said[0].split('] ')[-1] if said else 'no batch line'}")
    if gpus:
        checks = {"sharded with FSDP2": bool(said) and "(FSDP2)" in said[0]}
    else:  # the CPU rehearsal: accelerate's fallback, which the run must say
        fallback = "accelerate shards models only on GPUs" in sharded.stderr
        checks = {"not sharded on a CPU, and the run says so": fallback}
    folder = work / "sharded"
    checks["an ordinary peft adapter"] = all((folder / name).is_file()
                                              for name in ("adapter_config.json", "adapter_model.safetensors"))
    a, b = logits(work / "one"), logits(folder)
    gap = max(abs(x - y) for idx in a for x, y in zip(a[idx], b[idx])) if a.keys() == b.keys() else float("inf")
    checks[f"predicts like one process (max |logit difference| {gap:.2e} <= 1e-3)"] = gap <= 1e-3
    predict = subprocess.run([sys.executable, "-m", "gluetune", "predict", "--model_path", str(folder), "--input_text",
                              "The book was written by John."], cwd=ROOT, env=env, capture_output=True, text=True,
                             check=False)
    checks[f"gluetune predict loads it ({predict.stdout.strip() or predict.stderr.strip()[-200:]})"] = (
        predict.returncode == 0 and predict.stdout.startswith("label="))
    for name, ok in checks.items():
        print(f"gpu_fsdp: {'ok' if ok else 'FAILED'}: {name}")
    shutil.rmtree(work, ignore_errors=True)  # (a 1.5B model's weights and two runs)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
