"""The torch-free front-end layer every GUI uses (the 3D Slicer module now, a browser app next).

- :mod:`.requests` — requests that validate themselves and build their own ``tensorpeft`` command line
  (``FinetuneRequest``, ``SegmentRequest``, ``SynthesizeRequest``, ``ParameterCountRequest``), named like the
  Slicer parameter node's fields.
- :mod:`.jobs`, :mod:`.progress` — worker processes (start, poll, cancel, kill the tree) and their JSON events.
- :mod:`.environment`, :mod:`.device`, :mod:`.slicer_setup` — dependency and torch checks, the device probe, CPU
  time estimates, installing into Slicer's Python.
- :mod:`.adapter_folders` — finished adapters on disk.
- :mod:`.scene`, :mod:`.segmentations` — MRML scene I/O (need ``slicer``); :mod:`.synthetic_scene` — synthetic
  oblique cases for self-tests.

Constants are imported from their homes (the adapter catalog, the preset table, the engine's event kinds), never
copied. Names load on first use (PEP 562), so importing this package loads nothing but itself; this code also runs
on Python 3.9 (Slicer 5.8's).
"""

from __future__ import annotations

from .._lazy import lazy_exports


_HOME = {
    "RequestError": "requests", "FinetuneRequest": "requests", "SegmentRequest": "requests",
    "SynthesizeRequest": "requests", "ParameterCountRequest": "requests", "MODEL_KINDS": "requests",
    "DEVICE_CHOICES": "requests", "cli_command": "requests", "demo_model": "requests",
    "method_summaries": "requests",
    "Progress": "progress", "parse_event_line": "progress", "format_duration": "progress",
    "WorkerJob": "jobs", "JobResult": "jobs", "PopenProcess": "jobs", "ProcessLike": "jobs",
    "TORCH_REQUIREMENT": "environment", "missing_dependencies": "environment", "worker_environment": "environment",
    "describe_device": "device", "cpu_warning": "device", "estimate_cpu_seconds": "device",
    "install_dependencies": "slicer_setup",
    "check_adapter_folder": "adapter_folders", "check_adapter_for": "adapter_folders",
    "copy_adapter": "adapter_folders",
}

__all__ = sorted(_HOME)


__getattr__, __dir__ = lazy_exports(__name__, _HOME, globals())
