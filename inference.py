#!/usr/bin/env python
"""Classify texts with a trained folder: the same as `gluetune predict`.

    python inference.py --config configs/glue_cola_qwen.yaml \
      --model_path ./outputs/glue_cola_qwen --input_text "The book was written by John."
"""

import sys

from gluetune.cli import main

if __name__ == "__main__":
    sys.exit(main(["predict", *sys.argv[1:]], prog="inference.py"))
