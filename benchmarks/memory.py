"""Peak training memory of every adaptation method against full fine-tuning, with and without activation
checkpointing and bf16 autocast (issue 19, item 3).

    python benchmarks/memory.py                # paper presets: unetr-paper 128³, ddpm-paper 128×128×96 (long on CPU)
    python benchmarks/memory.py --quick        # small presets at small sizes: checks the script, not the papers' memory
    python benchmarks/memory.py --device cuda  # on a GPU: torch.cuda.max_memory_allocated

Every configuration (model × method × checkpointing × bf16) runs in its own process, forked from a server that has
imported torch and MONAI once (``forkserver``; ``spawn`` where there is none), one after the other, so no
configuration inherits another's peak and none competes with another for memory. In each process: build the preset
(seeded; the weights MONAI zero-initialises get random ones, as in ``harness.Setting``), inject the method at its
papers' rank (``full``: every weight trains), put the blocks ``finetune --checkpointing`` checkpoints under
checkpointing (UNETR's ViT blocks, the DDPM's resnet blocks), build Adam, then measure ``--steps`` training steps
(zero_grad, forward, loss, backward, Adam step; batch 1) from a resting state:

* **CUDA**: ``torch.cuda.max_memory_allocated`` over the steps (reset before them): the model, the adapter, the
  gradients, Adam's state and the activations; also the training increment over the resting allocation.
* **CPU**: the process's resident-set high-water mark (``VmHWM``, reset right before the steps through
  ``/proc/self/clear_refs``; where that is impossible, ``ru_maxrss`` of ``resource.getrusage``, which then also
  holds the injection's own peak) minus the resident set at rest: activations + gradients + Adam's state, without
  the ~0.5 GiB of libraries every process maps. glibc's mmap threshold is fixed at 128 KiB
  (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors leave the resident set.

The rest is taken after one untimed forward + backward (no optimiser step), so the libraries' one-time set-up is
not counted as training memory.

The first step creates Adam's state, so its peak is below the second's: two steps are the minimum that shows a
training step's peak. Ratios are to full fine-tuning without checkpointing in fp32 (the issue's target: adapters
with checkpointing at most 60 % of full fine-tuning's peak, on CUDA) and to full fine-tuning in the same variant.

Writes ``<out>/<name>.md`` and ``.json`` (default name ``memory_<device>[_quick]_<date>``) with the machine,
versions, date and command.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import multiprocessing as mp
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MIB = 2.0**20
#: (model, size) per run kind: the papers' presets at their patch sizes, or small ones for a quick check
MODELS = {
    "paper": ["unetr-paper:128", "ddpm-paper:128x128x96"],
    "quick": ["unetr-small:32", "ddpm-small:16"],
}
#: methods that do not apply to a family, and why (a row says so instead of failing)
NOT_APPLICABLE = {
    "ddpm": {m: "stacks the linear layers of transformer blocks; the DDPM has none"
             for m in ("lora-pt", "tcurlora", "lotr")},
}
#: the columns of a table: (checkpointing, bf16)
VARIANTS = [(False, False), (True, False), (False, True), (True, True)]
#: the issue's target on CUDA: adapters with checkpointing at most this share of full fine-tuning's peak
TARGET = 0.60


@dataclass(frozen=True)
class Config:
    """One measurement: a preset at a size, one method, one variant."""

    model: str  # "unetr-paper:128"
    method: str
    rank: int
    checkpointing: bool
    bf16: bool
    device: str
    steps: int
    threads: int | None

    @property
    def variant(self) -> str:
        return variant_name(self.checkpointing, self.bf16)


def variant_name(checkpointing: bool, bf16: bool) -> str:
    return ("bf16" if bf16 else "fp32") + (" + ckpt" if checkpointing else "")


# --------------------------------------------------------------------------------------------- one process


def measure(config: Config) -> dict[str, Any]:
    """Build, adapt and train ``config`` for its steps in this process; its memory figures (see the module doc)."""
    import torch

    import TensorPEFTLib as tp
    from benchmarks.harness import _proc_status_kib, loss_of, make_batch, parse_model, reset_peak_rss, train_step
    from TensorPEFTLib.engine.checkpointing import enable_checkpointing

    if config.threads:
        torch.set_num_threads(config.threads)
    setting = parse_model(config.model, device=config.device, threads=config.threads)
    model = setting.build()
    tp.inject(model, tp.AdapterConfig(method=config.method, rank=config.rank))
    blocks = enable_checkpointing(model) if config.checkpointing else []
    counts = tp.count_parameters(model)
    device = torch.device(config.device)
    model.to(device).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    batch = make_batch(setting, device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if config.bf16 else contextlib.nullcontext
    # One forward + backward before the measurement, without an optimiser step: the libraries' one-time set-up
    # (kernel caches, workspaces, thread pools) then lies in the resting state instead of in the first step's peak.
    with autocast():
        loss = loss_of(model, batch)
    loss.backward()
    del loss
    opt.zero_grad(set_to_none=True)
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        rest, source = torch.cuda.memory_allocated(), "cuda max_memory_allocated"
    else:
        rest = (_proc_status_kib("VmRSS") or 0) * 1024
        source = "VmHWM" if reset_peak_rss() else "ru_maxrss (lifetime: includes the injection)"
    times = [train_step(model, opt, batch, config.device, autocast())[0] for _ in range(config.steps)]
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        hwm = _proc_status_kib("VmHWM") if source == "VmHWM" else None
        peak = hwm * 1024 if hwm is not None else _maxrss_bytes()
    return {"peak_mib": peak / MIB, "rest_mib": rest / MIB, "train_mib": max(0.0, peak - rest) / MIB,
            "peak_source": source, "step_s": statistics.median(times), "checkpointed_blocks": len(blocks),
            "trainable": counts["trainable"], "total": counts["total"]}


def _maxrss_bytes() -> int:
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _worker(conn: Any, config: Config) -> None:
    try:
        conn.send({"ok": True, **measure(config)})
    except Exception as err:  # noqa: BLE001 - reported in the config's cell (e.g. out of memory), the run goes on
        text = str(err).splitlines()[0] if str(err) else ""
        conn.send({"ok": False, "error": f"{type(err).__name__}: {text}"[:300]})


def _context() -> Any:
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # imported once in the server, not in each configuration's process (torch + MONAI take seconds to import)
    ctx.set_forkserver_preload(["torch", "monai.networks.nets", "TensorPEFTLib.adapters", "TensorPEFTLib.models",
                                "benchmarks.harness"])
    return ctx


def run_isolated(config: Config, ctx: Any, timeout: float) -> dict[str, Any]:
    """``measure(config)`` in a fresh process; a crash (the kernel's out-of-memory killer) becomes the cell's error."""
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_worker, args=(child, config), name=f"memory-{config.method}", daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(timeout):
            return {"ok": False, "error": f"no answer within {timeout:.0f} s"}
        return parent.recv()
    except (EOFError, OSError) as err:
        return {"ok": False, "error": f"process died ({type(err).__name__}; out of memory?)"}
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=10)


# --------------------------------------------------------------------------------------------- the run


def configs_of(models: list[str], methods: str | None, device: str, steps: int, threads: int | None
               ) -> tuple[list[Config], list[dict[str, str]]]:
    """Every configuration to measure, and the (model, method) pairs left out as not applicable."""
    from benchmarks.harness import DEFAULT_METHODS, parse_methods, parse_model

    configs, skipped = [], []
    for model in models:
        family = parse_model(model).family
        chosen = parse_methods(methods or DEFAULT_METHODS[family])
        if "full" not in dict(chosen):
            chosen.insert(0, ("full", 1))  # the reference of every ratio
        for method, rank in chosen:
            why = NOT_APPLICABLE.get(family, {}).get(method)
            if why:
                skipped.append({"model": model, "method": method, "why": why})
                continue
            configs += [Config(model, method, rank, ckpt, bf16, device, steps, threads) for ckpt, bf16 in VARIANTS]
    return configs, skipped


def _cell(row: dict[str, Any] | None, full: dict[str, Any] | None, key: str) -> str:
    if row is None:
        return "-"
    if not row["ok"]:
        return f"failed: {row['error']}"
    value = row[key]
    if full is None or not full.get("ok") or not full[key]:
        return f"{value:,.0f}"
    return f"{value:,.0f} ({value / full[key]:.2f}×)"


def markdown(meta: dict[str, Any], results: list[dict[str, Any]], skipped: list[dict[str, str]]) -> str:
    cuda = meta["device"] == "cuda"
    key = "peak_mib" if cuda else "train_mib"
    what = ("peak allocated memory (MiB: model, adapter, gradients, Adam state, activations; "
            "torch.cuda.max_memory_allocated)" if cuda else
            "training memory (MiB: peak resident set over the steps minus the resident set at rest, i.e. activations, "
            "gradients and Adam state; libraries and the model excluded)")
    label = " (QUICK: small presets, not the papers’ models)" if meta["quick"] else ""
    lines = [f"# Peak training memory per method{label}", ""]
    if meta["quick"]:
        lines += ["**Quick run** (`--quick`): small presets at small sizes, to show the script works end to end. At "
                  "these sizes the figures are tens of MiB, much of it the allocator's and the libraries' behaviour "
                  "rather than activations (checkpointing the 8-token ViT blocks saves next to nothing); they say "
                  "nothing about the papers' models. The paper-preset run is `python benchmarks/memory.py` (CPU: "
                  "hours) or `python benchmarks/memory.py --device cuda`.", ""]
    lines += [f"- Machine: {meta['machine']}",
              f"- Software: torch {meta['torch']}, MONAI {meta['monai']}, Python {meta['python']}; torch threads per "
              f"process: {meta['threads']}",
              f"- Date: {meta['date']}",
              f"- Command: `{meta['command']}`",
              f"- Each configuration in its own process; {meta['steps']} training steps (batch 1) each; peak source: "
              f"{', '.join(sorted({r['peak_source'] for r in results if r.get('ok')})) or 'n/a'}",
              "", f"Cells: {what}, and in brackets the ratio to full fine-tuning in fp32 without checkpointing "
              "(the first cell of the `full` row).", ""]
    for model in meta["models"]:
        rows = [r for r in results if r["model"] == model]
        full = next((r for r in rows if r["method"] == "full" and r["variant"] == "fp32"), None)
        lines += [f"## {model}", "", "| method | trainable | " + " | ".join(variant_name(*v) for v in VARIANTS)
                  + " | step s (fp32 / + ckpt) |", "|---|---|" + "---|" * (len(VARIANTS) + 1)]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        for method in methods:
            cells = {r["variant"]: r for r in rows if r["method"] == method}
            plain, ckpt = cells.get("fp32"), cells.get("fp32 + ckpt")
            trainable = next((f"{r['trainable']:,}" for r in cells.values() if r.get("ok")), "-")
            times = " / ".join(f"{r['step_s']:.2f}" if r and r.get("ok") else "-" for r in (plain, ckpt))
            lines.append(f"| {method} (r={cells[next(iter(cells))]['rank']}) | {trainable} | "
                         + " | ".join(_cell(cells.get(variant_name(*v)), full, key) for v in VARIANTS)
                         + f" | {times} |")
        for s in skipped:
            if s["model"] == model:
                lines.append(f"| {s['method']} | - | n/a: {s['why']} |" + " |" * len(VARIANTS))
        lines.append("")
        lines += _target_lines(rows, full, key, cuda)
    return "\n".join(lines) + "\n"


def _target_lines(rows: list[dict[str, Any]], full: dict[str, Any] | None, key: str, cuda: bool) -> list[str]:
    """The issue's target for one model: every adapter with checkpointing at most 60 % of full fine-tuning's peak."""
    if full is None or not full.get("ok") or not full[key]:
        return ["Target not evaluated: full fine-tuning has no measurement.", ""]
    ratios = {r["method"]: r[key] / full[key] for r in rows
              if r["method"] != "full" and r["variant"] == "fp32 + ckpt" and r.get("ok")}
    if not ratios:
        return []
    worst = max(ratios, key=ratios.get)
    verdict = ("met" if ratios[worst] <= TARGET else "missed") if cuda else "indicative only: the target is for CUDA"
    best = min(ratios, key=ratios.get)
    return [f"Target (adapters + checkpointing ≤ {TARGET:.0%} of full fine-tuning's peak): worst {worst} at "
            f"{ratios[worst]:.2f}×, best {best} at {ratios[best]:.2f}× ({verdict}).", ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--quick", action="store_true", help="small presets at small sizes (checks the script)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default=None, help="preset[:size],... (default: the paper presets, or with "
                                                       "--quick the small ones)")
    parser.add_argument("--methods", default=None, help="name[:rank],... (default: all 13 at their papers' ranks; "
                                                        "full is always added as the reference)")
    parser.add_argument("--steps", type=int, default=2, help="training steps per configuration (at least 2: the "
                                                             "first creates Adam's state)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: 1 on cpu)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one configuration may take")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--name", default=None, help="file name stem of the results")
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: at least 2 (the first step creates Adam's state)")

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("memory.py: --device cuda but torch sees no GPU; leave out --device for the CPU run", file=sys.stderr)
        return 2
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else None)
    saved_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MALLOC_MMAP_THRESHOLD_")}
    try:
        return _run(args, argv, threads)
    finally:
        for key, value in saved_env.items():  # a caller in the same process (a test) gets its environment back
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run(args: argparse.Namespace, argv: list[str] | None, threads: int | None) -> int:
    import torch

    from benchmarks.harness import machine_line, today, versions

    if threads:
        # before the process server starts, so every configuration inherits it
        os.environ.update({k: str(threads) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    # glibc serves a freed large block's size from its heap from then on (its mmap threshold grows to it), and heap
    # memory stays resident after free: the resident set would then follow the largest blocks ever freed, not the
    # live tensors. A fixed threshold keeps every block over 128 KiB in its own mapping, returned when freed.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    models = args.models.split(",") if args.models else MODELS["quick" if args.quick else "paper"]
    configs, skipped = configs_of(models, args.methods, args.device, args.steps, threads)
    given = sys.argv[1:] if argv is None else argv
    command = "python benchmarks/memory.py " + " ".join(shlex.quote(a) for a in given)
    meta = {"date": today(), "machine": machine_line(args.device), "device": args.device, "quick": args.quick,
            "threads": threads or torch.get_num_threads(), "steps": args.steps, "models": models,
            "command": command.strip(), **versions()}
    name = args.name or "_".join(["memory", args.device, *(["quick"] if args.quick else []), meta["date"]])

    ctx = _context()
    results = []
    started = time.perf_counter()
    for i, config in enumerate(configs, 1):
        result = {**asdict(config), "variant": config.variant, **run_isolated(config, ctx, args.timeout)}
        results.append(result)
        shown = (f"{result['train_mib']:.0f} MiB training, {result['peak_mib']:.0f} MiB peak, {result['step_s']:.2f} s"
                 if result["ok"] else result["error"])
        print(f"# [{i}/{len(configs)}] {config.model} {config.method} {config.variant}: {shown}", file=sys.stderr,
              flush=True)
    meta["seconds"] = round(time.perf_counter() - started, 1)

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, name)
    text = markdown(meta, results, skipped)
    with open(stem + ".md", "w", encoding="utf-8") as handle:
        handle.write(text)
    with open(stem + ".json", "w", encoding="utf-8") as handle:
        json.dump({"meta": meta, "results": results, "not_applicable": skipped}, handle, indent=1)
    print(text)
    print(f"# wrote {stem}.md and {stem}.json ({meta['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
