"""Presets: YAML files merged in order (a preset, then overlays), validated against the schema.

The schema is ``workflow/schemas/config.schema.yaml``; Snakemake checks the same file at start.
Merging is Snakemake's ``--configfile`` rule: mappings merge key by key, anything else (lists
included) is replaced, so ``ect <step> --config a.yaml b.yaml`` sees what Snakemake sees.
"""
from __future__ import annotations

from pathlib import Path

import yaml

SCHEMA_PATH = Path(__file__).resolve().parents[1] / "workflow" / "schemas" / "config.schema.yaml"


# Training options that decide only when a run logs a tick and saves its resumable state, never what
# it computes: a run resumes under other values (more frequent saves on a cluster that preempts, say),
# and changing them reruns no pipeline step.
CADENCE_KEYS = ("tick_kimg", "state_kimg")


class ConfigError(ValueError):
    pass


def merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml(path) -> dict:
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


def validate_config(cfg: dict, source: str = "config") -> dict:
    """Raise one :class:`ConfigError` naming the first bad key or value; return ``cfg``."""
    import jsonschema

    schema = yaml.safe_load(SCHEMA_PATH.read_text())
    errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(cfg), key=lambda e: list(e.absolute_path))
    if errors:
        err = jsonschema.exceptions.best_match(errors)
        where = ".".join(str(p) for p in err.absolute_path) or "top level"
        if err.validator == "additionalProperties":
            unknown = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            known = ", ".join(sorted(err.schema.get("properties", {})))
            raise ConfigError(f"{source}: unknown key {', '.join(repr(u) for u in unknown)} in {where} "
                              f"(known: {known})")
        raise ConfigError(f"{source}: {where}: {err.message}")
    return cfg


def load_config(*paths, validate: bool = True) -> dict:
    """Merge the YAML files in order and (by default) validate the result."""
    if not paths:
        raise ConfigError("no config file given")
    cfg: dict = {}
    for path in paths:
        cfg = merge(cfg, read_yaml(path))
    return validate_config(cfg, " + ".join(map(str, paths))) if validate else cfg


def section(cfg: dict, name: str, path="config") -> dict:
    if not isinstance(cfg.get(name), dict):
        raise ConfigError(f"{path} has no '{name}' section")
    return cfg[name]
