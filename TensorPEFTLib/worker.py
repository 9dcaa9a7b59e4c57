"""Run TensorPEFT jobs in a separate process and follow them: the part of the 3D Slicer module that is not GUI.

Nothing here imports torch, Qt or Slicer, so the module draws itself instantly and pytest can drive every state:

- :func:`finetune_args` / :func:`segment_args` / :func:`synthesize_args` / :func:`params_args` build the same
  ``python -m TensorPEFTLib.cli ...`` command lines a terminal user types (one way to do each thing).
- :func:`parse_event_line` reads the JSON-lines events of ``--events -`` (``start``, ``step``, ``eval``,
  ``checkpoint``, ``done``, ``error``); :class:`Progress` turns them into a progress-bar value and a line such as
  ``step 12/300 · loss 0.4123 · val Dice 0.812 (best 0.830) · ETA 3 min 20 s``.
- :class:`WorkerJob` owns one child process (:class:`PopenProcess`, or any object with the same five methods —
  tests pass a fake). The GUI calls :meth:`WorkerJob.poll` from a timer on the main thread; reading happens in
  background threads, so Slicer never blocks. :meth:`WorkerJob.cancel` asks the process tree to stop (SIGTERM: the
  trainer finishes its step and writes a checkpoint) and kills the tree if it is still alive after a grace period.
- :class:`JobResult` says how it ended, with a one-line message for people and the full log.

``python -m TensorPEFTLib.worker device`` prints what the worker's torch sees (GPU name and memory) as JSON; the
module runs it in the background so the panel can show it without importing torch.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

__all__ = [
    "METHODS", "MODEL_KINDS", "DEMO_MODELS", "DEVICE_CHOICES", "EVENT_KINDS", "WorkerError", "FinetuneRequest",
    "cli_command", "finetune_args", "segment_args", "synthesize_args", "params_args", "parse_event_line",
    "format_duration", "Progress", "JobResult", "WorkerJob", "PopenProcess", "ProcessLike", "estimate_cpu_seconds",
    "check_adapter_folder", "copy_adapter", "missing_requirements", "shipped_constraints", "worker_environment",
]

#: Every adaptation method of the library with a one-line explanation for the panel (a test checks these names
#: against the registry, so a new method cannot be forgotten here).
METHODS: dict[str, str] = {
    "lora-pt": "LoRA-PT: truncated t-SVD of the stacked ViT weights; very few parameters (UNETR).",
    "tcurlora": "tCURLoRA: tensor CUR of the stacked ViT weights; only a small core per slice trains (UNETR).",
    "lotr": "LoTR: Tucker-2 update shared across ViT blocks, a small core per layer (UNETR).",
    "lora": "LoRA: a low-rank update B·A per layer (LoCon on convolutions).",
    "pissa": "PiSSA: LoRA started from the weight's top singular vectors.",
    "loha": "LoHa: Hadamard product of two low-rank updates (rank up to r² for 2r's parameters).",
    "lokr": "LoKr: Kronecker product of a small full matrix and a rank-r matrix.",
    "ssf": "SSF: per-channel scale and shift of each adapted layer's output.",
    "quanta": "QuanTA: linear updates as three small tensors over a factorised feature axis.",
    "tenvoo-l": "TenVOO-L: 3D convolution updates as a ten-core tensor network (DDPM).",
    "tenvoo-q": "TenVOO-Q: TenVOO with three r⁴ loop cores (DDPM).",
    "selora": "SeLoRA: LoRA starting at rank 1; ranks grow where a Fisher-score test says it helps.",
    "full": "Full fine-tuning: every weight trains (baseline; most memory and storage).",
}

MODEL_KINDS = ("UNETR", "DDPM")
#: the built-in demo models (``tensorpeft pretrain --recipe ...``) and the preset each is built on
DEMO_MODELS = {"UNETR": "demo-unetr", "DDPM": "demo-ddpm"}
DEMO_PRESETS = {"demo-unetr": "unetr-small", "demo-ddpm": "ddpm-small"}
#: the paper presets, used for parameter counts when the user brings a checkpoint of that family
FAMILY_PRESETS = {"UNETR": "unetr-paper", "DDPM": "ddpm-paper"}
DEFAULT_METHOD = {"UNETR": "lora-pt", "DDPM": "tenvoo-l"}
#: panel choice → ``--device`` value
DEVICE_CHOICES = {"auto": "auto", "GPU": "cuda", "CPU": "cpu"}
#: the same kinds as TensorPEFTLib.engine.events.EVENT_KINDS (importing the engine would import torch)
EVENT_KINDS = ("start", "step", "eval", "checkpoint", "done", "error")
EXIT_CANCELLED = 130  # the CLI's exit code after a cancelled fine-tune (engine.trainer.EXIT_CANCELLED)
ADAPTER_FILES = ("adapter_config.json", "adapter.safetensors")
#: copied by "Save adapter" besides the adapter itself (the training record); checkpoints stay behind
ADAPTER_EXTRAS = ("history.json", "metrics.csv", "report.png")


class WorkerError(ValueError):
    """A problem with what the user chose (one line: what is wrong, which node/file, how to fix it)."""


# --------------------------------------------------------------------------------------------- command lines


def cli_command(python: str, args: Sequence[str]) -> list[str]:
    """The argv that runs ``tensorpeft ARGS`` with ``python`` (Slicer's own Python inside Slicer)."""
    return [python, "-m", "TensorPEFTLib.cli", *[str(a) for a in args]]


@dataclass
class FinetuneRequest:
    """What the panel's fine-tune button needs; :meth:`validate` gives one-line messages for bad input."""

    model: str  # checkpoint file or a built-in name (demo-unetr, unetr-small ...)
    data: str  # Decathlon folder (imagesTr/, labelsTr/) or datalist JSON
    out: str  # adapter folder to write
    method: str = "lora-pt"
    rank: int = 1
    alpha: float | None = None  # None or 0: the method's default (alpha = rank)
    lr: float | None = None  # None or 0: finetune's default for the task and method
    steps: int | None = None  # None or 0: finetune's default for the number of cases
    patch_size: int | None = None  # None or 0: the model's own size
    device: str = "auto"  # panel choice: auto / GPU / CPU
    val: str | None = None
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    eval_every: int | None = None
    checkpoint_every: int | None = None
    threads: int | None = None
    affine: bool = True  # random affine augmentation (finetune's default; False passes --no-affine)
    flip: str | None = None  # None: the CLI default (left-right); "all", "none"
    spacing: float | None = None  # None or 0: the model's working spacing

    def validate(self) -> None:
        if self.method not in METHODS:
            raise WorkerError(f"method {self.method!r} is unknown; choose one of: {', '.join(METHODS)}")
        if int(self.rank) < 1:
            raise WorkerError(f"rank {self.rank}: choose a rank of 1 or more")
        if self.alpha is not None and self.alpha < 0:
            raise WorkerError(f"alpha {self.alpha}: choose 0 (the default, alpha = rank) or a positive value")
        if self.lr and not (0 < float(self.lr) < 1):
            raise WorkerError(f"learning rate {self.lr}: choose 0 (the default) or a value between 0 and 1, e.g. 0.001")
        if self.steps is not None and int(self.steps) < 0:
            raise WorkerError(f"steps {self.steps}: choose 0 (the default for the number of cases) or more")
        if self.spacing is not None and self.spacing < 0:
            raise WorkerError(f"spacing {self.spacing}: choose 0 (the model's working spacing) or a voxel size in mm")
        if self.patch_size is not None and self.patch_size != 0 and self.patch_size < 16:
            raise WorkerError(f"patch size {self.patch_size}: choose 0 (the model's size) or at least 16 voxels")
        if self.device not in DEVICE_CHOICES:
            raise WorkerError(f"device {self.device!r}: choose one of {', '.join(DEVICE_CHOICES)}")
        if not self.model:
            raise WorkerError("no model: tick 'Built-in demo model' or choose a checkpoint file")
        looks_like_file = os.sep in self.model or "/" in self.model or os.path.splitext(self.model)[1] != ""
        if looks_like_file and not os.path.exists(self.model):
            raise WorkerError(f"{self.model}: checkpoint file not found; choose an existing .safetensors/.pt file "
                              "or tick 'Built-in demo model'")
        if not self.data or not os.path.exists(self.data):
            raise WorkerError(f"{self.data or '(none)'}: training data not found; choose a Decathlon folder "
                              "(imagesTr/, labelsTr/) or add volume/segmentation pairs from the scene")
        if not self.out:
            raise WorkerError("no adapter folder: choose where the adapter is written")
        if self.flip not in (None, "all", "lr", "none"):
            raise WorkerError(f"flip {self.flip!r}: choose all, lr (left-right, for brains) or none")


def finetune_args(req: FinetuneRequest) -> list[str]:
    """``tensorpeft finetune`` arguments for ``req`` (validated first), always with ``--events -``."""
    req.validate()
    args = ["finetune", "--model", req.model, "--data", req.data, "--out", req.out,
            "--method", req.method, "--rank", str(int(req.rank)), "--device", DEVICE_CHOICES[req.device],
            "--seed", str(int(req.seed))]
    if req.lr:
        args += ["--lr", f"{float(req.lr):g}"]
    if req.steps:
        args += ["--steps", str(int(req.steps))]
    if req.spacing:
        args += ["--spacing", f"{float(req.spacing):g}"]
    if req.alpha:
        args += ["--alpha", f"{float(req.alpha):g}"]
    if req.patch_size:
        args += ["--patch-size", str(int(req.patch_size))]
    if req.val:
        args += ["--val", req.val]
    if req.eval_every:
        args += ["--eval-every", str(int(req.eval_every))]
    if req.checkpoint_every:
        args += ["--checkpoint-every", str(int(req.checkpoint_every))]
    if req.threads:
        args += ["--threads", str(int(req.threads))]
    if not req.affine:
        args.append("--no-affine")
    if req.flip:
        args += ["--flip", req.flip]
    if req.resume:
        args.append("--resume")
    elif req.overwrite:
        args.append("--overwrite")
    return args + ["--events", "-"]


def segment_args(image: str, out: str, *, adapter: str | None, model: str | None = None, device: str = "auto",
                 min_component_mm3: float | None = None) -> list[str]:
    """``tensorpeft segment`` for one exported image file → one mask file on the image's grid."""
    if device not in DEVICE_CHOICES:
        raise WorkerError(f"device {device!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    if not adapter and not model:
        raise WorkerError("no adapter folder and no model: fine-tune first, or load an adapter folder")
    args = ["segment", "--image", image, "--out", out, "--device", DEVICE_CHOICES[device]]
    if adapter:
        args += ["--adapter", adapter]
    if model:
        args += ["--model", model]
    if min_component_mm3 is not None:
        args += ["--min-component", f"{float(min_component_mm3):g}"]
    return args + ["--events", "-"]


def synthesize_args(out: str, count: int, *, adapter: str | None, model: str | None = None, device: str = "auto",
                    steps: int = 50, seed: int = 0) -> list[str]:
    if int(count) < 1:
        raise WorkerError(f"number of volumes {count}: choose 1 or more")
    if int(steps) < 1:
        raise WorkerError(f"sampling steps {steps}: choose 1 or more")
    if device not in DEVICE_CHOICES:
        raise WorkerError(f"device {device!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    if not adapter and not model:
        raise WorkerError("no adapter folder and no model: fine-tune first, or load an adapter folder")
    args = ["synthesize", "--out", out, "--count", str(int(count)), "--steps", str(int(steps)), "--seed", str(int(seed)),
            "--device", DEVICE_CHOICES[device]]
    if adapter:
        args += ["--adapter", adapter]
    if model:
        args += ["--model", model]
    return args + ["--events", "-"]


def params_args(preset: str, method: str, rank: int, alpha: float | None = None) -> list[str]:
    """``tensorpeft params --json`` (run in the background: it builds the model, which needs torch)."""
    args = ["params", "--model", preset, "--method", method, "--rank", str(int(rank))]
    if alpha:
        args += ["--alpha", f"{float(alpha):g}"]
    return args + ["--json"]


def count_preset(model_kind: str, model: str) -> str:
    """The preset whose parameter count the panel shows for ``model`` (a demo name, a preset, or a file)."""
    if model in DEMO_PRESETS:
        return DEMO_PRESETS[model]
    if model and not os.path.exists(model) and "/" not in model and os.sep not in model:
        return model  # a preset name
    return FAMILY_PRESETS[model_kind]


# --------------------------------------------------------------------------------------------- events, progress


def parse_event_line(line: str) -> dict[str, Any] | None:
    """One ``--events -`` line → the event dict, or None for anything else (messages, warnings, tracebacks)."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        event = json.loads(text)
    except ValueError:
        return None
    if not isinstance(event, dict) or event.get("event") not in EVENT_KINDS:
        return None
    return event


def format_duration(seconds: float | None) -> str:
    """``"45 s"``, ``"3 min 20 s"``, ``"2 h 05 min"``; ``""`` when unknown."""
    if seconds is None or seconds != seconds or seconds < 0:
        return ""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


_METRIC_LABELS = {"dice": "val Dice", "val_loss": "val loss"}


@dataclass
class Progress:
    """The state a progress bar shows, folded from events. ``now`` (seconds) is only used to estimate an ETA for
    jobs whose step events carry none (segment, synthesize)."""

    kind: str = ""
    status: str = "starting"  # starting | running | completed | cancelled | failed
    step: int = 0
    steps: int = 0
    loss: float | None = None
    metric_name: str | None = None
    metric: float | None = None
    best: float | None = None
    eta_seconds: float | None = None
    device_name: str | None = None
    checkpoint: str | None = None
    out: str | None = None
    trainable: int | None = None
    first_step_at: float | None = None
    first_step: int = 0
    image_index: int = 0  # segment: which image the window-batch steps belong to (1-based), of ``images``
    images: int = 0

    def update(self, event: dict[str, Any], now: float | None = None) -> None:
        kind = event.get("event")
        if kind == "start":
            self.kind = str(event.get("kind", self.kind))
            self.status = "running"
            self.steps = int(event.get("steps") or event.get("count") or event.get("images") or self.steps or 0)
            self.step = int(event.get("step") or 0)
            self.metric_name = event.get("metric") or self.metric_name
            self.device_name = event.get("device_name") or self.device_name
            self.out = event.get("out") or self.out
            self.trainable = event.get("trainable", self.trainable)
        elif kind == "step":
            self.status = "running"
            if event.get("images"):
                self.image_index, self.images = int(event.get("image_index") or 1), int(event["images"])
            self.step = int(event.get("step", self.step))
            self.steps = int(event.get("steps") or self.steps)
            if event.get("loss") is not None:
                self.loss = float(event["loss"])
            if event.get("eta_seconds") is not None:
                self.eta_seconds = float(event["eta_seconds"])
            elif now is not None:
                if self.first_step_at is None:
                    self.first_step_at, self.first_step = now, self.step
                elif self.step > self.first_step:
                    rate = (now - self.first_step_at) / (self.step - self.first_step)
                    self.eta_seconds = rate * max(0, self.steps - self.step)
        elif kind == "eval":
            name = self.metric_name or next((k for k in ("dice", "val_loss") if k in event), None)
            if name and event.get(name) is not None:
                self.metric_name = name
                self.metric = float(event[name])
            if event.get("best") is not None:
                self.best = float(event["best"])
        elif kind == "checkpoint":
            self.checkpoint = event.get("path") or self.checkpoint
        elif kind == "done":
            self.status = str(event.get("status", "completed"))
            self.step = int(event.get("step") or self.step)
            if event.get("best") is not None:
                self.best = float(event["best"])
            self.out = event.get("out") or self.out
            if self.status == "completed":
                self.eta_seconds = 0.0
        elif kind == "error":
            self.status = "failed"

    @property
    def fraction(self) -> float:
        if self.status == "completed":
            return 1.0
        within = min(1.0, self.step / self.steps) if self.steps else 0.0
        if self.images:  # segment: window batches of one image at a time
            return min(1.0, (self.image_index - 1 + within) / self.images)
        return within

    def text(self) -> str:
        if self.status == "starting":
            return "starting the worker (loading torch and the model) ..."
        parts = [f"step {self.step}/{self.steps}" if self.steps else f"step {self.step}"]
        if self.images:
            parts = [f"image {self.image_index}/{self.images}", f"window batch {self.step}/{self.steps}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.metric is not None:
            label = _METRIC_LABELS.get(self.metric_name or "", self.metric_name or "metric")
            best = f" (best {self.best:.3f})" if self.best is not None and self.best != self.metric else ""
            parts.append(f"{label} {self.metric:.3f}{best}")
        if self.status == "running" and self.eta_seconds is not None and self.step < self.steps:
            parts.append(f"ETA {format_duration(self.eta_seconds)}")
        if self.status in ("completed", "cancelled", "failed"):
            parts.append(self.status)
        return " · ".join(parts)


# --------------------------------------------------------------------------------------------- processes


class ProcessLike(Protocol):
    """What :class:`WorkerJob` needs from a child process (:class:`PopenProcess`, or a fake in tests)."""

    def start(self, argv: Sequence[str], env: dict[str, str] | None, cwd: str | None) -> None: ...
    def read(self) -> tuple[str, str]: ...  # (new stdout text, new stderr text) since the last call
    def exit_code(self) -> int | None: ...  # None while running or while output is still being drained
    def terminate_tree(self) -> None: ...  # polite stop of the process and its children
    def kill_tree(self) -> None: ...  # forced stop


class PopenProcess:
    """A child process in its own process group (POSIX session / Windows process group), its stdout and stderr read
    by two daemon threads into a queue. Safe to poll from Slicer's main thread: nothing here blocks."""

    def __init__(self) -> None:
        self.popen: subprocess.Popen | None = None
        self._queue: "queue.Queue[tuple[int, str | None]]" = queue.Queue()
        self._open_streams = 0

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen else None

    def start(self, argv: Sequence[str], env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # its own process group: the whole tree can be signalled
        self.popen = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                      env=env, cwd=cwd, text=True, encoding="utf-8", errors="replace", bufsize=1,
                                      **kwargs)
        self._open_streams = 2
        for index, stream in enumerate((self.popen.stdout, self.popen.stderr)):
            threading.Thread(target=self._pump, args=(index, stream), daemon=True).start()

    def _pump(self, index: int, stream: Any) -> None:
        try:
            for line in iter(stream.readline, ""):
                self._queue.put((index, line))
        finally:
            self._queue.put((index, None))

    def read(self) -> tuple[str, str]:
        chunks: list[list[str]] = [[], []]
        while True:
            try:
                index, text = self._queue.get_nowait()
            except queue.Empty:
                break
            if text is None:
                self._open_streams -= 1
            else:
                chunks[index].append(text)
        return "".join(chunks[0]), "".join(chunks[1])

    def exit_code(self) -> int | None:
        if self.popen is None:
            return None
        code = self.popen.poll()
        if code is None or self._open_streams > 0 or not self._queue.empty():
            return None
        return code

    def _signal_group(self, sig: int) -> None:
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, sig)  # the group id is the child's pid (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass

    def terminate_tree(self) -> None:
        """POSIX: SIGTERM to the process group — the trainer finishes its step, writes a checkpoint and exits.
        Windows: CTRL_BREAK to the group (stops at once; the last periodic checkpoint is kept)."""
        if self.popen is None or self.popen.poll() is not None:
            return
        if os.name == "nt":
            try:
                self.popen.send_signal(signal.CTRL_BREAK_EVENT)  # type: ignore[attr-defined]
            except (OSError, ValueError):
                self.kill_tree()
        else:
            self._signal_group(signal.SIGTERM)

    def kill_tree(self) -> None:
        if self.popen is None:
            return
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.popen.pid)], capture_output=True, check=False)
        else:
            self._signal_group(signal.SIGKILL)


