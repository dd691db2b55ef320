"""Bad input never exits 0 and never leaves half an output: one line on stderr, exit 2, nothing written.

Garbage settings (NaN, out of range, indivisible batches) are refused at start; a non-finite output is an
error; a full disk or a path under a regular file names the file; a second trainer on a state directory
is refused while the first runs, and a trainer whose parent dies saves its state and stops; outputs follow
the umask and a killed writer's temporaries are cleaned up.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from ect.checkpoint import save_checkpoint
from ect.data import DatasetError, save_dataset
from ect.fileio import write_bytes_atomic, write_json_atomic
from ect.networks import build_network
from ect.sample import save_samples
from ect.spec import load_spec
from ect.train import state_directory_lock
from ect.typed import ConfigError
from tests.helpers import (
    ect_command,
    make_dataset,
    make_teacher,
    run_ect,
    small_filesystem,
    toy_config,
    write_config,
)


def refused(proc, *expected):
    """Exit 2 with one line on stderr that says each of ``expected``."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def teacher(tmp_path):
    return make_teacher(tmp_path / "teacher.pt", kind="ect")


# ---- garbage settings are refused at start, and non-finite outputs are errors

@pytest.mark.parametrize("flags, expected", [
    (["--sampler", "heun", "--heun-steps", "1"], "heun_steps must be at least 2"),
    (["--sampler", "heun", "--heun-steps", "0"], "argument --heun-steps"),
    (["--steps", "2", "--t-mid", "nan"], "t_mid must lie in (0, 80)"),
    (["--steps", "2", "--t-mid", "80"], "t_mid must lie in (0, 80)"),
    (["--steps", "2", "--t-mid", "-1"], "t_mid must lie in (0, 80)"),
    (["--steps", "3", "--t-mid", "0.8"], "3 consistency steps need 2 intermediate times"),
    (["--batch", "0"], "argument --batch: must be at least 1"),
    (["--seeds", "0-99999999999"], "more than 10,000,000 seeds"),
    (["--seeds", "5-1"], "bad seed list"),
])
def test_sampler_settings_that_would_give_garbage_are_refused(teacher, tmp_path, flags, expected):
    proc = run_ect("sample", "--checkpoint", teacher, "--out", tmp_path / "s.npz", "--device", "cpu", *flags,
                   check=False, timeout=60)
    refused(proc, expected)
    assert not (tmp_path / "s.npz").exists()


def test_nan_weights_are_an_error_not_black_images(tmp_path):
    ckpt = torch.load(make_teacher(tmp_path / "t.pt"), weights_only=True)
    name = next(iter(ckpt["state_dict"]))
    ckpt["state_dict"][name] = torch.full_like(ckpt["state_dict"][name], float("nan"))
    save_checkpoint(tmp_path / "nan.pt", ckpt["arch"], ckpt["state_dict"], ckpt["meta"])
    proc = run_ect("sample", "--checkpoint", tmp_path / "nan.pt", "--out", tmp_path / "s.npz", check=False)
    refused(proc, "NaN or infinite", name)
    assert not (tmp_path / "s.npz").exists()


def test_a_network_that_outputs_nan_is_an_error(tmp_path):
    from ect.checkpoint import load_network
    from ect.sample import SamplingError, generate

    net = load_network(make_teacher(tmp_path / "t.pt"))
    with torch.no_grad():
        net.model.dec["8x8_aux_conv"].bias.fill_(float("inf"))  # finite weights can still overflow
        net.model.dec["8x8_aux_conv"].weight.fill_(float("inf"))
    with pytest.raises(SamplingError, match="non-finite"):
        generate(net, [0, 1], progress=False)


