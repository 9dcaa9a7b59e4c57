"""What the worker's torch sees (GPU name and memory), one line about it for the panel, and how long training on
the CPU would take.

``python -m TensorPEFTLib.frontend.device`` prints :func:`device_report` as JSON; a GUI runs it in the background
so it can show the device without importing torch itself.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Dict, Optional, Sequence, Tuple

from .progress import format_duration

#: CPU seconds per training step measured on a 2-core machine (UNETR forward+backward at batch 1, small DDPM
#: training step): preset → (seconds, voxels of the measured patch, batch of the measurement). unetr-small: `make demo`
#: on 2026-12-02 after the channels-last and cached-crop speed-ups (LoRA-PT r=1, bf16, 2 threads, batch 2 at 64³:
#: 327 s for 1000 steps with 5 validations, median step 0.30 s in its history.json; the earlier 1.0 s at batch 1
#: made the app and the Slicer panel promise 33 minutes for a 7-minute fine-tune)
_CPU_STEP_SECONDS = {
    "unetr-paper": (17.0, 128 ** 3, 1),
    "unetr-small": (0.33, 64 ** 3, 2),
    "ddpm-small": (1.1, 32 ** 3, 1),
    # demo-ldm's TenVOO-Q r=4 fine-tune in `make demo` (2026-12-03, 2 threads, 8 latent channels): 300 steps in 73 s,
    # median step 0.23 s at batch 1, the autoencoder's encoding of the 64x80x64 volume included (the earlier 0.48 s
    # was one shared thread)
    "ddpm-latent-small": (0.24, 64 * 80 * 64, 1),
}
#: the batch finetune trains with unless told otherwise (engine.jobs: segmentation 2, synthesis 1)
_TRAINING_BATCH = {"unetr": 2, "ddpm": 1}


def estimate_cpu_seconds(preset: str, steps: int, patch_size: Optional[int] = None) -> Optional[float]:
    """Rough CPU time of ``steps`` training steps (2 cores; more cores are faster), None if never measured.
    ``patch_size`` (a cube's side) replaces the preset's own training patch."""
    from ..models.presets import PRESETS

    if preset not in _CPU_STEP_SECONDS:
        return None
    seconds, voxels, batch = _CPU_STEP_SECONDS[preset]
    patch = patch_size ** 3 if patch_size else math.prod(PRESETS[preset].patch_size)
    return seconds * (patch / voxels) * _TRAINING_BATCH[preset.split("-")[0]] / batch * steps


def auto_steps(preset: str, structures: int = 1) -> int:
    """The steps ``finetune`` runs on a model of ``preset`` without ``--steps`` (a handful of cases whose labels
    hold ``structures`` structures: more than two take more steps)."""
    from ..adapters.catalog import default_steps
    from ..models.presets import PRESETS

    return default_steps(PRESETS[preset].task if preset in PRESETS else "segmentation", structures=max(1, structures))


def cpu_warning(preset: str, steps: int, patch_size: Optional[int] = None) -> str:
    estimate = estimate_cpu_seconds(preset, steps, patch_size)
    if estimate is None:
        return (f"Training {preset} on the CPU is impractically slow (hours to days); use a GPU, "
                "or the built-in demo model")
    return (f"No GPU: {steps} steps will take roughly {format_duration(estimate)} on a 2-core CPU "
            "(faster with more cores); a GPU is 20–100× faster")


def device_report() -> Dict[str, Any]:
    """What torch in this Python sees. Run in the worker (``python -m TensorPEFTLib.frontend.device``)."""
    report: Dict[str, Any] = {"torch": None, "cuda": False, "gpus": [], "mps": False}
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


def describe_device(report: Dict[str, Any], choice: str = "auto") -> Tuple[str, bool]:
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


def main(argv: Optional[Sequence[str]] = None) -> int:
    del argv  # no options: the report is the whole answer
    print(json.dumps(device_report()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
