"""The two questions a panel asks the worker's Python in the background: which device torch sees, and how many
parameters the chosen method trains. Each answer arrives through a callback as one line of text; a newer count
question replaces the one still running. ``start_job(args, name, raw, on_finished)`` starts a :class:`WorkerJob`."""

from __future__ import annotations

import json
from typing import Any, Callable, Dict, Optional

from .device import auto_steps, cpu_warning, describe_device
from .jobs import JobResult, WorkerJob
from .requests import ModelChoice, ParameterCountRequest

DEVICE_PROBE = ["-m", "TensorPEFTLib.frontend.device"]


class BackgroundProbes:
    def __init__(self, start_job: Callable[..., WorkerJob], show_device: Callable[[str, str], None],
                 show_count: Callable[[str], None]) -> None:
        self.start_job, self.show_device, self.show_count = start_job, show_device, show_count
        self.device_job: Optional[WorkerJob] = None
        self.count_job: Optional[WorkerJob] = None
        self.device_report: Optional[Dict[str, Any]] = None
        self.counted_args: Optional[list] = None  # the question the count on show (or on its way) answers
        self.question: Optional[tuple] = None  # the latest describe() arguments (None: the device line never asked)

    @property
    def jobs(self) -> list:
        return [job for job in (self.device_job, self.count_job) if job is not None and job.running]

    def poll(self) -> bool:
        """Poll the running probes; True while one still runs."""
        return any([job.poll() for job in self.jobs])

    def stop(self) -> None:
        for job in self.jobs:
            job.process.kill_tree()

    def forget_device(self) -> None:
        """After an install: the next :meth:`describe` asks again (another torch may see a GPU now)."""
        self.device_report = None

    def describe(self, request: ModelChoice, device: str, steps: int, patch_size: int, structures: int = 1) -> None:
        """Show the device line and, when training would run on the CPU, how long ``steps`` steps take there
        (``steps`` 0: finetune's default for labels of ``structures`` structures)."""
        self.question = (request, device, steps, patch_size, structures)  # the answer shows the latest question
        if self.device_report is None:
            if self.device_job is None or not self.device_job.running:
                self.device_job = self.start_job(DEVICE_PROBE, name="device check", raw=True,
                                                 on_finished=self._device_answer)
            return
        text, on_cpu = describe_device(self.device_report, device)
        self.show_device(text, cpu_warning(request.preset, steps or auto_steps(request.preset, structures),
                                           patch_size or None) if on_cpu else "")

    def _device_answer(self, result: JobResult) -> None:
        try:
            self.device_report = json.loads(self.device_job.stdout_lines[-1]) if result.ok else {"error": result.message}
        except (AttributeError, IndexError, ValueError):
            self.device_report = {"error": "could not read the device report; see the log"}
        self.describe(*self.question)

    def count(self, request: ParameterCountRequest) -> None:
        """Count the trainable parameters of ``request`` in a worker (it builds the model: torch). The same question
        as the last one (another field changed, e.g. steps) is not asked again."""
        if not request.isValid():
            self.counted_args = None
            self.show_count(request.problems()[0])
            return
        if request.asArgList() == self.counted_args:
            return
        if self.count_job is not None and self.count_job.running:
            self.count_job.process.kill_tree()  # a newer question replaces it
        self.counted_args = request.asArgList()
        self.show_count("counting ...")
        self.count_job = self.start_job(request.asArgList(), name="parameter count", raw=False,
                                        on_finished=lambda result: self._count_answer(result, request.counted))

    def _count_answer(self, result: JobResult, counted: str) -> None:
        if result.status == "cancelled" or self.count_job is None or self.count_job.result is not result:
            return  # replaced by a newer question
        try:
            report = json.loads(self.count_job.stdout_text()) if result.ok else None
        except ValueError:
            report = None
        if report is None:
            self.counted_args = None  # ask again next time
            self.show_count(result.message.replace("parameter count failed: ", "") if not result.ok
                            else "could not read the count; see the log")
            return
        self.show_count(f"{report['trainable']:,} of {report['base_total']:,} parameters "
                        f"({report['trainable_percent']:.2f}%) on {counted}; adapter {report['adapter']:,}")
