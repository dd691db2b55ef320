import json
import warnings

import numpy as np
import pytest
import torch

from ect.fileio import ChecksumError, sha256_file
from ect.metrics import FIDError
from ect.metrics.features import FeatureExtractor, compute_features, load_feature_net
from ect.metrics.frechet import fid_of_sets, frechet_distance, load_stats, save_stats, statistics
from tests.helpers import run_ect, write_config


def random_stats(rng, d, n=400):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    return x.mean(0), np.cov(x, rowvar=False)


def test_frechet_distance_matches_clean_fid_and_the_closed_form():
    from cleanfid.fid import frechet_distance as cleanfid_fd
    rng = np.random.default_rng(0)
    for d in (2, 8, 64):  # clean-fid fails on 1x1 (scipy returns no error estimate there)
        (m1, s1), (m2, s2) = random_stats(rng, d), random_stats(rng, d)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy's sqrtm(disp=) deprecation inside clean-fid
            ref = cleanfid_fd(m1, s1, m2, s2)
        assert frechet_distance(m1, s1, m2, s2) == pytest.approx(ref, rel=1e-7, abs=1e-8)
    # diagonal covariances: |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2 exactly
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    m1, m2 = rng.normal(size=16), rng.normal(size=16)
    expected = ((m1 - m2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_of_identical_statistics_is_zero_not_negative():
    m, s = random_stats(np.random.default_rng(1), 32)
    assert frechet_distance(m, s, m, s) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(m, s, m, s) >= 0.0
    with pytest.raises(FIDError, match="different dimensions"):
        frechet_distance(m, s, m[:3], s[:3, :3])


def test_fid_of_sets_splits_in_seed_order():
    rng = np.random.default_rng(2)
    feats = rng.normal(size=(30, 4))
    mu, sigma = statistics(rng.normal(size=(100, 4)))
    fids = fid_of_sets(feats, mu, sigma, 3)
    assert fids == [frechet_distance(*statistics(feats[i * 10:(i + 1) * 10]), mu, sigma) for i in range(3)]
    with pytest.raises(FIDError, match="cannot split"):
        fid_of_sets(feats[:5], mu, sigma, 3)


def test_stats_round_trip(tmp_path):
    mu, sigma = statistics(np.random.default_rng(3).normal(size=(10, 3)))
    save_stats(tmp_path / "s.npz", {"clean": (mu, sigma), "legacy_tensorflow": (mu + 1, sigma)}, {"images": 10})
    stats, meta = load_stats(tmp_path / "s.npz")
    assert np.array_equal(stats["clean"][0], mu) and np.array_equal(stats["legacy_tensorflow"][0], mu + 1)
    assert np.array_equal(stats["clean"][1], sigma) and meta == {"images": 10, "modes": ["clean", "legacy_tensorflow"]}
    with pytest.raises(FIDError, match="cannot read"):
        load_stats(tmp_path / "missing.npz")


@pytest.fixture(scope="module")
def feature_setup(tmp_path_factory):
    """A dataset of real digits, the feature net trained on it (1 epoch) and its reference statistics."""
    tmp = tmp_path_factory.mktemp("fid")
    config = write_config(tmp / "c.yaml")
    cfg = __import__("yaml").safe_load(config.read_text())
    cfg["fid"]["feature_net"]["epochs"] = 2
    config.write_text(__import__("yaml").safe_dump(cfg))
    run_ect("prepare-data", "--source", "digits", "--resolution", 16, "--out", tmp / "data.npz")
    run_ect("feature-net", "--config", config, "--data", tmp / "data.npz", "--out", tmp / "f.pt")
    run_ect("fid-stats", "--data", tmp / "data.npz", "--feature-net", tmp / "f.pt", "--kind", "digits-classifier",
            "--modes", "clean", "--out", tmp / "ref.npz", "--no-progress")
    return tmp, config


def test_feature_net_is_torchscript_with_the_inception_interface_and_deterministic(feature_setup, tmp_path):
    tmp, config = feature_setup
    net, meta, digest = load_feature_net(tmp / "f.pt", sha256_file(tmp / "f.pt"))
    assert meta["resolution"] == 16 and meta["channels"] == 1 and meta["seed"] == 0 and meta["epochs"] == 2
    assert meta["holdout_accuracy"] > 0.5  # 10 classes: chance is 0.1
    out = net(torch.rand(5, 1, 16, 16) * 255)
    assert out.shape == (5, 64) and out.dtype == torch.float32
    run_ect("feature-net", "--config", config, "--data", tmp / "data.npz", "--out", tmp_path / "again.pt")
    again, _, _ = load_feature_net(tmp_path / "again.pt")
    x = torch.rand(7, 1, 16, 16) * 255
    assert torch.equal(net(x), again(x))
    with pytest.raises(ChecksumError):
        load_feature_net(tmp / "f.pt", "0" * 64)


def test_fid_of_the_dataset_itself_is_near_zero_and_of_noise_is_large(feature_setup, tmp_path):
    from ect.data import load_dataset
    from ect.sample import save_samples
    tmp, config = feature_setup
    images, _ = load_dataset(tmp / "data.npz")
    noise = np.random.default_rng(0).integers(0, 256, size=images.shape, dtype=np.uint8)
    for name, imgs in (("real", images[:1500]), ("noise", noise[:1500])):
        save_samples(tmp_path / f"{name}.npz", imgs, np.arange(1500), {"sampler": "test", "steps": 1, "nfe": 1})
        run_ect("fid", "--config", config, "--samples", tmp_path / f"{name}.npz", "--ref", tmp / "ref.npz",
                "--feature-net", tmp / "f.pt", "--out", tmp_path / f"{name}.json", "--no-progress")
    real, noise_r = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("real", "noise"))
    assert len(real["fid_sets"]) == 3 and real["samples_per_set"] == 500 and real["seeds"] == [0, 1499]
    assert real["mode"] == "clean" and real["modes"]["clean"]["fid_sets"] == real["fid_sets"]
    assert real["fid_min"] < 0.05 * noise_r["fid_min"]
    # the same computation by hand
    stats, _ = load_stats(tmp / "ref.npz")
    feats = compute_features(images[:500], FeatureExtractor(tmp / "f.pt", "digits-classifier", "clean"))
    assert real["fid_sets"][0] == pytest.approx(frechet_distance(*statistics(feats), *stats["clean"]), rel=1e-9)


def test_fid_refuses_statistics_from_another_feature_network(feature_setup, tmp_path):
    tmp, config = feature_setup
    stats, meta = load_stats(tmp / "ref.npz")
    save_stats(tmp_path / "other.npz", stats, {**meta, "feature_net_sha256": "0" * 64})
    from ect.sample import save_samples
    save_samples(tmp_path / "s.npz", np.zeros((6, 16, 16, 3), np.uint8), np.arange(6), {"nfe": 1})
    proc = run_ect("fid", "--config", config, "--samples", tmp_path / "s.npz", "--ref", tmp_path / "other.npz",
                   "--feature-net", tmp / "f.pt", "--out", tmp_path / "x.json", check=False)
    assert proc.returncode == 2 and "another feature network" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_reference_statistics_in_shards_merge_to_the_whole_and_refuse_a_bad_set(feature_setup, tmp_path):
    """Moments of 3 shards added up give the statistics of the whole dataset (as np.cov computes them)."""
    tmp, _ = feature_setup
    args = ("--data", tmp / "data.npz", "--feature-net", tmp / "f.pt", "--kind", "digits-classifier",
            "--modes", "clean", "--batch", "100", "--no-progress")
    for i in range(3):
        run_ect("fid-stats", *args, "--shard", f"{i}/3", "--out", tmp_path / f"s{i}.npz")
    run_ect("fid-stats-merge", tmp_path / "s2.npz", tmp_path / "s0.npz", tmp_path / "s1.npz", "--out", tmp_path / "m.npz")
    merged, merged_meta = load_stats(tmp_path / "m.npz")
    whole, whole_meta = load_stats(tmp / "ref.npz")
    np.testing.assert_allclose(merged["clean"][0], whole["clean"][0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(merged["clean"][1], whole["clean"][1], rtol=1e-8, atol=1e-10)
    assert merged_meta["images"] == whole_meta["images"] == 1797 and merged_meta["shards"] == 3
    for shards, why in (((0, 1), "every shard 0..2"), ((0, 1, 1, 2), "every shard 0..2")):
        proc = run_ect("fid-stats-merge", *(tmp_path / f"s{i}.npz" for i in shards), "--out", tmp_path / "x.npz",
                       check=False)
        assert proc.returncode == 2 and why in proc.stderr and not (tmp_path / "x.npz").exists()
    proc = run_ect("fid-stats-merge", tmp / "ref.npz", tmp_path / "s0.npz", "--out", tmp_path / "x.npz", check=False)
    assert proc.returncode == 2 and "cannot read reference shard" in proc.stderr
    # Hostile shards: every field is checked before anything is added up.
    with np.load(tmp_path / "s1.npz") as f:
        arrays, meta = {k: f[k] for k in f.files if k != "meta"}, json.loads(str(f["meta"]))
    for name, change in (("bool", {"meta": {"shard": [True, 3]}}), ("huge", {"meta": {"shard": [1, 10**8]}}),
                         ("negative", {"n_clean": np.array(-5)}), ("shape", {"sum_clean": np.zeros(3)}),
                         ("nan", {"outer_clean": np.full_like(arrays["outer_clean"], np.nan)})):
        bad = {**arrays, **{k: v for k, v in change.items() if k != "meta"}}
        np.savez(tmp_path / f"bad-{name}.npz", **bad, meta=np.array(json.dumps({**meta, **change.get("meta", {})})))
        proc = run_ect("fid-stats-merge", tmp_path / "s0.npz", tmp_path / f"bad-{name}.npz", tmp_path / "s2.npz",
                       "--out", tmp_path / "x.npz", check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (name, proc.stderr)
        assert not (tmp_path / "x.npz").exists()
    proc = run_ect("fid-stats", *args, "--shard", "3/3", "--out", tmp_path / "x.npz", check=False)
    assert proc.returncode == 2 and "0 <= I < N" in proc.stderr


def test_published_statistics_are_read_from_edm_npz_and_edm2_pickles_and_compared(tmp_path):
    """EDM publishes .npz (mu, sigma), EDM2 a pickle of {metric: {mu, sigma}} (read by the strict reader in a
    limited child: numpy's array reconstruction is its only global). The check is their Frechet distance to ours."""
    import pickle

    from ect.fid import compare_reference
    from ect.metrics.frechet import save_stats
    from ect.untrusted import Refused

    rng = np.random.default_rng(0)
    mu, a = rng.normal(size=8), rng.normal(size=(8, 8))
    sigma = a @ a.T
    save_stats(tmp_path / "ours.npz", {"legacy_tensorflow": (mu, sigma)}, {"images": 10})
    np.savez(tmp_path / "edm.npz", mu=mu, sigma=sigma)
    (tmp_path / "edm2.pkl").write_bytes(pickle.dumps({"fid": {"mu": mu, "sigma": sigma},
                                                      "fd_dinov2": {"mu": mu[:4], "sigma": sigma[:4, :4]}}, protocol=4))
    for theirs in ("edm.npz", "edm2.pkl"):
        check = compare_reference(tmp_path / "ours.npz", tmp_path / theirs, "legacy_tensorflow")
        assert check["pass"] and check["frechet_distance"] < 1e-9
    (tmp_path / "shifted.pkl").write_bytes(pickle.dumps({"fid": {"mu": mu + 1, "sigma": sigma}}, protocol=4))
    check = compare_reference(tmp_path / "ours.npz", tmp_path / "shifted.pkl", "legacy_tensorflow")
    assert not check["pass"] and abs(check["frechet_distance"] - 8.0) < 1e-6  # |mu shift|^2 = 8
    # with FD_DINOv2 statistics on both sides (EDM2's img64.pkl has them), both are compared and both must match
    save_stats(tmp_path / "both.npz", {"legacy_tensorflow": (mu, sigma), "fd_dinov2": (mu[:4], sigma[:4, :4])},
               {"images": 10})
    check = compare_reference(tmp_path / "both.npz", tmp_path / "edm2.pkl", "legacy_tensorflow")
    assert check["pass"] and set(check["distances"]) == {"legacy_tensorflow", "fd_dinov2"}
    (tmp_path / "dino-off.pkl").write_bytes(pickle.dumps({"fid": {"mu": mu, "sigma": sigma},
                                                          "fd_dinov2": {"mu": mu[:4] + 1, "sigma": sigma[:4, :4]}}))
    check = compare_reference(tmp_path / "both.npz", tmp_path / "dino-off.pkl", "legacy_tensorflow")
    assert not check["pass"] and check["frechet_distance"] < 1e-9 and abs(check["distances"]["fd_dinov2"] - 4) < 1e-6
    (tmp_path / "evil.pkl").write_bytes(b"\x80\x02cposix\nsystem\n\x8c\x02id\x85R.")
    with pytest.raises(Refused, match="refusing to load global 'posix.system'"):
        compare_reference(tmp_path / "ours.npz", tmp_path / "evil.pkl", "legacy_tensorflow")
