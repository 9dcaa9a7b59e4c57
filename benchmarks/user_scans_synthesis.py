"""Fine-tuning the shipped latent diffusion model on what a user brings: whole-brain 1 mm scans in scanner space.

    python benchmarks/user_scans_synthesis.py                   # the README's figure and table (about 10 min on 2 CPUs)
    python benchmarks/user_scans_synthesis.py --resume          # keep the runs that finished

The scans are brains of two templates no TensorPEFT training uses (ICBM 2009c and 2009a, ``--subjects`` each), every
brain with its own random head pose (tilted up to 15°, off-centre up to 12 mm, ±10 % in size) and stored twice, LPS
and oblique at 1 mm, in raw scanner units with noise (``data.demo.build_whole_brain_eval``). ``demo-ldm`` is then
fine-tuned on them with ``finetune``'s defaults (LoRA r=4 at its default rate and steps, a quarter held out for
validation), once with ``--align off`` (the volumes resampled to the model's 2.5 mm and centred as they are) and once
with the default ``--align auto`` (each volume registered to MNI152, the space of demo-ldm's pre-training brains, and
sampled on the model's grid), and each adapter synthesizes ``--count`` volumes from the same seed.

Measured for each: the realism checks (``engine.synthesis_metrics.realism_checks``: not noise, brain-shaped, diverse)
against the scans as that run's training saw them, and against one common reference, the scans registered to MNI152;
the best validation loss; time to prepare, train and sample. Writes ``benchmarks/results/<name>.md`` / ``.json`` and
``.png`` (rows: the scans as the aligned run sees them, samples without alignment, samples with it), and with
``--figure PATH`` the same figure there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
VARIANTS = ("lps-1.0mm", "oblique-1.0mm")


def build_scans(work: str, subjects: int, seed: int) -> list[str]:
    """The user's scans (see the module docstring), built once into ``work/scans``."""
    from TensorPEFTLib.data.demo import EVAL_VARIANTS, build_whole_brain_eval

    folder = os.path.join(work, "scans")
    listing = os.path.join(folder, "dataset.json")
    if not os.path.isfile(listing):
        build_whole_brain_eval(folder, seed=seed, templates=("icbm2009c", "icbm2009a"),
                               subjects_per_template=subjects, variants=[v for v in EVAL_VARIANTS if v[0] in VARIANTS])
    entries = json.load(open(listing, encoding="utf-8"))["test"]
    return [e["image"] if os.path.isabs(e["image"]) else os.path.join(folder, e["image"]) for e in entries]


def as_training_sees(paths: list[str], size: tuple[int, ...], align: Any, pixdim: Any) -> list[np.ndarray]:
    from TensorPEFTLib.data import synthesis_transforms

    view = synthesis_transforms(size, align=align, pixdim=pixdim)
    return [np.asarray(view({"image": p})["image"], np.float32)[0] for p in paths]


def run(work: str, scans: list[str], mode: str, count: int, seed: int, threads: int, resume: bool) -> dict[str, Any]:
    """Fine-tune ``demo-ldm`` on ``scans`` with ``--align mode`` (finetune's defaults otherwise), then sample."""
    from TensorPEFTLib.cli import main as cli

    run_dir, samples_dir = os.path.join(work, f"run-{mode}"), os.path.join(work, f"samples-{mode}")
    record = os.path.join(work, f"{mode}.json")
    if resume and os.path.isfile(record):
        row = json.load(open(record, encoding="utf-8"))
        row["kept"] = True
        return row
    datalist = os.path.join(work, "scans.json")
    with open(datalist, "w", encoding="utf-8") as f:
        json.dump({"training": [{"image": p} for p in scans]}, f)
    started = time.perf_counter()
    code = cli(["finetune", "--model", "demo-ldm", "--data", datalist, "--out", run_dir, "--method", "lora", "--rank",
                "4", "--align", mode, "--threads", str(threads), "--seed", str(seed), "--overwrite", "--quiet"])
    train_seconds = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"finetune --align {mode} failed with exit code {code}")
    started = time.perf_counter()
    code = cli(["synthesize", "--adapter", run_dir, "--out", samples_dir, "--count", str(count), "--seed", str(seed),
                "--threads", str(threads), "--quiet"])
    if code != 0:
        raise RuntimeError(f"synthesize ({mode}) failed with exit code {code}")
    sample_seconds = time.perf_counter() - started
    saved = json.load(open(os.path.join(run_dir, "adapter_config.json"), encoding="utf-8"))
    history = json.load(open(os.path.join(run_dir, "history.json"), encoding="utf-8"))
    losses = [e["val_loss"] for e in history.get("evals", []) if "val_loss" in e]
    row = {"align": mode, "aligned_to": saved.get("aligned_to"), "steps": saved.get("train_steps"),
           "lr": saved.get("train_lr"), "train_cases": saved.get("train_cases"), "val_cases": saved.get("val_cases"),
           "best_val_loss": min(losses) if losses else None, "finetune_seconds": round(train_seconds, 1),
           "sample_seconds": round(sample_seconds, 1), "spacing": saved.get("spacing"), "centre": saved.get("centre"),
           "samples": sorted(os.path.join(samples_dir, f) for f in os.listdir(samples_dir) if f.endswith(".nii.gz"))}
    with open(record, "w", encoding="utf-8") as f:
        json.dump(row, f, indent=1)
    return row


