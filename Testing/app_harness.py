"""Start ``tensorpeft app`` as a user does (a separate process on a free localhost port) and tell why it cannot run
here when it cannot: the app extra, an EGL library for offscreen rendering, Chromium for the browser tests."""

from __future__ import annotations

import ctypes.util
import os
import re
import socket
import subprocess
import sys
import time
from importlib.util import find_spec
from typing import List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def app_missing() -> Optional[str]:
    """Why the app cannot start here (None when it can)."""
    missing = [name for name in ("trame", "trame_slicer", "slicer", "websockets") if find_spec(name) is None]
    if missing:
        return f"the app extra is not installed ({', '.join(missing)} missing): pip install -e '.[app]'"
    if not os.environ.get("DISPLAY") and ctypes.util.find_library("EGL") is None:
        return "no EGL library for offscreen rendering (Debian: apt-get install libegl1 libegl-mesa0)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RunningApp:
    """``python -m TensorPEFTLib.cli app ...`` until :meth:`stop`; ``url`` is what it printed."""

    def __init__(self, data_root: str, *extra: str, host: str = "127.0.0.1", timeout: float = 120) -> None:
        self.port = free_port()
        argv = [sys.executable, "-m", "TensorPEFTLib.cli", "app", "--data-root", data_root, "--host", host,
                "--port", str(self.port), *extra]
        env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
        self.started = time.monotonic()
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                        cwd=REPO, start_new_session=True)
        self.output: List[str] = []
        self.url = ""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                if self.process.poll() is not None:
                    break
                continue
            self.output.append(line)
            match = re.search(r"TensorPEFT app: (\S+)", line)
            if match:
                self.url = match.group(1).replace("localhost", "127.0.0.1")
                break
        self.startup_seconds = time.monotonic() - self.started
        if not self.url:
            self.stop()
            raise RuntimeError("the app did not start:\n" + "".join(self.output[-30:]))
        # keep reading its output so a full pipe never blocks the server
        import threading

        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for line in self.process.stdout:
            self.output.append(line)

    def rss_mb(self) -> float:
        with open(f"/proc/{self.process.pid}/status", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, 15)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, 9)
                self.process.wait(5)
