"""Side-by-side measurement of every adaptation method on one model: one worker process per method, driven in turns.

Why processes: peak memory is a per-process figure (CUDA max allocated, or the kernel's resident-set high-water mark
on CPU), so each method lives in its own process and cannot inherit another's peak. Why turns: a shared machine
drifts, so the parent keeps every worker alive and asks them for one training step (or one inference pass) each
per round, rotating the order every round; slow periods then hit all methods alike and the medians are comparable.
Only one worker computes at a time (the others block on their pipe).

Workers are forked from a ``forkserver`` that has imported torch, MONAI and the peers once, so twenty workers
share one copy of the libraries in physical memory (each still reports it in its own resident set, equally).

Entries of a run (:class:`Entry`):

* ``base`` - the frozen base: no adapter; every weight frozen except the extras the adapters of this model family
  train too (UNETR: the decoder path ``decoder2..5`` + ``out``; DDPM: normalisation layers and the biases of the
  layers the adapters wrap), and the input of every layer the adapters wrap marked as needing a gradient, so the
  backward pass runs through the same layers as an adapted model's but computes no adapter gradient. It is the
  floor any adapter on those layers pays.
* ``ours`` - a TensorPEFT method at its published default targets (``tp.inject``).
* ``peft`` / ``lycoris`` - a peer library's adapter on exactly the layers our LoRA wraps, same rank, same extras.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.util
import multiprocessing as mp
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

try:
    import resource  # Unix only: the lifetime peak RSS, a fallback where the high-water mark cannot be reset
except ImportError:  # pragma: no cover - Windows
    resource = None

import TensorPEFTLib as tp
from TensorPEFTLib.adapters import thin_conv
from TensorPEFTLib.adapters.model import original_name

#: the methods of the issue, at the ranks their papers use on each family (SeLoRA: its starting rank, see README)
DEFAULT_METHODS = {
    "unetr": "full,lora:4,pissa:4,loha:4,lokr:4,ssf,lora-pt:1,tcurlora:8,lotr:8,tenvoo-l:4,tenvoo-q:4,quanta:4,selora:1",
    "ddpm": "full,lora:2,pissa:2,loha:2,lokr:2,ssf,lora-pt:1,tcurlora:8,lotr:8,tenvoo-l:4,tenvoo-q:4,quanta:4,selora:1",
}
#: peers per family: (row label, library, algorithm, our method it is compared with)
PEERS = {
    "unetr": [("peft lora", "peft", "lora", "lora")],
    "ddpm": [("peft lora", "peft", "lora", "lora"), ("lycoris locon", "lycoris", "locon", "lora"),
             ("lycoris loha", "lycoris", "loha", "loha"),
             ("lycoris lokr", "lycoris", "lokr", "lokr")],
}
#: blocks wrapped in activation checkpointing (``--checkpointing``): the transformer blocks and the full-resolution
#: conv blocks of UNETR (where its activation memory is), every resnet/attention block of the DDPM
CHECKPOINT_BLOCKS = {
    "unetr": [r"vit\.blocks\.\d+", r"encoder[1-4]", r"decoder[2-5]"],
    "ddpm": [r"(down|up)_blocks\.\d+\.(resnets|attentions)\.\d+", r"middle_block\.(resnet_[12]|attention)"],
}
MIB = 2.0**20


# --------------------------------------------------------------------------------------------- machine facts


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def package_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - not installed, or no metadata
        return "not installed"


def monai_version() -> str:
    return package_version("monai")


def load_average() -> tuple[float, float, float] | None:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def fmt_load(load: tuple[float, float, float] | None) -> str:
    return "n/a" if load is None else ", ".join(f"{v:.2f}" for v in load)


def machine_line(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({cpu_name()}, {os.cpu_count()} CPU cores)"
    mem = ""
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo", encoding="utf-8") as handle:
            mem = f", {int(handle.readline().split()[1]) / 2**20:.0f} GiB RAM"
    return f"{cpu_name()}, {os.cpu_count()} cores{mem}, {platform.system()} {platform.release()}, no GPU used"


def parse_methods(text: str) -> list[tuple[str, int]]:
    """``"lora:4,ssf,lora-pt:1"`` -> ``[("lora", 4), ("ssf", 1), ("lora-pt", 1)]``."""
    out = []
    for item in text.split(","):
        name, _, rank = item.strip().partition(":")
        if name:
            out.append((name, int(rank or 1)))
    return out


# --------------------------------------------------------------------------------------------- what is measured


@dataclass(frozen=True)
class Setting:
    """One model at one input size on one device; every entry of a run shares it."""

    preset: str
    size: tuple[int, int, int]
    batch: int = 1
    device: str = "cpu"
    threads: int | None = None
    checkpointing: bool = False
    bf16: bool = False
    seed: int = 0

    @property
    def family(self) -> str:
        return "unetr" if tp.PRESETS[self.preset].task == "segmentation" else "ddpm"

    @property
    def label(self) -> str:
        return f"{self.preset} {'×'.join(map(str, self.size))}"

    def build(self) -> nn.Module:
        """The preset at this size, seeded (every worker gets the same weights). Weights MONAI initialises at zero
        (the DDPM's resnet ``conv2`` and output convolution) get PyTorch's default random init instead, standing in
        for a pretrained model: with a zero output convolution every gradient would be zero."""
        torch.manual_seed(self.seed)
        kwargs = {"img_size": self.size} if self.family == "unetr" else {}
        model = tp.build_model(self.preset, **kwargs)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1 and not p.any():
                    nn.init.kaiming_uniform_(p, a=5**0.5)
        return model


def parse_model(text: str, **setting: Any) -> Setting:
    """``"unetr-small:64"`` (cubic) or ``"ddpm-paper:128x128x96"``; no size = the preset's patch size."""
    preset, _, size = text.partition(":")
    if preset not in tp.PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(tp.PRESETS)}")
    if size:
        dims = tuple(int(v) for v in re.split(r"[x×]", size))
        dims = dims * 3 if len(dims) == 1 else dims
    else:
        dims = tuple(tp.PRESETS[preset].patch_size)
    if len(dims) != 3:
        raise ValueError(f"size of {text!r} must be N or DxHxW")
    return Setting(preset, dims, **setting)