@dataclass
class JobResult:
    status: str  # completed | cancelled | failed
    exit_code: int | None
    message: str  # one line for people
    log: str  # everything the worker printed (stdout lines that are not events, and stderr)
    done: dict[str, Any] | None = None  # the final "done" event
    checkpoint: str | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "completed"


class WorkerJob:
    """One worker run: start it, :meth:`poll` it from a timer, :meth:`cancel` it; callbacks report progress.

    ``on_progress(progress)`` after each event, ``on_event(event)`` for each event, ``on_log(line)`` for each other
    line, ``on_finished(result)`` once. ``clock`` and ``process`` are injectable for tests.
    """

    def __init__(self, argv: Sequence[str], *, name: str = "job", process: ProcessLike | None = None,
                 env: dict[str, str] | None = None, cwd: str | None = None, grace_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 on_event: Callable[[dict[str, Any]], None] | None = None,
                 on_progress: Callable[[Progress], None] | None = None,
                 on_log: Callable[[str], None] | None = None,
                 on_finished: Callable[[JobResult], None] | None = None) -> None:
        self.argv = list(argv)
        self.name = name
        self.process: ProcessLike = process if process is not None else PopenProcess()
        self.env, self.cwd = env, cwd
        self.grace_seconds = grace_seconds
        self.clock = clock
        self.on_event, self.on_progress, self.on_log, self.on_finished = on_event, on_progress, on_log, on_finished
        self.progress = Progress()
        self.events: list[dict[str, Any]] = []
        self.log_lines: list[str] = []
        self.stdout_lines: list[str] = []  # non-event stdout (e.g. the JSON of `params --json`)
        self.error_message: str | None = None
        self.result: JobResult | None = None
        self.started = False
        self.cancel_requested_at: float | None = None
        self.killed = False
        self._partial = ["", ""]
        self._start_error: str | None = None

    # ------------------------------------------------------------------ control
    def start(self) -> None:
        self.started = True
        try:
            self.process.start(self.argv, self.env, self.cwd)
        except OSError as err:  # reported by the next poll(), like any other ending
            self._start_error = f"cannot start the worker ({self.argv[0]}): {err}"

    @property
    def running(self) -> bool:
        return self.started and self.result is None

    def cancel(self) -> None:
        """Ask the process tree to stop (it checkpoints first); :meth:`poll` kills it after ``grace_seconds``."""
        if not self.running or self.cancel_requested_at is not None:
            return
        self.cancel_requested_at = self.clock()
        self._log(f"[{self.name}] cancel requested: asking the worker to stop after its current step")
        self.process.terminate_tree()

    def poll(self) -> bool:
        """Read what arrived, update progress, enforce the cancel timeout. Returns True while running."""
        if not self.running:
            return False
        if self._start_error is not None:
            self._finish(None, self._start_error)
            return False
        out, err = self.process.read()
        self._feed(0, out)
        self._feed(1, err)
        if (self.cancel_requested_at is not None and not self.killed
                and self.clock() - self.cancel_requested_at >= self.grace_seconds):
            self.killed = True
            self._log(f"[{self.name}] the worker did not stop within {self.grace_seconds:g} s: killing it")
            self.process.kill_tree()
        code = self.process.exit_code()
        if code is not None:
            self._flush()
            self._finish(code)
            return False
        return True

    def wait(self, timeout: float, interval: float = 0.05) -> JobResult | None:
        """Poll until the job ends or ``timeout`` seconds pass (scripts and tests; the GUI polls from a timer)."""
        deadline = time.monotonic() + timeout
        while self.poll() and time.monotonic() < deadline:
            time.sleep(interval)
        return self.result

    def stdout_text(self) -> str:
        return "".join(line + "\n" for line in self.stdout_lines)

    # ------------------------------------------------------------------ internals
    def _log(self, line: str) -> None:
        self.log_lines.append(line)
        if self.on_log:
            self.on_log(line)

    def _feed(self, index: int, text: str) -> None:
        if not text:
            return
        lines = (self._partial[index] + text).split("\n")
        self._partial[index] = lines.pop()  # an unfinished line waits for its end
        for line in lines:
            self._line(index, line.rstrip("\r"))

    def _flush(self) -> None:
        for index in (0, 1):
            if self._partial[index]:
                line, self._partial[index] = self._partial[index], ""
                self._line(index, line.rstrip("\r"))

    def _line(self, index: int, line: str) -> None:
        event = parse_event_line(line) if index == 0 else None
        if event is None:
            if index == 0:
                self.stdout_lines.append(line)
            if line.strip():
                self._log(line)
            return
        self.events.append(event)
        self.progress.update(event, now=self.clock())
        if event["event"] == "error":
            self.error_message = str(event.get("message") or "the worker reported an error")
            self._log(f"[{self.name}] error: {self.error_message}")
        if self.on_event:
            self.on_event(event)
        if self.on_progress:
            self.on_progress(self.progress)

    def _finish(self, code: int | None, start_error: str | None = None) -> None:
        done = next((e for e in reversed(self.events) if e["event"] == "done"), None)
        checkpoint = self.progress.checkpoint
        if start_error is not None:
            status, message = "failed", start_error
            self._log(start_error)
        elif self.cancel_requested_at is not None or code == EXIT_CANCELLED or (done or {}).get("status") == "cancelled":
            status = "cancelled"
            where = f"; checkpoint kept in {checkpoint} (fine-tune again with 'Resume' to continue)" if checkpoint else ""
            how = " (killed after the grace period)" if self.killed else ""
            message = f"{self.name} cancelled at step {self.progress.step}{how}{where}"
        elif code == 0 and self.error_message is None:
            status, message = "completed", f"{self.name} finished"
            if self.progress.steps:
                message += f" ({self.progress.step}/{self.progress.steps} steps)"
        else:
            status = "failed"
            message = self.error_message or _last_error_line(self.log_lines) or f"the worker exited with code {code}"
            message = f"{self.name} failed: {message}"
        self.progress.status = status
        self.result = JobResult(status, code, message, "\n".join(self.log_lines), done, checkpoint, list(self.events))
        if self.on_progress:
            self.on_progress(self.progress)
        if self.on_finished:
            self.on_finished(self.result)


