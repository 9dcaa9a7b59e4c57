"""Whole-head T1 scans as a clinic stores them: segment with brain extraction (the default) and without, against the
same brains skull-stripped.

    python benchmarks/whole_head.py --adapter tensorpeft-demo/unetr-lora-pt-r1

1. Builds whole-head evaluation cases (``data.demo.build_whole_brain_eval(whole_head=True)``): an ICBM 2009c or 2009a
   brain (templates no training uses) inside pydeface's mean head (scalp, skull, face, neck), posed (tilt up to 15°,
   shift up to 12 mm, +-10 % size), deformed, bias field and noise, stored LPS and oblique at 1 mm in raw scanner
   units; and skull-stripped brains of the same templates from the same seed (other deformations: the larger field
   of view draws another elastic field), for comparison.
2. Segments every case with ``tensorpeft segment --adapter A`` in one process per case (torch import and model load
   included in the time): heads with ``--skull-strip auto`` (the default) and ``off``, brains with the default.
3. Dice / HD95 on each scan's own grid, the mask's volume against the reference's, and the volume the mask puts outside
   the brain (further than 10 mm from the reference hippocampus).
4. Writes ``benchmarks/results/whole_head_<device>_<date>.md`` / ``.json`` and a figure of one head (``.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.harness import fmt_load, load_average, machine_line, today, versions  # noqa: E402
from TensorPEFTLib.atomic import write_text_atomically  # noqa: E402
from benchmarks.whole_brain import RESULTS, segment_case  # noqa: E402

VARIANTS = (("lps-1.0mm", "LPS", 1.0, "raw"), ("oblique-1.0mm", "oblique", 1.0, "raw"))


def far_volume_ml(mask_path: str, label_path: str, mm: float = 10.0) -> float:
    """mL of the mask further than ``mm`` from the reference hippocampus: detections in the wrong place."""
    from scipy.ndimage import distance_transform_edt

    from TensorPEFTLib.data import read_volume

    mask = read_volume(mask_path)
    label = read_volume(label_path).squeezed > 0
    distance = distance_transform_edt(~label, sampling=mask.spacing)
    far = (mask.squeezed > 0) & (distance > mm)
    return round(float(far.sum()) * float(np.prod(mask.spacing)) / 1000.0, 2)


def figure(path: str, image: str, label: str, masks: dict[str, str], title: str) -> str:
    from TensorPEFTLib.data import read_volume
    from TensorPEFTLib.data.skullstrip import extract_brain
    from TensorPEFTLib.engine.report import _figure, _save, as_ras, centre_of, view_slice

    stored = read_volume(image)
    data = np.asarray(stored.squeezed, np.float32)
    brain = extract_brain(data, stored.affine)
    volume = as_ras(data, stored.affine)
    ref = as_ras(read_volume(label).array, stored.affine)
    brain_ras = as_ras(brain.mask.astype(np.uint8), stored.affine)
    centre = centre_of(ref, ref.shape)
    plt, (fig, axes) = _figure(len(masks), 3, figsize=(10.5, 3.8 * len(masks)), squeeze=False)
    for row, (name, mask_path) in zip(axes, masks.items()):
        ours = as_ras(read_volume(mask_path).array, stored.affine)
        for ax, (view, axis) in zip(row, (("coronal", 1), ("axial", 2), ("sagittal", 0))):
            ax.imshow(view_slice(volume, view, centre[axis]), cmap="gray")
            for mask, colour, width in ((brain_ras, "deepskyblue", 0.7), (ref, "lime", 1.0), (ours, "red", 1.0)):
                plane = view_slice(mask, view, centre[axis])
                if plane.any():
                    ax.contour(plane > 0, levels=[0.5], colors=colour, linewidths=width)
            ax.set_axis_off()
            ax.set_title(f"{name}\n{view}" if axis == 1 else view, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, plt, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="a hippocampus adapter folder (e.g. the demo's)")
    parser.add_argument("--work", default=os.path.join("tensorpeft-demo", "whole-head"), help="work folder")
    parser.add_argument("--subjects", type=int, default=1, help="brains per template (default 1)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the evaluation brains (default 7)")
    parser.add_argument("--name", default=None, help="results file stem (default whole_head_cpu_<date>)")
    args = parser.parse_args(argv)

    from TensorPEFTLib.data.demo import build_whole_brain_eval
    from TensorPEFTLib.engine.jobs import evaluate

    sets = {}
    for kind in ("head", "brain"):
        folder = os.path.join(args.work, kind)
        if not os.path.isfile(os.path.join(folder, "dataset.json")):
            print(f"building the {kind} cases in {folder} ...", file=sys.stderr)
            build_whole_brain_eval(folder, seed=args.seed, subjects_per_template=args.subjects, variants=VARIANTS,
                                   whole_head=kind == "head", progress=True)
        sets[kind] = (folder, json.load(open(os.path.join(folder, "dataset.json"), encoding="utf-8"))["test"])
    load_before = load_average()
    runs = [("head", "auto"), ("head", "off"), ("brain", "auto")]
    rows = []
    for kind, mode in runs:
        folder, cases = sets[kind]
        masks = os.path.join(args.work, f"masks-{kind}-{mode}")
        os.makedirs(masks, exist_ok=True)
        for case in cases:
            image, label = os.path.join(folder, case["image"]), os.path.join(folder, case["label"])
            mask = os.path.join(masks, case["name"] + ".nii.gz")
            seconds, record = segment_case(args.adapter, image, mask, ["--skull-strip", mode])
            score = evaluate(mask, label, kind="segmentation")["cases"][0]
            reference_ml = float((read_label(label) > 0).sum()) * voxel_ml(label)
            rows.append({"name": case["name"], "subject": case["subject"], "variant": case["variant"], "scan": kind,
                         "skull_strip": mode, "dice": score["dice"], "hd95": score["hd95"],
                         "mask_ml": record["foreground_ml"], "reference_ml": round(reference_ml, 2),
                         "outside_ml": far_volume_ml(mask, label), "wall_s": round(seconds, 1),
                         "segment_s": record["seconds"], "stripped": record.get("skull_stripped"),
                         "image": image, "label": label, "mask": mask})
            print(f"{kind} --skull-strip {mode} {case['name']}: Dice {score['dice']:.3f}, {seconds:.1f} s",
                  file=sys.stderr)
    load_after = load_average()

    stem = args.name or f"whole_head_cpu_{today()}"
    os.makedirs(RESULTS, exist_ok=True)
    first = next(r for r in rows if r["scan"] == "head" and r["variant"].startswith("oblique"))
    shown = {f"--skull-strip {r['skull_strip']} (Dice {r['dice']:.3f})": r["mask"] for r in rows
             if r["name"] == first["name"]}
    png = figure(os.path.join(RESULTS, stem + ".png"), first["image"], first["label"], shown,
                 f"{first['name']}: a whole head stored obliquely at 1 mm - brain found (blue), reference "
                 "hippocampus (green), segment's mask (red)")
    command = "python benchmarks/whole_head.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = ["# Whole-head scans: segment with and without brain extraction", "",
             f"Adapter `{args.adapter}`; `tensorpeft segment` with its defaults and `--skull-strip` as given, one "
             "process per scan (the time includes starting Python, loading torch and the model). Dice / HD95 "
             "against the reference on the scan's own grid; *outside*: mL of the mask further than 10 mm from the "
             "reference hippocampus. The brain rows are skull-stripped brains of the same templates from the same "
             "seed (not the same deformations: the head's larger field of view draws another elastic field).", "",
             "| case | scan | --skull-strip | stripped | Dice | HD95 mm | mask mL | reference mL | outside mL | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['scan']} | {r['skull_strip']} | {'yes' if r['stripped'] else 'no'} | "
                     f"{r['dice']:.3f} | {r['hd95']:.1f} | {r['mask_ml']:.2f} | {r['reference_ml']:.2f} | "
                     f"{r['outside_ml']:.2f} | {r['wall_s']:.1f} |")
    lines.append("")
    for kind, mode in runs:
        mine = [r for r in rows if r["scan"] == kind and r["skull_strip"] == mode]
        dice = [r["dice"] for r in mine]
        lines.append(f"- {kind} scans, --skull-strip {mode}: Dice mean {np.mean(dice):.3f} (min {min(dice):.3f}), "
                     f"mask {np.mean([r['mask_ml'] for r in mine]):.2f} mL vs reference "
                     f"{np.mean([r['reference_ml'] for r in mine]):.2f} mL, outside "
                     f"{np.mean([r['outside_ml'] for r in mine]):.2f} mL, {np.mean([r['wall_s'] for r in mine]):.1f} s "
                     "a scan")
    lines += [f"- Command: `{command}`",
              f"- Machine: {machine_line('cpu')}; load average before {fmt_load(load_before)}, after "
              f"{fmt_load(load_after)}",
              "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()),
              f"- Date: {today()}", "", f"![overlays]({os.path.basename(png)})"]
    write_text_atomically(os.path.join(RESULTS, stem + ".md"), "\n".join(lines) + "\n")
    write_text_atomically(os.path.join(RESULTS, stem + ".json"),
                          json.dumps({"adapter": args.adapter, "rows": rows, "command": command, "date": today()},
                                     indent=2, default=float))
    print("\n".join(lines))
    return 0


def read_label(path: str) -> np.ndarray:
    from TensorPEFTLib.data import read_volume

    return read_volume(path).squeezed


def voxel_ml(path: str) -> float:
    from TensorPEFTLib.data import read_volume

    return float(np.prod(read_volume(path, header_only=True).spacing)) / 1000.0


if __name__ == "__main__":
    raise SystemExit(main())
