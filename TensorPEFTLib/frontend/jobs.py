"""Worker processes a GUI starts, follows and stops without ever blocking its event loop.

:class:`WorkerJob` owns one child process (:class:`PopenProcess`, or any object with the five methods of
:class:`ProcessLike`: tests pass a fake). The GUI calls :meth:`WorkerJob.poll` from a timer on its main thread;
reading happens in background threads. :meth:`WorkerJob.cancel` asks the process tree to stop (SIGTERM: the trainer
finishes its step and writes a checkpoint) and kills the tree if it is still alive after a grace period.
:class:`JobResult` says how it ended, with one line for people and the full log.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, Sequence

from ..engine.events import EXIT_CANCELLED
from .progress import Progress, parse_event_line


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

    def wait(self, timeout: float, interval: float = 0.05, idle: Callable[[], Any] | None = None) -> JobResult | None:
        """Poll until the job ends or ``timeout`` seconds pass (scripts, self-tests; the GUI polls from a timer).
        ``idle`` runs between polls (e.g. the GUI's event loop, so it stays responsive)."""
        deadline = time.monotonic() + timeout
        while self.poll() and time.monotonic() < deadline:
            if idle is not None:
                idle()
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

