"""The browser app without a browser: the data-root fence, the access policy and its token check, folder pairing,
the command lines the page's buttons build (the front-end layer's requests), the live curve, the CLI's one-line
mistakes. Fast; the real-browser workflow is in test_app_browser.py."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import numpy as np
import pytest

from TensorPEFTLib.app import access
from TensorPEFTLib.app.curve import curve_svg
from TensorPEFTLib.app.data_root import DataRoot, PathRefused, scan_folder

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def fenced(tmp_path):
    """A data root with a sub-folder, a secret outside it, a link inside that leads out and one that stays in."""
    root = tmp_path / "root"
    (root / "scans" / "deeper").mkdir(parents=True)
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "passwd").write_text("no")
    os.symlink(outside, root / "escape")
    os.symlink(root / "scans", root / "inner-link")
    return DataRoot(str(root)), str(outside)


# --------------------------------------------------------------------------------------------- the fence


@pytest.mark.parametrize("path, why", [
    ("/etc", "absolute"), ("\\\\server\\share", "absolute"), ("C:\\Windows", "absolute"), ("~/x", "absolute"),
    ("..", "'..'"), ("scans/../../secret", "'..'"), ("scans\\..\\..", "'..'"),
    ("escape", "outside the data root"), ("escape/passwd", "outside the data root"),
    ("scans/\x00", "not a valid path"),
])
def test_paths_from_the_page_cannot_leave_the_data_root(fenced, path, why):
    root, _ = fenced
    with pytest.raises(PathRefused) as refused:
        root.resolve(path)
    assert why in str(refused.value) and "\n" not in str(refused.value)


def test_paths_inside_the_root_resolve_and_links_that_stay_inside_are_fine(fenced):
    root, outside = fenced
    assert root.resolve("") == root.root
    assert root.resolve("scans/deeper") == os.path.join(root.root, "scans", "deeper")
    assert root.resolve("./scans//deeper/") == os.path.join(root.root, "scans", "deeper")
    assert root.resolve("inner-link") == os.path.join(root.root, "scans")  # a link is followed to its real place
    listed = root.all_folders()
    assert "scans" in listed and "scans/deeper" in listed
    assert not any("escape" in folder or outside in folder for folder in listed)
    with pytest.raises(PathRefused):
        root.writable_folder("escape/new")
    assert not os.path.exists(os.path.join(outside, "new"))


def test_a_session_refuses_a_path_in_one_line_and_writes_nothing_outside(fenced, tmp_path):
    from TensorPEFTLib.app.session import AppSession

    root, outside = fenced
    state: dict = {}
    session = AppSession(root, state, viewer=None, python=sys.executable)
    session.probes.start_job = lambda *a, **k: pytest.fail("no worker should start")
    session.open_folder("../secret")
    assert state["error"] == "../secret: '..' is not accepted; choose a folder under the data root"
    session.state["adapter"] = "scans"
    session.save_adapter("escape/copied")
    assert "outside the data root" in state["error"] and "\n" not in state["error"]
    assert os.listdir(outside) == ["passwd"]


# --------------------------------------------------------------------------------------------- access


def test_loopback_needs_no_token_and_any_other_address_gets_one():
    assert access.access_token("127.0.0.1", None) is None
    assert access.access_token("localhost", None) is None
    assert access.access_token("::1", None) is None
    generated = access.access_token("0.0.0.0", None)
    assert generated and len(generated) >= 16 and generated != access.access_token("0.0.0.0", None)
    assert access.access_token("192.168.1.5", "a-long-enough-token-123") == "a-long-enough-token-123"
    assert access.access_token("127.0.0.1", None, require=True)  # --token alone on loopback
    with pytest.raises(access.AccessError, match="16 characters"):
        access.access_token("0.0.0.0", "short")


def test_the_token_middleware_refuses_requests_without_it():
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    token = "t" * 20

    async def scenario():
        app = web.Application(middlewares=[access.token_middleware(token)])
        async def page(request):
            return web.Response(text="page")

        app.router.add_get("/", page)
        async with TestClient(TestServer(app)) as client:
            assert (await client.get("/")).status == 403
            assert (await client.get("/?token=" + "t" * 19 + "x")).status == 403
            refused = await client.get("/", cookies={access.COOKIE: "wrong"})
            assert refused.status == 403 and "access token" in await refused.text()
            allowed = await client.get("/?token=" + token)
            assert allowed.status == 200 and await allowed.text() == "page"
            assert access.COOKIE in allowed.cookies
            # the browser sends the cookie from then on (the page's scripts, the websocket)
            again = await client.get("/", cookies={access.COOKIE: token})
            assert again.status == 200

    asyncio.run(scenario())


def test_cli_app_defaults_to_loopback_and_bad_options_are_one_line(tmp_path):
    from TensorPEFTLib.cli import build_parser

    args = build_parser().parse_args(["app"])
    assert (args.host, args.port, args.token, args.data_root) == ("127.0.0.1", 8080, None, ".")
    for argv, needle in ((["--data-root", str(tmp_path / "missing")], "--data-root"),
                         (["--data-root", str(tmp_path), "--token", "short"], "--token"),
                         (["--data-root", str(tmp_path), "--port", "70000"], "--port")):
        done = subprocess.run([sys.executable, "-m", "TensorPEFTLib.cli", "app", *argv], capture_output=True,
                              text=True, cwd=REPO, timeout=120)
        assert done.returncode == 2, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("tensorpeft: error:"), done.stderr


# --------------------------------------------------------------------------------------------- folders


def _write(path, array=None):
    from TensorPEFTLib.data import write_volume

    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_volume(str(path), np.zeros((4, 4, 4), np.float32) if array is None else array, like=np.eye(4))


def test_loose_files_pair_images_with_their_labels(tmp_path):
    for name in ("a.nii.gz", "a_label.nii.gz", "b.nrrd", "b.seg.nrrd", "c.nii", "d_mask.nii.gz", "d.nii.gz"):
        _write(tmp_path / name)
    found = scan_folder(str(tmp_path))
    pairs = {case["name"]: os.path.basename(case["label"] or "") for case in found.cases}
    assert found.layout == "loose"
    assert pairs == {"a": "a_label.nii.gz", "b": "b.seg.nrrd", "c": "", "d": "d_mask.nii.gz"}


def test_dicom_series_folders_are_scans_beside_files_or_alone(tmp_path):
    import sys as _sys

    _sys.path.insert(0, os.path.dirname(__file__))
    from synthetic import write_dicom_series

    volume = np.arange(6 * 5 * 4, dtype=np.float32).reshape(6, 5, 4)
    write_dicom_series(str(tmp_path / "exam" / "t1_mprage"), volume, np.diag([1.0, 1.0, 1.2, 1.0]))
    write_dicom_series(str(tmp_path / "exam" / "flair"), volume, np.diag([1.0, 1.0, 1.2, 1.0]))
    _write(tmp_path / "exam" / "t1_mprage_label.nii.gz")
    _write(tmp_path / "exam" / "other.nii.gz")
    (tmp_path / "exam" / "notes").mkdir()  # a folder without DICOM files is no scan
    (tmp_path / "exam" / "notes" / "readme.txt").write_text("not a scan")
    found = scan_folder(str(tmp_path / "exam"))
    pairs = {case["name"]: (os.path.basename(case["image"]), os.path.basename(case["label"] or ""))
             for case in found.cases}
    assert found.layout == "loose"
    assert pairs == {"flair": ("flair", ""), "other": ("other.nii.gz", ""),
                     "t1_mprage": ("t1_mprage", "t1_mprage_label.nii.gz")}
    alone = scan_folder(str(tmp_path / "exam" / "flair"))  # the series folder itself: one scan
    assert alone.layout == "dicom" and [c["name"] for c in alone.cases] == ["flair"]
    assert alone.cases[0]["image"] == str(tmp_path / "exam" / "flair") and alone.cases[0]["label"] is None


def test_decathlon_folders_pair_training_and_test_cases(tmp_path):
    import sys as _sys

    _sys.path.insert(0, os.path.dirname(__file__))
    from synthetic import write_segmentation_dataset

    write_segmentation_dataset(str(tmp_path / "task"), n_train=2, n_test=1)
    found = scan_folder(str(tmp_path / "task"))
    assert found.layout == "decathlon" and len(found.cases) == 3 and found.labelled == 3
    with pytest.raises(ValueError, match="no volumes here"):
        scan_folder(str(tmp_path))
    (tmp_path / "dataset.json").write_text('{"tasks": {"task": "task"}}')  # a cohort of tasks, as the demo's
    with pytest.raises(ValueError, match="point at one of"):
        scan_folder(str(tmp_path))


# --------------------------------------------------------------------------------------------- buttons → commands


class _Recorder:
    """Stands in for the worker: records what a button would run."""

    def __init__(self):
        self.argv = []

    def __call__(self, args, name, raw=False, **callbacks):
        self.argv.append(list(args))

        class Job:
            running = True

        return Job()


def test_finetune_and_resume_run_the_cli_commands_of_the_front_end_layer(tmp_path):
    from TensorPEFTLib.app.session import AppSession

    sys.path.insert(0, os.path.dirname(__file__))
    from synthetic import write_segmentation_dataset

    write_segmentation_dataset(str(tmp_path / "task"), n_train=2, n_test=0)
    state: dict = {}
    session = AppSession(DataRoot(str(tmp_path)), state, viewer=None, worker_threads=1)
    recorder = _Recorder()
    session.start_job = recorder
    session.open_folder("task")
    state.update(steps=6, eval_every=2, method="lora", rank=2)
    session.finetune()
    assert not state["error"], state["error"]
    args = recorder.argv[-1]
    assert args[:5] == ["finetune", "--model", "demo-unetr", "--data", os.path.join(str(tmp_path), "task")]
    for flag, value in (("--method", "lora"), ("--rank", "2"), ("--steps", "6"), ("--eval-every", "2"),
                        ("--threads", "1")):
        assert args[args.index(flag) + 1] == value
    out = args[args.index("--out") + 1]
    assert out.startswith(os.path.join(str(tmp_path), "tensorpeft-app", "runs")) and args[-2:] == ["--events", "-"]
    assert args[args.index("--skull-strip") + 1] == "auto"  # the page's default, as the CLI's
    assert [c["value"] for c in state["skull_strip_choices"]] == ["auto", "on", "off"]
    assert "--labels" not in args  # empty Structures field: every value in the labels, as the CLI
    session.job = None  # as if it had been cancelled
    session.finetune(resume=True)
    resumed = recorder.argv[-1]
    assert "--resume" in resumed and resumed[resumed.index("--out") + 1] == out
    # the Structures field is finetune --labels; a typo is one line in the page and nothing runs
    session.job = None
    state["labels"] = "left=17, right=53"
    session.finetune()
    assert not state["error"], state["error"]
    named = recorder.argv[-1]
    assert named[named.index("--labels") + 1: named.index("--labels") + 3] == ["left=17", "right=53"]
    session.job = None
    state["labels"] = "17 left="
    runs = len(recorder.argv)
    session.finetune()
    assert "--labels 'left='" in state["error"] and "\n" not in state["error"] and len(recorder.argv) == runs


def test_the_buttons_send_the_fields_with_the_click_and_the_server_acts_on_those(tmp_path, monkeypatch):
    """The page's client holds back field updates while a call is in flight but sends a click at once: a fine-tune
    clicked just after typing *Structures* ran without them (fresh-clone CI, 2026-12-04). The action buttons now send
    the form with the click, and the server takes only the form's fields from it."""
    pytest.importorskip("trame_slicer")
    from TensorPEFTLib.app import page, server
    from TensorPEFTLib.app.session import FORM_FIELDS

    sys.path.insert(0, os.path.dirname(__file__))
    from synthetic import write_segmentation_dataset

    write_segmentation_dataset(str(tmp_path / "task"), n_train=2, n_test=0)
    built = {}
    real_build_page = page.build_page
    monkeypatch.setattr(page, "build_page", lambda *a: built.setdefault("layout", real_build_page(*a)))
    app, session = server.build_app(str(tmp_path), server_name="form-test")
    form = "[{" + ", ".join(f"{key}: {key}" for key in FORM_FIELDS) + "}]"
    html = built["layout"].html
    for button in ("finetune", "resume", "segment", "synthesize", "save", "load"):
        start = html.index(f'id="tp-{button}"')
        assert form in html[start: html.index(">", start)], f"tp-{button} does not send the fields with its click"

    recorder = _Recorder()
    session.start_job = recorder
    session.open_folder("task")
    assert app.state["labels"] == "" and app.state["steps"] == 0  # the server's state lags behind the page
    app.controller.finetune({"labels": "hippocampus=1", "steps": 4, "eval_every": 2, "rank": 2,
                             "adapter": "../elsewhere", "folder": "/etc"})  # not form fields: ignored
    assert not app.state["error"], app.state["error"]
    args = recorder.argv[-1]
    for flag, value in (("--labels", "hippocampus=1"), ("--steps", "4"), ("--eval-every", "2"), ("--rank", "2")):
        assert args[args.index(flag) + 1] == value
    assert app.state["adapter"] == "" and app.state["folder"] == "task"
    session.job = None  # the recorder stands in for the worker: nothing to stop


