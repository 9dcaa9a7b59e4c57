"""Training-step time of the 3D DDPM under full fine-tuning, LoRA (LoCon) and TenVOO-L/Q.

One step = forward + backward + Adam step on a random noisy volume at a fixed timestep batch (the DDPM's noise
prediction loss); the median over ``--steps`` timed steps after ``--warmup`` untimed ones is reported, with the ratio
to LoRA's step (the issue's target: TenVOO ≤ 1.15× LoRA).

    python benchmarks/bench_ddpm_step.py --preset ddpm-small --size 32 32 32
    python benchmarks/bench_ddpm_step.py --preset ddpm-paper --size 32 32 32 --steps 2   # sizes: multiples of 32
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time

import torch

import TensorPEFTLib as tp
from TensorPEFTLib.models.presets import build_model

METHODS = {"full": ("full", 1), "lora r2": ("lora", 2), "tenvoo-l r4": ("tenvoo-l", 4), "tenvoo-q r4": ("tenvoo-q", 4)}


def time_method(preset: str, size: tuple[int, int, int], method: str, rank: int, steps: int, warmup: int,
                batch: int, seed: int = 0) -> tuple[float, list[float], dict]:
    torch.manual_seed(seed)
    model = build_model(preset)
    summary = tp.inject(model, tp.AdapterConfig(method=method, rank=rank))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-5)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, *size, generator=gen)
    noise = torch.randn(batch, 1, *size, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    times, cpu = [], []
    for i in range(warmup + steps):
        start, start_cpu = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(model(x + noise, timesteps=t), noise)
        loss.backward()
        optimizer.step()
        elapsed, elapsed_cpu = time.perf_counter() - start, time.process_time() - start_cpu
        if i >= warmup:
            times.append(elapsed)
            cpu.append(elapsed_cpu)
    # CPU time (all threads of this process) is reported too: on a shared machine it is far less noisy than wall time.
    return statistics.median(times), times, {**summary, "cpu": statistics.median(cpu)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="ddpm-small")
    parser.add_argument("--size", type=int, nargs=3, default=(32, 32, 32), metavar=("D", "H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for label in args.methods:
        method, rank = METHODS[label]
        median, times, summary = time_method(args.preset, tuple(args.size), method, rank, args.steps, args.warmup,
                                             args.batch)
        rows.append((label, median, times, summary["trainable"], summary["cpu"]))
    lora = next((r for r in rows if r[0].startswith("lora")), None)
    full = next((r for r in rows if r[0] == "full"), None)
    print(f"{args.preset}, input {args.batch}×1×{'×'.join(map(str, args.size))}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{datetime.date.today().isoformat()}\n")
    print("| method | trainable | median wall (s) | wall vs LoRA | median CPU (s) | CPU vs LoRA | CPU vs full | wall, all steps (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for label, median, times, trainable, cpu in rows:
        vs_lora = f"{median / lora[1]:.2f}×" if lora else "-"
        cpu_lora = f"{cpu / lora[4]:.2f}×" if lora else "-"
        cpu_full = f"{cpu / full[4]:.2f}×" if full else "-"
        print(f"| {label} | {trainable:,} | {median:.3f} | {vs_lora} | {cpu:.3f} | {cpu_lora} | {cpu_full} | "
              f"{', '.join(f'{t:.2f}' for t in times)} |")


if __name__ == "__main__":
    main()
