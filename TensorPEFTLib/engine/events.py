"""Progress for people (a tqdm bar with loss, metric and ETA) or for programs (JSON lines, ``--events -``).

Every JSON event has an ``"event"`` key: ``start``, ``step``, ``eval``, ``checkpoint``, ``done`` or ``error``, plus
``time`` (seconds since the epoch). The Slicer module reads these from the worker's stdout.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

EVENT_KINDS = ("start", "step", "eval", "checkpoint", "done", "error")
#: the CLI's exit status after a cancelled fine-tune (SIGINT's shell convention); a front-end tells it from a failure
EXIT_CANCELLED = 130


class Events:
    """Sink for progress. ``target``: None (human: bar + messages on stderr), ``"-"`` (JSON lines on stdout) or a
    file path (JSON lines appended there, bar on stderr)."""

    def __init__(self, target: str | None = None, quiet: bool = False) -> None:
        self.json_stream: IO[str] | None = None
        self._owned = False
        self.silent = False  # see silent()
        if target == "-":
            self.json_stream = sys.stdout
        elif target:
            self.json_stream = open(target, "a", encoding="utf-8")
            self._owned = True
        self.quiet = quiet
        self._bar = None

    @classmethod
    def silent_sink(cls) -> "Events":
        """Events that go nowhere, warnings included: what ranks other than 0 of a torchrun job report to (rank 0
        speaks for the job, so 8 ranks do not print every line 8 times or append to one events file together)."""
        events = cls(None, quiet=True)
        events.silent = True
        return events

    @property
    def human(self) -> bool:
        return self.json_stream is not sys.stdout and not self.quiet

    def emit(self, event: str, **fields: Any) -> None:
        if event not in EVENT_KINDS:
            raise ValueError(f"unknown event {event!r}")
        if self.json_stream is not None:
            record = {"event": event, "time": round(time.time(), 3), **fields}
            self.json_stream.write(json.dumps(record, default=_jsonable) + "\n")
            self.json_stream.flush()

    def warn(self, text: str) -> None:
        """A warning: shown on stderr even with ``--quiet`` or ``--events -`` (stdout stays JSON)."""
        if self.silent:
            return
        text = f"warning: {text}"
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        """A line for people (stderr), kept clear of the progress bar."""
        if not self.human:
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ progress bar
    def start_bar(self, total: int, desc: str, initial: int = 0, unit: str = "step") -> None:
        if not self.human:
            return
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)

    def update_bar(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is not None:
            if postfix:
                self._bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}, refresh=False)
            self._bar.update(n)

    def close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def close(self) -> None:
        self.close_bar()
        if self._owned and self.json_stream is not None:
            self.json_stream.close()
            self.json_stream = None


def _jsonable(value: Any) -> Any:
    try:
        import numpy as np

        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, np.ndarray):
            return value.tolist()
    except ImportError:  # pragma: no cover
        pass
    return str(value)
