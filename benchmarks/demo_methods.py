"""Adapters compared on the demo task: the shipped UNETR fine-tuned on the same 5 hippocampus subjects with each
method, segmenting the same held-out subjects. One command, one table (Markdown + JSON) under benchmarks/results/.

    python benchmarks/demo_methods.py                       # full, lora, pissa, lora-pt, tcurlora, lotr
    python benchmarks/demo_methods.py --methods lora-pt,lotr --steps 120

It is ``tensorpeft demo --methods ... --no-synthesis`` plus the machine facts and the exact command, so the table
reproduces with the CLI alone.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.harness import fmt_load, load_average, machine_line, today, versions  # noqa: E402
from TensorPEFTLib.engine import Events  # noqa: E402
from TensorPEFTLib.engine.demo import DemoSettings, run_demo  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: each method at the rank its paper (or common use) pairs with this task: LoRA-PT r=1 and tCURLoRA r=8 as in their
#: papers, LoTR r=8, LoRA/PiSSA r=4; ``full`` has no rank
DEFAULT_METHODS = "full,lora:4,pissa:4,lora-pt:1,tcurlora:8,lotr:8"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated NAME or NAME:RANK (default {DEFAULT_METHODS})")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps (default: the demo's)")
    parser.add_argument("--out", default=os.path.join("tensorpeft-demo", "methods"), help="work folder")
    parser.add_argument("--name", default=None, help="results file stem (default demo_methods_<device>_<date>)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    settings = DemoSettings(synthesis=False, **({"seg_steps": args.steps} if args.steps else {}))
    load_before = load_average()
    summary = run_demo(args.out, settings, methods=methods, device=args.device, threads=args.threads, events=Events())
    load_after = load_average()
    seg = summary["segmentation"]
    command = "python benchmarks/demo_methods.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    stem = args.name or f"demo_methods_{'cpu' if args.device in ('auto', 'cpu') else args.device}_{today()}"
    os.makedirs(RESULTS, exist_ok=True)
    lines = [
        "# Adapters on the demo task: hippocampus from 5 labelled subjects", "",
        f"Shipped `demo-unetr` (unetr-small pretrained on thalamus/caudate/putamen/pallidum), fine-tuned with each "
        f"method on the same {len(seg['train_subjects'])} whole-brain subjects with `finetune`'s defaults: "
        f"{seg['adapted'][0]['steps']} steps (lr {seg['adapted'][0]['lr']:g}, Adam, poly decay, Dice + CE, batch 2, 64³ "
        f"patches at 1.5 mm, left-right flips, random affine); the best of {len(seg['val_subjects'])} "
        f"validation subjects' Dice picks the checkpoint; segmentation of the held-out subjects by sliding window "
        f"with test-time mirroring along the flipped axis (`segment --mirror auto`), components under 1000 mm³ "
        f"removed. Dice and HD95 (mm) are means over each group's subjects; `heldout`: new deformations of the "
        f"training template, `unseen-template`: a template no training subject uses.", "",
        seg["table"], "",
        f"- Command: `{command}`",
        f"- Machine: {machine_line(args.device)}; load average before {fmt_load(load_before)}, after {fmt_load(load_after)}",
        f"- Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
        f"- Date: {today()}; total {summary['seconds']:.0f} s. `train s` includes validation passes.",
    ]
    md = os.path.join(RESULTS, stem + ".md")
    with open(md + ".tmp", "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(md + ".tmp", md)
    rows = [{"model": "base", **seg["base"]["groups"]}] + [
        {k: r[k] for k in ("method", "rank", "trainable", "adapter_parameters", "total_parameters", "train_seconds",
                           "best_val_dice")} | {"groups": r["groups"]} for r in seg["adapted"]]
    with open(os.path.join(RESULTS, stem + ".json"), "w", encoding="utf-8") as handle:
        json.dump({"command": command, "rows": rows, "date": today(), "versions": versions()}, handle, indent=1)
    print("\n".join(lines))
    print(f"\nwritten: {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
