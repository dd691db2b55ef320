import numpy as np
import pytest
import torch

from ect.checkpoint import load_network
from ect.sample import (
    SeededNoise,
    consistency_sampler,
    generate,
    heun_sampler,
    heun_sigmas,
    load_samples,
    merge_samples,
    parse_seeds,
    to_uint8,
)
from tests.helpers import make_teacher, run_ect, toy_config


class Recorder(torch.nn.Module):
    """A stand-in D(x, σ) that records its calls: lets us check the samplers' arithmetic exactly."""

    img_channels, img_resolution, label_dim = 1, 2, 0

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, sigma, class_labels=None):
        self.calls.append((x.clone(), sigma.clone()))
        return (0.5 * x / (1 + sigma.reshape(-1, 1, 1, 1))).float()


def test_parse_seeds():
    assert parse_seeds("0-3,7,5-6") == [0, 1, 2, 3, 5, 6, 7]
    for bad in ("3-1", "a", "-2"):
        with pytest.raises(ValueError, match="bad seed list"):
            parse_seeds(bad)


def test_two_step_sampler_in_float64_with_noise_std_t_mid():
    net = Recorder()
    seeds = [4, 9]
    x = consistency_sampler(net, SeededNoise(seeds, (1, 2, 2), "cpu"), t_mids=(0.821,), steps=2)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    z = torch.stack([torch.randn((1, 2, 2), generator=g, dtype=torch.float64) for g in gens])
    e = torch.stack([torch.randn((1, 2, 2), generator=g, dtype=torch.float64) for g in gens])
    (x0, s0), (x1, s1) = net.calls
    torch.testing.assert_close(x0, 80 * z, rtol=0, atol=0)
    assert torch.all(s0 == 80) and torch.allclose(s1, torch.tensor(0.821, dtype=s1.dtype))
    d1 = (0.5 * 80 * z / 81).float().double()
    torch.testing.assert_close(x1, d1 + 0.821 * e, rtol=0, atol=0)
    assert x.dtype == torch.float64


def test_heun_sampler_uses_edm_schedule_and_35_evaluations():
    t = heun_sigmas(18)
    assert len(t) == 19 and t[0].item() == pytest.approx(80.0) and t[17].item() == pytest.approx(0.002) and t[18] == 0
    rho = 7
    want5 = (80 ** (1 / rho) + 5 / 17 * (0.002 ** (1 / rho) - 80 ** (1 / rho))) ** rho
    assert t[5].item() == pytest.approx(want5, rel=1e-14)
    net = Recorder()
    heun_sampler(net, SeededNoise([0], (1, 2, 2), "cpu"), num_steps=18)
    assert len(net.calls) == 35


def test_to_uint8_clamps_and_truncates():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.999, 1.0, 5.0], dtype=torch.float64).reshape(1, 1, 1, 6)
    assert to_uint8(x).flatten().tolist() == [0, 0, 128, 255, 255, 255]


def test_seed_subsets_are_reproducible_and_split_jobs_merge(tmp_path):
    ckpt = make_teacher(tmp_path / "t.pt", kind="ect")
    net = load_network(ckpt)
    whole = generate(net, list(range(6)), steps=2, batch=4, progress=False)
    part = generate(net, [3, 4], steps=2, progress=False)
    assert whole.dtype == np.uint8 and whole.shape == (6, 8, 8, 3)
    np.testing.assert_array_equal(whole[3:5], part)
    run_ect("sample", "--checkpoint", ckpt, "--out", tmp_path / "b.npz", "--seeds", "3-5", "--steps", "2",
            "--no-progress", "--device", "cpu")
    run_ect("sample", "--checkpoint", ckpt, "--out", tmp_path / "a.npz", "--seeds", "0-2", "--steps", "2",
            "--grid", tmp_path / "grid.png", "--no-progress", "--device", "cpu")
    run_ect("merge-samples", tmp_path / "m.npz", tmp_path / "b.npz", tmp_path / "a.npz")
    images, seeds, meta = load_samples(tmp_path / "m.npz")
    assert seeds.tolist() == list(range(6)) and meta["nfe"] == 2 and meta["t_mid"] == [0.821]
    np.testing.assert_array_equal(images, whole)
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="overlap"):
        merge_samples([tmp_path / "a.npz", tmp_path / "m.npz"])


def test_heun_cli_records_nfe(tmp_path):
    ckpt = make_teacher(tmp_path / "t.pt")
    run_ect("sample", "--checkpoint", ckpt, "--out", tmp_path / "h.npz", "--seeds", "0-1", "--sampler", "heun",
            "--no-progress", "--device", "cpu")
    images, seeds, meta = load_samples(tmp_path / "h.npz")
    assert meta["nfe"] == 35 and meta["sampler"] == "heun" and images.shape == (2, 8, 8, 3)


def test_sample_sets_from_the_config(tmp_path):
    import yaml
    ckpt = make_teacher(tmp_path / "t.pt", kind="ect")
    cfg = toy_config()
    cfg["sample"].update(sets=2, samples_per_set=3, t_mid=[1.5], heun_steps=2, batch=4)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    expected = {"ect-2step": ("consistency", 2, [1.5]), "teacher-heun": ("heun", 3, []), "ect-1step": ("consistency", 1, [])}
    for name, (sampler, nfe, t_mid) in expected.items():
        run_ect("sample", "--config", tmp_path / "c.yaml", "--set", name, "--checkpoint", ckpt,
                "--out", tmp_path / f"{name}.npz", "--no-progress", "--device", "cpu")
        images, seeds, meta = load_samples(tmp_path / f"{name}.npz")
        assert seeds.tolist() == list(range(6)) and images.shape == (6, 8, 8, 3)
        assert (meta["set"], meta["sampler"], meta["nfe"], meta["t_mid"]) == (name, sampler, nfe, t_mid)
    direct = generate(load_network(ckpt), list(range(6)), steps=2, t_mids=[1.5], progress=False)
    np.testing.assert_array_equal(load_samples(tmp_path / "ect-2step.npz")[0], direct)
    proc = run_ect("sample", "--config", tmp_path / "c.yaml", "--set", "ect-1step", "--steps", "2", "--checkpoint",
                   ckpt, "--out", tmp_path / "x.npz", check=False)
    assert proc.returncode == 2 and "--steps cannot be combined with --config" in proc.stderr
    proc = run_ect("sample", "--config", tmp_path / "c.yaml", "--checkpoint", ckpt, "--out", tmp_path / "x.npz",
                   check=False)
    assert proc.returncode == 2 and "--config needs --set" in proc.stderr
    assert not (tmp_path / "x.npz").exists()
