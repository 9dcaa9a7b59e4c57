"""The training loop shared by segmentation and synthesis fine-tuning.

Reproducible and resumable by construction: every step draws its data and augmentation from a seed that depends
only on (seed, step), the learning rate is a function of the step, and the checkpoint holds the adapter, the
optimiser state and the history. A resumed run therefore ends with exactly the weights of an uninterrupted one
(CPU; GPU kernels are not bit-deterministic).

Output folder layout (``OUT``)::

    OUT/adapter_config.json, OUT/adapter.safetensors   the adapter to use, written only when the run finishes:
                                                       best validation score, else the last
    OUT/best/                                          the best adapter so far (during a run; kept after it)
    OUT/last/                                          the adapter after the final step
    OUT/checkpoint/                                    resume state (adapter + optimiser + step), written atomically
    OUT/.tensorpeft.lock                               while a process writes the run (see ``outputs.RunLock``)

A cancelled or failed run never leaves an adapter at the top level, so whatever sits there is a finished run's.
    OUT/history.json, OUT/metrics.csv                  losses, learning rates, validation scores per step
    OUT/report.png                                     curves and a look at the data (by the task)

Data-parallel (``torchrun``, see :mod:`.distributed`): every rank runs this loop on its slice of each step's global
batch through a ``DistributedDataParallel`` wrapper; rank 0 alone validates and writes every file above (the others
write nothing), the ranks agree after each step on the global batch's loss and on whether to stop, and a rank that
dies stops the others with a line saying which checkpoint ``--resume`` continues from.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Protocol, Sequence

import torch
from torch import nn

from ..adapters import save_adapter, trainable_parameters
from ..atomic import copy_atomically, write_folder_atomically, write_text_atomically
from .distributed import SINGLE, Distributed, data_parallel, is_lost_peer, unused_parameters
from .events import Events
from .outputs import disk_full_message, folder_bytes, is_disk_full, torch_bytes, write_bytes
from .runtime import EngineError, Runtime, out_of_memory_as_error, peak_memory_gb, step_seed

CHECKPOINT_DIR = "checkpoint"
LAST_DIR = "last"
BEST_DIR = "best"
STATE_FILE = "trainer_state.pt"


@dataclass
class TrainSettings:
    """Optimisation settings. Defaults follow the LoRA-PT recipe (Adam, lr 1e-3, poly 0.9, weight decay 1e-5).
    ``finetune`` chooses ``steps``, ``lr``, ``eval_every`` and ``checkpoint_every`` left at None for the task, the
    method and the number of subjects (``jobs.default_steps`` / ``default_lr``); the Trainer itself needs them set."""

    steps: int | None = 300
    lr: float | None = 1e-3
    weight_decay: float = 1e-5
    optimizer: str = "adam"  # adam | adamw
    poly_power: float = 0.9
    accumulate: int = 1
    eval_every: int | None = 50
    checkpoint_every: int | None = 50
    grad_clip: float | None = 1.0
    seed: int = 0

    def validate(self) -> None:
        if self.steps is None or self.lr is None or self.eval_every is None or self.checkpoint_every is None:
            raise EngineError("TrainSettings: steps, lr, eval_every and checkpoint_every must be set (finetune "
                              "chooses them when left None)")
        if self.steps < 1:
            raise EngineError(f"--steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise EngineError(f"--lr must be > 0, got {self.lr}")
        if self.optimizer not in ("adam", "adamw"):
            raise EngineError(f"--optimizer {self.optimizer!r}: choose adam or adamw")
        if self.accumulate < 1:
            raise EngineError(f"--accumulate must be >= 1, got {self.accumulate}")

    def lr_at(self, step: int) -> float:
        """Polynomial decay from ``lr`` to 0 over ``steps`` (a function of the step alone, so resume-safe)."""
        return self.lr * (1.0 - step / self.steps) ** self.poly_power


class Task(Protocol):
    """What the loop needs from a fine-tuning task (see segmentation.py / synthesis.py)."""

    kind: str
    metric: str  # the validation score's name, e.g. "dice"
    higher_is_better: bool

    def batch(self, step: int, micro: int, seed: int) -> Any: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...

    def evaluate(self, model: nn.Module) -> dict[str, float] | None: ...

    def report(self, model: nn.Module, out: str, history: dict[str, Any]) -> list[str]: ...


class StepHook(Protocol):
    """Called after each optimiser step (SeLoRA's rank growth). May return fields for the step event."""

    def after_step(self, step: int, batch: Any, loss_fn: Callable[[], torch.Tensor]) -> dict[str, Any] | None: ...


@dataclass
class TrainResult:
    status: str  # "completed" | "cancelled"
    step: int
    out: str
    best: float | None
    seconds: float
    history: dict[str, Any] = field(default_factory=dict)


class CancelToken:
    """Set by SIGINT/SIGTERM (first signal: finish the step, checkpoint, stop; second SIGINT: stop now)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "CancelToken":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def make_optimizer(params: list[nn.Parameter], settings: TrainSettings) -> torch.optim.Optimizer:
    if not params:
        raise EngineError("nothing to train: the adapter configuration leaves no trainable parameter")
    cls = torch.optim.AdamW if settings.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=settings.lr, weight_decay=settings.weight_decay)


def structure_scores_text(structures: dict[str, float], shown: int = 4) -> str:
    """"; per structure: 17 0.81, 53 0.79" (up to ``shown`` structures, in label order), or the lowest ``shown - 1`` of
    more: a mean over ten structures hides one at 0, and a user should see which."""
    if len(structures) < 2:
        return ""
    if len(structures) <= shown:
        return "; per structure: " + ", ".join(f"{name} {score:.2f}" for name, score in structures.items())
    lowest = sorted(structures.items(), key=lambda item: item[1])[: shown - 1]
    return f"; lowest of {len(structures)}: " + ", ".join(f"{name} {score:.2f}" for name, score in lowest)


#: a structure validating below this Dice with the adapter a run keeps was not found: with ten structures at once the
#: hippocampi validated 0.00 until step 1000 and 0.6-0.7 at 2500 (benchmarks/results/own_labels_subcortical_*)
UNLEARNED_DICE = 0.1


def unlearned_structures_warning(evals: Sequence[Mapping[str, Any]], steps: int, shown: int = 4) -> str | None:
    """What to tell a user whose finished segmentation run kept an adapter that validates below :data:`UNLEARNED_DICE`
    on some structure (``evals``: the run's validation rows, ``steps``: its length); None when every structure was
    found. A mean Dice of 0.6 over ten structures reads as a working adapter while two of them come out empty."""
    kept = [row for row in evals if row.get("dice") is not None and row.get("best") == row.get("dice")]
    if not kept:
        return None
    row = kept[-1]
    structures = {str(k): float(v) for k, v in (row.get("structures") or {"the structure": row["dice"]}).items()}
    missing = [(name, score) for name, score in structures.items() if score < UNLEARNED_DICE]
    if not missing:
        return None
    named = ", ".join(f"{name} ({score:.2f})" for name, score in missing[:shown])
    if len(missing) > shown:
        named += f" and {len(missing) - shown} more"
    several = f" ({len(missing)} of {len(structures)} structures)" if len(structures) > 1 else ""
    return (f"the adapter kept (step {row['step']}) finds little of {named}{several} on the validation cases; a structure "
            f"the model has not learned before can take longer, more so among several: run again with --steps "
            f"{2 * int(steps)} --overwrite, and check that the labels mark each structure the same way in every case")


def _atomic_text(path: str, text: str) -> None:
    """Write a text file whole or not at all."""
    write_text_atomically(path, text)


def checkpoint_path(out: str) -> str | None:
    """The resumable checkpoint in ``out`` (falls back to the previous one if a swap was interrupted)."""
    for name in (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old"):
        path = os.path.join(out, name)
        if os.path.isfile(os.path.join(path, STATE_FILE)):
            return path
    return None


def load_trainer_state(path: str) -> dict[str, Any]:
    try:
        return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable state is the same user-facing problem
        raise EngineError(f"{path}: checkpoint cannot be read ({type(err).__name__}); start again without --resume") from None


class Trainer:
    def __init__(self, model: nn.Module, task: Task, settings: TrainSettings, out: str, runtime: Runtime,
                 events: Events, hooks: list[StepHook] | None = None, extra_meta: dict[str, Any] | None = None,
                 dist: Distributed | None = None) -> None:
        settings.validate()
        self.model, self.task, self.settings, self.out = model, task, settings, os.fspath(out)
        self.dist = dist or SINGLE
        #: what the training step runs: ``model`` itself, or its DDP wrapper in a data-parallel job (built by run())
        self.train_model: nn.Module = model
        self._wrapped: list[int] = []
        self._unused: list[str] | None = None  # trainable parameters no forward pass uses (data-parallel only)
        self.runtime, self.events, self.hooks = runtime, events, list(hooks or [])
        self.extra_meta = extra_meta or {}
        self.optimizer = make_optimizer(trainable_parameters(model), settings)
        self.scaler = torch.amp.GradScaler("cuda") if runtime.amp_dtype == torch.float16 else None
        self.step = 0
        self.best: float | None = None
        self.history: dict[str, Any] = {"steps": [], "evals": [], "settings": asdict(settings), "runtime": runtime.describe()}

    # ------------------------------------------------------------------ persistence
    def _meta(self) -> dict[str, Any]:
        return {**self.extra_meta, "trained_steps": self.step, "best_" + self.task.metric: self.best}

    def save_checkpoint(self) -> str:
        path = os.path.join(self.out, CHECKPOINT_DIR)

        def write(folder: str) -> None:
            save_adapter(self.model, folder, extra=self._meta())
            state = {"step": self.step, "best": self.best, "optimizer": self.optimizer.state_dict(),
                     "history": json.dumps(self.history),
                     "scaler": self.scaler.state_dict() if self.scaler else {}}
            write_bytes(os.path.join(folder, STATE_FILE), torch_bytes(state))

        write_folder_atomically(path, write)
        self.events.emit("checkpoint", step=self.step, path=path)
        return path

    def disk_full_error(self) -> EngineError:
        """What to tell the user when a write into the run folder found the disk full: the folder, about how much
        a checkpoint needs, and which checkpoint is still whole (every write is atomic, so one always is, or none
        was written yet)."""
        kept = checkpoint_path(self.out)
        previous = f"the checkpoint of step {self._checkpoint_step(kept)} is intact" if kept else "no checkpoint was written yet"
        return EngineError(f"{disk_full_message(self.out, folder_bytes(kept) if kept else None)} and continue with "
                           f"--resume ({previous})")

    @staticmethod
    def _checkpoint_step(path: str | None) -> int | str:
        try:
            return int(load_trainer_state(path)["step"]) if path else "?"
        except (EngineError, KeyError, ValueError, TypeError):
            return "?"

    def restore(self, path: str) -> None:
        """Continue from a checkpoint folder. The model must already carry that checkpoint's adapter (load it with
        ``load_adapter`` before building the Trainer, so grown SeLoRA ranks exist when the optimiser is made)."""
        state = load_trainer_state(path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise EngineError(f"{path}: optimiser state does not fit this adapter ({err}); start without --resume") from None
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.best = int(state["step"]), state.get("best")
        self.history = json.loads(state["history"])
        # best/ may have been written after this checkpoint (killed in between): it knows the best score so far
        try:
            with open(os.path.join(self.out, BEST_DIR, "adapter_config.json"), encoding="utf-8") as handle:
                saved = json.load(handle).get("best_" + self.task.metric)
        except (OSError, ValueError, AttributeError):
            saved = None
        if saved is not None and (self.best is None or (saved > self.best if self.task.higher_is_better else saved < self.best)):
            self.best = float(saved)

    def _save_outputs(self, finished: bool) -> None:
        write_folder_atomically(os.path.join(self.out, LAST_DIR), lambda folder: save_adapter(self.model, folder, extra=self._meta()))
        if finished:
            self.publish()
        self.write_history()

    def publish(self) -> None:
        """Put the finished run's adapter at the top of ``out``: the best validated one, else the last. The weights
        are written first and the config last, so an ``adapter_config.json`` at the top always belongs to a whole
        adapter of a finished run."""
        source = os.path.join(self.out, BEST_DIR if self.best is not None else LAST_DIR)
        if not os.path.isfile(os.path.join(source, "adapter_config.json")):
            source = os.path.join(self.out, LAST_DIR)
        for name in ("adapter.safetensors", "adapter_config.json"):
            copy_atomically(os.path.join(source, name), os.path.join(self.out, name))

    def write_history(self) -> None:
        import io

        _atomic_text(os.path.join(self.out, "history.json"), json.dumps(self.history, indent=1))
        evals = {row["step"]: row for row in self.history["evals"]}
        metric = self.task.metric
        column = metric if metric.startswith("val_") else f"val_{metric}"
        table = io.StringIO(newline="")
        writer = csv.writer(table)
        writer.writerow(["step", "loss", "lr", "seconds", column])
        for row in self.history["steps"]:
            val = evals.get(row["step"], {}).get(metric, "")
            writer.writerow([row["step"], f"{row['loss']:.6g}", f"{row['lr']:.6g}", f"{row['seconds']:.3f}", val])
        _atomic_text(os.path.join(self.out, "metrics.csv"), table.getvalue())

    # ------------------------------------------------------------------ loop
    def _evaluate(self) -> None:
        self.model.eval()
        with torch.no_grad(), self.runtime.autocast(), out_of_memory_as_error("validation"):
            scores = self.task.evaluate(self.model)
        self.model.train()
        if not scores:
            return
        value = float(scores[self.task.metric])
        better = self.best is None or (value > self.best if self.task.higher_is_better else value < self.best)
        if better:
            self.best = value
            write_folder_atomically(os.path.join(self.out, BEST_DIR), lambda folder: save_adapter(self.model, folder, extra=self._meta()))
        row = {"step": self.step, **scores, "best": self.best}
        self.history["evals"].append(row)
        self.events.emit("eval", **row)
        self.events.message(f"step {self.step}: validation {self.task.metric} {value:.4f}" + (" (best)" if better else "")
                            + structure_scores_text(scores.get("structures") or {}))

    def _one_step(self) -> tuple[float, Any]:
        settings = self.settings
        lr = settings.lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        batch = None
        for micro in range(settings.accumulate):
            seed = step_seed(settings.seed, self.step, micro)
            # adapter dropout and any torch-side randomness of this micro-step (each rank its own stream)
            torch.manual_seed(step_seed(settings.seed, self.step, micro, self.dist.rank))
            batch = self.task.batch(self.step, micro, seed)
            # DDP exchanges gradients once per optimiser step: not after the micro-batches before the last
            skip_sync = self.dist.active and micro < settings.accumulate - 1
            with self.train_model.no_sync() if skip_sync else contextlib.nullcontext():  # type: ignore[operator]
                with self.runtime.autocast():
                    loss = self.task.loss(self.train_model, batch) / settings.accumulate
                if not torch.isfinite(loss):
                    raise EngineError(f"loss became {loss.item()} at step {self.step}: lower --lr (now {settings.lr:g})")
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            total += float(loss.detach())
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if settings.grad_clip:
            torch.nn.utils.clip_grad_norm_(trainable_parameters(self.model), settings.grad_clip)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, batch

    def _data_parallel(self, init_sync: bool = True) -> None:
        """(Re)build the DDP wrapper over the current trainable parameters: at the start, and after a hook replaced
        parameters (SeLoRA's growth), since DDP registers its parameters once. Every rank must hold the same
        parameters; that is checked first, so a rank that grew differently is named instead of DDP failing on a
        shape mismatch."""
        self.train_model = self.model  # the old wrapper (and its reducer's hooks) goes before the next is built
        if not self.dist.active:
            return
        named = [(name, tuple(p.shape)) for name, p in self.model.named_parameters() if p.requires_grad]
        layouts = self.dist.gather(named)
        if any(layout != layouts[0] for layout in layouts):
            differ = next(r for r, layout in enumerate(layouts) if layout != layouts[0])
            diff = sorted(set(map(str, layouts[differ])) ^ set(map(str, layouts[0])))[:3]
            raise EngineError(f"at step {self.step} rank {differ} holds other trainable parameters than rank 0 "
                              f"({'; '.join(diff)}); the ranks must grow/adapt the same layers")
        if self._unused is None:
            self._unused = self._probe_unused_parameters()
        self.train_model = data_parallel(self.model, self.runtime.device, init_sync=init_sync,
                                         find_unused=bool(self._unused))
        self._wrapped = [id(p) for p in trainable_parameters(self.model)]

    def _probe_unused_parameters(self) -> list[str]:
        """Trainable parameters the loss does not reach, from one forward pass on the first batch (every rank does
        it: the task's loss may exchange statistics). DDP must be told about them, or it waits for their gradients
        forever; they get none in one process either, so the optimiser leaves them alone in both."""
        seed = step_seed(self.settings.seed, self.step, 0)
        batch = self.task.batch(self.step, 0, seed)
        with torch.enable_grad(), self.runtime.autocast():
            loss = self.task.loss(self.model, batch)
        unused = unused_parameters(self.model, loss)
        del loss, batch
        if unused:
            more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
            self.events.message(f"DDP: {len(unused)} trainable tensor(s) take no part in the forward pass "
                                f"({', '.join(unused[:3])}{more}); searching for unused parameters every step")
        return unused

    def _parameters_changed(self) -> bool:
        return [id(p) for p in trainable_parameters(self.model)] != self._wrapped

    def lost_peer_error(self, err: BaseException) -> EngineError:
        """What a rank says when another rank of its job died (killed, crashed, node lost): one line, and how to
        continue."""
        kept = checkpoint_path(self.out)
        previous = (f"the checkpoint of step {self._checkpoint_step(kept)} is intact" if kept else
                    "no checkpoint was written yet")
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        return EngineError(f"another rank of this job stopped during step {self.step + 1} ({type(err).__name__}: "
                           f"{first}); {previous}: run the same torchrun command with --resume")

    def run(self, resume_from: str | None = None) -> TrainResult:
        if self.dist.is_main:
            os.makedirs(self.out, exist_ok=True)
        if resume_from:
            self.restore(resume_from)
        settings, started = self.settings, time.time()
        self.events.emit("start", kind=self.task.kind, steps=settings.steps, step=self.step, out=self.out,
                         resumed=bool(resume_from), metric=self.task.metric, **self.runtime.describe(), **self.extra_meta)
        if self.runtime.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.runtime.device)
        self.model.train()
        self.events.start_bar(settings.steps, f"fine-tuning ({self.extra_meta.get('method', 'adapter')})", initial=self.step)
        try:
            self._data_parallel()
            return self._run(started)
        except OSError as err:
            if not is_disk_full(err):
                raise
            self.events.close_bar()
            raise self.disk_full_error() from None
        except Exception as err:  # noqa: BLE001 - only a lost peer of a data-parallel job is translated
            if not (self.dist.active and is_lost_peer(err)):
                raise
            self.events.close_bar()
            raise self.lost_peer_error(err) from None

    def _run(self, started: float) -> TrainResult:
        settings = self.settings
        recent: list[float] = []
        status = "completed"
        stop = False  # data-parallel: the ranks' common decision (one process: its own cancel request)
        with CancelToken() as cancel, out_of_memory_as_error(f"training step {self.step}"):
            while self.step < settings.steps:
                if stop or (cancel.requested and not self.dist.active):
                    status = "cancelled"
                    break
                tick = time.time()
                loss, batch = self._one_step()
                self.step += 1
                if self.dist.active:
                    # The global batch's loss for the log, and one decision to stop: torchrun signals every rank,
                    # but not within the same step, and a rank that stopped alone would leave the others waiting in
                    # their next all-reduce.
                    loss, stop = self.dist.mean_and_any(loss, cancel.requested, self.runtime.device)
                extra: dict[str, Any] = {}
                for hook in self.hooks:
                    # the hook re-runs the loss on this step's batch (e.g. SeLoRA's Fisher test)
                    def loss_fn(b: Any = batch) -> torch.Tensor:
                        with self.runtime.autocast():
                            return self.task.loss(self.model, b)

                    extra.update(hook.after_step(self.step, batch, loss_fn) or {})
                if self.dist.active and self._parameters_changed():
                    self._data_parallel(init_sync=False)  # SeLoRA grew: DDP must know the new factors
                seconds = time.time() - tick
                recent = (recent + [seconds])[-20:]
                eta = sum(recent) / len(recent) * (settings.steps - self.step)
                lr = settings.lr_at(self.step - 1)
                self.history["steps"].append({"step": self.step, "loss": loss, "lr": lr, "seconds": seconds})
                self.events.emit("step", step=self.step, steps=settings.steps, loss=loss, lr=lr,
                                 seconds=round(seconds, 4), eta_seconds=round(eta, 1), **extra)
                postfix = {"loss": loss}
                if self.best is not None:
                    postfix[self.task.metric] = self.best
                self.events.update_bar(1, **postfix)
                # rank 0 validates and writes; the others go on to the next step and wait for it in its all-reduce
                if self.dist.is_main and (self.step % settings.eval_every == 0 or self.step == settings.steps):
                    self._evaluate()
                if self.dist.is_main and self.step % settings.checkpoint_every == 0 and self.step < settings.steps:
                    self.save_checkpoint()
        self.events.close_bar()
        if self.dist.is_main:
            self.save_checkpoint()
            self._save_outputs(finished=status == "completed")
        self.history["peak_gpu_memory_gb"] = peak_memory_gb(self.runtime.device)
        if self.dist.is_main:
            if status == "completed":
                self.model.eval()
                try:
                    self.history["report"] = self.task.report(self.model, self.out, self.history)
                except Exception as err:  # noqa: BLE001 - a plot must never lose a finished training run
                    self.events.message(f"report not written: {type(err).__name__}: {err}")
                self.write_history()
                if self.task.metric == "dice":
                    warning = unlearned_structures_warning(self.history["evals"], settings.steps)
                    if warning:
                        self.events.warn(warning)
        # No rank leaves before rank 0's files are whole: torchrun stops the other processes as soon as one exits
        # with an error status (a cancelled run's 130), which could cut rank 0's last checkpoint short.
        self.dist.barrier()
        seconds = time.time() - started
        self.events.emit("done", status=status, step=self.step, steps=settings.steps, out=self.out, best=self.best,
                         metric=self.task.metric, seconds=round(seconds, 2),
                         peak_gpu_memory_gb=self.history.get("peak_gpu_memory_gb"))
        return TrainResult(status, self.step, self.out, self.best, seconds, self.history)

