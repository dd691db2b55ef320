"""Presets: YAML files merged in order (a preset, then overlays), validated against the schema.

The schema ships inside the package (``ect/schemas/config.schema.yaml``), so ``ect`` works from an
installed wheel; Snakemake validates with the same function at start. After the schema, the checks it
cannot express (divisibility, cross-section consistency) run here too, so every bad value stops a run
before anything starts.
Merging is Snakemake's ``--configfile`` rule: mappings merge key by key, anything else (lists
included) is replaced, so ``ect <step> --config a.yaml b.yaml`` sees what Snakemake sees.
"""
from __future__ import annotations

import math
from pathlib import Path

import yaml

SCHEMA_PATH = Path(__file__).resolve().parent / "schemas" / "config.schema.yaml"


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


MAX_CONFIG_BYTES = 1 << 20


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without anchors and aliases: presets need none, and aliases let a small file expand
    exponentially when it is merged, validated or printed."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            raise ConfigError(f"YAML aliases (*name) are not allowed in a config (line {self.peek_event().start_mark.line + 1})")
        return super().compose_node(parent, index)


def read_yaml(path) -> dict:
    path = Path(path)
    try:
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"config {path} is larger than {MAX_CONFIG_BYTES} bytes: not a preset")
        cfg = yaml.load(path.read_text(), Loader=_NoAliasLoader)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {' '.join(str(exc).split())[:300]}") from exc
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
        raise ConfigError(f"{source}: {where}: {err.message[:300]}")
    for problem in semantic_problems(cfg):
        raise ConfigError(f"{source}: {problem}")
    return cfg


def _numbers(value, where=""):
    """(key path, number) of every number in a config (a tree: read_yaml allows no aliases)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{where}.{k}" if where else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{where}.{i}")
    elif isinstance(value, float):
        yield where, value


def semantic_problems(cfg: dict):
    """What a schema cannot say: yield one message per problem (the caller reports the first)."""
    for where, number in _numbers(cfg):
        if not math.isfinite(number):  # NaN passes every numeric bound of a schema
            yield f"{where}: {number} is not a finite number"
    resources = cfg["resources"]
    for section in ("pretrain", "tune"):
        if section not in cfg:
            continue
        train = cfg[section]
        gpus = max(1, {**resources["default"], **resources.get(section, {})}.get("gpu", 0))
        if train["batch"] % gpus:
            yield f"{section}.batch {train['batch']} does not split evenly over resources.{section}.gpu = {gpus} GPUs"
        elif train.get("batch_gpu") and (train["batch"] // gpus) % train["batch_gpu"]:
            yield (f"{section}.batch_gpu {train['batch_gpu']} does not divide the per-GPU batch "
                   f"{train['batch'] // gpus} ({section}.batch {train['batch']} over {gpus} GPUs)")
    yield from _scaling_problems(cfg)
    t_mid, curve_steps = cfg["sample"]["t_mid"], cfg["fid"]["curve_steps"]
    if max(curve_steps) - 1 > len(t_mid):
        yield f"fid.curve_steps asks for {max(curve_steps)} steps but sample.t_mid has {len(t_mid)} intermediate times"


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


def _scaling_problems(cfg: dict):
    """A scaling study's budgets must be snapshots of its tuning runs, and enough of them to fit."""
    scaling = cfg.get("scaling")
    if not scaling:
        return
    tune, budgets = cfg["tune"], scaling["budgets_kimg"]
    if len(budgets) < 3:
        yield f"scaling.budgets_kimg has {len(budgets)} points; a power law per size needs at least 3"
    every = round(tune.get("snapshot_kimg", 0) * 1000 / tune["batch"])
    for kimg in budgets:
        iterations = kimg * 1000 / tune["batch"]
        if kimg > tune["kimg"] or not every or abs(iterations - round(iterations)) > 1e-9 or round(iterations) % every:
            yield (f"scaling.budgets_kimg: {kimg} is not a snapshot of the tuning run (tune.kimg {tune['kimg']}, "
                   f"a snapshot every tune.snapshot_kimg = {tune.get('snapshot_kimg', 0)} kimg)")
    if cfg["teacher"]["source"] != "pretrain" and any(scaling["sizes"].values()):
        yield ("scaling.sizes: a downloaded teacher brings its architecture; its sizes take no arch overrides ({}): "
               "give each size its own download in scaling.teachers")
    sizes = set(scaling["sizes"])
    for key in ("teachers", "tune"):
        extra = sorted(set(scaling.get(key, {})) - sizes)
        if extra:
            yield f"scaling.{key} names sizes {extra} that scaling.sizes does not have"
    teachers = scaling.get("teachers")
    if teachers is not None and (cfg["teacher"]["source"] == "pretrain" or set(teachers) != sizes):
        yield ("scaling.teachers: a download for every size of scaling.sizes, and only with a downloaded teacher "
               "(teacher.source: edm)")
    if teachers is None and cfg["teacher"]["source"] != "pretrain" and len(sizes) > 1:
        yield "scaling.sizes: several sizes with a downloaded teacher need a teacher each (scaling.teachers)"