def _last_error_line(lines: list[str]) -> str | None:
    """The most telling line of a crash: ``tensorpeft: error: ...`` or a traceback's last line."""
    for line in reversed(lines):
        text = line.strip()
        if text.startswith("tensorpeft: error:"):
            return text[len("tensorpeft: error:"):].strip()
    for line in reversed(lines):
        text = line.strip()
        if text and not text.startswith(("[", "warnings.warn", "File ")):
            return text
    return None


# --------------------------------------------------------------------------------------------- estimates


#: CPU seconds per training step measured on a 2-core machine (Shared/reference.md: UNETR forward+backward batch 1,
#: small DDPM training step): preset → (seconds, voxels of the measured patch, batch of the measurement)
_CPU_STEP_SECONDS = {
    "unetr-paper": (17.0, 128 ** 3, 1),
    "unetr-small": (1.0, 64 ** 3, 1),
    "ddpm-small": (1.1, 32 ** 3, 1),
}
_DEFAULT_BATCH = {"unetr": 2, "ddpm": 1}
_PRESET_PATCH = {"unetr-paper": 128, "unetr-small": 64, "ddpm-small": 32, "ddpm-paper": 112}


def estimate_cpu_seconds(preset: str, steps: int, patch_size: int | None = None) -> float | None:
    """Rough CPU time of ``steps`` training steps (2 cores; more cores are faster), None if never measured."""
    if preset not in _CPU_STEP_SECONDS:
        return None
    seconds, voxels, batch = _CPU_STEP_SECONDS[preset]
    patch = patch_size or _PRESET_PATCH[preset]
    per_step = seconds * (patch ** 3 / voxels) * _DEFAULT_BATCH[preset.split("-")[0]] / batch
    return per_step * steps