def test_json_results_never_hold_nan(tmp_path):
    with pytest.raises(ValueError, match="non-finite"):
        write_json_atomic(tmp_path / "r.json", {"fid": float("nan")})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change, expected", [
    (lambda c: c["sample"].update(heun_steps=1), "sample.heun_steps: 1 is less than the minimum of 2"),
    (lambda c: c["sample"].update(t_mid=[80]), "sample.t_mid.0: 80 is greater than or equal to the maximum of 80"),
    (lambda c: c["sample"].update(t_mid=[float("nan")]), "sample.t_mid.0: nan is not a finite number"),
    (lambda c: c["tune"].update(lr=float("inf")), "tune.lr: inf is not a finite number"),
    (lambda c: c["tune"].update(batch_gpu=5), "tune.batch_gpu: 5 does not divide the batch 32"),
    (lambda c: c["resources"].update(tune={"gpu": 3}), "tune.batch 32 does not split evenly over resources.tune.gpu"),
    (lambda c: c["resources"]["default"].pop("threads"), "resources.default: 'threads' is a required property"),
    (lambda c: c["fid"].update(curve_steps=[3]), "fid.curve_steps asks for 3 steps"),
])
def test_config_values_that_would_fail_midway_are_refused_at_start(tmp_path, change, expected):
    cfg = toy_config()
    change(cfg)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=re.escape(expected)):
        load_spec(path)
    proc = run_ect("tune", "--config", path, "--data", tmp_path / "d.npz", "--teacher", tmp_path / "t.pt",
                   "--state-dir", tmp_path / "s", "--out", tmp_path / "o.pt", check=False)
    refused(proc, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]


def test_yaml_aliases_are_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("a: &x [1, 2]\nb: *x\n")
    with pytest.raises(ConfigError, match="aliases"):
        load_spec(tmp_path / "c.yaml")


# ---- files that are not what they claim: one line naming the problem

def test_samples_files_are_checked(tmp_path, teacher):
    np.savez(tmp_path / "nometa.npz", images=np.zeros((4, 8, 8, 3), np.uint8), seeds=np.arange(4))
    save_samples(tmp_path / "short.npz", np.zeros((4, 8, 8, 3), np.uint8), np.arange(3), {"nfe": 1})
    save_samples(tmp_path / "dup.npz", np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 1, 1, 2]), {"nfe": 1})
    for name, expected in [("nometa", "has no ['meta']"), ("short", "4 images but seeds of shape (3,)"),
                           ("dup", "some seeds appear twice")]:
        proc = run_ect("merge-samples", tmp_path / "out.npz", tmp_path / f"{name}.npz", check=False)
        refused(proc, expected)
    assert not (tmp_path / "out.npz").exists()


def test_datasets_must_be_uint8_nonempty_with_labels_at_least_zero(tmp_path):
    images = np.zeros((3, 8, 8, 1), np.uint8)
    for bad_images, labels, expected in [(images, np.array([0, -1, 2]), "labels must be >= 0"),
                                         (images[:0], np.zeros(0, np.int64), "holds no images"),
                                         (images.astype(np.float32), np.zeros(3, np.int64), "uint8")]:
        with pytest.raises(DatasetError, match=expected):
            save_dataset(tmp_path / "d.npz", bad_images, labels)
    np.savez(tmp_path / "neg.npz", images=images, labels=np.array([0, -1, 2]), content_sha256=np.array("x"))
    proc = run_ect("fid-stats", "--data", tmp_path / "neg.npz", "--feature-net", tmp_path / "f.pt", "--kind",
                   "inception", "--modes", "clean", "--out", tmp_path / "r.npz", check=False)
    refused(proc, "labels must be >= 0")
    assert not (tmp_path / "d.npz").exists() and not (tmp_path / "r.npz").exists()


