"""A search space in YAML, keyed by the `section.key` names of `--set`:

    training.learning_rate: {loguniform: [1.0e-5, 1.0e-3]}
    training.warmup_ratio: {uniform: [0.0, 0.2]}
    training.num_train_epochs: {int: [2, 7]}
    peft.lora_r: {choice: [8, 16, 32]}
    enqueue:                  # optional: points tried first, each exactly once
      - {training.learning_rate: 2.0e-4, peft.lora_r: 32, training.num_train_epochs: 7}

Every parameter's bounds and choices are checked against the config before a trial starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.reading import read_yaml_file, yaml_value
from ..config.run import load_config
from ..errors import UserError, did_you_mean

KINDS = ("loguniform", "uniform", "int", "choice")
ENQUEUE_KEY = "enqueue"


@dataclass
class Parameter:
    key: str  # section.key, as for --set
    kind: str  # one of KINDS
    values: list  # [low, high], or the choices

    def distribution(self):
        """The parameter as an Optuna distribution (choices that are not scalars by their YAML text)."""
        import optuna.distributions as d

        if self.kind == "choice":
            return d.CategoricalDistribution(self.categories())
        if self.kind == "int":
            return d.IntDistribution(*self.values)
        return d.FloatDistribution(*self.values, log=self.kind == "loguniform")

    def suggest(self, trial):
        """The value an Optuna trial proposes (or was enqueued with)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.key, self.categories())
        if self.kind == "int":
            return trial.suggest_int(self.key, *self.values)
        return trial.suggest_float(self.key, *self.values, log=self.kind == "loguniform")

    def categories(self) -> list:
        return [v if _scalar(v) else yaml_value(v) for v in self.values]

    def value_of(self, sampled) -> Any:
        """The config value of a sampled (or enqueued) parameter value."""
        if self.kind == "choice":
            return self.values[self.categories().index(sampled)]
        return int(sampled) if self.kind == "int" else float(sampled)

    def contains(self, value) -> bool:
        if self.kind == "choice":
            return value in self.values
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.values[0] <= value <= self.values[1] and (self.kind != "int" or float(value).is_integer())


@dataclass
class Space:
    source: str
    parameters: list[Parameter]
    enqueue: list[dict[str, Any]]  # points as {key: config value}

    def sampled(self, point: dict[str, Any]) -> dict[str, Any]:
        """Config values -> the values Optuna stores (choices as their category)."""
        by_key = {p.key: p for p in self.parameters}
        return {k: by_key[k].categories()[by_key[k].values.index(v)] if by_key[k].kind == "choice" else v
                for k, v in point.items()}

    def to_dict(self) -> dict:
        return {"parameters": [vars(p) for p in self.parameters], "enqueue": self.enqueue}

    @classmethod
    def from_dict(cls, source: str, data: dict) -> Space:
        return cls(source, [Parameter(**p) for p in data["parameters"]], data["enqueue"])


def _scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def as_overrides(values: dict[str, Any]) -> list[str]:
    """{section.key: config value} -> `--set` items."""
    return [f"{key}={yaml_value(value)}" for key, value in values.items()]


def read_space(path: str | Path) -> Space:
    raw = read_yaml_file(path)
    source = str(path)
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{source}: expected a mapping of section.key names to {{loguniform|uniform|int|choice: ...}}")
    enqueue = raw.pop(ENQUEUE_KEY, None) or []
    parameters = [_parameter(source, key, spec) for key, spec in raw.items()]
    if not parameters:
        raise UserError(f"{source}: no parameters to search (only '{ENQUEUE_KEY}')")
    space = Space(source, parameters, [])
    if not isinstance(enqueue, list):
        raise UserError(f"{source}: {ENQUEUE_KEY}: expected a list of points, e.g. - {{{parameters[0].key}: ...}}")
    space.enqueue = [_point(source, i, point, parameters) for i, point in enumerate(enqueue)]
    return space


def _parameter(source: str, key, spec) -> Parameter:
    where = f"{source}: {key}"
    if not isinstance(key, str) or key.count(".") < 1:
        raise UserError(f"{where}: expected a section.key name as for --set (e.g. training.learning_rate)")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise UserError(f"{where}: expected one of {{loguniform: [low, high]}}, {{uniform: [low, high]}}, "
                        "{int: [low, high]}, {choice: [a, b, ...]}")
    (kind, values), = spec.items()
    if kind not in KINDS:
        raise UserError(f"{where}: unknown kind '{kind}'{did_you_mean(kind, KINDS)}; expected one of {', '.join(KINDS)}")
    if kind == "choice":
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: choice: expected a non-empty list of values, e.g. [8, 16, 32]")
        return Parameter(key, kind, values)
    numbers = isinstance(values, list) and len(values) == 2 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not numbers or not values[0] < values[1]:
        raise UserError(f"{where}: {kind}: expected [low, high] with low < high, got {values!r}")
    if kind == "loguniform" and values[0] <= 0:
        raise UserError(f"{where}: loguniform: the low end must be above 0, got {values[0]}")
    if kind == "int" and not all(isinstance(v, int) for v in values):
        raise UserError(f"{where}: int: expected whole numbers [low, high], got {values!r}")
    return Parameter(key, kind, [float(v) for v in values] if kind != "int" else values)


def _point(source: str, index: int, point, parameters: list[Parameter]) -> dict[str, Any]:
    where = f"{source}: {ENQUEUE_KEY}[{index}]"
    by_key = {p.key: p for p in parameters}
    if not isinstance(point, dict) or not point:
        raise UserError(f"{where}: expected a mapping of the space's keys to values")
    for key, value in point.items():
        if key not in by_key:
            raise UserError(f"{where}: '{key}' is not in the space{did_you_mean(key, by_key)}; "
                            f"expected one of {', '.join(by_key)}")
        if not by_key[key].contains(value):
            raise UserError(f"{where}: {key}={value!r} is outside the space ({by_key[key].kind} {by_key[key].values})")
    return dict(point)


def check_against_config(space: Space, config_path: str, overrides: list[str]) -> None:
    """Load the config at each end of every range and with every choice: a key the config does
    not have or a value it refuses is reported now, in one line, not by the first trial."""
    for parameter in space.parameters:
        for value in parameter.values:
            value = int(value) if parameter.kind == "int" else value
            try:
                load_config(config_path, [*overrides, *as_overrides({parameter.key: value})])
            except UserError as err:
                raise UserError(f"{space.source}: {parameter.key}={yaml_value(value)}: {err}") from None
    for point in space.enqueue:
        try:
            load_config(config_path, [*overrides, *as_overrides(point)])
        except UserError as err:
            raise UserError(f"{space.source}: {ENQUEUE_KEY} point {point}: {err}") from None