def cpu_warning(preset: str, steps: int, patch_size: int | None = None) -> str:
    estimate = estimate_cpu_seconds(preset, steps, patch_size)
    if estimate is None:
        return (f"Training {preset} on the CPU is impractically slow (hours to days); use a GPU, "
                "or the built-in demo model")
    return (f"No GPU: {steps} steps will take roughly {format_duration(estimate)} on a 2-core CPU "
            "(faster with more cores); a GPU is 20–100× faster")


# --------------------------------------------------------------------------------------------- adapters, deps


def check_adapter_folder(folder: str) -> dict[str, Any]:
    """The adapter_config.json of ``folder``, or WorkerError saying what is missing."""
    if not folder or not os.path.isdir(folder):
        raise WorkerError(f"{folder or '(none)'}: adapter folder not found; choose a folder written by fine-tuning "
                          "(it holds adapter_config.json and adapter.safetensors)")
    missing = [f for f in ADAPTER_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing and os.path.isdir(os.path.join(folder, "checkpoint")):
        # the adapter is written when a run finishes; a cancelled one has its checkpoint (and best/) only
        best = os.path.join(folder, "best")
        raise WorkerError(f"{folder}: this fine-tuning run has not finished; tick Resume and fine-tune again to "
                          f"continue it" + (f", or choose {best} (the best adapter so far)" if os.path.isdir(best) else ""))
    if missing:
        raise WorkerError(f"{folder}: not an adapter folder ({' and '.join(missing)} missing); choose a folder "
                          "written by fine-tuning")
    try:
        with open(os.path.join(folder, ADAPTER_FILES[0]), encoding="utf-8") as handle:
            config = json.load(handle)
    except (OSError, ValueError) as err:
        raise WorkerError(f"{folder}/adapter_config.json cannot be read ({err}); fine-tune again") from None
    if not isinstance(config, dict) or config.get("format") != "tensorpeft-adapter":
        raise WorkerError(f"{folder}/adapter_config.json is not a TensorPEFT adapter; choose another folder")
    return config


def copy_adapter(source: str, target: str) -> list[str]:
    """Copy an adapter (and its training record, not the checkpoints) to ``target``; returns the files copied."""
    check_adapter_folder(source)
    if os.path.abspath(source) == os.path.abspath(target):
        raise WorkerError(f"{target}: this is already the adapter folder; choose another folder to save a copy")
    os.makedirs(target, exist_ok=True)
    copied = []
    for name in ADAPTER_FILES + ADAPTER_EXTRAS:
        path = os.path.join(source, name)
        if os.path.isfile(path):
            shutil.copy2(path, os.path.join(target, name))
            copied.append(name)
    return copied


#: packages that Slicer ships (scipy since 5.x) or that come from its PyTorch extension: pinned, never replaced by pip
SHIPPED_PACKAGES = ("numpy", "SimpleITK", "scipy", "torch")


def read_requirements(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [line.split("#")[0].strip() for line in handle if line.split("#")[0].strip()
                and not line.strip().startswith("-")]


def missing_requirements(requirements: Sequence[str]) -> list[str]:
    """Requirement strings not satisfied in this Python (checked with importlib.metadata; no subprocess)."""
    from importlib import metadata

    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - Slicer and pip environments have packaging
        Requirement = None  # type: ignore[assignment]
    missing = []
    for text in requirements:
        if Requirement is not None:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate():
                continue
            name, spec = req.name, req.specifier
        else:
            name, spec = text.split(">")[0].split("=")[0].split("<")[0].strip(), None
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(text)
            continue
        if spec is not None and not spec.contains(version, prereleases=True):
            missing.append(text)
    return missing


def shipped_constraints() -> list[str]:
    """``name==version`` for each installed shipped package: a pip constraints file that forbids replacing them."""
    from importlib import metadata

    lines = []
    for name in SHIPPED_PACKAGES:
        try:
            lines.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            pass
    return lines


def worker_environment(library_parent: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for the worker: ``library_parent`` (the folder holding TensorPEFTLib/) first on PYTHONPATH,
    unbuffered output, and torch's thread pools sized by the CLI rather than by the environment."""
    env = dict(os.environ if base is None else base)
    paths = [library_parent] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != library_parent]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return env


# --------------------------------------------------------------------------------------------- device probe


def device_report() -> dict[str, Any]:
    """What torch in this Python sees. Run in the worker (``python -m TensorPEFTLib.worker device``)."""
    report: dict[str, Any] = {"torch": None, "cuda": False, "gpus": [], "mps": False}
    try:
        import torch
    except ImportError as err:
        report["error"] = f"PyTorch is not installed ({err}); click 'Install dependencies'"
        return report
    report["torch"] = torch.__version__
    report["cuda_build"] = torch.version.cuda
    report["cuda"] = bool(torch.cuda.is_available())
    if report["cuda"]:
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            report["gpus"].append({"name": props.name, "memory_gb": round(props.total_memory / 2**30, 1)})
    mps = getattr(torch.backends, "mps", None)
    report["mps"] = bool(mps is not None and mps.is_available())
    report["cpu_cores"] = os.cpu_count()
    return report


def describe_device(report: dict[str, Any], choice: str = "auto") -> tuple[str, bool]:
    """(one line for the panel, whether training would run on the CPU) for a :func:`device_report`."""
    if report.get("error"):
        return report["error"], True
    gpus = report.get("gpus") or []
    if choice == "CPU":
        return f"CPU ({report.get('cpu_cores') or '?'} cores), chosen", True
    if gpus:
        first = gpus[0]
        return f"GPU: {first['name']} ({first['memory_gb']:.1f} GiB), torch {report.get('torch')}", False
    if report.get("mps") and choice == "auto":
        return f"Apple GPU (MPS), torch {report.get('torch')}", False
    build = report.get("cuda_build")
    why = ("this torch build has no CUDA support: reinstall PyTorch from the PyTorch Utils module with a CUDA backend"
           if not build else "no CUDA GPU visible (driver?)")
    if choice == "GPU":
        return f"GPU chosen but not available — {why}", True
    return f"CPU only ({report.get('cpu_cores') or '?'} cores) — {why}", True


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["device"]:
        print(json.dumps(device_report()))
        return 0
    print("usage: python -m TensorPEFTLib.worker device", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