def test_fid_checks_the_samples_against_the_reference(tmp_path):
    from ect.fid import FeatureFiles, score_samples
    from ect.metrics import FIDError
    from ect.metrics.frechet import statistics

    config = load_spec(write_config(tmp_path / "c.yaml"))
    make_dataset(tmp_path / "d.npz", n=16, res=8)
    from ect.data import load_dataset
    from ect.fileio import sha256_file
    from ect.metrics.digits import train_feature_net
    from ect.metrics.frechet import save_stats

    imgs, labels = load_dataset(tmp_path / "d.npz")
    train_feature_net(imgs, labels, tmp_path / "f.pt", epochs=1)
    mu, sigma = statistics(np.random.default_rng(0).normal(size=(20, 64)))
    save_stats(tmp_path / "ref.npz", {"clean": (mu, sigma)},
               {"feature_net_sha256": sha256_file(tmp_path / "f.pt"), "resolution": 16})
    save_samples(tmp_path / "s.npz", np.zeros((6, 8, 8, 3), np.uint8), np.arange(6), {"nfe": 1})
    with pytest.raises(FIDError, match="8x8 images, but the reference statistics .* are of 16x16"):
        score_samples(config, tmp_path / "s.npz", tmp_path / "ref.npz", FeatureFiles(tmp_path / "f.pt"), "cpu")


