import pytest
import yaml

from ect.config import merge
from ect.spec import load_spec
from ect.typed import ConfigError
from tests.helpers import ROOT, run_ect

TOY = ROOT / "config" / "config.yaml"


def overlay(tmp_path, data):
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_toy_preset_is_valid_and_overlays_merge_like_snakemake(tmp_path):
    cfg = load_spec(TOY, overlay(tmp_path, {"tune": {"kimg": 8, "arch": {"dropout": 0.3}}, "sample": {"t_mid": [1.0]}}))
    assert cfg.tune.kimg == 8 and cfg.tune.arch == {"dropout": 0.3} and cfg.tune.batch == yaml.safe_load(TOY.read_text())["tune"]["batch"]
    assert cfg.sample.t_mid == (1.0,)  # lists are replaced
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}, "d": 4}) == {"a": {"b": 1, "c": 3}, "d": 4}


@pytest.mark.parametrize("data, message", [
    ({"tune": {"lrr": 1}}, "unknown key 'lrr' in tune"),
    ({"tune": {"lr": "fast"}}, "tune.lr: 'fast' is not of type 'number'"),
    ({"tune": {"loss": {"q": 1}}}, "tune.loss.q: 1 is less than or equal to the minimum of 1"),
    ({"dataset": {"resolution": 12}}, "dataset.resolution: 12 is not a multiple of 8"),
    ({"run": "a b"}, "run: 'a b' does not match"),
    ({"resources": {"tunee": {"runtime": 1}}}, "unknown key 'tunee' in resources"),
    ({"extra": 1}, "unknown key 'extra' in top level"),
])
def test_bad_key_or_value_is_one_error_naming_it(tmp_path, data, message):
    with pytest.raises(ConfigError) as err:
        load_spec(TOY, overlay(tmp_path, data))
    assert message in str(err.value)
    assert "overlay.yaml" in str(err.value)


def test_cli_reports_a_bad_config_and_writes_nothing(tmp_path):
    proc = run_ect("sample", "--config", TOY, overlay(tmp_path, {"sample": {"sets": 0}}), "--set", "ect-1step",
                   "--checkpoint", tmp_path / "c.pt", "--out", tmp_path / "s.npz", check=False)
    assert proc.returncode == 2 and "sample.sets: 0 is less than the minimum of 1" in proc.stderr
    assert not (tmp_path / "s.npz").exists()
    proc = run_ect("sample", "--config", tmp_path / "missing.yaml", "--set", "ect-1step", "--checkpoint", tmp_path / "c.pt",
                   "--out", tmp_path / "s.npz", check=False)
    assert proc.returncode == 2 and "cannot read config" in proc.stderr


def test_download_urls_must_need_no_shell_quoting(tmp_path):
    with pytest.raises(ConfigError, match="dataset.url: .* does not match"):
        load_spec(ROOT / "config" / "cifar10.yaml", overlay(tmp_path, {"dataset": {"url": "https://x.org/a.tgz; rm -rf ~"}}))


def test_cifar10_presets_agree_on_everything_they_share_under_resources():
    """The CIFAR-10 presets write the same resources/ files (downloads, dataset, Inception reference statistics):
    the settings that make those files must be equal, or one preset would use the other's."""
    names = sorted(p.stem for p in (ROOT / "config").glob("cifar10*.yaml"))
    assert names == ["cifar10", "cifar10-1hour", "cifar10-400k", "cifar10-scaling"]
    a, *others = (load_spec(ROOT / "config" / f"{name}.yaml") for name in names)
    for b in others:
        for section in ("dataset", "teacher"):
            assert getattr(a, section) == getattr(b, section), section
        assert a.fid.feature_net == b.fid.feature_net and a.fid.modes == b.fid.modes
