"""Reading config files: YAML as users mean it, one-line errors, `--set` overrides.

`--set section.key=value` overrides are applied to the raw YAML, so they are validated exactly
like the file (config.run). Nothing here imports a model library: a typo is reported at once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError, one_line

SECTIONS = ("model", "dataset", "peft", "training")


class _Loader(yaml.SafeLoader):
    """YAML as users mean it (the YAML 1.2 reading): `3e-4` is a float, and only true/false are
    booleans, so `save_strategy: no` stays the string "no" instead of turning into False."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))

_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.VERBOSE,
    ),
    list("-+0123456789."),
)


def _no_duplicate_keys(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            mark = key_node.start_mark
            raise UserError(f"line {mark.line + 1}, column {mark.column + 1}: key '{key}' appears twice")
        seen.add(key)
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def parse_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except UserError as err:
        raise UserError(f"{source}: {err}") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise UserError(f"{source}: malformed YAML at {where}{err.problem or err.context}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{source}: malformed YAML: {one_line(err)}") from None


def read_yaml_file(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start})") from None
    raw = parse_yaml(text, str(path))
    if raw is None:
        raise UserError(f"{path}: the config is empty; expected sections {', '.join(SECTIONS)}")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping with sections {', '.join(SECTIONS)}, got {type(raw).__name__}")
    return raw


def apply_overrides(raw: dict[str, Any], overrides: list[str], source: str = "--set") -> dict[str, Any]:
    """`section.key=value` (value parsed as YAML); nested keys go deeper: `training.a.b=1`."""
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"{source} {item!r}: expected section.key=value, e.g. training.learning_rate=2e-4")
        path, value_text = item.split("=", 1)
        keys = path.strip().split(".")
        if len(keys) < 2 or not all(keys):
            raise UserError(f"{source} {item!r}: expected section.key=value, e.g. peft.lora_r=16")
        value = parse_yaml(value_text, f"{source} {path}") if value_text.strip() else None
        node = raw
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise UserError(f"{source} {path}: '{key}' is a value, not a section")
            node = child
        node[keys[-1]] = value
    return raw


def yaml_value(value: Any) -> str:
    """A value as one line of YAML, as `--set` takes it back: `[q_proj, v_proj]`, `true`, `0.0002`."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
