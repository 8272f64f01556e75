"""The YAML run config: its four sections checked before any model loads.

`run` (the sections as dataclasses, load/save, "same settings?"), `reading` (YAML as users mean it,
`--set` overrides), `arguments` (the `training:` section as TrainingArguments), `tasks` (the GLUE
task registry a config names), `quantization` (the `model.quantization` spec). A method's `peft:`
section is its own dataclass (gluetune.methods).
"""

from .reading import apply_overrides, read_yaml_file
from .run import (
           CONFIG_FILENAME,
           DatasetConfig,
           ModelConfig,
           RunConfig,
           build_config,
           load_config,
           load_saved_config,
           save_config,
)

__all__ = ["CONFIG_FILENAME", "DatasetConfig", "ModelConfig", "RunConfig", "apply_overrides", "build_config",
           "load_config", "load_saved_config", "read_yaml_file", "save_config"]
