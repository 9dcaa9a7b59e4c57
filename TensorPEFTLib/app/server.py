"""``tensorpeft app``: build the trame server (views, page, workflow session, access check) and serve it.

The app process never imports torch: jobs run in worker processes (``python -m TensorPEFTLib.cli ...``), polled
here every 0.2 s from the server's event loop, so the page stays responsive while a job runs.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any, Callable, Optional

POLL_SECONDS = 0.2


class AppError(ValueError):
    """A problem with the app's own options (one line naming the option)."""


def missing_app_dependencies() -> Optional[str]:
    """One line saying what to install, or None when the app can start."""
    from importlib.util import find_spec

    missing = [name for name in ("trame", "trame_slicer", "trame_vuetify", "slicer") if find_spec(name) is None]
    if missing:
        return (f"the browser app needs {', '.join(missing)}: pip install 'tensorpeft[app]' "
                "(trame-slicer with Slicer-core; Linux x86-64, Windows AMD64 or macOS arm64, Python >= 3.10)")
    return None


def build_app(data_root: str, *, host: str = "127.0.0.1", port: int = 8080, token: Optional[str] = None,
              worker_threads: int = 0, server_name: Optional[str] = None) -> Any:
    """The configured trame server and its session (not started)."""
    from .data_root import DataRoot

    if not os.path.isdir(data_root):
        raise AppError(f"--data-root {data_root}: no such folder; choose the folder that holds your scans")
    problem = missing_app_dependencies()
    if problem:
        raise AppError(problem)
    from .viewer import use_offscreen_egl

    use_offscreen_egl()
    from trame.app import get_server

    from . import access
    from .page import build_page
    from .session import AppSession

    server = get_server(server_name or "tensorpeft", client_type="vue3")
    server.state["trame__title"] = "TensorPEFT"
    access.install(server, token)
    from .viewer import SceneViewer

    viewer = SceneViewer(server)
    session = AppSession(DataRoot(data_root), server.state, viewer, worker_threads=worker_threads)
    ctrl = server.controller
    ctrl.refresh_folders = session.refresh_folders
    ctrl.open_folder = lambda folder: session.open_folder(folder) if folder is not None else None
    ctrl.select_case = lambda index: session.select_case(index) if index is not None else None
    ctrl.set_kind = session.set_kind
    ctrl.refresh_estimates = session.refresh_estimates

    def with_form(action: Callable[[], Any]) -> Callable[..., Any]:
        def act(form: Any = None) -> Any:  # the page's fields as they were at the click (session.take_form)
            session.take_form(form)
            return action()

        return act

    ctrl.finetune = with_form(session.finetune)
    ctrl.resume = with_form(lambda: session.finetune(resume=True))
    ctrl.cancel = session.cancel
    ctrl.segment = with_form(session.segment)
    ctrl.synthesize = with_form(session.synthesize)
    ctrl.show_synthesized = lambda index: session.show_synthesized(index) if index is not None else None
    ctrl.save_adapter = with_form(lambda: session.save_adapter(server.state["save_to"]))
    ctrl.load_adapter = with_form(lambda: session.load_adapter(server.state["adapter_to_load"]))
    ctrl.list_adapters = lambda: server.state.update({"adapter_folders": session.adapter_folders()})
    build_page(server, viewer, session)

    # a state listener, not the fields' change events: those reach the server before the new value does
    @server.state.change("model", "method", "rank", "steps", "device", "labels")
    def _estimates(**_: Any) -> None:
        session.refresh_estimates()

    async def poll_forever() -> None:
        while True:
            session.poll()
            with server.state:  # push what the callbacks changed to the page
                pass
            await asyncio.sleep(POLL_SECONDS)

    def started(**_: Any) -> None:
        asyncio.get_event_loop().create_task(poll_forever())
        session.refresh_estimates()
        server.state.flush()

    ctrl.on_server_ready.add(started)
    ctrl.on_server_exited.add(lambda **_: session.stop())
    return server, session


def run(data_root: str, host: str = "127.0.0.1", port: int = 8080, token: Optional[str] = None,
        require_token: bool = False, worker_threads: int = 0) -> int:
    from .access import access_token, is_loopback

    expected = access_token(host, token, require=require_token)
    server, session = build_app(data_root, host=host, port=port, token=expected, worker_threads=worker_threads)
    import atexit

    atexit.register(session.stop)  # stopped app: its workers (own process groups) are asked to stop too

    def announce(**_: Any) -> None:  # once listening: with --port 0 only then is the port known
        address = f"http://{'localhost' if is_loopback(host) else host}:{server.port}/"
        if expected:
            address += f"?token={expected}"
        print(f"TensorPEFT app: {address}  (data root {os.path.realpath(data_root)}; Ctrl-C stops it)", flush=True)
        if expected and token is None:
            print("  the token above was generated for this run; share the address only with your users", flush=True)

    server.controller.on_server_ready.add(announce)
    server.start(host=host, port=port, open_browser=False, show_connection_info=False, timeout=0)
    return 0


if __name__ == "__main__":  # pragma: no cover - `tensorpeft app` is the entry point
    sys.exit(run(sys.argv[1] if len(sys.argv) > 1 else "."))
