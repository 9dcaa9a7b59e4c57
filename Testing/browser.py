"""Headless Chromium driven over the DevTools protocol: the system's ``chromium`` (no browser download), one
websocket (``websockets``' sync client), the handful of commands the app tests need: open a page, run JavaScript,
wait for a condition, click, take a PNG screenshot.

``--screenshot`` on the command line alone captures the page before trame's websocket connects ("Loading…"), so
the tests wait on the page's own state first.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from typing import Any, Callable, Optional

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> Optional[str]:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    pass


class Browser:
    def __init__(self, width: int = 1500, height: int = 950, executable: Optional[str] = None) -> None:
        from websockets.sync.client import connect

        self.executable = executable or find_chromium()
        if self.executable is None:
            raise BrowserError("no chromium on PATH")
        self.profile = tempfile.mkdtemp(prefix="tp-chromium-")
        # --no-sandbox: CI containers run as root, where Chromium's sandbox refuses to start
        argv = [self.executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                "--disable-extensions", "--disable-background-networking", "--disable-dev-shm-usage",
                "--disable-breakpad",  # (--disable-crashpad-for-testing breaks navigation: ERR_ABORTED)
                "--remote-debugging-port=0", f"--user-data-dir={self.profile}", f"--window-size={width},{height}",
                "about:blank"]
        # its own process group: close() ends the browser with every helper process it started
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                        start_new_session=True)
        port = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and port is None:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                break
            match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if match:
                port = int(match.group(1))
        if port is None:
            self.close()
            raise BrowserError("chromium did not open its DevTools port")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            pages = [t for t in json.load(answer) if t.get("type") == "page"]
        self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=64 * 2**20, open_timeout=10)
        self._id = 0
        self.send("Page.enable")
        self.send("Runtime.enable")
        self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def send(self, method: str, **params: Any) -> dict:
        self._id += 1
        ident = self._id
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                message = json.loads(self.ws.recv(timeout=60))
            except TimeoutError:
                raise BrowserError(f"{method}: no answer within 60 s") from None
            if message.get("id") == ident:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})
        raise BrowserError(f"{method}: no answer")

    def open(self, url: str) -> None:
        self.send("Page.navigate", url=url)

    def js(self, expression: str) -> Any:
        answer = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in answer:
            raise BrowserError(f"{expression[:80]}: {answer['exceptionDetails'].get('text')} "
                               f"{answer['exceptionDetails'].get('exception', {}).get('description', '')}")
        return answer.get("result", {}).get("value")

    def wait(self, expression: str, timeout: float, what: str = "", interval: float = 0.25) -> Any:
        deadline = time.monotonic() + timeout
        value = None
        while time.monotonic() < deadline:
            try:
                value = self.js(expression)
            except BrowserError:
                value = None
            if value:
                return value
            time.sleep(interval)
        raise BrowserError(f"timed out after {timeout:g} s waiting for {what or expression}")

    def state(self, name: str) -> Any:
        """A trame state value as the page holds it."""
        return self.js(f"window.trame && window.trame.state.get({json.dumps(name)})")

    def click(self, selector: str) -> None:
        found = self.js(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                        "if (!e) return false; e.click(); return true; })()")
        if not found:
            raise BrowserError(f"nothing to click at {selector}")

    def choose(self, select_id: str, text: str, timeout: float = 10) -> None:
        """Pick ``text`` in the Vuetify select whose input has ``select_id``, as a user does: open its menu, click."""
        opened = self.js(f"(() => {{ const i = document.getElementById({json.dumps(select_id)}); if (!i) return false;"
                         " i.closest('.v-field').dispatchEvent(new MouseEvent('mousedown', {bubbles: true}));"
                         " return true; })()")
        if not opened:
            raise BrowserError(f"no select #{select_id} on the page")
        item = (f"Array.from(document.querySelectorAll('.v-overlay--active .v-list-item')).find("
                f"e => e.querySelector('.v-list-item-title') && "
                f"e.querySelector('.v-list-item-title').innerText.trim() == {json.dumps(text)})")
        self.wait(f"!!{item}", timeout, f"{text!r} in the list of #{select_id}")
        self.js(f"{item}.click()")

    def wait_for_text(self, selector: str, needle: str, timeout: float) -> str:
        return self.wait(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); "
                         f"return e && e.innerText.includes({json.dumps(needle)}) ? e.innerText : ''; }})()",
                         timeout, f"{needle!r} in {selector}")

    def screenshot(self, path: str, selector: Optional[str] = None) -> str:
        params: dict = {"format": "png"}
        if selector:
            box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                          " return [r.x, r.y, r.width, r.height]; })()")
            params["clip"] = {"x": box[0], "y": box[1], "width": box[2], "height": box[3], "scale": 1}
        data = self.send("Page.captureScreenshot", **params)["data"]
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001 - closing: the browser may be gone already
            pass
        import signal

        for sig in (signal.SIGTERM, signal.SIGKILL):  # then helpers that outlived it, or a browser that hung
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


def poll_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.25)
    raise BrowserError(f"timed out after {timeout:g} s waiting for {what}")
