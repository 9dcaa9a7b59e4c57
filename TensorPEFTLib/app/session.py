"""What the browser app does when the user clicks: the workflow, in terms of the front-end layer.

Requests (:mod:`TensorPEFTLib.frontend.requests`) build the same ``tensorpeft`` command lines the Slicer module and a
terminal user run; :class:`~TensorPEFTLib.frontend.jobs.WorkerJob` runs them in a separate process (the page stays
responsive; Cancel stops it after its step with a checkpoint); :class:`~TensorPEFTLib.frontend.probes.BackgroundProbes`
counts parameters and finds the device. Every path the page sends goes through :class:`.data_root.DataRoot`.

The page's state is a mapping (trame's ``state``, or a dict in tests); every user action is a method that leaves
one line in ``state["error"]`` when it cannot proceed, never a traceback (that goes to the log).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback
from functools import wraps
from typing import Any, Callable, Dict, List, Mapping, MutableMapping, Optional, Sequence

from ..frontend import adapter_folders, requests
from ..frontend.environment import worker_environment
from ..frontend.jobs import JobResult, WorkerJob
from ..frontend.probes import BackgroundProbes
from ..frontend.progress import Progress, format_duration
from .curve import curve_svg
from .data_root import DataRoot, FolderCases, PathRefused, scan_folder

#: folder under --data-root where the app writes runs, exports and generated volumes
APP_FOLDER = "tensorpeft-app"
MODEL_SUFFIXES = (".safetensors", ".pt", ".pth", ".ckpt")
LOG_LINES = 400  # the log the page shows (the whole log stays in the job)


def _library_parent() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def one_line_errors(action: Callable) -> Callable:
    """A page action: what goes wrong becomes one line in the page (and the details go to the log)."""

    @wraps(action)
    def run(self: "AppSession", *args: Any, **kwargs: Any) -> Any:
        self.state["error"] = ""
        try:
            return action(self, *args, **kwargs)
        except (requests.RequestError, PathRefused, ValueError, OSError) as err:
            self.fail(str(err).splitlines()[0] if str(err) else type(err).__name__)
        except Exception as err:  # noqa: BLE001 - the page gets one line; the traceback goes to the log
            self.log(traceback.format_exc())
            self.fail(f"internal error in {action.__name__}: {type(err).__name__}: {err} (details in the log)")
        return None

    return run


# the page's input fields that a button's action reads (sent with the click: see AppSession.take_form)
FORM_FIELDS = ("skull_strip", "model_kind", "model", "method", "rank", "steps", "eval_every", "labels", "synth_count",
               "synth_steps", "save_to", "adapter_to_load")


def structure_colours_text(structures: Mapping[Any, str], present: Sequence[int]) -> str:
    """The status line's colours: "red" for one structure; for several, each name with its colour and, where the mask
    has none of it, "not found" (``structures``: ``segment``'s done event, value -> name; ``present``: the values in
    the mask)."""
    from .viewer import prediction_colour_names

    if len(structures) < 2:
        return "red"
    found = {int(v) for v in present}
    named = [f"{name} {colour}" + ("" if int(value) in found else " (not found)")
             for (value, name), colour in zip(structures.items(), prediction_colour_names(len(structures)))]
    return f"{len(structures)} structures: " + ", ".join(named)


class AppSession:
    def __init__(self, root: DataRoot, state: MutableMapping[str, Any], viewer: Any = None, *,
                 python: str = sys.executable, worker_threads: int = 0) -> None:
        self.root, self.state, self.viewer = root, state, viewer
        self.python, self.worker_threads = python, worker_threads
        self.job: Optional[WorkerJob] = None
        self.cases: Optional[FolderCases] = None
        self.losses: List[tuple] = []
        self.scores: List[tuple] = []
        self.log_lines: List[str] = []
        self.last_run: Optional[str] = None  # the adapter folder of the latest fine-tune (Resume continues it)
        self.case_structures = 0  # the label values of the case on show (0: no label)
        self.probes = BackgroundProbes(self.start_job, self._show_device, self._show_count)
        self.state.update(self.defaults())

    # ------------------------------------------------------------------------------------------------ state
    def defaults(self) -> Dict[str, Any]:
        return {
            "folders": self.root.all_folders(), "folder": None, "cases": [], "case_index": None, "case_text": "",
            "model_kind": "UNETR", "model": "demo-unetr", "models": self.model_choices("UNETR"),
            "methods": [{"title": f"{name}", "value": name, "subtitle": summary}
                        for name, summary in requests.method_summaries().items()],
            # steps / eval_every 0: finetune's own defaults for the cohort (1250 steps for a few cases, validation every
            # fifth), as the CLI and the Slicer panel use them
            "method": "lora-pt", "rank": 1, "steps": 0, "eval_every": 0, "device": "auto", "skull_strip": "auto",
            "labels": "",  # finetune --labels: the structures to learn ("": every value in the labels)
            "skull_strip_choices": [{"title": f"{mode}: {text}", "value": mode}
                                    for mode, text in requests.SKULL_STRIP_HELP.items()],
            "device_text": "checking the device ...", "cpu_warning": "", "param_count": "",
            "job_name": "", "job_busy": False, "progress": 0, "progress_text": "idle", "eta": "", "curve": "",
            "adapter": "", "can_resume": False, "synth_count": 1, "synth_steps": 50, "synthesized": [],
            "synth_index": None, "segment_with": "", "save_to": "", "adapter_to_load": "",
            "error": "", "info": "", "log": "", "show_log": False, "segmented": "",
        }

    def take_form(self, form: Any) -> None:
        """Take the fields' values as the page had them when a button was clicked. The page's client holds back
        state updates while any call is in flight (the views' image requests make that often) but sends a click at
        once, so a value typed just before the click could reach the server after it: a fine-tune started with the
        *Structures* typed a moment before ran without them. The buttons send the fields with the click instead.
        Only the form's own fields are taken; anything else in ``form`` is ignored."""
        if isinstance(form, dict):
            self.state.update({key: form[key] for key in FORM_FIELDS if key in form})

    def flush(self) -> None:
        flush = getattr(self.state, "flush", None)
        if flush is not None:
            flush()

    def fail(self, line: str) -> None:
        self.state["error"] = line
        self.log(f"error: {line}")

    def log(self, text: str) -> None:
        self.log_lines.extend(text.rstrip("\n").split("\n"))
        del self.log_lines[:-LOG_LINES]
        self.state["log"] = "\n".join(self.log_lines)

    def info(self, line: str) -> None:
        self.state["info"] = line
        self.log(line)

    # ------------------------------------------------------------------------------------------------ models
    def model_choices(self, kind: str) -> List[Dict[str, str]]:
        """The shipped models of a family, then model files found under the data root (relative paths)."""
        from ..models.shipped import SHIPPED_MODELS, model_card

        family = kind.lower() + "-"
        shipped = [{"title": f"{name} (shipped)", "value": name} for name in SHIPPED_MODELS
                   if str(model_card(name).get("preset", "")).startswith(family)]
        files = []
        for folder in self.root.all_folders(max_depth=2):
            base = self.root.resolve(folder)
            for entry in sorted(os.scandir(base), key=lambda e: e.name):
                if entry.is_file() and entry.name.lower().endswith(MODEL_SUFFIXES) and entry.name != "adapter.safetensors":
                    rel = self.root.relative(entry.path)
                    files.append({"title": rel, "value": rel})
        return shipped + files

    def _model_argument(self) -> str:
        """What ``--model`` gets: a shipped name as it is, a file as its real path under the data root."""
        from ..models.shipped import SHIPPED_MODELS

        model = str(self.state["model"] or "")
        if model in SHIPPED_MODELS:
            return model
        if not model:
            raise requests.RequestError("no model chosen: choose a shipped model or a checkpoint file")
        return self.root.resolve(model)

    def model_choice(self, cls: type = requests.ModelChoice, **values: Any) -> Any:
        return cls(modelKind=self.state["model_kind"], useDemoModel=False, checkpointPath=self._model_argument(),
                   method=self.state["method"], rank=int(self.state["rank"] or 0), **values)

    @one_line_errors
    def set_kind(self, kind: str) -> None:
        self.state["model_kind"] = kind
        self.state["models"] = self.model_choices(kind)
        self.state["model"] = self.state["models"][0]["value"] if self.state["models"] else ""
        self.state["method"] = "lora-pt" if kind == "UNETR" else "tenvoo-l"
        self.state["rank"] = 1 if kind == "UNETR" else 4
        self.refresh_estimates()

    def refresh_estimates(self) -> None:
        """The trainable-parameter count and the device line for what is chosen now (both asked in the background).
        A problem with the choice shows in place of the count: the page's error line stays the last action's."""
        try:
            choice = self.model_choice()
            self.probes.describe(choice, str(self.state["device"]), int(self.state["steps"] or 0), 0,
                                 self.structures() if self.state["model_kind"] == "UNETR" else 1)
            self.probes.count(self.model_choice(requests.ParameterCountRequest))
        except (requests.RequestError, PathRefused, ValueError, TypeError) as err:
            self.state["param_count"] = str(err).splitlines()[0]

    def _show_device(self, text: str, warning: str) -> None:
        # the shared line speaks to Slicer users (its PyTorch extension); here torch is the app's own Python's
        text = text.replace("reinstall PyTorch from the PyTorch Utils module with a CUDA backend",
                            "install a CUDA build of PyTorch into the app's Python")
        self.state["device_text"], self.state["cpu_warning"] = text, warning

    def _show_count(self, text: str) -> None:
        self.state["param_count"] = text

    # ------------------------------------------------------------------------------------------------ data
    @one_line_errors
    def refresh_folders(self) -> None:
        self.state["folders"] = self.root.all_folders()

    @one_line_errors
    def open_folder(self, relative: str) -> None:
        """Pair the folder's images with their labels, list them, show the first."""
        folder = self.root.resolve(relative)
        if not os.path.isdir(folder):
            raise PathRefused(f"{relative}: not a folder")
        self.cases = scan_folder(folder)
        self.state["folder"] = self.root.relative(folder)
        self.state["cases"] = [{"title": case["name"], "value": index,
                                "subtitle": "image + label" if case.get("label") else "image"}
                               for index, case in enumerate(self.cases.cases)]
        self.info(f"{self.state['folder'] or '(data root)'}: {len(self.cases.cases)} volumes, "
                  f"{self.cases.labelled} with labels ({self.cases.layout} layout)")
        self.select_case(0)

    @one_line_errors
    def select_case(self, index: int) -> None:
        if self.cases is None or not (0 <= int(index) < len(self.cases.cases)):
            raise ValueError("choose a volume from the list")
        case = self.cases.cases[int(index)]
        self.state["case_index"] = int(index)
        label = _read_label(case["label"]) if case.get("label") else None  # once: the views and the text share it
        if self.viewer is not None:
            self.viewer.load_case(case["image"], case.get("label"), case["name"], label_volume=label)
        values = _label_values(label)
        self.case_structures = len(values)
        self.state["case_text"] = f"{case['name']}" + (f" (with its label, green{_label_values_text(values)})"
                                                       if case.get("label") else "")
        self.state["segmented"] = ""
        if self.probes.question is not None:  # the page asked for its device line (a page-less session never does)
            self.refresh_estimates()  # finetune's default steps depend on how many structures the labels hold

    def structures(self) -> int:
        """How many structures a fine-tune would learn, for its time estimate: the *Structures* field's entries, else
        the label values of the case on show (1 without a label)."""
        specs = requests.FinetuneRequest(labels=str(self.state["labels"] or "")).label_specs()
        return len(specs) or max(1, self.case_structures)

    def _training_data(self) -> str:
        """The loaded folder as ``finetune --data`` takes it: a Decathlon folder as it is; loose files through a
        datalist JSON written in the app's work folder."""
        if self.cases is None:
            raise requests.RequestError("no data loaded: open a folder with volumes (and labels) first")
        if self.cases.layout == "decathlon":
            return self.cases.folder
        need_labels = self.state["model_kind"] == "UNETR"
        entries = [{"image": c["image"], **({"label": c["label"]} if need_labels else {})}
                   for c in self.cases.cases if c.get("label") or not need_labels]
        if not entries:
            raise requests.RequestError(f"{self.state['folder']}: no image has a label (name them CASE and "
                                        "CASE_label); a UNETR trains on labelled volumes")
        path = os.path.join(self.work_folder("datalists"), "training.json")
        with open(path, "w", encoding="utf-8") as handle:
            json.dump({"training": entries}, handle, indent=1)
        return path

    def work_folder(self, kind: str) -> str:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
        return self.root.writable_folder(f"{APP_FOLDER}/{kind}/{stamp}")

    # ------------------------------------------------------------------------------------------------ jobs
    def start_job(self, args: List[str], name: str, raw: bool = False, **callbacks: Any) -> WorkerJob:
        argv = [self.python, *args] if raw else requests.cli_command(self.python, args)
        job = WorkerJob(argv, name=name, env=worker_environment(_library_parent()), cwd=self.root.root,
                        grace_seconds=30.0, **callbacks)
        job.start()
        return job

    def busy(self) -> bool:
        return self.job is not None and self.job.running

    def _start_user_job(self, request: requests.Request, name: str, on_success: Callable[[JobResult], None],
                        keep_curve: bool = False) -> None:
        if self.busy():
            raise requests.RequestError(f"{self.job.name} is running: wait for it or cancel it first")
        args = request.asArgList()
        self.log(f"$ tensorpeft {' '.join(args)}")
        if not keep_curve:  # a resumed run continues the curve of the run it resumes
            self.losses, self.scores = [], []
        self.state.update({"job_name": name, "job_busy": True, "progress": 0, "eta": "", "curve": "", "info": "",
                           "progress_text": "starting the worker (loading torch and the model) ..."})

        def finished(result: JobResult) -> None:
            self.state["job_busy"] = False
            self.state["progress_text"] = result.message
            if result.ok:
                self.state["progress"] = 100
                try:
                    on_success(result)
                except Exception as err:  # noqa: BLE001 - one line in the page, the traceback in the log
                    self.log(traceback.format_exc())
                    self.fail(f"{name} finished, but showing its result failed: {err}")
            elif result.status == "cancelled":
                self.info(result.message)
            else:
                self.fail(result.message)
            if name == "fine-tune":  # Resume is offered after a cancelled fine-tune that left a checkpoint
                self.state["can_resume"] = result.status == "cancelled" and bool(result.checkpoint)
            self.state["job_name"] = ""

        self.job = self.start_job(args, name, on_event=self._on_event, on_progress=self._on_progress,
                                  on_log=self.log, on_finished=finished)

    def _on_event(self, event: Dict[str, Any]) -> None:
        if event.get("event") == "step" and event.get("loss") is not None and not event.get("images"):
            step = float(event.get("step", 0))
            self.losses = [p for p in self.losses if p[0] < step] + [(step, float(event["loss"]))]  # resumed: redone
        elif event.get("event") == "eval":
            name = next((k for k in ("dice", "val_loss") if event.get(k) is not None), None)
            if name:
                step = float(event.get("step", 0))
                self.scores = [p for p in self.scores if p[0] < step] + [(step, float(event[name]))]

    def _on_progress(self, progress: Progress) -> None:
        self.state["progress"] = round(100 * progress.fraction, 1)
        self.state["progress_text"] = progress.text()
        running = progress.status == "running" and progress.eta_seconds is not None and progress.step < progress.steps
        self.state["eta"] = format_duration(progress.eta_seconds) if running else ""
        if self.state["job_name"] == "fine-tune":
            label = "val Dice" if progress.metric_name in (None, "dice") else str(progress.metric_name)
            self.state["curve"] = curve_svg(self.losses, self.scores, progress.steps, label)

    def poll(self) -> bool:
        """Read what the workers wrote (a timer calls this); True while anything runs."""
        running = self.busy() and self.job.poll()
        probing = self.probes.poll()
        return bool(running or probing)

    @one_line_errors
    def cancel(self) -> None:
        if not self.busy():
            raise requests.RequestError("nothing is running")
        self.job.cancel()
        self.state["progress_text"] = "stopping after the current step (a checkpoint is written) ..."

    @one_line_errors
    def finetune(self, resume: bool = False) -> None:
        if resume and not self.last_run:
            raise requests.RequestError("nothing to resume: fine-tune first")
        kind, method, rank = self.state["model_kind"], self.state["method"], int(self.state["rank"] or 0)
        out = self.last_run if resume else os.path.join(self.work_folder("runs"), f"{kind.lower()}-{method}-r{rank}")
        request = self.model_choice(requests.FinetuneRequest, dataFolder=self._training_data(), adapterFolder=out,
                                    steps=int(self.state["steps"] or 0), evalEvery=int(self.state["eval_every"] or 0),
                                    device=str(self.state["device"]), resume=resume, threads=self.worker_threads,
                                    skullStrip=str(self.state["skull_strip"]),
                                    labels=str(self.state["labels"] or "") if kind == "UNETR" else "")
        request.validate()
        self.last_run = out
        self.state["can_resume"] = False

        def done(result: JobResult) -> None:
            self.state["adapter"] = self.root.relative(out)
            best = (result.done or {}).get("best")
            score = f", best validation {best:.3f}" if best is not None else ""
            self.info(f"adapter written to {self.root.relative(out)}{score}")

        self._start_user_job(request, "fine-tune", done, keep_curve=resume)

    def _adapter_for(self, task: str) -> str:
        """The loaded or fine-tuned adapter for ``task`` (its real path), or '' to use the chosen model as it is."""
        if not self.state["adapter"]:
            return ""
        folder = self.root.resolve(self.state["adapter"])
        config = adapter_folders.check_adapter_folder(folder)
        return folder if adapter_folders.adapter_task(config) == task else ""

    @one_line_errors
    def segment(self) -> None:
        from ..frontend.slicer_app import export_for_segmentation, segmented_text

        if self.state["model_kind"] != "UNETR":
            raise requests.RequestError("segmentation needs a UNETR: choose the UNETR family (and its model)")
        if self.viewer is None or not self.viewer.case_nodes:
            raise requests.RequestError("no volume shown: open a folder and choose a volume first")
        volume = self.viewer.case_nodes[0]
        adapter = self._adapter_for("segmentation")
        image, mask = export_for_segmentation(self.viewer.scene, volume, self.work_folder("segment"))
        request = requests.SegmentRequest(image=image, mask=mask, adapterFolder=adapter,
                                          model="" if adapter else self._model_argument(),
                                          device=str(self.state["device"]), skullStrip=str(self.state["skull_strip"]))
        what = os.path.basename(adapter) if adapter else os.path.basename(str(self.state["model"]))
        self.state["segment_with"] = what

        def done(result: JobResult) -> None:
            segmentation = self.viewer.show_mask(mask, volume, what, result.done)
            self.state["segmented"] = volume.GetName()
            from .viewer import segment_values

            self.info(segmented_text(volume.GetName(), what, result.done)
                      + f" ({structure_colours_text((result.done or {}).get('structures') or {}, segment_values(segmentation))}"
                      ": slice overlay and 3D surface)")

        self._start_user_job(request, "segment", done)

    @one_line_errors
    def synthesize(self) -> None:
        if self.state["model_kind"] != "DDPM":
            raise requests.RequestError("synthesis needs a DDPM: choose the DDPM family (and its model)")
        adapter = self._adapter_for("synthesis")
        request = requests.SynthesizeRequest(outputFolder=self.work_folder("synthesized"),
                                             synthCount=int(self.state["synth_count"] or 0),
                                             synthSteps=int(self.state["synth_steps"] or 0), adapterFolder=adapter,
                                             model="" if adapter else self._model_argument(),
                                             device=str(self.state["device"]))

        def done(result: JobResult) -> None:
            paths = (result.done or {}).get("volumes") or []
            if not paths:
                raise requests.RequestError("the worker reported no generated volumes; see the log")
            names = self.viewer.show_synthesized(paths) if self.viewer is not None else paths
            self.state["synthesized"] = [{"title": name, "value": index} for index, name in enumerate(names)]
            self.state["synth_index"] = 0
            self.info(f"{len(names)} volume(s) generated into {self.root.relative(os.path.dirname(paths[0]))}")

        self._start_user_job(request, "synthesize", done)

    @one_line_errors
    def show_synthesized(self, index: int) -> None:
        self.state["synth_index"] = int(index)
        if self.viewer is not None:
            self.viewer.show_synthesized_index(int(index))

    # ------------------------------------------------------------------------------------------------ adapters
    @one_line_errors
    def save_adapter(self, target: str) -> None:
        if not self.state["adapter"]:
            raise requests.RequestError("no adapter to save: fine-tune or load one first")
        if not str(target or "").strip():
            raise requests.RequestError("save to: type a folder name under the data root")
        source = self.root.resolve(self.state["adapter"])
        destination = self.root.resolve(target, must_exist=False)
        copied = adapter_folders.copy_adapter(source, destination)
        self.info(f"saved {', '.join(copied)} to {self.root.relative(destination)}")

    @one_line_errors
    def load_adapter(self, folder: str) -> None:
        path = self.root.resolve(folder)
        config = adapter_folders.check_adapter_folder(path)
        kind = "DDPM" if adapter_folders.adapter_task(config) == "synthesis" else "UNETR"
        if kind != self.state["model_kind"]:
            self.set_kind(kind)
        self.state["adapter"] = self.root.relative(path)
        self.state["skull_strip"] = adapter_folders.recorded_skull_strip(config)  # its scans as it was trained
        self.info(f"adapter {config.get('method', '?')} (rank {config.get('rank', '?')}) loaded from "
                  f"{self.root.relative(path)}")

    def adapter_folders(self) -> List[str]:
        """Folders under the data root that hold a finished adapter (the load list)."""
        found = []
        for folder in self.root.all_folders(max_depth=5):
            try:
                adapter_folders.check_adapter_folder(self.root.resolve(folder))
            except requests.RequestError:
                continue
            found.append(folder)
        return found

    def stop(self) -> None:
        if self.busy():
            self.job.cancel()
        self.probes.stop()


def _read_label(path: str) -> Any:
    """The label file as a :class:`~TensorPEFTLib.data.Volume`, None if it cannot be read here (the views and the
    fine-tune say why)."""
    from ..data import read_volume

    try:
        return read_volume(path)
    except Exception:  # noqa: BLE001 - a hint only
        return None


def _label_values(label: Any) -> List[int]:
    """The values of a label volume other than 0 (none for None)."""
    import numpy as np

    return [] if label is None else [int(v) for v in np.unique(np.asarray(label.array)) if v != 0]


def _label_values_text(values: Sequence[int]) -> str:
    """": label values 17, 53" for a label that holds other values than 1 (what --labels / the Structures field
    take); "" for a plain one-structure label or one that could not be read here (the fine-tune checks it anyway)."""
    values = list(values)
    if values == [1] or not values:
        return ""
    shown = ", ".join(map(str, values[:12])) + (f" and {len(values) - 12} more" if len(values) > 12 else "")
    return f": label values {shown}"