@dataclass(frozen=True)
class Entry:
    """One row of a run: the frozen base, one of our methods, or a peer's adapter."""

    label: str
    kind: str  # "base" | "ours" | "peft" | "lycoris"
    method: str = ""
    rank: int = 1
    compare: str | None = None  # the method of ours a peer row is compared with
    checkpointing: bool | None = None  # None = the setting's
    tap_matmul: bool = True  # False: LoCon's thin convolutions run as convolutions (TensorPEFTLib.adapters.thin_conv)
    merged_input_grad: bool = True  # False: LoCon's input gradient through W and the adapter separately (thin_conv)


def default_entries(family: str, methods: str | None = None, peers: bool = True, with_base: bool = True,
                    checkpointing: bool = False) -> list[Entry]:
    """The rows of a run: base, each method (ranks from ``methods`` or :data:`DEFAULT_METHODS`), the peers (at the
    rank of the method they are compared with) and, with checkpointing, full fine-tuning without it."""
    chosen = parse_methods(methods or DEFAULT_METHODS[family])
    ranks = dict(chosen)
    entries = [Entry("base", "base")] if with_base else []
    entries += [Entry(name, "ours", name, rank) for name, rank in chosen]
    if checkpointing and "full" in ranks:
        entries.append(Entry("full (no ckpt)", "ours", "full", 1, checkpointing=False))
    if family == "ddpm" and "lora" in ranks:  # our LoCon with its down-projection as the plain convolution
        entries.append(Entry("lora (conv A as oneDNN conv)", "ours", "lora", ranks["lora"], compare="lora",
                             tap_matmul=False))
        entries.append(Entry("lora (separate input gradient)", "ours", "lora", ranks["lora"], compare="lora",
                             merged_input_grad=False))
    if peers:
        for label, library, algo, ours in PEERS[family]:
            if ours in ranks:
                entries.append(Entry(label, library, algo, ranks[ours], compare=ours))
    return entries


# --------------------------------------------------------------------------------------------- model preparation


