"""Soak check: back-to-back short ``finetune`` / ``segment`` jobs killed at random; count corrupt or lost outputs.

    python benchmarks/soak.py --jobs 50

Each job is a real ``tensorpeft`` process on tiny volumes (a 4-layer UNETR at 32³, a LoRA adapter, 8 steps,
a checkpoint every 2). A third of the jobs run to the end; the rest get SIGKILL or SIGTERM after a random delay
(so some die while loading, some mid-step, some mid-write). After every job the run folders are checked:

- a finished fine-tuning run (``adapter_config.json`` at its top) must load, and its ``last/`` adapter must be
  bit-identical to an uninterrupted reference run's (the same seed and thread count: resumes must not drift);
- every ``checkpoint/`` must load with ``torch.load(weights_only=True)`` and ``load_adapter``;
- every mask must be a readable NIfTI on its image's grid, equal to the reference mask;
- a killed fine-tuning run is continued with ``--resume`` by the next fine-tuning job (or restarted with
  ``--overwrite`` when it died before its first checkpoint), so "lost" means a finished job whose output is missing.

Writes ``benchmarks/results/soak_<date>.md`` / ``.json``: jobs, kills, and the counts of corrupt outputs, lost
outputs and stray temp files (goal 0, 0, 0). Do not time anything else on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "Testing"))

from benchmarks.harness import machine_line, today, versions  # noqa: E402

RESULTS = os.path.join(ROOT, "benchmarks", "results")
STEPS = 8


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "TensorPEFTLib.cli", *args]


def finetune_args(model: str, data: str, out: str) -> list[str]:
    return ["finetune", "--model", model, "--data", data, "--out", out, "--method", "lora", "--rank", "2",
            "--steps", str(STEPS), "--checkpoint-every", "2", "--eval-every", "4", "--device", "cpu", "--threads", "1",
            "--seed", "5", "--quiet"]


def segment_args(adapter: str, images: str, out: str) -> list[str]:
    return ["segment", "--adapter", adapter, "--image", images, "--out", out, "--device", "cpu", "--threads", "1",
            "--quiet"]


def run_job(command: list[str], kill: str | None, delay: float) -> tuple[int, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill:
        try:
            proc.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL if kill == "SIGKILL" else signal.SIGTERM)
    _, err = proc.communicate(timeout=600)
    return proc.returncode, err


def tensors_equal(a: str, b: str) -> bool:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    return x.keys() == y.keys() and all(bool((x[k] == y[k]).all()) for k in x)


def check_run(folder: str, model: str, reference_last: str) -> list[str]:
    """Problems of one fine-tuning run folder (empty list: whole)."""
    import torch

    from TensorPEFTLib.adapters import load_adapter
    from TensorPEFTLib.engine.trainer import STATE_FILE
    from TensorPEFTLib.models.checkpoints import load_model

    problems = []
    if not os.path.isdir(folder):
        return problems
    for sub in ("checkpoint", "best", "last", "."):
        path = os.path.join(folder, sub)
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            continue
        try:
            load_adapter(load_model(model), path)
        except Exception as err:  # noqa: BLE001 - any failure is a corrupt output
            problems.append(f"{path}: adapter does not load ({type(err).__name__}: {err})")
        if sub == "checkpoint":
            try:
                torch.load(os.path.join(path, STATE_FILE), weights_only=True)
            except Exception as err:  # noqa: BLE001
                problems.append(f"{path}: trainer state does not load ({type(err).__name__})")
    if os.path.isfile(os.path.join(folder, "adapter_config.json")):
        last = os.path.join(folder, "last", "adapter.safetensors")
        if not os.path.isfile(last) or not tensors_equal(last, reference_last):
            problems.append(f"{folder}: finished run differs from the uninterrupted reference")
    return problems


def check_masks(folder: str, reference: str) -> list[str]:
    import numpy as np

    from TensorPEFTLib.data import read_volume

    problems = []
    if not os.path.isdir(folder):
        return problems
    for name in os.listdir(folder):
        if name.startswith("."):
            continue
        try:
            got = np.asarray(read_volume(os.path.join(folder, name)).array)
            want = np.asarray(read_volume(os.path.join(reference, name)).array)
            if got.shape != want.shape or not np.array_equal(got, want):
                problems.append(f"{folder}/{name}: differs from the reference mask")
        except Exception as err:  # noqa: BLE001
            problems.append(f"{folder}/{name}: unreadable ({type(err).__name__})")
    return problems


def strays(folder: str) -> list[str]:
    """Temp files or half-swapped folders left behind (by SIGKILL, which no program can clean up after)."""
    found = []
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            if name.startswith(".tmp") or name.endswith((".tmp", ".new")) or ".tmp-" in name:
                found.append(os.path.join(root, name))
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp folder, removed after)")
    args = parser.parse_args()

    import synthetic

    rng = random.Random(args.seed)
    work = args.work or tempfile.mkdtemp(prefix="tensorpeft-soak-")
    os.makedirs(work, exist_ok=True)
    data = synthetic.write_segmentation_dataset(os.path.join(work, "data"), n_train=4, n_test=2, seed=0)
    model = synthetic.save_tiny_model(os.path.join(work, "unetr.safetensors"))
    images = os.path.join(data, "imagesTs")

    started = time.time()
    reference = os.path.join(work, "reference")
    code, err = run_job(cli(*finetune_args(model, data, reference)), None, 0)
    if code != 0:
        raise SystemExit(f"reference run failed: {err}")
    reference_masks = os.path.join(work, "reference-masks")
    code, err = run_job(cli(*segment_args(reference, images, reference_masks)), None, 0)
    if code != 0:
        raise SystemExit(f"reference segment failed: {err}")
    reference_last = os.path.join(reference, "last", "adapter.safetensors")

    rows, corrupt, lost, stray = [], [], [], []
    run_index, run_dir, pending = 0, None, False  # pending: a killed run the next fine-tune continues
    for job in range(args.jobs):
        kind = rng.choice(["finetune", "finetune", "segment"])
        kill = rng.choice([None, "SIGKILL", "SIGTERM"])
        delay = rng.uniform(0.5, 9.0)
        if kind == "finetune":
            if not pending:
                run_index += 1
                run_dir = os.path.join(work, f"run{run_index:02d}")
            from TensorPEFTLib.engine.trainer import checkpoint_path

            resume = pending and checkpoint_path(run_dir) is not None
            extra = ["--resume"] if resume else (["--overwrite"] if pending else [])
            command = cli(*finetune_args(model, data, run_dir), *extra)
            target = run_dir
        else:
            target = os.path.join(work, f"masks{job:02d}")
            command = cli(*segment_args(reference, images, target))
        t0 = time.time()
        code, err = run_job(command, kill, delay)
        seconds = time.time() - t0
        if kind == "finetune":
            finished = os.path.isfile(os.path.join(run_dir, "adapter_config.json"))
            pending = not finished
            problems = check_run(run_dir, model, reference_last)
            if code == 0 and not finished:
                lost.append(f"job {job}: finetune exited 0 without an adapter in {run_dir}")
        else:
            problems = check_masks(target, reference_masks)
            if code == 0 and len([n for n in os.listdir(target) if not n.startswith(".")]) != 2:
                lost.append(f"job {job}: segment exited 0 without its 2 masks")
        left = strays(target)
        # 130: stopped by its own handler; -9 / -15: killed outright (SIGKILL, or SIGTERM before the CLI installed its
        # handler or after it finished): all fine as long as the outputs are whole, which is what is checked above
        if code not in (0, 130, -9, -15):
            problems.append(f"job {job}: exit {code}: {err.strip().splitlines()[-1:] if err else ''}")
        if "Traceback" in err and code != -9:
            problems.append(f"job {job}: traceback on stderr: {err.strip().splitlines()[-1:]}")
        corrupt += problems
        stray += left
        rows.append({"job": job, "kind": kind, "resume": kind == "finetune" and "--resume" in command,
                     "kill": kill, "delay_s": round(delay, 1), "exit": code, "seconds": round(seconds, 1),
                     "problems": problems, "strays": left})
        print(f"job {job:2d} {kind:8s} kill={kill or '-':7s} after {delay:4.1f}s exit={code:4d} "
              f"{'OK' if not problems else problems}", flush=True)

    finished_runs = sum(1 for i in range(1, run_index + 1)
                        if os.path.isfile(os.path.join(work, f"run{i:02d}", "adapter_config.json")))
    summary = {
        "date": today(), "jobs": args.jobs, "seed": args.seed, "seconds": round(time.time() - started, 1),
        "kills": sum(1 for r in rows if r["kill"]), "sigkill": sum(1 for r in rows if r["kill"] == "SIGKILL"),
        "sigterm": sum(1 for r in rows if r["kill"] == "SIGTERM"),
        "finetune_jobs": sum(1 for r in rows if r["kind"] == "finetune"),
        "resumed_jobs": sum(1 for r in rows if r["resume"]),
        "segment_jobs": sum(1 for r in rows if r["kind"] == "segment"),
        "runs": run_index, "finished_runs": finished_runs,
        "corrupt": len(corrupt), "lost": len(lost), "strays": len(stray),
        "problems": corrupt + lost, "stray_files": stray, "rows": rows, "machine": machine_line("cpu"),
        "versions": versions(), "command": "python benchmarks/soak.py " + " ".join(sys.argv[1:]),
    }
    os.makedirs(RESULTS, exist_ok=True)
    base = os.path.join(RESULTS, f"soak_{today()}")
    with open(base + ".json", "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=1)
    lines = [
        "# Soak: short jobs killed at random",
        "",
        f"{args.jobs} back-to-back `tensorpeft` jobs ({summary['finetune_jobs']} finetune, of which "
        f"{summary['resumed_jobs']} resumed a killed run; {summary['segment_jobs']} segment) on tiny volumes; "
        f"{summary['kills']} killed after a random 0.5-9 s ({summary['sigkill']} SIGKILL, {summary['sigterm']} "
        f"SIGTERM). {summary['runs']} fine-tuning runs, {finished_runs} finished.",
        "",
        "| check | count (goal 0) |",
        "|---|---|",
        f"| corrupt outputs (an adapter, checkpoint or mask that does not load, or a finished run / mask that "
        f"differs from the uninterrupted reference) | {len(corrupt)} |",
        f"| lost outputs (exit 0 without its output) | {len(lost)} |",
        f"| stray temp files or folders left behind | {len(stray)} |",
        "",
        *(f"- {p}" for p in (corrupt + lost + stray)[:20]),
        "",
        f"- Command: `{summary['command']}`",
        f"- Machine: {summary['machine']}",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in summary['versions'].items())}",
        f"- Date: {today()}; {summary['seconds']:.0f} s",
    ]
    with open(base + ".md", "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if not corrupt and not lost else 1


if __name__ == "__main__":
    sys.exit(main())
