"""Where and how computation runs: device choice, CPU threads, mixed precision, seeding, out-of-memory advice."""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch


class EngineError(ValueError):
    """A user-facing engine problem (bad option, device not available, out of memory). One line, says what to do."""


class Interrupted(Exception):
    """A job stopped by SIGINT/SIGTERM outside the training loop's own graceful stop; says what was kept."""


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None = full precision
    threads: int
    name: str  # "CPU (2 threads)", "NVIDIA H100 80GB (79.1 GiB)"
    memory_gb: float | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def describe(self) -> dict:
        return {"device": str(self.device), "device_name": self.name, "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else "off",
                "threads": self.threads, "gpu_memory_gb": self.memory_gb}


def default_threads() -> int:
    """CPU threads when ``--threads`` is not given: the cores this process may run on (its affinity mask), whatever
    else the machine is doing right now.

    The count must not depend on the load: CPU reductions sum in a thread-count-dependent order, so a run with 1
    thread and one with 2 give different weights (49 of 50 LoRA tensors differed here), and a default read from the
    current load made "same seed, same adapter" false. The run records the count and ``--resume`` reuses it. Where
    other work shares the cores, pass ``--threads`` (two threads competing for one free core made a step 5x slower).
    """
    try:
        cores = max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        cores = max(1, os.cpu_count() or 1)
    # torchrun's processes on one node share its cores (LOCAL_WORLD_SIZE of them): each takes its share, so 2
    # ranks on 2 cores run a thread each instead of four threads fighting over two cores
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 1
    except ValueError:
        local = 1
    return max(1, cores // max(1, local))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX: Intel Sapphire Rapids+, AMD Zen 4+).

    There, bf16 autocast made a UNETR fine-tuning step 1.8x faster than fp32 on 2 cores (0.43 vs 0.77 s, batch 2 at
    64³) with the same loss to 4 digits; elsewhere bf16 is emulated and slower, so ``--amp auto`` stays fp32."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except Exception:  # noqa: BLE001 - a probe must never stop a job
        return False


def place_model(model: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """Move ``model`` to the runtime's device; on CPU, a UNETR's 3D convolution weights also go to the channels-last
    layout (NDHWC), which oneDNN computes faster there: a LoRA-PT fine-tuning step of the demo UNETR (batch 2 at 64³,
    one thread, interleaved rounds) took 0.408 s instead of 0.461 s in bf16 and 0.833 s instead of 1.026 s in fp32.
    Not for the DDPM U-Net: its LoRA step took 0.615 s instead of 0.462 s so (group norms, attention and the thin
    low-rank convolutions pay for the layout changes). Only the layout changes: the values are the same, and saved
    adapters are written contiguous."""
    from ..adapters.registry import model_family

    model.to(runtime.device)
    if runtime.device.type == "cpu" and model_family(model) == "unetr":
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv3d, torch.nn.ConvTranspose3d)) and module.weight.dim() == 5:
                module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last_3d)
    return model


def select_runtime(device: str = "auto", amp: str = "auto", threads: int | None = None) -> Runtime:
    """Pick the device (``auto``: CUDA, else Apple MPS, else CPU) and the autocast dtype.

    ``amp``: ``auto`` (bf16 on CUDA GPUs that support it, else fp16; bf16 on CPUs that compute it natively, see
    :func:`cpu_has_native_bf16`, else off; off on MPS), ``bf16``, ``fp16``, ``off``.
    """
    device = (device or "auto").lower()
    if device not in ("auto", "cuda", "cpu", "mps") and not device.startswith("cuda:"):
        raise EngineError(f"--device {device!r}: choose auto, cuda, cuda:N, mps or cpu")
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise EngineError(
            f"--device {device}: no CUDA GPU is visible to this torch build ({torch.__version__}); "
            f"use --device cpu, or install a CUDA build of torch"
        )
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise EngineError("--device mps: Apple MPS is not available here; use --device cpu")
    dev = torch.device(device)

    if threads is not None and threads < 1:
        raise EngineError(f"--threads must be >= 1, got {threads}")
    n_threads = threads or default_threads()
    if dev.type == "cpu":
        torch.set_num_threads(n_threads)

    amp = (amp or "auto").lower()
    if amp not in ("auto", "bf16", "fp16", "off"):
        raise EngineError(f"--amp {amp!r}: choose auto, bf16, fp16 or off")
    amp_dtype: torch.dtype | None = None
    if dev.type == "cuda":
        if amp == "auto":
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif amp != "off":
            amp_dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    elif amp in ("bf16", "fp16"):
        amp_dtype = torch.bfloat16  # CPU autocast supports bf16 only
    elif amp == "auto" and dev.type == "cpu" and cpu_has_native_bf16():
        amp_dtype = torch.bfloat16

    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        memory = props.total_memory / 2**30
        return Runtime(dev, amp_dtype, n_threads, f"{props.name} ({memory:.1f} GiB)", round(memory, 1))
    if dev.type == "mps":
        return Runtime(dev, amp_dtype, n_threads, "Apple MPS")
    return Runtime(dev, amp_dtype, n_threads, f"CPU ({n_threads} thread{'s' if n_threads > 1 else ''})")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, step: int, stream: int = 0, rank: int = 0) -> int:
    """The seed of one training step: data sampling and augmentation depend only on (seed, step), so a resumed run
    draws exactly what an uninterrupted one would. ``rank`` (data-parallel jobs) gives each rank its own stream for
    torch-side randomness (adapter dropout), since each holds other patches; rank 0's is the one-process seed."""
    return (seed * 1_000_003 + step * 7919 + stream * 104_729 + rank * 15_485_863) % (2**31 - 1)


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


OOM_ADVICE = ("out of GPU memory: lower --patch-size (e.g. 96 instead of 128), --batch-size, or --sw-batch-size "
              "(inference), or use --device cpu")


@contextlib.contextmanager
def out_of_memory_as_error(what: str) -> Iterator[None]:
    """Turn a CUDA out-of-memory crash into an EngineError that says what to lower."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - re-raised unless it is an OOM
        if is_out_of_memory(err):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise EngineError(f"{what}: {OOM_ADVICE}") from None
        raise


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return None
