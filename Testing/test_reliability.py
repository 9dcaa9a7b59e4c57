"""The catalogue of bad inputs and faults: each gets one clear line, a non-zero exit and loses nothing.

Every row runs through the CLI on tiny volumes with 1-2 training steps and checks the exit code, that stderr is a
single line without "Traceback", and that the output place is as it was before (or holds only whole files).
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from TensorPEFTLib.cli import main
from TensorPEFTLib.data import read_volume, write_volume

import synthetic

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

FT = ["finetune", "--method", "lora", "--rank", "2", "--steps", "2", "--device", "cpu", "--threads", "1", "--quiet"]


def snapshot(path) -> dict:
    """Every file under ``path`` (or the file itself) with size and modification time; {} when absent."""
    path = str(path)
    if os.path.isfile(path):
        st = os.stat(path)
        return {".": (st.st_size, st.st_mtime_ns)}
    found = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            st = os.stat(full)
            found[os.path.relpath(full, path)] = (st.st_size if name in files else -1, st.st_mtime_ns)
    return found


def run(argv, capsys):
    """Run the CLI in-process; returns (exit code, stderr). argparse's exit is an exit code too."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as stop:
        code = stop.code
    err = capsys.readouterr().err
    return code, err


def assert_one_line(err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle.lower() in err.lower(), (needle, err)


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    """Tiny UNETR (recording a working spacing), a DDPM, a labelled dataset and a finished 2-step adapter."""
    root = tmp_path_factory.mktemp("rel")
    data = synthetic.write_segmentation_dataset(str(root / "data"), n_train=4, n_test=2, seed=0)
    model = synthetic.save_tiny_model(str(root / "unetr.safetensors"), spacing=(1.2, 1.2, 1.2))
    ddpm = synthetic.save_tiny_model(str(root / "ddpm.safetensors"), kind="ddpm")
    run_dir = root / "run"
    assert main([*FT, "--model", model, "--data", data, "--out", str(run_dir), "--no-val"]) == 0
    image = os.path.join(data, "imagesTs", "case_ts00.nii.gz")
    return {"root": root, "data": data, "model": model, "ddpm": ddpm, "run": str(run_dir), "image": image}


def copy_dataset(rig, dest) -> str:
    shutil.copytree(rig["data"], dest)
    return str(dest)


def first_image(folder) -> str:
    return os.path.join(folder, "imagesTr", sorted(os.listdir(os.path.join(folder, "imagesTr")))[0])


# --------------------------------------------------------------------------------------------------- segment


def test_segment_refuses_an_image_with_one_nan_voxel(rig, tmp_path, capsys):
    vol = read_volume(rig["image"])
    array = np.asarray(vol.array, dtype=np.float32).copy()
    array[3, 4, 5] = np.nan
    bad = write_volume(tmp_path / "nan.nii.gz", array, like=vol.affine)
    code, err = run(["segment", "--adapter", rig["run"], "--image", bad, "--out", tmp_path / "m.nii.gz", "--quiet"], capsys)
    assert code == 2
    assert_one_line(err, "nan.nii.gz", "NaN")
    assert not os.path.exists(tmp_path / "m.nii.gz")


def test_segment_refuses_a_constant_image(rig, tmp_path, capsys):
    vol = read_volume(rig["image"])
    flat = write_volume(tmp_path / "flat.nii.gz", np.full(vol.array.shape, 7.0, np.float32), like=vol.affine)
    code, err = run(["segment", "--adapter", rig["run"], "--image", flat, "--out", tmp_path / "m.nii.gz", "--quiet"], capsys)
    assert code == 2
    assert_one_line(err, "flat.nii.gz", "same value")
    assert not os.path.exists(tmp_path / "m.nii.gz")


def _truncated(src, dest) -> str:
    raw = gzip.open(src).read()
    with gzip.open(dest, "wb") as handle:
        handle.write(raw[: len(raw) // 2])
    return str(dest)


def test_segment_refuses_truncated_and_2d_images(rig, tmp_path, capsys):
    cut = _truncated(rig["image"], tmp_path / "cut.nii.gz")
    code, err = run(["segment", "--adapter", rig["run"], "--image", cut, "--out", tmp_path / "m.nii.gz", "--quiet"], capsys)
    assert code == 2
    assert_one_line(err, "cut.nii.gz")
    flat = write_volume(tmp_path / "slice.nii.gz", np.random.default_rng(0).random((40, 40, 1)).astype(np.float32),
                        like=np.eye(4))
    code, err = run(["segment", "--adapter", rig["run"], "--image", flat, "--out", tmp_path / "m.nii.gz", "--quiet"], capsys)
    assert code == 2
    assert_one_line(err, "slice.nii.gz", "2D")
    assert not os.path.exists(tmp_path / "m.nii.gz")


@pytest.mark.parametrize("overlap", ["1.5", "-0.5", "1"])
def test_segment_overlap_out_of_range_is_an_argument_error(rig, tmp_path, capsys, overlap):
    code, err = run(["segment", "--adapter", tmp_path / "not-loaded", "--image", rig["image"], "--out",
                     tmp_path / "m.nii.gz", f"--overlap={overlap}"], capsys)
    assert code == 2
    assert_one_line(err, "--overlap", "below 1")


def test_segment_folder_with_one_bad_file_segments_the_others(rig, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(rig["image"], folder / "a.nii.gz")
    _truncated(rig["image"], folder / "b.nii.gz")
    shutil.copy(rig["image"], folder / "c.nii.gz")
    code, err = run(["segment", "--adapter", rig["run"], "--image", folder, "--out", tmp_path / "masks", "--quiet"],
                    capsys)
    assert code == 2 and "Traceback" not in err
    assert "b.nii.gz" in err.splitlines()[-1] and "1 of 3" in err.splitlines()[-1]
    assert sorted(os.listdir(tmp_path / "masks")) == ["a.nii.gz", "c.nii.gz"]


@pytest.mark.parametrize("target", ["under-a-file", "bad-extension"])
def test_segment_output_is_checked_before_inference(rig, tmp_path, capsys, monkeypatch, target):
    from TensorPEFTLib.engine import jobs

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(jobs, "load_adapted_model", never)
    (tmp_path / "file").write_text("x")
    out = tmp_path / "file" / "m.nii.gz" if target == "under-a-file" else tmp_path / "mask.png"
    code, err = run(["segment", "--adapter", rig["run"], "--image", rig["image"], "--out", out], capsys)
    assert code == 2
    assert_one_line(err, "--out")
    assert not os.path.exists(tmp_path / "mask.png")


def test_disk_full_during_segment_leaves_no_partial_mask(rig, tmp_path, capsys, monkeypatch):
    from TensorPEFTLib.data import io

    def full(path, array, affine):
        with open(path, "wb") as handle:
            handle.write(b"\0" * 100)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(io, "_write_nifti", full)
    out = tmp_path / "masks"
    out.mkdir()
    code, err = run(["segment", "--adapter", rig["run"], "--image", rig["image"], "--out", out / "m.nii.gz",
                     "--quiet"], capsys)
    assert code == 2
    assert_one_line(err, "m.nii.gz", "No space left")
    assert os.listdir(out) == []


# -------------------------------------------------------------------------------------------------- finetune


@pytest.mark.parametrize("flag,value", [("--threads", "0"), ("--threads", "-1"), ("--batch-size", "0"),
                                        ("--batch-size", "-1"), ("--checkpoint-every", "0"), ("--eval-every", "0"),
                                        ("--steps", "0")])
def test_finetune_counts_below_one_are_argument_errors(rig, tmp_path, capsys, flag, value):
    code, err = run(["finetune", "--model", rig["model"], "--data", rig["data"], "--out", tmp_path / "o",
                     f"{flag}={value}"], capsys)
    assert code == 2
    assert_one_line(err, flag, ">= 1")
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("size,needle", [("0", ">= 1"), ("128", "32x32x32"), ("50", "32x32x32")])
def test_finetune_patch_size_is_checked_before_training(rig, tmp_path, capsys, size, needle):
    code, err = run([*FT, "--model", rig["model"], "--data", rig["data"], "--out", tmp_path / "o",
                     "--patch-size", size], capsys)
    assert code == 2
    assert_one_line(err, "--patch-size" if size != "0" else "size", needle)
    assert not os.path.exists(tmp_path / "o")


@pytest.mark.parametrize("where", ["/proc/tensorpeft-run", "a-file", "under-a-file"])
def test_finetune_unwritable_out_is_refused_first(rig, tmp_path, capsys, where):
    (tmp_path / "a-file").write_text("x")
    out = {"a-file": tmp_path / "a-file", "under-a-file": tmp_path / "a-file" / "run"}.get(where, where)
    before = snapshot(tmp_path)
    code, err = run([*FT, "--model", rig["model"], "--data", rig["data"], "--out", out], capsys)
    assert code == 2
    assert_one_line(err, "--out")
    assert snapshot(tmp_path) == before


def test_demo_data_to_an_unwritable_folder_is_refused(tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    for out in ("/proc/tensorpeft-demo", tmp_path / "a-file" / "cohort"):
        code, err = run(["demo-data", out, "--quiet"], capsys)
        assert code == 2
        assert_one_line(err, str(out))


def test_finetune_refuses_a_constant_image_before_making_the_run(rig, tmp_path, capsys):
    data = copy_dataset(rig, tmp_path / "data")
    path = first_image(data)
    vol = read_volume(path)
    write_volume(path, np.zeros(vol.array.shape, np.float32), like=vol.affine)
    code, err = run([*FT, "--model", rig["model"], "--data", data, "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert_one_line(err, os.path.basename(path), "same value")
    assert not os.path.exists(tmp_path / "o")


def test_finetune_refuses_an_image_smaller_than_the_patch(rig, tmp_path, capsys):
    data = tmp_path / "tiny"
    for sub in ("imagesTr", "labelsTr"):
        (data / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(2):
        image = rng.random((10, 10, 10)).astype(np.float32)
        label = np.zeros((10, 10, 10), np.uint8)
        label[3:6, 3:6, 3:6] = 1
        write_volume(data / "imagesTr" / f"c{i}.nii.gz", image, like=np.diag([1.2, 1.2, 1.2, 1.0]))
        write_volume(data / "labelsTr" / f"c{i}.nii.gz", label, like=np.diag([1.2, 1.2, 1.2, 1.0]))
    code, err = run([*FT, "--model", rig["model"], "--data", data, "--out", tmp_path / "o"], capsys)
    assert code == 2
    assert "smaller than the model's 32x32x32 patch" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "o")


def test_spacing_far_from_the_models_is_a_warning(rig, tmp_path, capsys):
    code, err = run([*FT, "--model", rig["model"], "--data", rig["data"], "--out", tmp_path / "o", "--spacing", "10",
                     "--steps", "1", "--no-val", "--patch-size", "32"], capsys)
    # 36x34x34 voxels of ~1.2 mm are 5 voxels at 10 mm: smaller than a patch, refused; the warning came first
    assert code == 2 and "warning: working voxel size 10x10x10 mm is 8.3x off the 1.2x1.2x1.2 mm" in err
    coarse = tmp_path / "coarse"
    for sub in ("imagesTr", "labelsTr"):
        (coarse / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(2):
        image, label = synthetic.blob_case(rng, shape=(40, 40, 40))
        affine = np.diag([1.2, 1.2, 6.0, 1.0])  # 6 mm slices: 5x the model's 1.2 mm
        write_volume(coarse / "imagesTr" / f"c{i}.nii.gz", image, like=affine)
        write_volume(coarse / "labelsTr" / f"c{i}.nii.gz", label, like=affine)
    code, err = run([*FT, "--model", rig["model"], "--data", coarse, "--out", tmp_path / "o2", "--steps", "1",
                     "--no-val"], capsys)
    assert code == 0, err
    assert "warning: voxel size more than 3x off the working grid" in err and "c0.nii.gz (1.2x1.2x6 mm)" in err


@pytest.mark.parametrize("spacing", ["nan", "inf", "0", "1x1", "1.5xmm", "-1"])
def test_a_spacing_that_is_not_a_voxel_size_is_refused_in_one_line(rig, tmp_path, capsys, spacing):
    """``nan`` and ``inf`` parse as floats and passed the "> 0" check (a nan working grid would fail far later)."""
    code, err = run([*FT, "--model", rig["model"], "--data", rig["data"], "--out", tmp_path / "o", "--spacing",
                     spacing, "--steps", "1", "--no-val"], capsys)
    assert code == 2
    assert_one_line(err, f"--spacing {spacing!r}", "give one voxel size in mm")
    assert not os.path.exists(tmp_path / "o")


def test_ddpm_with_labelled_data_says_the_labels_are_unused(rig, tmp_path, capsys):
    code, err = run([*FT, "--model", rig["ddpm"], "--data", rig["data"], "--out", tmp_path / "o", "--steps", "1",
                     "--no-val", "--patch-size", "16"], capsys)
    assert code == 0, err
    assert "labels are unused" in err


def test_a_live_lock_refuses_a_second_run_and_a_stale_one_is_taken_over(rig, tmp_path, capsys):
    from TensorPEFTLib.engine.outputs import LOCK_FILE

    out = tmp_path / "o"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        import socket

        (out / LOCK_FILE).write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                 "command": "finetune", "started": time.time()}))
        code, err = run([*FT, "--model", rig["model"], "--data", rig["data"], "--out", out, "--no-val"], capsys)
        assert code == 2
        assert_one_line(err, f"process {holder.pid}", "in use")
        assert sorted(os.listdir(out)) == [LOCK_FILE]
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over
    code, err = run([*FT, "--model", rig["model"], "--data", rig["data"], "--out", out, "--no-val"], capsys)
    assert code == 0, err
    assert not os.path.exists(out / LOCK_FILE) and os.path.isfile(out / "adapter_config.json")


def _cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return [sys.executable, "-m", "TensorPEFTLib.cli", *map(str, args)], env


def test_two_processes_with_the_same_out_one_wins_one_is_refused(rig, tmp_path):
    cmd, env = _cli(*FT[:-1], "--model", rig["model"], "--data", rig["data"], "--out", tmp_path / "o", "--no-val",
                    "--steps", "6", "--checkpoint-every", "1")
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "in use by another finetune" in refused or "already holds a fine-tuning run" in refused
    assert "Traceback" not in refused
    config = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert config["trained_steps"] == 6


def test_default_threads_do_not_depend_on_the_load_and_resume_reuses_the_runs(rig, tmp_path, monkeypatch, capsys):
    from TensorPEFTLib.engine import runtime

    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert runtime.select_runtime("cpu").threads == 2  # whatever else runs: no load is measured
    assert not hasattr(runtime, "free_cores")
    out = tmp_path / "o"
    argv = [*FT, "--model", rig["model"], "--data", rig["data"], "--out", out, "--no-val", "--steps", "4",
            "--checkpoint-every", "2"]
    assert main([str(a) for a in argv]) == 0  # FT says --threads 1
    assert json.loads((out / "adapter_config.json").read_text())["train_threads"] == 1
    # --resume without --threads takes the recorded count (not the machine's 2)
    state = out / "checkpoint"
    assert state.is_dir()
    shutil.rmtree(out / "last")
    os.remove(out / "adapter_config.json")
    seen = {}
    real = runtime.select_runtime

    def spy(device="auto", amp="auto", threads=None):
        seen["threads"] = threads
        return real(device, amp, threads)

    from TensorPEFTLib.engine import jobs

    monkeypatch.setattr(jobs, "select_runtime", spy)
    from TensorPEFTLib.engine.trainer import STATE_FILE
    import torch

    # rewind the checkpoint to step 2 so there is something left to resume
    payload = torch.load(state / STATE_FILE, weights_only=True)
    payload["step"] = 2
    torch.save(payload, state / STATE_FILE)
    assert main(["finetune", "--model", rig["model"], "--data", rig["data"], "--out", str(out), "--resume", "--quiet",
                 "--device", "cpu"]) == 0
    assert seen["threads"] == 1


def test_disk_full_while_checkpointing_keeps_the_last_good_checkpoint(rig, tmp_path, capsys, monkeypatch):
    """The write fails the way a full disk fails it (part of the bytes, then ENOSPC; checked for real on a 9 MB
    tmpfs, see the issue note): one line naming the folder, no checkpoint.new left, the step-2 checkpoint resumes."""
    from TensorPEFTLib.engine import trainer

    out = tmp_path / "o"
    calls = {"n": 0}
    real = trainer.write_bytes

    def fill_up(path, data):
        calls["n"] += 1
        if calls["n"] >= 2:  # the second checkpoint finds the disk full halfway
            with open(path, "wb") as handle:
                handle.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(trainer, "write_bytes", fill_up)
    code, err = run([*FT, "--model", rig["model"], "--data", rig["data"], "--out", out, "--no-val", "--steps", "4",
                     "--checkpoint-every", "2"], capsys)
    assert code == 2
    assert_one_line(err, str(out), "disk full", "--resume", "step 2 is intact")
    assert sorted(os.listdir(out)) == ["checkpoint"]
    monkeypatch.setattr(trainer, "write_bytes", real)
    code, err = run(["finetune", "--model", rig["model"], "--data", rig["data"], "--out", out, "--resume", "--quiet",
                     "--device", "cpu", "--threads", "1"], capsys)
    assert code == 0, err
    assert json.loads((out / "adapter_config.json").read_text())["trained_steps"] == 4


def test_sigterm_before_the_first_step_saves_nothing_and_says_so(rig, tmp_path):
    out = tmp_path / "o"
    cmd, env = _cli(*FT[:-1], "--model", rig["model"], "--data", rig["data"], "--out", out, "--no-val", "--steps", "50")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # the data check runs before any step: stop it there
        if "checking" in line:
            proc.send_signal(signal.SIGTERM)
            break
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 130
    assert "nothing was saved" in err and "Traceback" not in err
    assert not os.path.exists(out)


def test_sigterm_after_a_checkpoint_leaves_no_top_level_adapter(rig, tmp_path, capsys):
    out = tmp_path / "o"
    cmd, env = _cli(*FT[:-1], "--model", rig["model"], "--data", rig["data"], "--out", out, "--steps", "200",
                    "--checkpoint-every", "2", "--eval-every", "2", "--events", "-")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        event = json.loads(line)
        if event["event"] == "checkpoint" and event["step"] >= 2:
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    assert proc.wait(timeout=120) == 130
    assert not os.path.exists(out / "adapter_config.json") and not os.path.exists(out / "adapter.safetensors")
    assert os.path.isfile(out / "checkpoint" / "adapter_config.json") and os.path.isdir(out / "best")
    code, err = run(["segment", "--adapter", out, "--image", rig["image"], "--out", tmp_path / "m.nii.gz", "--quiet"], capsys)
    assert code == 2
    assert_one_line(err, "has not finished", "--resume", "best")


# ------------------------------------------------------------------------------------------------ synthesize


@pytest.mark.parametrize("size", ["5", "33"])
def test_synthesize_size_the_unet_cannot_take_is_refused_first(rig, tmp_path, capsys, size):
    code, err = run(["synthesize", "--model", rig["ddpm"], "--out", tmp_path / "s", "--size", size, "--count", "1",
                     "--steps", "1", "--device", "cpu", "--quiet"], capsys)
    assert code == 2
    assert_one_line(err, "--size", "multiple of 4")
    assert not os.path.exists(tmp_path / "s")


def test_synthesize_zero_steps_is_an_argument_error(rig, tmp_path, capsys):
    code, err = run(["synthesize", "--model", rig["ddpm"], "--out", tmp_path / "s", "--steps", "0"], capsys)
    assert code == 2
    assert_one_line(err, "--steps", ">= 1")
    assert not os.path.exists(tmp_path / "s")


# -------------------------------------------------------------------------------------------------- evaluate


def _mask(path, shape=(20, 20, 20), affine=None, seed=0):
    mask = np.zeros(shape, np.uint8)
    mask[5:12, 5:12, 5:12] = 1
    return write_volume(path, mask, like=np.eye(4) if affine is None else affine)


def test_evaluate_names_both_files_when_shapes_differ(tmp_path, capsys):
    p = _mask(tmp_path / "p" / "a.nii.gz", shape=(20, 20, 20))
    r = _mask(tmp_path / "r" / "a.nii.gz", shape=(24, 20, 20))
    code, err = run(["evaluate", "--pred", tmp_path / "p", "--ref", tmp_path / "r"], capsys)
    assert code == 2
    assert_one_line(err, p, r, "differ in shape", "grid")


def test_evaluate_explains_the_pairing_rule_and_scores_an_explicit_pair(tmp_path, capsys):
    _mask(tmp_path / "p" / "mine.nii.gz")
    _mask(tmp_path / "r" / "case_01.nii.gz")
    code, err = run(["evaluate", "--pred", tmp_path / "p", "--ref", tmp_path / "r"], capsys)
    assert code == 2
    assert_one_line(err, "paired by case name", "case_01", "two files")
    code = main(["evaluate", "--pred", str(tmp_path / "p" / "mine.nii.gz"), "--ref",
                 str(tmp_path / "r" / "case_01.nii.gz"), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["cases"][0]["case"] == "case_01" and result["cases"][0]["dice"] == pytest.approx(1.0)


def test_evaluate_says_which_references_have_no_prediction(tmp_path, capsys):
    _mask(tmp_path / "p" / "c0.nii.gz")
    for i in range(5):
        _mask(tmp_path / "r" / f"c{i}.nii.gz")
    code, err = run(["evaluate", "--pred", tmp_path / "p", "--ref", tmp_path / "r"], capsys)
    assert code == 0
    assert_one_line(err, "4 reference(s) have no prediction", "c1.nii.gz")
