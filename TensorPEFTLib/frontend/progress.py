"""What a running job tells a front-end: ``--events -`` lines parsed, and folded into a progress-bar state.

``parse_event_line`` reads one JSON line (``start``, ``step``, ``eval``, ``checkpoint``, ``done``, ``error``: the
kinds :mod:`TensorPEFTLib.engine.events` writes); :class:`Progress` turns the events into a fraction and a line
such as ``step 12/300 · loss 0.4123 · val Dice 0.812 (best 0.830) · ETA 3 min 20 s``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from ..engine.events import EVENT_KINDS


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
    lowest: tuple[str, float] | None = None  # several structures: the one validating worst (name, Dice)

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
            structures = event.get("structures") or {}
            if len(structures) > 1:  # a mean over ten structures hides one at 0
                name, score = min(structures.items(), key=lambda item: float(item[1]))
                self.lowest = (str(name), float(score))
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
            notes = [f"best {self.best:.3f}"] if self.best is not None and self.best != self.metric else []
            if self.lowest is not None:
                notes.append(f"lowest {self.lowest[0]} {self.lowest[1]:.2f}")
            parts.append(f"{label} {self.metric:.3f}" + (f" ({', '.join(notes)})" if notes else ""))
        if self.status == "running" and self.eta_seconds is not None and self.step < self.steps:
            parts.append(f"ETA {format_duration(self.eta_seconds)}")
        if self.status in ("completed", "cancelled", "failed"):
            parts.append(self.status)
        return " · ".join(parts)

