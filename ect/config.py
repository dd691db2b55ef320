"""Config files: a preset (which may name a base it overlays) and overlays, read and merged in order.

Merging is Snakemake's ``--configfile`` rule: mappings merge key by key, anything else (lists included)
is replaced, so ``ect <step> --config a.yaml b.yaml`` sees what Snakemake sees. A preset's ``base:``
(a file relative to the preset, under ``config/base/``) is read before it, so a family of presets
states only what differs from their base. The files are untrusted text: no YAML aliases, no repeated
keys, a size cap. What the values mean, and every check of them, is the run spec (``ect/spec.py``).
"""
from __future__ import annotations

import re
from pathlib import Path

import yaml

from ect.typed import ConfigError

MAX_CONFIG_BYTES = 256 << 10  # a preset is a few kB; PyYAML reads about 50 kB a second of the worst text
MAX_BASE_DEPTH = 4  # a base may itself have a base, this deep


def merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class StrictLoader(yaml.SafeLoader):
    """YAML as untrusted text: scalars of YAML 1.2's core schema only (strings, integers, numbers such as
    ``1e-08``, booleans, null; no dates, no sexagesimal or octal surprises of YAML 1.1), no explicit tags,
    no anchors and aliases (they let a small file expand exponentially when it is merged, checked or
    printed), no key twice in one mapping (the second would silently win), nesting at most MAX_DEPTH deep
    and integers of at most MAX_DIGITS digits, so that no file can make the parser recurse or compute
    without bound."""

    yaml_implicit_resolvers: dict = {}
    depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if self.check_event(yaml.AliasEvent):
            raise ConfigError(f"YAML aliases (*name) are not allowed (line {event.start_mark.line + 1})")
        if getattr(event, "tag", None) not in (None, "!"):
            raise ConfigError(f"YAML tags ({str(event.tag)[:40]}) are not allowed (line {event.start_mark.line + 1})")
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise ConfigError(f"nested deeper than {MAX_DEPTH} levels (line {event.start_mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (str, int, float, bool)) or key is None:
                if key in seen:
                    raise ConfigError(f"key {str(key)[:80]!r} appears twice in one mapping "
                                      f"(line {key_node.start_mark.line + 1})")
                seen.add(key)
        return super().construct_mapping(node, deep)

    def construct_yaml_int(self, node):
        text = self.construct_scalar(node).lstrip("+-")
        if len(text) > MAX_DIGITS:
            raise ConfigError(f"an integer of {len(text)} digits (line {node.start_mark.line + 1}): no setting is "
                              "that large")
        return super().construct_yaml_int(node)


MAX_DEPTH = 32
MAX_DIGITS = 40
for _tag, _pattern, _first in (  # YAML 1.2's core schema
        ("bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
        ("int", r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$", "-+0123456789"),
        ("float", r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$",
         "-+0123456789."),
        ("null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""])):
    StrictLoader.add_implicit_resolver(f"tag:yaml.org,2002:{_tag}", re.compile(_pattern), list(_first))
StrictLoader.add_constructor("tag:yaml.org,2002:int", StrictLoader.construct_yaml_int)


def load_yaml_text(text: str, what: str):
    """Untrusted YAML text to data, with the rules of :class:`StrictLoader`."""
    try:
        return yaml.load(text, Loader=StrictLoader)
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} is not valid YAML: {' '.join(str(exc).split())[:300]}") from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
        # a scalar the constructors cannot build; the rules above leave none, this is the backstop
        raise ConfigError(f"{what} has a value YAML cannot read: {type(exc).__name__}: {str(exc)[:200]}") from None


def read_yaml(path) -> dict:
    """One config file as a mapping."""
    path = Path(path)
    try:
        if not path.is_file():
            raise ConfigError(f"cannot read config {path}: not a regular file" if path.exists()
                              else f"cannot read config {path}: No such file or directory")
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)  # the size stat reports can lie (/proc files report 0)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(f"config {path} is larger than {MAX_CONFIG_BYTES} bytes: not a preset")
        text = data.decode()
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"config {path} is not UTF-8 text") from None
    cfg = load_yaml_text(text, f"config {path}")
    if not isinstance(cfg, dict):
        raise ConfigError(f"config {path} must be a mapping at top level")
    return cfg


def preset_chain(path) -> list[Path]:
    """A preset file after the bases it overlays, the deepest base first."""
    chain = [Path(path)]
    while True:
        base = read_yaml(chain[0]).get("base")
        if base is None:
            return chain
        if not isinstance(base, str) or not base.endswith(".yaml"):
            raise ConfigError(f"{chain[0]}: base: {str(base)[:80]!r} is not a .yaml file name")
        parent = (chain[0].parent / base)
        if parent.resolve() in {p.resolve() for p in chain} or len(chain) > MAX_BASE_DEPTH:
            raise ConfigError(f"{chain[0]}: base: {base} makes a cycle or a chain deeper than {MAX_BASE_DEPTH}")
        chain.insert(0, parent)


def config_files(*paths) -> list[Path]:
    """Every file a run reads, in merge order: the preset's bases, the preset, the overlays. Only the
    preset (the first file) may name a base."""
    if not paths:
        raise ConfigError("no config file given")
    for overlay in paths[1:]:
        if "base" in read_yaml(overlay):
            raise ConfigError(f"{overlay}: only a preset (the first config file) may name a base")
    return [*preset_chain(paths[0]), *map(Path, paths[1:])]


def read_config(*paths) -> dict:
    """The merged data of a preset (after its bases) and its overlays, unchecked (ect/spec.py checks it)."""
    cfg: dict = {}
    for path in config_files(*paths):
        cfg = merge(cfg, {k: v for k, v in read_yaml(path).items() if k != "base"})
    return cfg