def markdown(result: dict[str, Any]) -> str:
    lines = [f"# Synthesis fine-tuning on a user's 1 mm scans: registered to the model's space or not ({result['date']})",
             "", f"- Command: `{result['command']}`", f"- Machine: {result['machine']}",
             f"- Scans: {result['scans']} (ICBM 2009c / 2009a brains, each posed at random, stored "
             f"{' and '.join(VARIANTS)}); `finetune` defaults: LoRA r=4, {result['rows'][0]['steps']} steps at "
             f"{result['rows'][0]['lr']:g}, {result['rows'][0]['train_cases']} training + "
             f"{result['rows'][0]['val_cases']} validation cases; {result['count']} samples each, 50 DDIM steps, seed "
             f"{result['seed']}", "",
             "| --align | best val loss | realism vs the scans as trained on | HF ratio (each) | mask Dice (each) | "
             "realism vs the registered scans | finetune s | sample s |", "|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        own, common = row["realism_own"], row["realism_registered"]
        lines.append(f"| {row['align']} | {row['best_val_loss']:.4f} | {'pass' if own['pass']['all'] else 'fail'}: "
                     f"{own['summary']} | {', '.join(f'{v:.2f}' for v in own['hf_vs_real'])} | "
                     f"{', '.join(f'{v:.3f}' for v in own['mask_dice'])} | "
                     f"{'pass' if common['pass']['all'] else 'fail'}: {common['summary']} | "
                     f"{row['finetune_seconds']:.0f} | {row['sample_seconds']:.0f} |")
    lines += ["", "Realism checks: `engine/synthesis_metrics.realism_checks` (HF ratio within 1.5x of the real volumes', "
              "brain-mask Dice >= 0.8 against the mean real volume's mask, diversity >= 0.3x the real volumes'). "
              "\"As trained on\": each run's own view of the scans (`--align off`: resampled to 2.5 mm and centred; "
              "`auto`: registered to MNI152). `finetune s` includes the registration of every scan."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from TensorPEFTLib.data import read_volume
    from TensorPEFTLib.data.align import AlignTarget
    from TensorPEFTLib.engine.synthesis_metrics import realism_checks
    from TensorPEFTLib.models.checkpoints import load_model

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from harness import machine_line
    from ldm_methods import rows_figure

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/tensorpeft-user-scans", help="folder for scans, runs and samples")
    parser.add_argument("--subjects", type=int, default=2, help="brains per template (each stored twice)")
    parser.add_argument("--count", type=int, default=4, help="samples per run")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--name", default="user_scans_synthesis_cpu")
    parser.add_argument("--figure", default=None, help="also write the figure here (the README's)")
    parser.add_argument("--resume", action="store_true", help="keep finished runs in --work")
    args = parser.parse_args(argv)

    os.makedirs(args.work, exist_ok=True)
    scans = build_scans(args.work, args.subjects, seed=3)
    grid = load_model("demo-ldm").tensorpeft_spec["synthesis_grid"]
    size = (64, 80, 64)
    target = AlignTarget(grid["reference"], size, tuple(grid["spacing"]), tuple(grid["centre"]))
    registered = as_training_sees(scans, size, target, None)
    views = {"off": as_training_sees(scans, size, None, tuple(grid["spacing"])), "auto": registered}
    rows, figure_rows = [], [("your scans, registered to MNI152", registered)]
    for mode in ("off", "auto"):
        row = run(args.work, scans, mode, args.count, args.seed, args.threads, args.resume)
        samples = [np.clip(np.asarray(read_volume(p).array, np.float32), 0, 1) for p in row["samples"]]
        row["realism_own"] = realism_checks(samples, views[mode])
        row["realism_registered"] = realism_checks(samples, registered)
        print(f"--align {mode}: {row['realism_own']['summary']}")
        rows.append(row)
        figure_rows.append((f"samples, --align {mode}" + (" (default)" if mode == "auto" else ""), samples))
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine_line("cpu"), "scans": len(scans),
              "count": args.count, "seed": args.seed, "rows": rows,
              "command": "python benchmarks/user_scans_synthesis.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    os.makedirs(RESULTS, exist_ok=True)
    base = os.path.join(RESULTS, args.name)
    with open(base + ".json", "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    with open(base + ".md", "w", encoding="utf-8") as f:
        f.write(markdown(result))
    rows_figure(base + ".png", figure_rows)
    if args.figure:
        rows_figure(args.figure, figure_rows)
    print(f"wrote {base}.md, .json, .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