def test_a_label_with_other_values_names_them(tmp_path):
    from TensorPEFTLib.app.session import _label_values, _label_values_text, _read_label

    def text(path) -> str:
        return _label_values_text(_label_values(_read_label(str(path))))

    assert text(tmp_path / "nowhere.nii.gz") == ""
    plain = np.zeros((4, 4, 4), np.uint8)
    plain[1, 1, 1] = 1
    _write(tmp_path / "plain.nii.gz", plain)
    assert text(tmp_path / "plain.nii.gz") == ""
    plain[2, 2, 2], plain[3, 3, 3] = 17, 53
    _write(tmp_path / "aseg.nii.gz", plain)
    assert text(tmp_path / "aseg.nii.gz") == ": label values 1, 17, 53"


def test_the_cpu_time_estimate_counts_the_structures_of_the_labels_on_show(tmp_path):
    """finetune takes 2500 steps by default for more than two structures: the page's CPU estimate says so once a
    case labelled with ten is shown, and counts the *Structures* field's entries when they choose fewer."""
    from TensorPEFTLib.app.session import AppSession

    aseg = np.zeros((4, 4, 4), np.uint8)
    aseg.flat[:10] = (10, 11, 12, 13, 17, 49, 50, 51, 52, 53)
    _write(tmp_path / "task" / "s1.nii.gz")
    _write(tmp_path / "task" / "s1_label.nii.gz", aseg)
    state: dict = {}
    session = AppSession(DataRoot(str(tmp_path)), state, viewer=None)
    session.start_job = _Recorder()
    session.refresh_estimates()  # the page asks at start-up (the device probe is the recorder's)
    session.probes.device_report = {"torch": "2.5.1", "gpus": [], "cpu_cores": 2}  # its answer: no GPU
    session.refresh_estimates()
    assert "1250 steps will take roughly" in state["cpu_warning"]  # no data yet: one structure
    session.open_folder("task")
    assert "2500 steps will take roughly" in state["cpu_warning"] and "label values 10, 11" in state["case_text"]
    state["labels"] = "left=17 right=53"
    session.refresh_estimates()
    assert "1250 steps will take roughly" in state["cpu_warning"]


