"""Typed settings: each setting declared once (type, default, bounds, meaning) and built, checked and
described as a JSON schema from that one declaration.

A section of settings is a frozen dataclass whose fields come from :func:`setting`; the bounds of a
field are a :class:`Bound`. :func:`build` turns plain data (parsed YAML) into the dataclass, checking
every value on the way and raising one :class:`ConfigError` that names the key; :func:`json_schema`
writes the same declarations as a JSON schema (for editors, `snakemake` validation and the docs).
Network constructors use the same :class:`Bound` in ``Annotated`` parameters, so their kwargs are
checked by the same code (``ect/networks.py``: ``arch_options``).

The checks are stricter than JSON schema's: an integer is an ``int`` (``32.0`` is refused), a pattern
matches the whole string (no trailing newline), every number is finite.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from ect.errors import BadInput


class ConfigError(BadInput):
    """A setting whose value no run can use; the message starts with the key's dotted path."""


@dataclass(frozen=True)
class Bound:
    """Bounds of a number, a string or a list (and of the list's items)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    multiple_of: int | None = None
    pattern: str | None = None  # matched against the whole string
    min_items: int | None = None
    max_items: int | None = None
    unique: bool = False
    items: Bound | None = None

    def problem(self, value) -> str | None:
        """What is wrong with ``value`` (already of the right type), or None."""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return self._number_problem(value)
        if isinstance(value, str) and self.pattern is not None and not re.fullmatch(self.pattern, value):
            return f"{_show(value)} does not match {self.pattern!r}"
        if isinstance(value, (list, tuple)):
            if self.min_items is not None and len(value) < self.min_items:
                return f"{_show(value)} should have at least {self.min_items} item(s)"
            if self.max_items is not None and len(value) > self.max_items:
                return f"{_show(value)} should have at most {self.max_items} item(s)"
            if self.unique and len(set(map(repr, value))) != len(value):
                return f"{_show(value)} has repeated items"
        return None

    def _number_problem(self, value) -> str | None:
        if type(value) is float and not math.isfinite(value):
            return f"{value} is not a finite number"
        for limit, fails, words in ((self.ge, lambda v, x: v < x, "less than the minimum of"),
                                    (self.gt, lambda v, x: v <= x, "less than or equal to the minimum of"),
                                    (self.le, lambda v, x: v > x, "greater than the maximum of"),
                                    (self.lt, lambda v, x: v >= x, "greater than or equal to the maximum of")):
            if limit is not None and fails(value, limit):
                return f"{value} is {words} {limit:g}"
        if self.multiple_of and value % self.multiple_of:
            return f"{value} is not a multiple of {self.multiple_of}"
        return None

    def schema(self) -> dict:
        keys = {"ge": "minimum", "gt": "exclusiveMinimum", "le": "maximum", "lt": "exclusiveMaximum",
                "multiple_of": "multipleOf", "min_items": "minItems", "max_items": "maxItems"}
        out = {name: getattr(self, attr) for attr, name in keys.items() if getattr(self, attr) is not None}
        if self.pattern is not None:
            out["pattern"] = f"^(?:{self.pattern})$"
        if self.unique:
            out["uniqueItems"] = True
        return out


def _show(value, limit: int = 60) -> str:
    """A bounded excerpt of a value for a message: never a whole (possibly huge) structure."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


REQUIRED = dataclasses.MISSING


def setting(default=REQUIRED, doc: str = "", bound: Bound | None = None, **bounds):
    """A field of a settings dataclass: its default (none: the key is required), what it means, its bounds."""
    meta = {"doc": doc, "bound": bound or (Bound(**bounds) if bounds else None)}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class When:
    """A requirement that holds when a field has a value: ``When("source", "edm", require=("url",))``."""

    field: str
    value: Any
    require: tuple = ()  # keys that must be given, with a value
    equal: dict = dataclasses.field(default_factory=dict)  # field -> the only value it may then take
    nullable: tuple = ()  # keys of ``require`` that must be given but may be null (a checksum: trust on first use)


class Mapping:
    """``Annotated[dict[str, T], Mapping(keys=...)]``: a mapping whose keys match a pattern (or are one of a
    list) and whose values are of type T. (An ``Annotated`` extra with ``check(value, path)`` and
    ``schema(defs)`` methods checks and describes a value itself.)"""

    def __init__(self, keys: str | None = None, names: tuple | None = None, min_items: int = 0):
        self.keys, self.names, self.min_items = keys, names, min_items