def reference_selection(setting: Setting) -> tuple[list[str], list[str]]:
    """The layers our LoRA wraps by default on this model and the names of the other parameters it trains (the
    family's extras), found by injecting LoRA into a throw-away copy."""
    probe = setting.build()
    tp.inject(probe, tp.AdapterConfig(method="lora", rank=1))
    layers = list(probe.tensorpeft.layers)
    extras = [original_name(n) for n, p in probe.named_parameters() if p.requires_grad and ".lora_" not in n]
    del probe
    return layers, extras


def freeze_except(model: nn.Module, names: list[str]) -> list[nn.Parameter]:
    """Freeze every parameter but ``names``; returns those (kept by identity: peers re-wrap the layers)."""
    wanted = set(names)
    keep = []
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
        if name in wanted:
            keep.append(p)
    if len(keep) != len(wanted):
        raise RuntimeError(f"{len(wanted) - len(keep)} extra parameters not found in the model")
    return keep


def _input_needs_grad(module: nn.Module, args: tuple) -> tuple | None:
    # A tensor that needs no gradient has nothing upstream needing one, so detaching it loses nothing.
    if not torch.is_grad_enabled() or not args or not torch.is_tensor(args[0]) or args[0].requires_grad:
        return None
    return (args[0].detach().requires_grad_(True), *args[1:])


def make_frozen_base(model: nn.Module, layers: list[str]) -> None:
    """Mark the input of every listed layer as needing a gradient (see the module docstring: the frozen base)."""
    for name in layers:
        model.get_submodule(name).register_forward_pre_hook(_input_needs_grad)


def apply_peft_lora(model: nn.Module, layers: list[str], rank: int) -> nn.Module:
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=layers, lora_dropout=0.0, bias="none")
    return peft.get_peft_model(model, config)


def apply_lycoris(model: nn.Module, layers: list[str], algo: str, rank: int) -> nn.Module:
    """LyCORIS ``algo`` on exactly ``layers``; LoCon in its bypass mode (a thin r-channel path, as ours and peft's);
    LoHa/LoKr in their default mode (ΔW formed, one convolution with it, as ours)."""
    import logging

    from lycoris import LycorisNetwork

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # it logs every module it creates to stdout
    LycorisNetwork.apply_preset({"target_module": [], "target_name": list(layers), "module_algo_map": {},
                                 "name_algo_map": {}, "exclude_name": []})
    network = LycorisNetwork(model, multiplier=1.0, lora_dim=rank, conv_lora_dim=rank, alpha=rank, conv_alpha=rank,
                             network_module=algo, bypass_mode=algo == "locon")
    if len(network.loras) != len(layers):
        raise RuntimeError(f"LyCORIS {algo} wrapped {len(network.loras)} of {len(layers)} layers")
    network.apply_to()
    return network


def apply_checkpointing(model: nn.Module, family: str) -> tuple[int, int]:
    """Run the family's blocks (:data:`CHECKPOINT_BLOCKS`, wider than ``finetune --checkpointing``'s: UNETR's conv
    blocks and the DDPM's attention blocks too) under the engine's non-reentrant activation checkpointing while
    gradients are on; returns how many blocks were wrapped and how many were left out (none since the cross-layer
    groups compute their factors outside the blocks; kept for the report's column)."""
    from TensorPEFTLib.engine.checkpointing import checkpoint_modules

    return len(checkpoint_modules(model, CHECKPOINT_BLOCKS[family])), 0


