#!/bin/bash
# bench/gpu_qwen.py on a lent GPU machine that has no internet and no ../shared.
#
#   bash bench/gpu_device.sh stage        # here: wheels into .whl/, CoLA + Qwen assets into .gpu_assets/
#   bash bench/gpu_device.sh run [ARGS]   # there (carry .whl and .gpu_assets): ARGS go to gpu_qwen.py
#
# The device's own torch is used; transformers, peft, datasets etc. travel as wheels pinned to the
# versions installed here, so both machines run the same library code. Add both folders to
# .git/info/exclude: they must never be committed.
set -e
cd "$(dirname "$0")/.."
case "$1" in
stage)
  shift
  SHARED=${SHARED:-../shared}
  mkdir -p .whl .gpu_assets/glue
  pins=$(python -m pip freeze | grep -iE '^(transformers|tokenizers|huggingface.hub|httpx2|httpcore2|truststore|peft|datasets|dill|multiprocess|fsspec|accelerate)==')
  python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl $pins
  cp -r "$SHARED/data/glue/CoLA" .gpu_assets/glue/
  cp -r "$SHARED/assets/qwen2.5-tokenizer" "$SHARED/assets/qwen2.5-configs" .gpu_assets/
  du -sh .whl .gpu_assets
  ;;
run)
  shift
  PY=${PY:-python3}
  if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
  fi
  export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false GLUETUNE_CACHE_DIR=/tmp/gtcache HF_HUB_OFFLINE=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
  $PY -c "import torch, transformers, peft, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__, 'datasets', datasets.__version__)"
  $PY bench/gpu_qwen.py --glue_dir .gpu_assets/glue --tokenizer .gpu_assets/qwen2.5-tokenizer \
    --model_config .gpu_assets/qwen2.5-configs/Qwen2.5-1.5B "$@"
  ;;
*)
  echo "usage: bash bench/gpu_device.sh stage | run [gpu_qwen.py arguments]" >&2; exit 2
  ;;
esac