def test_an_output_under_a_regular_file_is_named(tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = run_ect("prepare-data", "--source", "digits", "--resolution", "16", "--out", tmp_path / "afile" / "d.npz",
                   check=False)
    refused(proc, f"{tmp_path / 'afile'} is a file, not a directory")


def test_a_full_disk_names_the_file_and_leaves_nothing(tmp_path):
    with small_filesystem(tmp_path / "small", 64) as small:
        proc = run_ect("prepare-data", "--source", "digits", "--resolution", "16", "--out", small / "d.npz",
                       check=False)
        refused(proc, f"cannot write {small / 'd.npz'}: No space left on device")
        assert list(small.iterdir()) == []


def test_tune_saving_its_state_on_a_full_disk_says_so(tmp_path):
    data, teacher = tmp_path / "d.npz", make_teacher(tmp_path / "t.pt")
    make_dataset(data)
    config = write_config(tmp_path / "c.yaml", tune={"kimg": 0.16, "state_kimg": 0.04, "snapshot_kimg": 0.16})
    with small_filesystem(tmp_path / "small", 96) as small:
        proc = run_ect("tune", "--config", config, "--data", data, "--teacher", teacher, "--state-dir", small / "state",
                       "--out", tmp_path / "o.pt", "--no-progress", check=False)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert f"cannot write {small / 'state' / 'state.pt'}: No space left on device" in proc.stderr.splitlines()[-1]
        assert not (tmp_path / "o.pt").exists() and not list((small / "state").glob(".state.pt.tmp-*"))


# ---- processes: one trainer per state directory; a trainer dies with its parent

def _start_tune(tmp_path, name="a"):
    data, teacher = tmp_path / "d.npz", tmp_path / "t.pt"
    if not data.exists():
        make_dataset(data)
        make_teacher(teacher)
    config = write_config(tmp_path / "c.yaml", tune={"kimg": 40, "state_kimg": 0.04})
    return [*ect_command("tune", "--config", config, "--data", data, "--teacher", teacher, "--state-dir",
                         tmp_path / "state", "--out", tmp_path / f"{name}.pt", "--no-progress", "--threads", "1")]


def _wait_for(path, timeout=60):
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_second_trainer_on_the_same_state_directory_is_refused_naming_the_first(tmp_path):
    first = subprocess.Popen(_start_tune(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for(tmp_path / "state" / "state.pt")
        second = subprocess.run(_start_tune(tmp_path, "b"), capture_output=True, text=True, timeout=60)
        refused(second, f"is in use by pid {first.pid} on", "another trainer is still running")
        assert first.poll() is None and not (tmp_path / "b.pt").exists()
    finally:
        first.kill()
        first.wait()


def test_a_trainer_whose_parent_is_killed_saves_its_state_and_stops(tmp_path):
    """As under a snakemake killed with SIGKILL: the step's parent vanishes, the step must not run on."""
    log = tmp_path / "tune.log"
    parent = subprocess.Popen([sys.executable, "-c", (
        "import subprocess, sys, time\n"
        f"subprocess.Popen({_start_tune(tmp_path)!r}, stdout=subprocess.DEVNULL, stderr=open({str(log)!r}, 'w'))\n"
        "time.sleep(600)\n")])
    _wait_for(tmp_path / "state" / "state.pt")
    child = int(open(tmp_path / "state" / "lock").read().split()[1])
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 30
    while time.time() < deadline and os.path.exists(f"/proc/{child}") and \
            open(f"/proc/{child}/stat").read().split()[2] != "Z":
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z", \
        "the trainer outlived its parent"
    assert "received signal 15: state saved" in log.read_text()
    with state_directory_lock(tmp_path / "state"):  # free again: a rerun resumes from the saved state
        pass


# ---- outputs: permissions from the umask, no temporaries left behind by killed writers

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_outputs_follow_the_umask(tmp_path, umask, mode):
    script = ("import os, sys; os.umask(int(sys.argv[1])); from ect.fileio import write_bytes_atomic; "
              "write_bytes_atomic(sys.argv[2], b'x')")
    subprocess.run([sys.executable, "-c", script, str(umask), str(tmp_path / "out" / "f.bin")], check=True)
    assert (tmp_path / "out" / "f.bin").stat().st_mode & 0o777 == mode


def test_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".f.bin.tmp-{dead.pid}-abc123"
    stale.write_bytes(b"half")
    live = tmp_path / f".f.bin.tmp-{os.getpid()}-def456"  # a writer still running: left alone
    live.write_bytes(b"in progress")
    write_bytes_atomic(tmp_path / "f.bin", b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["f.bin", live.name])


# ---- found by probing the EDM2 / ImageNet entry points --------------------------------------------

def test_an_existing_output_that_is_not_a_regular_file_is_never_replaced(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # stands in for /dev/null: a rename over it would replace the node with a file
    with pytest.raises(OSError, match="not a regular file"):
        write_bytes_atomic(fifo, b"x")
    assert fifo.exists() and not fifo.is_file()
    proc = run_ect("prepare-data", "--source", "digits", "--resolution", 8, "--out", fifo, check=False)
    refused(proc, "not a regular file")


def test_seeds_beyond_int64_and_label_bombs_are_refused_before_sampling(tmp_path):
    import io
    import zipfile

    make_teacher(tmp_path / "t.pt")
    proc = run_ect("sample", "--checkpoint", tmp_path / "t.pt", "--seeds", "18446744073709551615",
                   "--out", tmp_path / "s.npz", check=False)
    refused(proc, "2^63")
    header = io.BytesIO()  # a 100-byte labels member declaring 2^40 entries (8 TiB once inflated)
    np.lib.format.write_array_header_1_0(header, {"descr": "<i8", "fortran_order": False, "shape": (2**40,)})
    with zipfile.ZipFile(tmp_path / "bomb.npz", "w") as zf:
        zf.writestr("labels.npy", header.getvalue())
    from ect.data import load_labels

    with pytest.raises(DatasetError, match="declares 8,796,093,022,208 bytes but holds 128"):
        load_labels(tmp_path / "bomb.npz")


def test_edm2_checkpoints_with_nan_weights_or_heads_that_do_not_divide_are_refused_at_conversion(tmp_path):
    from ect.networks import ArchError, check_arch
    from tests.helpers import edm2_snapshot_bytes, randomized

    kwargs = dict(img_resolution=16, img_channels=3, label_dim=10, model_channels=16, channel_mult=[1, 2],
                  num_blocks=1, attn_resolutions=[8], channels_per_head=16, dropout=0.0, use_fp16=True)
    net = randomized(build_network({"kind": "edm2", **kwargs, "logvar_channels": 16}), scale=1.0)
    with torch.no_grad():
        net.unet.out_gain.fill_(float("nan"))
    (tmp_path / "nan.pkl").write_bytes(edm2_snapshot_bytes(net, kwargs))
    refused(run_ect("convert-edm", tmp_path / "nan.pkl", tmp_path / "nan.pt", check=False), "NaN")
    assert not (tmp_path / "nan.pt").exists()
    with pytest.raises(ArchError, match="channels_per_head 5 must divide"):
        check_arch({"kind": "edm2", **{**kwargs, "channels_per_head": 5}})


# ---- bugs are not bad input; runs always resume; a step's outputs are all or nothing

def test_a_bug_prints_its_traceback_and_exits_1_while_bad_input_is_one_line(tmp_path, capsys):
    """A RuntimeError from anywhere (torch, NCCL) is a bug to report, not the user's file: it propagates (Python
    prints its traceback and exits 1), where our own errors are one line and exit 2; CUDA running out of memory is
    one line naming batch_gpu, exit 1."""
    import ect.cli as cli

    step = next(s for s in cli.STEPS if s.name == "merge-samples")
    argv = ["merge-samples", str(tmp_path / "o.npz"), str(tmp_path / "i.npz")]

    def raising(exc):
        def run(args):
            raise exc
        return run

    try:
        object.__setattr__(step, "run", raising(RuntimeError("a bug inside the library")))  # the table is frozen
        with pytest.raises(RuntimeError, match="a bug inside"):
            cli.main(argv)
        object.__setattr__(step, "run", raising(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried 2 GiB")))
        assert cli.main(argv) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "batch_gpu" in err[0]
    finally:
        object.__setattr__(step, "run", cli.run_merge_samples)
    assert cli.main(argv) == 2  # a missing input: bad input, one line
    assert capsys.readouterr().err.count("\n") == 1


def test_a_resumed_run_cuts_a_torn_log_line_and_refuses_a_broken_state(tmp_path):
    data, teacher = tmp_path / "d.npz", make_teacher(tmp_path / "t.pt")
    make_dataset(data)
    config = write_config(tmp_path / "c.yaml", tune={"kimg": 0.16, "state_kimg": 0.04})
    args = ["tune", "--config", config, "--data", data, "--teacher", teacher, "--state-dir", tmp_path / "st", "--out",
            tmp_path / "o.pt", "--no-progress"]
    run_ect(*args)
    log = tmp_path / "st" / "log.jsonl"
    log.write_text(log.read_text() + '{"iteration": 3, "lo')  # a writer killed mid-line
    state = torch.load(tmp_path / "st" / "state.pt", weights_only=True)
    state["iteration"] = 10  # an earlier state: the run resumes from it and rewrites the log
    torch.save(state, tmp_path / "st" / "state.pt")
    proc = run_ect(*args)
    assert "cut 1 line(s)" in proc.stderr and all(line.endswith("}") for line in log.read_text().splitlines())
    for change, why in ((lambda s: s.pop("optimizer"), "optimizer"), (lambda s: s.update(iteration=-1), "iteration"),
                        (lambda s: s.update(config_digest="0" * 16), "different configuration")):
        broken = dict(state)
        change(broken)
        torch.save(broken, tmp_path / "st" / "state.pt")
        proc = run_ect(*args, check=False)
        refused(proc, str(tmp_path / "st" / "state.pt"), why)
        assert f"delete {tmp_path / 'st'} to start over" in proc.stderr


def test_a_step_that_fails_removes_the_outputs_it_wrote(tmp_path, teacher):
    """`ect sample` writes the samples, then the grid: when the grid cannot be written, the samples go too."""
    (tmp_path / "file").write_text("a regular file")
    proc = run_ect("sample", "--checkpoint", teacher, "--seeds", "0-3", "--out", tmp_path / "s.npz", "--grid",
                   tmp_path / "file" / "grid.png", check=False)
    assert proc.returncode == 2 and not (tmp_path / "s.npz").exists()
    proc = run_ect("sample", "--checkpoint", teacher, "--seeds", "0-3", "--out", teacher, check=False)
    refused(proc, "is also an input of this step")
    assert teacher.stat().st_size > 0


def test_a_scaling_table_with_a_byte_order_mark_reads(tmp_path):
    from ect.scaling import read_points

    (tmp_path / "p.csv").write_bytes("\ufeffcompute,fid\n1,3\n2,2\n4,1\n".encode())
    assert [r["compute"] for r in read_points(tmp_path / "p.csv")] == [1.0, 2.0, 4.0]
