"""Full fine-tuning's `peft:` section: nothing to set but the method."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ...validation import check_section


@dataclass
class Config:
    method: str = "full"


def parse(raw: dict, source: str) -> Config:
    return check_section("peft", raw, Config, source)


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