def test_loose_labelled_files_train_through_a_datalist(tmp_path):
    import json

    from TensorPEFTLib.app.session import AppSession

    for name in ("s1.nii.gz", "s1_label.nii.gz", "s2.nii.gz"):
        _write(tmp_path / "loose" / name)
    state: dict = {}
    session = AppSession(DataRoot(str(tmp_path)), state, viewer=None)
    session.start_job = _Recorder()
    session.open_folder("loose")
    data = session._training_data()
    with open(data, encoding="utf-8") as handle:
        entries = json.load(handle)["training"]
    assert [os.path.basename(e["label"]) for e in entries] == ["s1_label.nii.gz"]  # the unlabelled one is left out


def test_curve_draws_loss_and_validation_points():
    svg = curve_svg([(1, 0.9), (2, 0.7), (3, 0.5)], [(2, 0.3), (3, 0.6)], steps=4)
    assert svg.startswith("<svg") and svg.count("<polyline") == 2 and svg.count("<circle") == 2
    assert "val Dice" in svg
    assert curve_svg([], [], 10) == ""


def test_ten_structures_get_ten_colours_none_green_and_the_status_line_names_them():
    """FreeSurfer's five subcortical pairs (10 values): each structure and each side its own colour, none the
    reference's green, and the names the status line gives follow the palette."""
    from TensorPEFTLib.app.viewer import PREDICTION_COLOR, PREDICTION_PALETTE, prediction_colour_names

    rgb = np.array([colour for _, colour in PREDICTION_PALETTE]) * 255
    assert len(PREDICTION_PALETTE) == 10 and PREDICTION_PALETTE[0][1] == PREDICTION_COLOR
    assert len({tuple(c) for c in rgb}) == 10 and len(set(prediction_colour_names(10))) == 10
    distances = np.linalg.norm(rgb[:, None] - rgb[None], axis=-1) + np.eye(10) * 1e9
    assert distances.min() > 60  # told apart on screen, not shades of one colour
    r, g, b = rgb.T
    assert not np.any((g > 90) & (g > 1.5 * r) & (g > 1.5 * b))  # test_app_browser's green: the reference alone
    assert prediction_colour_names(12)[10:] == ["red", "magenta"]


