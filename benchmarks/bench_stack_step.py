"""Training-step time of the cross-layer tensor adapters against LoRA on the paper's UNETR.

One step = forward + backward + Adam step, batch 1, at a cubic patch (default 96³; the ViT is rebuilt at that
size, which changes only its position embedding). Every method trains its adapter and the paper's decoder path, so
the difference between rows is the adapter's own cost. Methods run interleaved (one step of each per round) so
slow drifts of a shared machine hit them alike; the table reports the median over the timed rounds.

Also reported: the group computation alone (every stack's ΔW, forward + backward with a random upstream gradient),
the part a cross-layer method adds on top of a per-layer one.

    python benchmarks/bench_stack_step.py --patch 96 --warmup 1 --steps 3
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import TensorPEFTLib as tp  # noqa: E402
from benchmarks.harness import cpu_name, fmt_load, load_average, monai_version, parse_methods, train_step  # noqa: E402


def group_time(model: torch.nn.Module, reps: int, device: str) -> float:
    """Median seconds of computing every group's ΔW and back-propagating a random gradient into the factors."""
    groups = getattr(model, "tensorpeft_groups", None)
    if groups is None:
        return float("nan")
    times = []
    for _ in range(reps + 1):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for group in groups.values():
            parts = group.compute_deltas()
            grads = [torch.ones_like(p) for p in parts]
            torch.autograd.backward(parts, grads)
            group.clear_cache()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch", type=int, default=96, help="cubic input size (multiple of 16)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds")
    parser.add_argument("--steps", type=int, default=3, help="timed rounds")
    parser.add_argument("--methods", default="lora:1,lora-pt:1,tcurlora:8,lotr:8", help="name:rank,...")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--group-reps", type=int, default=3, help="repetitions of the isolated group timing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = parse_methods(args.methods)
    device = args.device

    load_before = load_average()
    base = tp.build_model("unetr-paper", img_size=(args.patch,) * 3)
    models, opts, info = {}, {}, {}
    for name, rank in methods:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        report = tp.inject(model, tp.AdapterConfig(method=name, rank=rank))
        inject_s = time.perf_counter() - start
        model.to(device).train()
        key = f"{name} r={rank}"
        models[key] = model
        opts[key] = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        info[key] = {"trainable": report["trainable"], "adapter": report["adapter"], "inject_s": inject_s}
    del base

    gen = torch.Generator().manual_seed(0)
    batch = {"x": torch.randn(1, 1, *(args.patch,) * 3, generator=gen).to(device),
             "y": torch.randint(0, 2, (1, *(args.patch,) * 3), generator=gen).to(device)}
    times: dict[str, list[float]] = {k: [] for k in models}
    for round_ in range(args.warmup + args.steps):
        for key, model in models.items():
            t, _ = train_step(model, opts[key], batch, device)
            if round_ >= args.warmup:
                times[key].append(t)
            print(f"# round {round_} {key}: {t:.2f} s", file=sys.stderr, flush=True)
    for key, model in models.items():
        info[key]["group_s"] = group_time(model, args.group_reps, device)
    load_after = load_average()

    ref_key = next((k for k in models if k.startswith("lora ")), next(iter(models)))
    ref = statistics.median(times[ref_key])
    dev_name = torch.cuda.get_device_name() if device == "cuda" else f"{cpu_name()}, {os.cpu_count()} cores"
    print(f"Training step of unetr-paper at {args.patch}³, batch 1 (forward + backward + Adam), {dev_name}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), MONAI {monai_version()}, "
          f"{datetime.date.today().isoformat()}")
    print(f"Rounds: {args.warmup} warm-up + {args.steps} timed, methods interleaved. Load average before/after: "
          f"{fmt_load(load_before)} / {fmt_load(load_after)}.")
    print()
    print("| method | trainable | adapter | inject (s) | step median (s) | steps (s) | vs lora | all ΔW materialised, fwd+bwd (s) |")
    print("|---|---:|---:|---:|---:|---|---:|---:|")
    for key in models:
        med = statistics.median(times[key])
        row = info[key]
        steps = ", ".join(f"{t:.2f}" for t in times[key])
        group = "-" if row["group_s"] != row["group_s"] else f"{row['group_s']:.3f}"
        print(f"| {key} | {row['trainable']:,} | {row['adapter']:,} | {row['inject_s']:.1f} | {med:.2f} | {steps} | "
              f"{med / ref:.3f}× | {group} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
