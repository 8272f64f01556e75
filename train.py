#!/usr/bin/env python
"""Train from a config: `python train.py --config configs/glue_cola_qwen.yaml [--set k=v ...]`.

The same as `gluetune train`; works under `torchrun` and `accelerate launch` too.
"""

import sys

from gluetune.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]], prog="train.py"))
