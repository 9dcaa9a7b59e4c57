"""Whole-brain scans as a user brings them: Dice in every storage variant, time per scan, merged-adapter cost.

    python benchmarks/whole_brain.py --adapter tensorpeft-demo/unetr-lora-pt-r1

1. Builds the whole-brain evaluation set (``data.demo.build_whole_brain_eval``): hippocampus cases on templates no
   training uses (ICBM 2009c, and ICBM 2009a where nilearn is installed), each brain stored RAS, LPS and oblique by
   10-20°, at 1.0 and 1.2 mm, one variant in 0-4095 and one in [0, 1].
2. Segments every case with ``tensorpeft segment --adapter A`` and its defaults, one process per case, timed from
   the outside (torch import and model load included), and scores Dice / HD95 on the input grid.
3. Times the sliding window of the merged adapter against the base model on the same preprocessed 1 mm scan,
   interleaved, and reports the ratio of the fastest runs (target <= 1.01; ``segment`` merges and unloads the adapter,
   so the two are the same architecture and any difference is the machine's noise).
4. Writes ``benchmarks/results/whole_brain_<device>_<date>.md`` / ``.json`` and an overlay figure of a 1 mm RAS and
   an oblique case (``.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.harness import fmt_load, load_average, machine_line, today, versions  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def dice_spreads(rows: list[dict]) -> tuple[dict[str, float], dict[str, float]]:
    """Per brain (``subject``): the Dice range over all its stored variants, and the largest Dice range over its
    orientations (``storage``: RAS, LPS, oblique) at one voxel size — the two differ by what resampling a 1.0 vs a
    1.2 mm reference does to the label itself."""
    spread, orientation = {}, {}
    for subject in sorted({r["subject"] for r in rows}):
        mine = [r for r in rows if r["subject"] == subject]
        spread[subject] = round(max(r["dice"] for r in mine) - min(r["dice"] for r in mine), 4)
        by_size: dict[float, list[float]] = {}
        for r in mine:
            by_size.setdefault(float(r["spacing_mm"][0]), []).append(r["dice"])
        orientation[subject] = round(max(max(d) - min(d) for d in by_size.values()), 4)
    return spread, orientation


def segment_case(adapter: str, image: str, mask: str, extra: list[str]) -> tuple[float, dict]:
    """One ``tensorpeft segment`` process: wall seconds (everything a user waits for) and its record."""
    command = [sys.executable, "-m", "TensorPEFTLib.cli", "segment", "--adapter", adapter, "--image", image,
               "--out", mask, "--json", "--quiet", *extra]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"segment failed on {image}: {done.stderr.strip().splitlines()[-1:]}")
    return seconds, json.loads(done.stdout)[0]


def merged_cost_ratio(adapter: str, image: str, repeats: int = 5) -> dict:
    """Sliding-window seconds of the merged adapter over the base model's, on one preprocessed scan, interleaved so
    both see the same machine. The ratio is of the fastest run of each (the least disturbed by anything else on the
    machine, as ``timeit`` advises); the medians are reported beside it."""
    import torch

    from TensorPEFTLib.adapters import read_adapter_config
    from TensorPEFTLib.data import inference_transforms
    from TensorPEFTLib.engine.jobs import inference_preprocessing, load_adapted_model
    from TensorPEFTLib.engine.runtime import select_runtime
    from TensorPEFTLib.engine.segmentation import predict_probabilities

    runtime = select_runtime("auto", "auto", None)
    saved = read_adapter_config(adapter)
    base, _ = load_adapted_model(saved["base_model_source"], None, runtime)
    merged, _ = load_adapted_model(None, adapter, runtime)
    prep = inference_preprocessing(merged, saved)
    volume = inference_transforms(pixdim=prep.spacing, intensity=prep.intensity)({"image": image})["image"][None].float()
    patch = tuple(saved["patch_size"])
    times: dict[str, list[float]] = {"base": [], "merged": []}
    with torch.no_grad(), runtime.autocast():
        predict_probabilities(base, volume, patch, 4, 0.5)  # warm-up
        for _ in range(repeats):
            for name, model in (("base", base), ("merged", merged)):
                started = time.perf_counter()
                predict_probabilities(model, volume, patch, 4, 0.5)
                times[name].append(time.perf_counter() - started)
    base_s, merged_s = min(times["base"]), min(times["merged"])
    return {"base_s": round(base_s, 3), "merged_s": round(merged_s, 3), "ratio": round(merged_s / base_s, 4),
            "base_median_s": round(statistics.median(times["base"]), 3),
            "merged_median_s": round(statistics.median(times["merged"]), 3),
            "repeats": repeats, "shape": list(volume.shape[2:]), "threads": torch.get_num_threads()}


def overlay(path: str, cases: list[dict], folder: str, masks: str) -> str:
    from TensorPEFTLib.data import read_volume
    from TensorPEFTLib.engine.report import _figure, _save, as_ras, centre_of, view_slice

    plt, (fig, axes) = _figure(len(cases), 3, figsize=(10, 3.6 * len(cases)), squeeze=False)
    for row, case in zip(axes, cases):
        stored = read_volume(os.path.join(folder, case["image"]))
        image = as_ras(np.asarray(stored.array, np.float32), stored.affine)
        ref = as_ras(read_volume(os.path.join(folder, case["label"])).array, stored.affine)
        ours = as_ras(read_volume(os.path.join(masks, case["name"] + ".nii.gz")).array, stored.affine)
        centre = centre_of(ref, ref.shape)
        for ax, (view, axis) in zip(row, (("coronal", 1), ("axial", 2), ("sagittal", 0))):
            ax.imshow(view_slice(image, view, centre[axis]), cmap="gray")
            for mask, colour in ((ref, "lime"), (ours, "red")):
                plane = view_slice(mask, view, centre[axis])
                if plane.any():
                    ax.contour(plane > 0, levels=[0.5], colors=colour, linewidths=1.0)
            ax.set_axis_off()
            title = f"{case['name']} (Dice {case['dice']:.3f})\n" if axis == 1 else ""
            ax.set_title(f"{title}{view}", fontsize=8)
    fig.suptitle("whole-brain scans of unseen templates: reference hippocampus (green), segment's mask (red)\n"
                 "each mask on its scan's own grid, shown in the closest RAS planes (the oblique scan stays tilted)",
                 fontsize=9)
    return _save(fig, plt, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="a hippocampus adapter folder (e.g. the demo's)")
    parser.add_argument("--work", default=os.path.join("tensorpeft-demo", "whole-brain"), help="work folder")
    parser.add_argument("--subjects", type=int, default=1, help="brains per template (default 1)")
    parser.add_argument("--name", default=None, help="results file stem (default whole_brain_cpu_<date>)")
    parser.add_argument("--segment-args", default="", help="extra segment flags, e.g. '--mirror none'")
    args = parser.parse_args(argv)

    from TensorPEFTLib.data.demo import build_whole_brain_eval
    from TensorPEFTLib.engine.jobs import evaluate

    folder = os.path.join(args.work, "eval")
    if not os.path.isfile(os.path.join(folder, "dataset.json")):
        print(f"building the evaluation set in {folder} ...", file=sys.stderr)
        build_whole_brain_eval(folder, subjects_per_template=args.subjects, progress=True)
    meta = json.load(open(os.path.join(folder, "dataset.json"), encoding="utf-8"))
    masks = os.path.join(args.work, "masks")
    os.makedirs(masks, exist_ok=True)
    load_before = load_average()
    rows = []
    for case in meta["test"]:
        image = os.path.join(folder, case["image"])
        mask = os.path.join(masks, case["name"] + ".nii.gz")
        seconds, record = segment_case(args.adapter, image, mask, shlex.split(args.segment_args))
        score = evaluate(mask, os.path.join(folder, case["label"]), kind="segmentation")["cases"][0]
        rows.append({**case, "dice": score["dice"], "hd95": score["hd95"], "wall_s": round(seconds, 1),
                     "segment_s": record["seconds"], "mirror": record.get("mirror"),
                     "foreground_ml": record["foreground_ml"]})
        print(f"{case['name']}: Dice {score['dice']:.3f}, {seconds:.1f} s", file=sys.stderr)
    one_mm = next(r for r in rows if r["variant"].startswith("ras-1.0"))
    cost = merged_cost_ratio(args.adapter, os.path.join(folder, one_mm["image"]))
    load_after = load_average()

    spread, orientation_spread = dice_spreads(rows)
    stem = args.name or f"whole_brain_cpu_{today()}"
    os.makedirs(RESULTS, exist_ok=True)
    png = overlay(os.path.join(RESULTS, stem + ".png"),
                  [one_mm, next(r for r in rows if r["subject"] == one_mm["subject"] and r["storage"] == "oblique")],
                  folder, masks)
    command = "python benchmarks/whole_brain.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = ["# Whole-brain scans of unseen templates, stored every way", "",
             f"Adapter `{args.adapter}`; `tensorpeft segment` with its defaults, one process per scan (the time "
             "includes starting Python, loading torch and the model). Dice / HD95 against the reference on the "
             "scan's own grid.", "",
             "| case | template | stored | voxel mm | shape | range | Dice | HD95 mm | seconds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['template']} | {r['storage']} | {r['spacing_mm'][0]:g} | "
                     f"{'x'.join(map(str, r['shape']))} | {r['range']} | {r['dice']:.3f} | {r['hd95']:.1f} | "
                     f"{r['wall_s']:.1f} |")
    dice = [r["dice"] for r in rows]
    lines += ["", f"- Dice: min {min(dice):.3f}, mean {np.mean(dice):.3f}",
              "- Largest spread between orientations (RAS, LPS, oblique) of one brain at one voxel size: "
              + ", ".join(f"{s} {v:.3f}" for s, v in orientation_spread.items()),
              "- Largest spread between all variants of one brain (orientations and voxel sizes together): "
              + ", ".join(f"{s} {v:.3f}" for s, v in spread.items()),
              f"- 1 mm RAS scan ({'x'.join(map(str, one_mm['shape']))}): {one_mm['wall_s']:.1f} s end to end, "
              f"{one_mm['segment_s']:.1f} s in segment_images (mirroring {one_mm['mirror']})",
              f"- Merged adapter vs base model, sliding window on the same {'x'.join(map(str, cost['shape']))} "
              f"working volume (merged and unloaded, as segment runs it), {cost['repeats']} interleaved runs each: "
              f"fastest {cost['merged_s']:.2f} s vs {cost['base_s']:.2f} s, ratio {cost['ratio']:.3f} (medians "
              f"{cost['merged_median_s']:.2f} s vs {cost['base_median_s']:.2f} s; {cost['threads']} torch threads)",
              f"- Command: `{command}`",
              f"- Machine: {machine_line('cpu')}; load average before {fmt_load(load_before)}, after {fmt_load(load_after)}",
              "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
              f"- Date: {today()}", "", f"![overlays]({os.path.basename(png)})"]
    md = os.path.join(RESULTS, stem + ".md")
    with open(md + ".tmp", "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(md + ".tmp", md)
    with open(os.path.join(RESULTS, stem + ".json.tmp"), "w", encoding="utf-8") as handle:
        json.dump({"adapter": args.adapter, "cases": rows, "spread": spread,
                   "orientation_spread": orientation_spread, "merged_cost": cost,
                   "command": command, "date": today()}, handle, indent=2, default=float)
    os.replace(os.path.join(RESULTS, stem + ".json.tmp"), os.path.join(RESULTS, stem + ".json"))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