def test_a_structure_missing_from_the_mask_keeps_the_others_colours_and_is_named_not_found():
    """Seen in chromium with a ten-structure adapter that found no hippocampus: colours were dealt to the segments the
    mask had, so the right thalamus (49) was drawn blue while the status line called it violet. Each value keeps the
    colour of its place among the adapter's structures, and the line says which it did not find."""
    from TensorPEFTLib.app.session import structure_colours_text
    from TensorPEFTLib.app.viewer import PREDICTION_PALETTE, prediction_colours

    structures = [10, 11, 12, 13, 17, 49, 50, 51, 52, 53]
    present = [10, 11, 12, 13, 49, 50, 51, 52]
    colours = prediction_colours(present, structures)
    palette = dict(PREDICTION_PALETTE)
    assert set(colours) == set(present)
    assert colours[49] == palette["violet"] and colours[52] == palette["brown"] and colours[10] == palette["red"]
    assert prediction_colours([2, 1]) == {1: palette["red"], 2: palette["magenta"]}  # no list: value order
    assert prediction_colours([7, 3], [3]) == {3: palette["red"], 7: palette["magenta"]}  # unlisted values follow
    names = {str(v): f"label {v}" for v in structures}
    text = structure_colours_text(names, present)
    assert text.startswith("10 structures: label 10 red, label 11 magenta")
    assert "label 17 blue (not found)" in text and "label 49 violet," in text and "label 53 lavender (not found)" in text
    assert structure_colours_text({"1": "hippocampus"}, []) == "red"


