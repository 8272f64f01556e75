#!/usr/bin/env bash
# The reference run: Qwen2.5-1.5B + LoRA on GLUE CoLA. Extra arguments pass through, e.g.
#   bash examples/train_cola_qwen.sh --set training.learning_rate=2e-4
set -euo pipefail
cd "$(dirname "$0")/.."
python train.py --config configs/glue_cola_qwen.yaml "$@"
