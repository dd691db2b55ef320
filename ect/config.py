"""Loading a preset (YAML) with errors that name the file and the problem."""
from __future__ import annotations

from pathlib import Path

import yaml


class ConfigError(ValueError):
    pass


def load_config(path) -> dict:
    path = Path(path)
    try:
        cfg = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ConfigError(f"config {path} must be a mapping at top level")
    return cfg


def section(cfg: dict, name: str, path="config") -> dict:
    if not isinstance(cfg.get(name), dict):
        raise ConfigError(f"{path} has no '{name}' section")
    return cfg[name]