def test_the_app_process_stays_torch_free(tmp_path):
    """The app only draws and starts workers: torch loads in the worker processes, never in the server."""
    code = ("import sys; from TensorPEFTLib.app.data_root import DataRoot; from TensorPEFTLib.app.session import "
            f"AppSession; s = AppSession(DataRoot({str(tmp_path)!r}), {{}}); "
            "print('torch' in sys.modules, len(s.state['models']))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.stdout.split() == ["False", "1"], done.stdout + done.stderr


def test_save_and_load_an_adapter_inside_the_root(tmp_path):
    import json

    from TensorPEFTLib.adapters.config import ADAPTER_FORMAT, CONFIG_FILE
    from TensorPEFTLib.app.session import AppSession

    run = tmp_path / "runs" / "one"
    run.mkdir(parents=True)
    (run / CONFIG_FILE).write_text(json.dumps({"format": ADAPTER_FORMAT, "method": "lora", "rank": 2,
                                               "family": "unetr"}))
    (run / "adapter.safetensors").write_bytes(b"not read here")
    state: dict = {}
    session = AppSession(DataRoot(str(tmp_path)), state, viewer=None)
    session.start_job = _Recorder()
    session.probes.start_job = _Recorder()
    state["skull_strip"] = "off"
    session.load_adapter("runs/one")
    assert not state["error"] and state["adapter"] == "runs/one" and state["model_kind"] == "UNETR"
    assert state["skull_strip"] == "auto"  # what the adapter was trained with (its record has no mode: auto)
    assert "runs/one" in session.adapter_folders()
    session.save_adapter("kept/copy")
    assert not state["error"], state["error"]
    assert sorted(os.listdir(tmp_path / "kept" / "copy")) == ["adapter.safetensors", CONFIG_FILE]
    session.load_adapter("kept")  # not an adapter folder: one line naming it
    assert "kept" in state["error"] and "not an adapter folder" in state["error"]


def test_without_the_app_extra_the_command_says_what_to_install(monkeypatch, tmp_path):
    import importlib.util

    from TensorPEFTLib.app import server

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "trame_slicer" else real(name, *a))
    line = server.missing_app_dependencies()
    assert "trame_slicer" in line and "pip install 'tensorpeft[app]'" in line
    with pytest.raises(server.AppError, match=r"tensorpeft\[app\]"):
        server.build_app(str(tmp_path))
