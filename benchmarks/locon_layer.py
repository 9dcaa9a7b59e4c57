"""One LoCon layer (LoRA on a 3x3x3 convolution, r = 2) against its frozen convolution, per volume size: where forming
W + ΔW for one input gradient (``thin_conv.locon_conv``) pays and where it does not.

    OMP_NUM_THREADS=1 python benchmarks/locon_layer.py --threads 1     # what thin_conv.MERGED_MIN_POSITIONS rests on

Each row times, interleaved over ``--rounds`` rounds (median): the frozen convolution's forward + input and bias
gradients ("base"), LoCon as base + thin adapter path with two input gradients (``thin_conv.tap_matmul_conv`` and
``add_channel_mix``, "separate"), and LoCon with one input gradient through W + ΔW ("merged"), on one sample of
``channels`` -> ``channels`` at ``size``³. Writes ``benchmarks/results/<name>.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torch import nn  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CASES = ((32, 32), (32, 64), (16, 32), (16, 64), (16, 128), (8, 64), (8, 128))


def time_layer(size: int, channels: int, rank: int, rounds: int) -> dict[str, float]:
    from TensorPEFTLib.adapters import thin_conv

    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv3d(channels, channels, 3, padding=1)
    conv.weight.requires_grad_(False)
    down = (torch.randn(rank, channels, 3, 3, 3, generator=gen) * 0.05).requires_grad_()
    mix = (torch.randn(channels, rank, generator=gen) * 0.05).requires_grad_()
    x = torch.randn(1, channels, size, size, size, generator=gen, requires_grad=True)
    grad = torch.randn(1, channels, size, size, size, generator=gen)

    def base() -> None:
        conv(x).backward(grad)

    def separate() -> None:
        hidden = thin_conv.tap_matmul_conv(x, down, (1, 1, 1), (1, 1, 1), (1, 1, 1))
        thin_conv.add_channel_mix(conv(x), mix, hidden, 0.5).backward(grad)

    def merged() -> None:
        thin_conv.locon_conv(x, conv, down, mix, 0.5).backward(grad)

    runs = {"base": base, "separate": separate, "merged": merged}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for f in runs.values():
        f()  # warm-up
    for i in range(rounds):
        order = list(runs.items())
        order = order[i % 3:] + order[: i % 3]  # rotate the order so drifts hit all alike
        for name, f in order:
            start = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - start)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from harness import machine_line

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = args.name or f"locon_layer_cpu_{args.threads}thread_{time.strftime('%Y-%m-%d')}"
    lines = [f"# One LoCon layer (r = {args.rank}) against its frozen 3x3x3 convolution ({time.strftime('%Y-%m-%d')})", "",
             f"- Command: `python benchmarks/locon_layer.py {' '.join(argv if argv is not None else sys.argv[1:])}`",
             f"- Machine: {machine_line('cpu')}; torch threads {args.threads}; median of {args.rounds} interleaved rounds",
             "", "| size | channels | base (ms) | separate × base | merged × base | merged used by default |",
             "|---|---|---:|---:|---:|---|"]
    from TensorPEFTLib.adapters import thin_conv

    for size, channels in CASES:
        t = time_layer(size, channels, args.rank, args.rounds)
        used = size**3 >= thin_conv.MERGED_MIN_POSITIONS
        lines.append(f"| {size}³ | {channels} | {t['base'] * 1e3:.1f} | {t['separate'] / t['base']:.3f}× | "
                     f"{t['merged'] / t['base']:.3f}× | {'yes' if used else 'no'} |")
        print(lines[-1], flush=True)
    lines += ["", "base: the frozen convolution's forward + input and bias gradients; separate: LoCon as base + thin "
              "adapter path (two input gradients, added); merged: `thin_conv.locon_conv` (forward and one input "
              "gradient through W + ΔW, the thin product kept for the factors' gradients)."]
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, name + ".md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {os.path.join(RESULTS, name + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
