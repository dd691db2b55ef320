"""The run spec: one home of every setting. Every key fails at plan time with a bad value, naming itself; the
JSON schema written from the spec agrees with it; each step reads only what it declares."""
from __future__ import annotations

import copy
import dataclasses
import re
import typing

import jsonschema
import pytest
import yaml

from ect.config import read_config
from ect.networks import arch_options
from ect.spec import (
    STEP_READS,
    RunSpec,
    UndeclaredSetting,
    build_spec,
    config_schema,
    load_spec,
    step_settings,
    step_values,
)
from ect.typed import ConfigError, fields_of
from tests.helpers import ROOT

# Presets in which every section exists: a key is tried in the first whose data has its parent.
BASES = ["config", "toy-scaling", "cifar10", "imagenet64-scaling"]
PAPER = {"source": "s", "claims": [{"set": "ect-2step", "fid": 1.0, "source": "s"}], "protocol": "p",
         "statement": "s", "budget": {"gpu_hours": 1, "device": "A100", "fid": 1.0, "source": "s"}}


def leaf_paths(cls, prefix=""):
    """(dotted path, type) of every setting of a spec section, descending into sections and, for mappings,
    into an entry named '*'."""
    for name, (tp, _) in fields_of(cls).items():
        path = f"{prefix}{name}"
        yield path, tp
        for inner in _sections(tp):
            yield from leaf_paths(inner, f"{path}.*." if _is_mapping(tp) else f"{path}.")


