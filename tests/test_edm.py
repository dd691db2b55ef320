import os
import pickle
import subprocess

import pytest
import torch

from ect.checkpoint import CheckpointError, load_network, load_state_by_name, read_checkpoint
from ect.cli import main as ect_main
from ect.edm import EDMFormatError, convert_edm_pickle, load_edm_pickle, read_edm_network
from ect.fileio import ChecksumError, sha256_file
from ect.networks import build_network
from ect.safepickle import PickleRefused as UnsafePickleError
from tests.helpers import edm_snapshot_bytes, malicious_pickle, randomized, small_unet_kwargs


def make_edm_file(tmp_path, class_name="EDMPrecond", **unet):
    kwargs = small_unet_kwargs(augment_dim=9, **unet)
    net = randomized(build_network(dict(kind="edm", img_resolution=8, img_channels=3, **kwargs)))
    path = tmp_path / "edm.pkl"
    path.write_bytes(edm_snapshot_bytes(net, kwargs, class_name=class_name))
    return path, net.eval()


def test_edm_pickle_converts_by_name_and_matches_the_source_network(tmp_path):
    path, net = make_edm_file(tmp_path)
    dst = tmp_path / "teacher.pt"
    convert_edm_pickle(path, dst, sha256=sha256_file(path), log=lambda *_: None)
    ckpt = torch.load(dst, weights_only=True)  # the contract: plain data only
    assert ckpt["arch"]["kind"] == "edm" and ckpt["arch"]["augment_dim"] == 9
    assert ckpt["meta"]["source_sha256"] == sha256_file(path)
    assert set(ckpt["state_dict"]) == set(net.state_dict())
    loaded = load_network(dst)
    assert not loaded.training
    x, s = torch.randn(2, 3, 8, 8), torch.tensor([0.2, 40.0])
    torch.testing.assert_close(loaded(x, s), net(x, s), rtol=0, atol=0)


def test_ect_snapshot_with_bound_method_loss_reads(tmp_path):
    path, net = make_edm_file(tmp_path, class_name="ECMPrecond")
    arch, state, info = read_edm_network(path.read_bytes())
    assert arch["kind"] == "ect" and arch["sigma_min"] == pytest.approx(0.003)
    assert info["precond_class"] == "ECMPrecond"
    torch.testing.assert_close(state, net.state_dict())


def test_student_loads_teacher_weights_skipping_map_augment(tmp_path):
    path, _ = make_edm_file(tmp_path)
    _, state, _ = read_edm_network(path.read_bytes())
    student = build_network(dict(kind="ect", img_resolution=8, img_channels=3, **small_unet_kwargs(dropout=0.2)))
    skipped = load_state_by_name(student, state)
    assert skipped == ["model.map_augment.weight"]
    with pytest.raises(CheckpointError, match="missing"):
        load_state_by_name(student, {k: v for k, v in state.items() if "aux_conv" not in k})
    assert load_state_by_name(student, {k: v for k, v in state.items() if "aux_conv" not in k}, allow_missing=True)


@pytest.mark.parametrize("payload", [
    (os.system, "touch {marker}"),
    (exec, "open({marker!r}, 'w').write('x')"),
    (eval, "open({marker!r}, 'w').write('x')"),
    (subprocess.Popen, ["touch", "{marker}"]),
])
def test_malicious_pickles_are_refused_and_nothing_runs(tmp_path, payload):
    marker = str(tmp_path / "pwned")
    func, arg = payload
    arg = [a.format(marker=marker) for a in arg] if isinstance(arg, list) else arg.format(marker=marker)
    blob = malicious_pickle(func, arg)
    qualname = {os.system: "system", exec: "builtins.exec", eval: "builtins.eval", subprocess.Popen: "subprocess.Popen"}[func]
    with pytest.raises(UnsafePickleError, match=qualname.replace(".", r"\.")):
        load_edm_pickle(blob)
    src = tmp_path / "evil.pkl"
    src.write_bytes(blob)
    assert ect_main(["convert-edm", str(src), str(tmp_path / "out.pt")]) != 0
    assert not os.path.exists(marker) and not (tmp_path / "out.pt").exists()


def test_truncated_and_corrupt_files_give_clear_errors(tmp_path):
    path, _ = make_edm_file(tmp_path)
    data = path.read_bytes()
    for bad in (data[: len(data) // 2], data[:100], b"not a pickle at all", data[:-1]):
        with pytest.raises((EDMFormatError, UnsafePickleError), match="truncated|corrupt|EDM|opcode"):
            load_edm_pickle(bad)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    (tmp_path / "flip.pkl").write_bytes(bytes(flipped))
    with pytest.raises(ChecksumError, match="sha256 mismatch"):
        convert_edm_pickle(tmp_path / "flip.pkl", tmp_path / "x.pt", sha256=sha256_file(path))
    assert not (tmp_path / "x.pt").exists()


def test_wrong_structures_are_named(tmp_path):
    with pytest.raises(EDMFormatError, match="no persistent 'ema'"):
        read_edm_network(pickle.dumps({"ema": 3}))
    with pytest.raises(EDMFormatError, match="top level"):
        load_edm_pickle(pickle.dumps([1, 2]))
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(bad)


def test_convert_edm_cli_checks_sha256(tmp_path, capsys):
    path, _ = make_edm_file(tmp_path)
    assert ect_main(["convert-edm", str(path), str(tmp_path / "a.pt"), "--sha256", "0" * 64]) != 0
    assert "sha256 mismatch" in capsys.readouterr().err
    assert not (tmp_path / "a.pt").exists()
    assert ect_main(["convert-edm", str(path), str(tmp_path / "a.pt"), "--sha256", sha256_file(path)]) == 0
    assert (tmp_path / "a.pt").exists()