def make_batch(setting: Setting, device: torch.device, out_channels: int = 2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(setting.seed)
    shape = (setting.batch, 1, *setting.size)
    batch = {"x": torch.randn(shape, generator=gen)}
    if setting.family == "unetr":
        batch["y"] = torch.randint(0, out_channels, (setting.batch, *setting.size), generator=gen)
    else:
        batch["noise"] = torch.randn(shape, generator=gen)
        batch["t"] = torch.randint(0, 1000, (setting.batch,), generator=gen)
    return {k: v.to(device) for k, v in batch.items()}


def forward(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    if "t" in batch:
        return model(batch["x"], timesteps=batch["t"])
    return model(batch["x"])


def loss_of(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """UNETR: cross-entropy against random labels; DDPM: the noise-prediction MSE."""
    out = forward(model, batch)
    if "y" in batch:
        return F.cross_entropy(out.float(), batch["y"])
    return F.mse_loss(out.float(), batch["noise"])


def train_step(model: nn.Module, opt: torch.optim.Optimizer, batch: dict[str, torch.Tensor], device: str,
               autocast: contextlib.AbstractContextManager | None = None) -> tuple[float, float]:
    """zero_grad + forward + loss + backward + optimiser step; (wall seconds, process CPU seconds)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    wall, cpu = time.perf_counter(), time.process_time()
    opt.zero_grad(set_to_none=True)
    with autocast or contextlib.nullcontext():
        loss = loss_of(model, batch)
    loss.backward()
    opt.step()
    sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def step_flops(model: nn.Module, batch: dict[str, torch.Tensor],
               autocast: contextlib.AbstractContextManager | None = None) -> int:
    """Floating-point operations of one forward + backward (matmuls and convolutions, torch's FlopCounterMode):
    the compute a method asks for, independent of how efficiently the machine runs it."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        with autocast or contextlib.nullcontext():
            loss = loss_of(model, batch)
        loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def kernel_trace(model: nn.Module, batch: dict[str, torch.Tensor],
                 autocast: contextlib.AbstractContextManager | None = None) -> list[tuple[str, tuple]]:
    """The aten operations one inference forward dispatches, each with its operands' shapes, in order: two models
    with equal traces run the same kernels, whatever the Python around them."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Trace(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[tuple[str, tuple]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's protocol
            self.ops.append((str(func), tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), autocast or contextlib.nullcontext(), Trace() as trace:
        forward(model, batch)
    return trace.ops


# --------------------------------------------------------------------------------------------- memory probes


def saved_activation_bytes(model: nn.Module, batch: dict[str, torch.Tensor],
                           autocast: contextlib.AbstractContextManager | None = None) -> int:
    """Bytes autograd keeps for backward in one training forward pass (unique storages, parameters and buffers
    excluded): the activation memory of a method, exact and free of allocator noise. Regions under activation
    checkpointing keep their own bookkeeping and are not counted."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast or contextlib.nullcontext():
        loss_of(model, batch)
    return sum(saved.values())


def _proc_status_kib(key: str) -> int | None:
    with contextlib.suppress(OSError, AttributeError, ValueError):
        with open("/proc/self/status", encoding="utf-8") as handle:
            match = re.search(rf"^{key}:\s+(\d+)", handle.read(), re.M)
            return int(match.group(1))
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux ≥ 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="utf-8") as handle:
            handle.write("5")
        return _proc_status_kib("VmHWM") is not None
    except OSError:
        return False


# --------------------------------------------------------------------------------------------- the worker


class Workload:
    """One entry's model, optimiser and input inside its worker process; each public method answers one command."""

    def __init__(self, setting: Setting, entry: Entry) -> None:
        self.setting, self.entry = setting, entry
        self.device = setting.device
        self.peer: Any = None
        model = setting.build()
        extra_params: list[nn.Parameter] = []
        start = time.perf_counter()
        thin_conv.ENABLED = entry.tap_matmul  # this worker process only
        thin_conv.MERGED_INPUT_GRAD = entry.merged_input_grad
        if entry.kind == "ours":
            tp.inject(model, tp.AdapterConfig(method=entry.method, rank=entry.rank))
        else:
            module = {"peft": "peft", "lycoris": "lycoris"}.get(entry.kind)
            if module and importlib.util.find_spec(module) is None:
                raise RuntimeError(f"{module} is not installed: pip install -e '.[bench]' (peer skipped)")
            layers, extras = reference_selection(setting)
            start = time.perf_counter()
            extra_params = freeze_except(model, extras)
            if entry.kind == "base":
                make_frozen_base(model, layers)
            elif entry.kind == "peft":
                model = apply_peft_lora(model, layers, entry.rank)
            elif entry.kind == "lycoris":
                self.peer = apply_lycoris(model, layers, entry.method, entry.rank)
            else:
                raise ValueError(f"unknown entry kind {entry.kind!r}")
            for p in extra_params:  # peers freeze everything but their own factors: train the same extras as ours
                p.requires_grad_(True)
        self.inject_s = time.perf_counter() - start
        checkpointing = setting.checkpointing if entry.checkpointing is None else entry.checkpointing
        self.checkpointed = apply_checkpointing(model, setting.family) if checkpointing else (0, 0)
        self.model = model.to(self.device).train()
        if self.peer is not None:
            self.peer.to(self.device).train()
        every = {id(p): p for p in [*self.model.parameters(), *(self.peer.parameters() if self.peer else [])]}
        self.params = [p for p in every.values() if p.requires_grad]
        extras = {id(p) for p in extra_params}
        self.counts = {
            "total": sum(p.numel() for p in every.values()),
            "trainable": sum(p.numel() for p in self.params),
            "adapter": (tp.count_parameters(self.model)["adapter"] if entry.kind == "ours"
                        else sum(p.numel() for p in self.params if id(p) not in extras)),
        }
        self.opt = torch.optim.Adam(self.params, lr=1e-5) if self.params else None
        self.batch = make_batch(setting, torch.device(self.device))
        self.autocast = (lambda: torch.autocast(self.device.split(":")[0], dtype=torch.bfloat16)) if setting.bf16 \
            else contextlib.nullcontext
        self.merged = False
        self.reference: torch.Tensor | None = None
        self.merge_diff: float | None = None
        self.plain: nn.Module | None = None
        self.calls = 0
        gc.collect()
        self.peak_source = self._reset_peak()

    # ---------------------------------------------------------------- commands
    def info(self) -> dict[str, Any]:
        done, skipped = self.checkpointed
        return {**self.counts, "inject_s": self.inject_s, "checkpointed_blocks": done, "checkpoint_skipped": skipped}

    def train(self) -> dict[str, Any]:
        if self.opt is None:
            raise RuntimeError("nothing to train")
        wall, cpu = train_step(self.model, self.opt, self.batch, self.device, self.autocast())
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()  # give the activations' memory back to the other workers on the same GPU
        return {"wall": wall, "cpu": cpu}

    def memory(self) -> dict[str, Any]:
        """Peak memory of the training steps so far (since the reset at the end of setup), then the bytes one
        training forward keeps for backward (measured after the peak is read)."""
        if self.device.startswith("cuda"):
            result = {"peak_mib": torch.cuda.max_memory_allocated() / MIB, "rest_mib": self.rest / MIB,
                      "peak_source": self.peak_source}
        else:
            hwm = _proc_status_kib("VmHWM") if self.peak_source == "VmHWM" else None
            maxrss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 if resource else None
            result = {"peak_mib": hwm / 1024.0 if hwm is not None else maxrss_mib, "rest_mib": self.rest / MIB,
                      "maxrss_mib": maxrss_mib, "peak_source": self.peak_source}
        result["saved_mib"] = saved_activation_bytes(self.model, self.batch, self.autocast()) / MIB
        result["gflop"] = step_flops(self.model, self.batch, self.autocast()) / 1e9
        return result

    def infer(self) -> dict[str, Any]:
        """One forward pass in eval mode without gradients, and one of a plain copy of the base model right before
        or after it (alternating), for a paired ratio that drifts of a shared machine hardly touch; on the first
        merged pass, the largest output change merging caused (a correctness check)."""
        if self.model.training:
            self.model.eval()
            self.opt = None  # free the optimiser state and gradients: inference runs without them
            for p in self.params:
                p.grad = None
            self.plain = self.setting.build().to(self.device).eval()  # built only now: not in the training peak
            # no parameter needs a gradient at inference; the flag alone changes how aten.matmul lays out a Linear
            # on 3-D input (mm vs bmm), so both models drop it for a like-for-like comparison
            for p in [*self.model.parameters(), *self.plain.parameters(), *(self.peer.parameters() if self.peer else [])]:
                p.requires_grad_(False)
            gc.collect()
        self.calls += 1
        timed: dict[str, tuple[float, float]] = {}
        outputs: dict[str, torch.Tensor] = {}
        for which in (("plain", "model") if self.calls % 2 else ("model", "plain")):
            timed[which], outputs[which] = self._timed_forward(getattr(self, which))
        out = outputs.pop("model")
        result: dict[str, Any] = {"wall": timed["model"][0], "cpu": timed["model"][1],
                                  "plain_wall": timed["plain"][0], "plain_cpu": timed["plain"][1]}
        if not self.merged:
            self.reference = out.detach().float()
        elif self.reference is not None:
            self.merge_diff = (out.detach().float() - self.reference).abs().max().item()
            self.reference = None
        if self.merged:
            result["merge_diff"] = self.merge_diff
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
        return result

    def merge(self) -> dict[str, Any]:
        """Merge the adapter, then compare the kernels of one forward with the plain base model's."""
        before = kernel_trace(self.model, self.batch, self.autocast()) if self.plain is not None else None
        kind = self.entry.kind
        if kind == "ours":
            tp.merge(self.model)
        elif kind == "peft":
            self.model.merge_adapter()
        elif kind == "lycoris":
            self.peer.merge_to()
            self.peer.restore()  # back to the plain layers' forward, now with the merged weights
        self.merged = True
        if before is None:
            return {}
        plain = kernel_trace(self.plain, self.batch, self.autocast())
        merged = kernel_trace(self.model, self.batch, self.autocast())
        return {"kernels_plain": len(plain), "kernels_unmerged": len(before), "kernels_merged": len(merged),
                "merged_same_kernels": merged == plain}

    # ---------------------------------------------------------------- helpers
    def _timed_forward(self, model: nn.Module) -> tuple[tuple[float, float], torch.Tensor]:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        start, start_cpu = time.perf_counter(), time.process_time()
        with torch.no_grad(), self.autocast():
            out = forward(model, self.batch)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return (time.perf_counter() - start, time.process_time() - start_cpu), out

    def _reset_peak(self) -> str:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.rest = torch.cuda.memory_allocated()
            return "cuda max_memory_allocated"
        self.rest = (_proc_status_kib("VmRSS") or 0) * 1024
        return "VmHWM" if reset_peak_rss() else "ru_maxrss (lifetime)"


def _one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]


def worker_main(conn: Any, setting: Setting, entry: Entry) -> None:
    """The worker process: set up, then answer commands (``train``, ``memory``, ``infer``, ``merge``) until ``stop``."""
    if setting.threads:
        torch.set_num_threads(setting.threads)
    try:
        work = Workload(setting, entry)
        conn.send({"ok": True, **work.info()})
    except Exception as err:  # noqa: BLE001 - reported as the row's error, the run goes on
        conn.send({"ok": False, "error": _one_line(err)})
        return
    while True:
        command = conn.recv()
        if command == "stop":
            return
        try:
            conn.send({"ok": True, **getattr(work, command)()})
        except Exception as err:  # noqa: BLE001 - e.g. CUDA out of memory: that entry's phase is marked failed
            conn.send({"ok": False, "error": _one_line(err)})


# --------------------------------------------------------------------------------------------- the parent


@dataclass
class EntryResult:
    entry: Entry
    info: dict[str, Any] = field(default_factory=dict)
    train_wall: list[float] = field(default_factory=list)
    train_cpu: list[float] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)
    infer_unmerged: list[float] = field(default_factory=list)
    infer_merged: list[float] = field(default_factory=list)
    infer_unmerged_cpu: list[float] = field(default_factory=list)
    infer_merged_cpu: list[float] = field(default_factory=list)
    #: per round, this entry's forward over the plain base model's in the same worker (wall, CPU)
    paired_unmerged: list[tuple[float, float]] = field(default_factory=list)
    paired_merged: list[tuple[float, float]] = field(default_factory=list)
    merge_diff: float | None = None
    merge_info: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return "setup" not in self.errors


@dataclass
class SettingResult:
    setting: Setting
    results: list[EntryResult]
    load_before: tuple[float, float, float] | None
    load_after: tuple[float, float, float] | None
    seconds: float


def _context(peers: list[str]) -> Any:
    methods = mp.get_all_start_methods()
    if "forkserver" not in methods:
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # imported once in the server (when this process first starts one), shared by every worker forked from it;
    # a peer that is not installed is skipped silently here and reported by its worker
    ctx.set_forkserver_preload(["torch", "monai.networks.nets", "TensorPEFTLib.adapters", "TensorPEFTLib.models",
                                "benchmarks.harness", *peers])
    return ctx


def run_setting(setting: Setting, entries: list[Entry], warmup: int, rounds: int, infer_warmup: int,
                infer_rounds: int, log: Callable[[str], None] = print) -> SettingResult:
    """Start one worker per entry, then: training rounds, memory, unmerged inference rounds, merge, merged
    inference rounds; every round visits all live workers, the starting worker rotating."""
    started = time.perf_counter()
    ctx = _context(sorted({e.kind for e in entries} & {"peft", "lycoris"}))
    results = [EntryResult(e) for e in entries]
    pipes, procs = [], []
    for entry in entries:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_main, args=(child, setting, entry), name=f"bench-{entry.label}", daemon=True)
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)

    def ask(i: int, command: str, phase: str) -> dict[str, Any] | None:
        if phase in results[i].errors or not results[i].ok:
            return None
        try:
            if command:
                pipes[i].send(command)
            reply = pipes[i].recv()
        except (EOFError, OSError) as err:
            reply = {"ok": False, "error": f"worker died ({type(err).__name__}; out of memory?)"}
        if not reply.pop("ok"):
            results[i].errors[phase] = reply["error"]
            log(f"# {setting.label} {entries[i].label}: {phase} failed: {reply['error']}")
            return None
        return reply

    try:
        for i in range(len(entries)):
            info = ask(i, "", "setup")
            if info is not None:
                results[i].info = info
        log(f"# {setting.label}: {sum(r.ok for r in results)} of {len(entries)} workers ready "
            f"({time.perf_counter() - started:.0f} s)")
        load_before = load_average()

        def rounds_of(command: str, phase: str, n_warm: int, n: int, sink: Callable[[EntryResult, dict], None]) -> None:
            for round_ in range(n_warm + n):
                shift = round_ % len(entries)
                times = []
                for i in [*range(shift, len(entries)), *range(shift)]:
                    reply = ask(i, command, phase)
                    if reply is not None:
                        times.append(f"{entries[i].label} {reply['wall']:.2f}")
                        if round_ >= n_warm:
                            sink(results[i], reply)
                log(f"# {setting.label} {phase} round {round_ + 1}/{n_warm + n}: {'; '.join(times)}")

        def keep_train(r: EntryResult, reply: dict) -> None:
            r.train_wall.append(reply["wall"])
            r.train_cpu.append(reply["cpu"])

        rounds_of("train", "train", warmup, rounds, keep_train)
        for i in range(len(entries)):
            reply = ask(i, "memory", "memory")
            if reply is not None:
                results[i].memory = reply
        def keep_unmerged(r: EntryResult, reply: dict) -> None:
            r.infer_unmerged.append(reply["wall"])
            r.infer_unmerged_cpu.append(reply["cpu"])
            r.paired_unmerged.append((reply["wall"] / reply["plain_wall"], reply["cpu"] / reply["plain_cpu"]))

        rounds_of("infer", "infer", infer_warmup, infer_rounds, keep_unmerged)
        for i in range(len(entries)):
            results[i].merge_info = ask(i, "merge", "merge") or {}

        def keep_merged(r: EntryResult, reply: dict) -> None:
            r.infer_merged.append(reply["wall"])
            r.infer_merged_cpu.append(reply["cpu"])
            r.paired_merged.append((reply["wall"] / reply["plain_wall"], reply["cpu"] / reply["plain_cpu"]))
            r.merge_diff = reply.get("merge_diff")

        rounds_of("infer", "infer merged", infer_warmup, infer_rounds, keep_merged)
        load_after = load_average()
    finally:
        for pipe, proc in zip(pipes, procs):
            with contextlib.suppress(OSError, BrokenPipeError):
                pipe.send("stop")
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()
    return SettingResult(setting, results, load_before, load_after, time.perf_counter() - started)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def today() -> str:
    return datetime.date.today().isoformat()


def versions() -> dict[str, str]:
    return {"torch": torch.__version__, "monai": monai_version(), "peft": package_version("peft"),
            "lycoris": package_version("lycoris-lora"), "python": sys.version.split()[0]}


__all__ = [
    "DEFAULT_METHODS", "Entry", "EntryResult", "Setting", "SettingResult", "cpu_name", "default_entries",
    "fmt_load", "load_average", "machine_line", "median", "monai_version", "parse_methods", "parse_model",
    "run_setting", "today", "train_step", "versions",
]
