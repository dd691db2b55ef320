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
    assert changed == {"sample", "fid_curve", "fid_snapshot", "fid_emas", "fid_budget", "scaling_point", "report"}
    c = dataclasses.replace(a, tune=dataclasses.replace(a.tune, tick_kimg=0.5, state_kimg=0.5))
    assert {step for step in STEP_READS if step_values(a, step) != step_values(c, step)} == {"report"}


# ---------------------------------------------------------------------------------------------
# A scaling study's runs: sizes, seed repeats, batch-grown runs, reused runs; claims about one run.

def toy_study(**scaling) -> dict:
    data = read_config(ROOT / "config/toy-scaling.yaml")
    data["scaling"] = {**data["scaling"], **scaling}
    return data


def test_a_studys_runs_are_its_sizes_their_seed_repeats_and_their_batch_grown_runs():
    from ect.spec import same_run, training_options

    spec = build_spec(toy_study())
    assert list(spec.scaling.models) == ["xs", "s", "m", "xs-seed1", "s-seed1", "m-seed1", "s-batch16", "s-batch32",
                                         "s-batch64"]
    seed = training_options(spec, "tune", model="m-seed1")
    assert (seed.seed, seed.kimg, seed.batch, seed.arch) == (spec.tune.seed + 1, 6.4, 32,
                                                             training_options(spec, "tune", "m").arch)
    assert spec.scaling.budgets_of("m-seed1") == (3.2, 6.4) and spec.scaling.budgets_of("m") == (1.6, 3.2, 6.4, 12.8)
    grown = training_options(spec, "tune", model="s-batch64")
    assert (grown.batch, grown.total_iters, grown.kimg, grown.snapshot_kimg) == (64, 200, 12.8, 12.8)
    assert spec.scaling.budgets_of("s-batch64") == (12.8,)
    # batch 32 for 200 iterations is the 6.4 kimg snapshot of s's own run: an alias, not a second training
    assert [same_run(spec, m) for m in ("s-batch16", "s-batch32", "s-batch64", "s-seed1")] == [None, "s", None, None]


@pytest.mark.parametrize("change, message", [
    ({"seeds": {"count": 2, "budgets_kimg": [5.0]}}, "seeds.budgets_kimg: [5.0] are not budgets"),
    ({"seeds": {"count": 1, "budgets_kimg": [3.2]}}, "scaling.seeds.count: 1 is less than the minimum of 2"),
    ({"seeds": {"count": 2, "budgets_kimg": [3.2], "sizes": ["xl"]}}, "seeds.sizes: ['xl'] are not sizes"),
    ({"batches": {"sizes": ["q"], "batch": [8], "iterations": 10}}, "batches.sizes: ['q'] are not sizes"),
    ({"sets": 2}, "scaling.sets: 2 is less than the minimum of 3"),
    ({"sizes": {"size": {}, "s": {"model_channels": 16}}}, "'size' names the fit across sizes"),
    ({"reuse": {"s": "Bad Name"}}, "scaling.reuse.s: 'Bad Name' does not match"),
    ({"reuse": {"s": "no-such-preset"}}, "config/no-such-preset.yaml"),
    ({"reuse": {"s": "config"}}, "cannot stand in for a size with its own teacher or arch"),
])
def test_a_studys_runs_are_checked_at_plan_time(change, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        from ect.layout import RunLayout

        RunLayout(build_spec(toy_study(**change), "c.yaml"))  # the layout reads and checks a reused preset


def test_a_reused_run_must_be_the_run_the_study_would_train(tmp_path, monkeypatch):
    from ect.layout import RunLayout

    spec = load_spec(ROOT / "config/cifar10-scaling.yaml")
    layout = RunLayout(spec, "ddpmpp")
    assert (layout.model, layout.teacher) == ("results/cifar10-400k", "results/cifar10-400k/teacher.pt")
    assert RunLayout(spec, "ddpmpp-batch256").model == "results/cifar10-scaling/sizes/ddpmpp-batch256"
    assert RunLayout(spec, "ddpmpp-batch128").model == "results/cifar10-400k"  # its snapshot at 12.8 Mimg
    assert RunLayout(spec).trained_models == ["ddpmpp-batch256", "ddpmpp-batch512"]
    (tmp_path / "config").mkdir()
    other = read_config(ROOT / "config/cifar10-400k.yaml")
    other["tune"]["lr"] = 2e-4
    (tmp_path / "config/cifar10-400k.yaml").write_text(yaml.safe_dump(other))
    monkeypatch.chdir(tmp_path)  # the reused preset is read from the working directory's config/
    with pytest.raises(ConfigError, match="tunes otherwise than this study's size ddpmpp"):
        RunLayout(spec)


def test_a_claim_names_a_run_of_a_study_and_only_of_a_study():
    study = toy_study()
    study["report"]["paper"]["claims"] = [{"set": "ect-2step", "fid": 9.0, "source": "s", "model": "s-batch64"}]
    assert build_spec(study).report.paper.claims[0].model == "s-batch64"
    study["report"]["paper"]["claims"][0]["model"] = "s-batch65"
    with pytest.raises(ConfigError, match="must be a run of scaling.models"):
        build_spec(study)
    run = read_config(ROOT / "config/config.yaml")
    run["report"]["paper"] = {"source": "s", "claims": [{"set": "ect-2step", "fid": 9.0, "source": "s", "model": "s"}]}
    with pytest.raises(ConfigError, match="only a scaling study's claims name a run"):
        build_spec(run)