def _unwrap(tp):
    while typing.get_origin(tp) in (typing.Annotated, typing.Union, type(int | None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    return tp


def _is_mapping(tp) -> bool:
    return typing.get_origin(_unwrap(tp)) is dict


def _sections(tp):
    inner = _unwrap(tp)
    if typing.get_origin(inner) is dict:
        inner = _unwrap(typing.get_args(inner)[1])
    return [inner] if dataclasses.is_dataclass(inner) else []


def bad_value(tp):
    """A value no setting of this type accepts."""
    inner = _unwrap(tp)
    origin = typing.get_origin(inner)
    if inner is str or origin is typing.Literal:
        return 17
    if origin is tuple:
        return "not a list"
    if inner is bool:
        return 3
    return "not a number"  # int, float, sections and mappings (which need an object)


def place(data: dict, path: str, value):
    """Put ``value`` at ``path`` (a '*' picks an existing entry); False when the parent does not exist."""
    *parents, last = path.split(".")
    node = data
    for part in parents:
        if part == "*":
            if not isinstance(node, dict) or not node:
                return False
            part = next(iter(node))
        if not isinstance(node, dict) or not isinstance(node.get(part), dict):
            return False
        node = node[part]
    node[last] = value
    return True


def with_paper(data: dict) -> dict:
    data = copy.deepcopy(data)
    data["report"]["paper"] = {**PAPER, **(data["report"].get("paper") or {})}
    return data


def test_every_key_of_the_spec_fails_with_a_bad_value_naming_the_key():
    bases = [with_paper(read_config(ROOT / f"config/{name}.yaml")) for name in BASES]
    paths = [(p, tp) for p, tp in leaf_paths(RunSpec) if p != "base"]  # `base` is read with the files
    assert len(paths) > 100
    for path, tp in paths:
        for base in bases:
            data = copy.deepcopy(base)
            if place(data, path, bad_value(tp)):
                break
        else:
            pytest.fail(f"no preset has the parent of {path}: add one to BASES")
        with pytest.raises(ConfigError) as err:
            build_spec(data, "c.yaml")
        key = re.escape(path).replace(r"\*", r"[A-Za-z0-9_]+")
        assert re.match(rf"c\.yaml: {key}: ", str(err.value)), (path, str(err.value))
        assert "\n" not in str(err.value)


def test_every_network_option_fails_with_a_bad_value_naming_it():
    toy = read_config(ROOT / "config/config.yaml")
    for kind in ("edm", "edm2"):
        for name, (tp, _) in arch_options(kind).items():
            data = copy.deepcopy(toy)
            data["tune"]["arch"] = {name: bad_value(tp)}
            with pytest.raises(ConfigError) as err:
                build_spec(data, "c.yaml")
            assert str(err.value).startswith(f"c.yaml: tune.arch.{name}: "), str(err.value)


@pytest.mark.parametrize("change, message", [
    ({"tune": {"loss": {"q": 1}}}, "tune.loss.q: 1 is less than or equal to the minimum of 1"),
    ({"tune": {"output_ema_std": 0.05}}, "tune.output_ema_std: 0.05 is not one of pf_ema_stds"),
    ({"tune": {"arch": {"model_channels": 0}}}, "tune.arch.model_channels: 0 is less than"),
    ({"tune": {"arch": {"channel_mults": [1]}}}, "tune.arch: unknown network option 'channel_mults'"),
    ({"pretrain": {"arch": {"channel_mult": [1, 2, 2, 2, 2, 2]}}}, "pretrain.arch: img_resolution 16 cannot be halved 5"),
    ({"pretrain": {"batch": 32.0}}, "pretrain.batch: 32.0 is not of type 'integer'"),
    ({"run": "toy\n"}, "run: 'toy\\n' does not match"),
    ({"fid": {"modes": ["legacy_tensorflow"]}}, "fid.modes: the digits-classifier feature network supports only"),
    ({"tune": {"snapshot_kimg": 0}}, "tune.snapshot_kimg: 0 gives no snapshot"),
    ({"sample": {"samples_per_set": 10_000_000}}, "sample.sets: 3 x samples_per_set 10000000 is more than"),
    ({"pretrain": {"loss": {"q": 2}}}, "unknown key 'q' in pretrain.loss"),
])
def test_values_that_used_to_fail_only_when_a_job_started_fail_when_the_spec_is_built(tmp_path, change, message):
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(change))
    with pytest.raises(ConfigError) as err:
        load_spec(ROOT / "config/config.yaml", path)
    assert message in str(err.value)


def test_the_json_schema_is_written_from_the_spec_and_agrees_with_it():
    schema = config_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    for preset in sorted((ROOT / "config").glob("*.yaml")):
        data = read_config(preset)
        assert not list(validator.iter_errors(yaml.safe_load(preset.read_text()) | data)), preset.name
        load_spec(preset)  # and the spec accepts it
    toy = read_config(ROOT / "config/config.yaml")
    for path, tp in leaf_paths(RunSpec):
        data = copy.deepcopy(toy)
        if "*" not in path and path != "base" and place(data, path, bad_value(tp)):
            assert list(validator.iter_errors(data)), f"the schema accepts a bad {path}"


def test_a_base_is_read_before_its_preset_and_cycles_and_overlay_bases_are_refused(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "b.yaml").write_text("tune: {lr: 0.5, kimg: 4}\n")
    (tmp_path / "p.yaml").write_text((ROOT / "config/config.yaml").read_text() + "\nbase: base/b.yaml\n")
    spec = load_spec(tmp_path / "p.yaml")
    assert spec.tune.lr == 0.002 and spec.tune.kimg == 16  # the preset's own values win over its base's
    (tmp_path / "c1.yaml").write_text("base: c2.yaml\n")
    (tmp_path / "c2.yaml").write_text("base: c1.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_spec(tmp_path / "c1.yaml")
    (tmp_path / "o.yaml").write_text("base: base/b.yaml\n")
    with pytest.raises(ConfigError, match="only a preset"):
        load_spec(tmp_path / "p.yaml", tmp_path / "o.yaml")


def test_the_imagenet_presets_state_only_what_differs_from_their_base():
    base = yaml.safe_load((ROOT / "config/base/imagenet64.yaml").read_text())
    for size in ("s", "m", "l", "xl"):
        own = yaml.safe_load((ROOT / f"config/imagenet64-{size}.yaml").read_text())
        assert own["base"] == "base/imagenet64.yaml"
        for section, values in own.items():
            if isinstance(values, dict) and isinstance(base.get(section), dict):
                same = [k for k, v in values.items() if base[section].get(k) == v]
                assert not same, f"imagenet64-{size}.yaml repeats its base's {section}.{same}"
        assert len((ROOT / f"config/imagenet64-{size}.yaml").read_text().splitlines()) < 45


def test_duplicate_keys_and_aliases_are_refused(tmp_path):
    (tmp_path / "d.yaml").write_text("run: a\nrun: b\n")
    with pytest.raises(ConfigError, match="'run' appears twice"):
        load_spec(tmp_path / "d.yaml")
    (tmp_path / "a.yaml").write_text("a: &x [1, 2]\nb: *x\n")
    with pytest.raises(ConfigError, match="aliases"):
        load_spec(tmp_path / "a.yaml")


def test_a_step_reads_only_what_it_declares():
    spec = load_spec(ROOT / "config/toy-scaling.yaml")
    fid = step_settings(spec, "fid")
    assert fid.sample.sets == spec.sample.sets and fid.fid.modes == spec.fid.modes
    with pytest.raises(UndeclaredSetting, match="step 'fid' reads sample.t_mid"):
        _ = fid.sample.t_mid
    tune = step_settings(spec, "tune", {"size": "s"})
    assert tune.scaling.sizes["s"] == {"model_channels": 16} and tune.tune.lr == spec.tune.lr
    with pytest.raises(UndeclaredSetting):
        _ = tune.scaling.sizes["m"]  # another size's settings
    assert step_settings(spec, "report").sample.batch == spec.sample.batch  # the report reads everything


def test_a_steps_values_change_only_with_what_it_reads():
    a = load_spec(ROOT / "config/config.yaml")
    b = dataclasses.replace(a, sample=dataclasses.replace(a.sample, t_mid=(0.5,)))
    changed = {step for step in STEP_READS if step_values(a, step) != step_values(b, step)}
    assert changed == {"sample", "fid_curve", "fid_snapshot", "fid_budget", "scaling_point", "report"}
    c = dataclasses.replace(a, tune=dataclasses.replace(a.tune, tick_kimg=0.5, state_kimg=0.5))
    assert {step for step in STEP_READS if step_values(a, step) != step_values(c, step)} == {"report"}
