"""Every adaptation method side by side on UNETR and the 3D DDPM: trainable parameters, training-step time (as a
ratio to full fine-tuning and to the frozen base), peak memory, and inference latency merged and unmerged (as a
ratio to the base model), with Hugging Face peft and LyCORIS as peers, all measured in one run.

    python benchmarks/run.py --device cpu                    # small presets at small patches (~15-20 min on 2 shared cores)
    python benchmarks/run.py --device cuda                   # paper presets: UNETR 96³ and 128³, DDPM 128×128×96
    python benchmarks/run.py --device cuda --checkpointing   # + activation checkpointing (adds "full (no ckpt)")
    python benchmarks/run.py --device cuda --bf16            # bf16 autocast

Writes ``<out>/<name>.md``, ``.csv`` and ``.png`` (default name ``methods_<device>[_ckpt][_bf16]_<date>``).
See ``benchmarks/README.md`` for what each figure means.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.harness import (  # noqa: E402
    default_entries,
    machine_line,
    parse_model,
    run_setting,
    today,
    versions,
)

DEFAULT_MODELS = {
    "cpu": "unetr-small:64,ddpm-small:32",
    "cuda": "unetr-paper:96,unetr-paper:128,ddpm-paper:128x128x96",
}
CUDA_COMMANDS = [
    "python benchmarks/run.py --device cuda",
    "python benchmarks/run.py --device cuda --checkpointing",
    "python benchmarks/run.py --device cuda --checkpointing --bf16",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default=None,
                        help="preset[:size],... with size N (cubic) or DxHxW (default: small presets on cpu, paper on cuda)")
    parser.add_argument("--methods", default=None,
                        help="name[:rank],... for every model (default: all 13 at their papers' ranks, see harness.py)")
    parser.add_argument("--no-peers", action="store_true", help="leave out peft / LyCORIS")
    parser.add_argument("--no-base", action="store_true", help="leave out the frozen-base row")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=1, help="untimed training rounds")
    parser.add_argument("--rounds", type=int, default=5, help="timed training rounds (median reported)")
    parser.add_argument("--infer-warmup", type=int, default=1)
    parser.add_argument("--infer-rounds", type=int, default=8, help="timed inference rounds, merged and unmerged each")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: 1 on cpu, torch's choice on cuda)")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the models' blocks")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast for training and inference")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    parser.add_argument("--name", default=None, help="file name stem of the results")
    parser.add_argument("--no-plot", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("run.py: --device cuda but torch sees no GPU; the CPU run is `python benchmarks/run.py --device cpu`",
              file=sys.stderr)
        return 2
    threads = args.threads if args.threads is not None else (1 if args.device == "cpu" else None)
    saved_env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if threads:
        # before the worker server starts, so every worker inherits it (oversubscribed threads on a shared CPU
        # make steps several times slower and the ratios meaningless)
        os.environ.update({k: str(threads) for k in saved_env})
    try:
        return _run(args, threads, argv)
    finally:
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _run(args: argparse.Namespace, threads: int | None, argv: list[str] | None) -> int:
    settings = [parse_model(m, batch=args.batch, device=args.device, threads=threads, checkpointing=args.checkpointing,
                            bf16=args.bf16) for m in (args.models or DEFAULT_MODELS[args.device]).split(",")]
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    meta = {"date": today(), "machine": machine_line(args.device), "device": args.device,
            "threads": threads or torch.get_num_threads(), "command": command.strip(), **versions()}
    name = args.name or "_".join(["methods", args.device, *(["ckpt"] if args.checkpointing else []),
                                  *(["bf16"] if args.bf16 else []), meta["date"]])
    os.makedirs(args.out, exist_ok=True)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    done = []
    for setting in settings:
        entries = default_entries(setting.family, args.methods, peers=not args.no_peers, with_base=not args.no_base,
                                  checkpointing=args.checkpointing)
        log(f"# {setting.label}: {len(entries)} workers: {', '.join(e.label for e in entries)}")
        result = run_setting(setting, entries, args.warmup, args.rounds, args.infer_warmup, args.infer_rounds, log)
        done.append((result, report.rows_of(result)))

    stem = os.path.join(args.out, name)
    plot_name = None
    if not args.no_plot:
        report.plot(stem + ".png", done, f"{meta['machine']}; torch {meta['torch']}; {meta['date']}")
        plot_name = os.path.basename(stem) + ".png"
    rounds = (f"{args.warmup} warm-up + {args.rounds} timed training rounds, {args.infer_warmup} + {args.infer_rounds} "
              f"inference rounds unmerged and as many merged")
    text = report.markdown_report(meta, done, rounds, CUDA_COMMANDS if args.device == "cpu" else [], plot_name)
    with open(stem + ".md", "w", encoding="utf-8") as handle:
        handle.write(text)
    report.write_csv(stem + ".csv", meta, done)
    print(text)
    log(f"# wrote {stem}.md, {stem}.csv" + (f", {stem}.png" if plot_name else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
