"""Data-parallel scaling: ``finetune`` on 1 process vs N ranks under ``torchrun``, and sharded ``segment``.

    python benchmarks/distributed.py --quick                       # CPU smoke: tiny UNETR, 1 vs 2 processes, ~2 min
    python benchmarks/distributed.py --device cpu                  # CPU: demo-unetr at 64³, 1 vs 2 processes
    python benchmarks/distributed.py --device cuda --nprocs 1,2,4,8   # GPUs: demo-unetr, 1 to 8 GPUs of this node

Each training run is a real ``tensorpeft finetune`` (one process run plainly, N ranks through ``torchrun --standalone``)
on the same synthetic cases with the same per-rank batch, so N ranks train on N times the patches per step. Step
times come from rank 0's ``step`` events (the first ``--warmup`` steps dropped: caches, allocator, DDP's first
buckets), so start-up and data caching are not counted; they are reported separately as wall-clock time. Reported:
median step time, patches per second (global batch / step time), speed-up over one process and scaling efficiency
(speed-up / N). ``segment`` is timed end to end on ``--images`` scans (wall clock of the whole command), one process
vs N ranks each taking every N-th scan.

On a CPU, N processes share the machine's cores (each gets cores / N torch threads), so at best the patches per second
stay equal: what this measures there is the overhead of DDP's gradient exchange over gloo. Timings on a shared
machine are noisy; the load average before and after each run is recorded beside it.

Writes ``benchmarks/results/distributed_<device>_<date>.md`` and ``.json`` (machine, versions, exact command).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "Testing"))

from benchmarks.harness import fmt_load, load_average, machine_line, today, versions  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def command(nprocs: int, *args: str) -> list[str]:
    """One process: the CLI as a user runs it on one device (no process group, no DDP). N: torchrun."""
    if nprocs == 1:
        return [sys.executable, "-m", "TensorPEFTLib.cli", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nprocs),
            "--master_port", str(free_port()), "-m", "TensorPEFTLib.cli", *args]


def make_data(folder: str, cases: int, size: int, spacing: float, images: int) -> str:
    """Blob cases (image + label) at ``spacing`` mm with ``size`` voxels a side: imagesTr/labelsTr for training and
    imagesTs/ for segmentation."""
    import numpy as np

    import synthetic
    from TensorPEFTLib.data import write_volume

    rng = np.random.default_rng(0)
    affine = np.diag([spacing, spacing, spacing, 1.0])
    for split, count in (("Tr", cases), ("Ts", images)):
        os.makedirs(os.path.join(folder, f"images{split}"), exist_ok=True)
        os.makedirs(os.path.join(folder, f"labels{split}"), exist_ok=True)
        for i in range(count):
            image, label = synthetic.blob_case(rng, shape=(size, size, size))
            name = f"case_{split.lower()}{i:02d}.nii.gz"
            write_volume(os.path.join(folder, f"images{split}", name), image, like=affine)
            write_volume(os.path.join(folder, f"labels{split}", name), label, like=affine)
    with open(os.path.join(folder, "dataset.json"), "w", encoding="utf-8") as handle:
        json.dump({"name": "blobs", "labels": {"0": "background", "1": "blob"}}, handle)
    return folder


def run(cmd: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr[-4000:]}")
    return seconds, done


def train(nprocs: int, args: argparse.Namespace, model: str, data: str, work: str, env: dict[str, str]) -> dict:
    out, events = os.path.join(work, f"ft{nprocs}"), os.path.join(work, f"ft{nprocs}.jsonl")
    threads = [] if args.device != "cpu" else ["--threads", str(max(1, args.cores // nprocs))]
    load_before = load_average()
    wall, _ = run(command(nprocs, "finetune", "--model", model, "--data", data, "--out", out, "--method", args.method,
                          "--rank", str(args.rank), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                          "--eval-every", str(10**6), "--checkpoint-every", str(10**6), "--no-val",
                          "--device", args.device, "--events", events, "--quiet", *threads), env)
    with open(events, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    steps = [r["seconds"] for r in rows if r["event"] == "step"][args.warmup:]
    step = statistics.median(steps)
    global_batch = args.batch_size * nprocs
    return {"nprocs": nprocs, "global_batch": global_batch, "step_s": round(step, 4),
            "step_iqr_s": [round(q, 4) for q in _quartiles(steps)], "patches_per_s": round(global_batch / step, 3),
            "wall_s": round(wall, 1), "timed_steps": len(steps), "load_before": fmt_load(load_before),
            "load_after": fmt_load(load_average())}


def segment(nprocs: int, args: argparse.Namespace, model: str, data: str, work: str, env: dict[str, str]) -> dict:
    out = os.path.join(work, f"seg{nprocs}")
    threads = [] if args.device != "cpu" else ["--threads", str(max(1, args.cores // nprocs))]
    load_before = load_average()
    wall, _ = run(command(nprocs, "segment", "--image", os.path.join(data, "imagesTs"), "--model", model, "--out", out,
                          "--device", args.device, "--quiet", *threads), env)
    return {"nprocs": nprocs, "images": args.images, "wall_s": round(wall, 1),
            "images_per_min": round(args.images / wall * 60, 2), "load_before": fmt_load(load_before),
            "load_after": fmt_load(load_average())}


def _quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 4:
        return min(values), max(values)
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def report(args: argparse.Namespace, rows: list[dict], seg: list[dict], started: str) -> str:
    base = rows[0]
    lines = [f"# Data-parallel scaling ({args.device}, {started})", "",
             f"- machine: {machine_line(args.device)}",
             f"- versions: {', '.join(f'{k} {v}' for k, v in versions().items())}",
             f"- command: `{' '.join(sys.argv)}`",
             f"- finetune: {args.model_label}, {args.method} rank {args.rank}, {args.batch_size} patch(es) per rank, "
             f"{args.steps} steps ({args.warmup} warm-up steps not timed), cases {args.size}³ at {args.spacing} mm",
             "", "| processes | global batch | step (s, median) | IQR (s) | patches/s | speed-up | efficiency | wall (s) "
             "| load before → after |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        speed = row["patches_per_s"] / base["patches_per_s"]
        lines.append(f"| {row['nprocs']} | {row['global_batch']} | {row['step_s']:.3f} | "
                     f"{row['step_iqr_s'][0]:.3f}–{row['step_iqr_s'][1]:.3f} | {row['patches_per_s']:.2f} | "
                     f"{speed:.2f}× | {speed / row['nprocs']:.0%} | {row['wall_s']:.0f} | "
                     f"{row['load_before']} → {row['load_after']} |")
    if seg:
        lines += ["", f"`segment` of {args.images} scans ({args.size}³ at {args.spacing} mm), wall clock of the command:",
                  "", "| processes | wall (s) | scans/min | speed-up | load before → after |", "|---|---|---|---|---|"]
        for row in seg:
            lines.append(f"| {row['nprocs']} | {row['wall_s']:.0f} | {row['images_per_min']:.2f} | "
                         f"{seg[0]['wall_s'] / row['wall_s']:.2f}× | {row['load_before']} → {row['load_after']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--nprocs", default="1,2", help="process counts to compare, e.g. 1,2,4,8 (default 1,2)")
    parser.add_argument("--quick", action="store_true", help="tiny UNETR at 32³, 12 steps, 4 scans: a smoke run")
    parser.add_argument("--model", default=None, help="model to fine-tune: a checkpoint, a shipped model or `tiny` (default demo-unetr; --quick: tiny)")
    parser.add_argument("--method", default="lora-pt")
    parser.add_argument("--rank", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2, help="patches per rank (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 40; --quick 12)")
    parser.add_argument("--warmup", type=int, default=None, help="first steps not timed (default 5; --quick 2)")
    parser.add_argument("--images", type=int, default=None, help="scans for segment (default 8; --quick 4; 0: skip)")
    parser.add_argument("--cores", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                        else os.cpu_count(), help="CPU cores shared by the processes (threads per rank = cores / N)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    parser.add_argument("--no-write", action="store_true", help="print the table only, write no result files")
    args = parser.parse_args()
    nprocs = sorted({int(n) for n in args.nprocs.split(",")})
    if nprocs[0] != 1:
        nprocs = [1, *nprocs]  # the baseline
    args.steps = args.steps or (12 if args.quick else 40)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    args.images = args.images if args.images is not None else (4 if args.quick else 8)
    if args.steps <= args.warmup:
        raise SystemExit("--steps must be larger than --warmup")
    work = tempfile.mkdtemp(prefix="tensorpeft-ddp-bench-")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])}
    started = today()
    try:
        if args.quick or args.model == "tiny":
            import synthetic

            model = synthetic.save_tiny_model(os.path.join(work, "unetr.safetensors"), spacing=(1.5, 1.5, 1.5))
            args.model_label, args.size, args.spacing = "tiny UNETR (4 blocks, 32³)", 40, 1.5
        else:
            model = args.model or "demo-unetr"
            args.model_label, args.size, args.spacing = model, 80, 1.5  # demo-unetr: 64³ patches at 1.5 mm
        data = make_data(os.path.join(work, "data"), cases=4, size=args.size, spacing=args.spacing,
                         images=args.images)
        rows = []
        for n in nprocs:
            print(f"finetune on {n} process(es) ...", file=sys.stderr, flush=True)
            rows.append(train(n, args, model, data, work, env))
        seg = []
        for n in nprocs if args.images else []:
            print(f"segment on {n} process(es) ...", file=sys.stderr, flush=True)
            seg.append(segment(n, args, model, data, work, env))
    finally:
        if args.keep:
            print(f"work folder: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    text = report(args, rows, seg, started)
    print(text)
    if not args.no_write:
        os.makedirs(RESULTS, exist_ok=True)
        stem = os.path.join(RESULTS, f"distributed_{args.device.split(':')[0]}{'_quick' if args.quick else ''}_{started}")
        with open(stem + ".md", "w", encoding="utf-8") as handle:
            handle.write(text)
        with open(stem + ".json", "w", encoding="utf-8") as handle:
            json.dump({"date": started, "machine": machine_line(args.device), "versions": versions(),
                       "command": sys.argv, "finetune": rows, "segment": seg}, handle, indent=1)
        print(f"wrote {stem}.md and .json", file=sys.stderr)


if __name__ == "__main__":
    main()