# ---------------------------------------------------------------------------------------------
# Building (and checking) a dataclass from plain data.

def fields_of(cls) -> dict[str, tuple[Any, dataclasses.Field]]:
    """name -> (resolved type, field) of a settings dataclass."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: (hints[f.name], f) for f in dataclasses.fields(cls)}


def where(path: str) -> str:
    return path or "top level"


def build(cls, data, path: str = ""):
    """The dataclass ``cls`` from ``data`` (a mapping), every value checked; defaults fill what is absent."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where(path)}: {_show(data)} is not of type 'object'")
    fields = fields_of(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(f"unknown key {', '.join(repr(str(k)[:80]) for k in unknown)} in {where(path)} "
                        f"(known: {', '.join(fields)})")
    for rule in getattr(cls, "CONDITIONS", ()):
        if data.get(rule.field, fields[rule.field][1].default) == rule.value:
            for key in rule.require:
                if key not in data or (data[key] is None and key not in rule.nullable):
                    raise ConfigError(f"{where(path)}: '{key}' is a required property when {rule.field} is "
                                    f"{rule.value!r}")
            for key, only in rule.equal.items():
                if key in data and data[key] != only:
                    raise ConfigError(f"{join(path, key)}: {rule.field} {rule.value!r} needs {only!r}, not "
                                    f"{_show(data[key])}")
    values = {}
    for name, (tp, f) in fields.items():
        if name in data:
            values[name] = convert(tp, data[name], join(path, name), f.metadata.get("bound"))
        elif f.default is REQUIRED and f.default_factory is REQUIRED:
            raise ConfigError(f"{where(path)}: '{name}' is a required property")
    try:
        return cls(**values)
    except ConfigError as exc:  # a cross-field check: its message is relative to this section
        raise ConfigError(f"{path}.{exc}" if path else str(exc)) from None


def join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def convert(tp, value, path: str, bound: Bound | None = None):
    """``value`` checked against the type ``tp`` (and ``bound``); lists become tuples where ``tp`` says so."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        base, extras = args[0], args[1:]
        for extra in extras:
            if hasattr(extra, "check"):  # a check of its own (network options)
                return extra.check(value, path)
            if isinstance(extra, Mapping):
                return _mapping(base, value, path, extra)
        return convert(base, value, path, next((e for e in extras if isinstance(e, Bound)), bound))
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        return convert(options[0], value, path, bound) if len(options) == 1 else _first_fitting(options, value, path)
    if origin is Literal:
        if value not in args or type(value) not in {type(a) for a in args}:
            raise ConfigError(f"{path}: {_show(value)} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if origin is tuple:
        return _sequence(args[0], value, path, bound)
    if origin is dict:
        return _mapping(tp, value, path, Mapping())
    _check_scalar(tp, value, path)
    problem = bound.problem(value) if bound else None
    if problem:
        raise ConfigError(f"{path}: {problem}")
    return value


# No setting comes near these: integers fit int64 (seeds are below 2^63), and numbers stay far enough below
# float's range that what is derived from them (iteration counts, products of settings) cannot overflow.
MAX_INTEGER, MAX_NUMBER = 2**63 - 1, 1e15
TYPE_NAMES = {int: "integer", float: "number", bool: "boolean", str: "string"}


def _check_scalar(tp, value, path: str) -> None:
    fits = {int: lambda v: type(v) is int, bool: lambda v: type(v) is bool, str: lambda v: isinstance(v, str),
            float: lambda v: type(v) in (int, float)}
    if tp is Any:
        return
    if tp not in fits:
        raise TypeError(f"settings type {tp!r} at {path} is not supported")
    if not fits[tp](value):
        raise ConfigError(f"{path}: {_show(value)} is not of type '{TYPE_NAMES[tp]}'")
    if tp is float and not math.isfinite(value):  # NaN passes every comparison
        raise ConfigError(f"{path}: {value} is not a finite number")
    limit = MAX_INTEGER if tp is int else MAX_NUMBER
    if tp in (int, float) and not -limit <= value <= limit:
        raise ConfigError(f"{path}: {_show(value)} is beyond {limit:.3g} in magnitude: no setting is that large")


def _first_fitting(options, value, path: str):
    problems = []
    for option in options:
        try:
            return convert(option, value, path)
        except ConfigError as exc:
            problems.append(str(exc).removeprefix(f"{path}: "))
    raise ConfigError(f"{path}: {'; or '.join(problems)}")


def _sequence(item_type, value, path: str, bound: Bound | None):
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{path}: {_show(value)} is not of type 'array'")
    items = tuple(convert(item_type, v, f"{path}.{i}", bound.items if bound else None) for i, v in enumerate(value))
    problem = bound.problem(items) if bound else None
    if problem:
        raise ConfigError(f"{path}: {problem}")
    return items


def _mapping(tp, value, path: str, spec: Mapping) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: {_show(value)} is not of type 'object'")
    _, value_type = typing.get_args(tp)
    if len(value) < spec.min_items:
        raise ConfigError(f"{path}: needs at least {spec.min_items} entr{'y' if spec.min_items == 1 else 'ies'}")
    out = {}
    for key, item in value.items():
        if not isinstance(key, str) or (spec.keys and not re.fullmatch(spec.keys, key)):
            raise ConfigError(f"{path}: key {_show(key)} does not match {spec.keys!r}")
        if spec.names is not None and key not in spec.names:
            raise ConfigError(f"unknown key {key[:80]!r} in {path} (known: {', '.join(spec.names)})")
        out[key] = convert(value_type, item, join(path, key))
    return out


# ---------------------------------------------------------------------------------------------
# The same declarations as a JSON schema.

def json_schema(cls, title: str = "") -> dict:
    """A JSON schema (draft 2020-12) of the settings dataclass ``cls``, with its nested sections as $defs."""
    defs: dict[str, dict] = {}
    root = _object_schema(cls, defs)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": title, **root, "$defs": defs}


def _object_schema(cls, defs: dict) -> dict:
    properties, required = {}, []
    for name, (tp, f) in fields_of(cls).items():
        prop = type_schema(tp, defs, f.metadata.get("bound"))
        if f.metadata.get("doc"):
            prop["description"] = f.metadata["doc"]
        if f.default is not REQUIRED and f.default is not None and not isinstance(f.default, type):
            prop["default"] = plain(f.default)
        if f.default is REQUIRED and f.default_factory is REQUIRED:
            required.append(name)
        properties[name] = prop
    out = {"type": "object", "additionalProperties": False, "properties": properties}
    if cls.__doc__:
        out["description"] = " ".join(cls.__doc__.split())
    if required:
        out["required"] = required
    conditions = [{"if": {"properties": {c.field: {"const": c.value}}},
                   "then": {"required": list(c.require), "properties": {
                       **{k: {"not": {"type": "null"}} for k in c.require if k not in c.nullable},
                       **{k: {"const": v} for k, v in c.equal.items()}}}}
                  for c in getattr(cls, "CONDITIONS", ())]
    if conditions:
        out["allOf"] = conditions
    return out


def type_schema(tp, defs: dict, bound: Bound | None = None) -> dict:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        base, extras = args[0], args[1:]
        for extra in extras:
            if hasattr(extra, "check"):
                return extra.schema(defs)
            if isinstance(extra, Mapping):
                return _mapping_schema(base, defs, extra)
        return type_schema(base, defs, next((e for e in extras if isinstance(e, Bound)), bound))
    if origin in (Union, types.UnionType):
        options = [type_schema(a, defs, bound) for a in args if a is not type(None)]
        if type(None) in args:
            options.append({"type": "null"})
        return options[0] if len(options) == 1 else {"anyOf": options}
    if origin is Literal:
        return {"enum": list(args)}
    if dataclasses.is_dataclass(tp):
        defs.setdefault(tp.__name__, None)
        if defs[tp.__name__] is None:
            defs[tp.__name__] = _object_schema(tp, defs)
        return {"$ref": f"#/$defs/{tp.__name__}"}
    if origin is tuple:
        out = {"type": "array", "items": type_schema(args[0], defs, bound.items if bound else None)}
        return {**out, **(bound.schema() if bound else {})}
    if origin is dict:
        return _mapping_schema(tp, defs, Mapping())
    if tp is Any:
        return {}
    return {"type": TYPE_NAMES[tp], **(bound.schema() if bound else {})}


def _mapping_schema(tp, defs: dict, spec: Mapping) -> dict:
    _, value_type = typing.get_args(tp)
    out = {"type": "object", "additionalProperties": type_schema(value_type, defs)}
    if spec.keys:
        out["propertyNames"] = {"pattern": f"^(?:{spec.keys})$"}
    if spec.names is not None:
        out["propertyNames"] = {"enum": list(spec.names)}
    if spec.min_items:
        out["minProperties"] = spec.min_items
    return out


def plain(value):
    """A settings value as plain data (dicts, lists, numbers, strings): for JSON, YAML and params."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value
