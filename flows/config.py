"""The pipeline's one typed configuration, composed from the stage sections.

Each stage module defines its own section (``DataConfig`` and ``SelectionConfig`` beside
the select work, ``DetectorConfig`` beside the detector, ...); this module only composes
them. The same model is the Prefect flow's parameter, so the UI renders it as a form.

Sources, later wins: defaults < YAML file (``--config``) < CLI flags / ``--set key=value``.
Unknown keys and bad values raise ``ConfigError`` naming the key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.run_folder import RunFolder
from core.sharding import ShardingConfig
from inference.recordings import RecordingsSettings
from models.classifier import ModelConfig
from models.detector import DetectorConfig
from tasks.crops import CropConfig
from tasks.select import DataConfig, SelectionConfig
from tasks.split import SplitConfig
from tasks.train import TrainConfig, check_calibration_folder


class ConfigError(ValueError):
    """A configuration value or key is invalid; the message names it."""


class PipelineConfig(BaseModel):
    """Everything one pipeline run needs."""

    model_config = ConfigDict(extra="forbid")

    out: Path = Field(Path("artifacts/run"), description="Run folder for all stage outputs.")
    experiment: str = Field(
        "default", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
        description="Training recipe name: train and evaluate write to "
        "OUT/experiments/<name>/ (model/, logs/, reports/), reusing OUT's prepared data; "
        "other experiments' models are never touched.")
    data: DataConfig = Field(default_factory=DataConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    sharding: ShardingConfig = Field(default_factory=ShardingConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    crops: CropConfig = Field(default_factory=CropConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @property
    def folder(self) -> RunFolder:
        """The run folder's paths (``out`` and the experiment's)."""
        return RunFolder(self.out, self.experiment)

    @model_validator(mode="after")
    def _sections_agree(self) -> PipelineConfig:
        check_calibration_folder(self.train, [f.name for f in self.data.folders])
        return self


class RecordingsConfig(BaseModel):
    """Everything one recordings run (``kface recordings``) needs."""

    model_config = ConfigDict(extra="forbid")

    out: Path = Field(Path("artifacts/recordings"), description="Run folder: what was "
                      "counted of each video (the visitors go to the store).")
    recordings: RecordingsSettings
    sharding: ShardingConfig = Field(default_factory=ShardingConfig)

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.out)


def _describe(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(root)"
        if err["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif not err["loc"]:  # a check across sections: its message names the keys
            lines.append(err["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"{key}: {err['msg']} (got {err.get('input')!r})")
    return f"invalid configuration in {source}:\n  " + "\n  ".join(lines)


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``dotted == 'a.b'``, creating dicts on the way."""
    *parents, leaf = dotted.split(".")
    node = tree
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: '{part}' is not a section")
    node[leaf] = value


def parse_assignment(text: str) -> tuple[str, Any]:
    """Parse ``key.path=value``; the value is read as YAML (numbers, lists, booleans)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None
                ) -> PipelineConfig:
    """Build a config from an optional YAML file plus dotted-key ``overrides``."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError(f"config file {path} not found") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        tree = loaded or {}
    for key, value in (overrides or {}).items():  # (None sets a setting to null)
        set_dotted(tree, key, value)
        source = f"{source} + command-line options" if "+" not in source else source
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def dump_config(cfg: PipelineConfig | RecordingsConfig) -> str:
    """The config as YAML (what ``kface config`` prints and each run saves)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
