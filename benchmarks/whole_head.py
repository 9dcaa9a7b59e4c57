"""Whole-head T1 scans as a clinic stores them: segment with brain extraction (the default) and without, against the
same brains skull-stripped; and heads unlike the one the extraction registers to.

    python benchmarks/whole_head.py --adapter tensorpeft-demo/unetr-lora-pt-r1
    python benchmarks/whole_head.py --adapter tensorpeft-demo/unetr-lora-pt-r1 --styles all --variants oblique

1. Builds whole-head evaluation cases (``data.demo.build_whole_brain_eval(whole_head=True)``): an ICBM 2009c or 2009a
   brain (templates no training uses) inside pydeface's mean head (scalp, skull, face, neck), posed (tilt up to 15°,
   shift up to 12 mm, +-10 % size), deformed, bias field and noise, stored LPS and oblique at 1 mm in raw scanner
   units; and skull-stripped brains of the same templates from the same seed (other deformations: the larger field
   of view draws another elastic field), for comparison. ``--styles``: heads unlike the mean head
   (``data.demo.HEAD_STYLES``: defaced, a wider skull, a bent neck, a field of view ending below the cerebellum),
   the same brains and poses inside them.
2. Segments every case with ``tensorpeft segment --adapter A`` in one process per case (torch import and model load
   included in the time): mean heads with ``--skull-strip auto`` (the default) and ``off``, brains with the default,
   the other head styles with the default.
3. Dice / HD95 on each scan's own grid, the mask's volume against the reference's, and the volume the mask puts outside
   the brain (further than 10 mm from the reference hippocampus). For every head, the brain extraction itself
   (``extract_brain`` on the stored scan, in this process): how much of the true brain its mask keeps, its volume
   against the true brain's, and the correlation it was accepted with.
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


def draw_planes(row, volume: np.ndarray, overlays, centre, views, name: str) -> None:
    """``volume``'s planes through ``centre`` (``views``: (name, axis) pairs) on the axes of ``row``, each with the
    contours of ``overlays`` ((mask, colour, line width), RAS like the volume); the first plane titled ``name``."""
    from TensorPEFTLib.engine.report import view_slice

    for index, (ax, (view, axis)) in enumerate(zip(row, views)):
        ax.imshow(view_slice(volume, view, centre[axis]), cmap="gray")
        for mask, colour, width in overlays:
            plane = view_slice(mask, view, centre[axis])
            if plane.any():
                ax.contour(plane > 0, levels=[0.5], colors=colour, linewidths=width)
        ax.set_axis_off()
        ax.set_title(f"{name}\n{view}" if index == 0 else view, fontsize=8)


def figure(path: str, image: str, label: str, masks: dict[str, str], title: str) -> str:
    from TensorPEFTLib.data import read_volume
    from TensorPEFTLib.data.skullstrip import extract_brain
    from TensorPEFTLib.engine.report import _figure, _save, as_ras, centre_of

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
        draw_planes(row, volume, ((brain_ras, "deepskyblue", 0.7), (ref, "lime", 1.0), (ours, "red", 1.0)), centre,
                    (("coronal", 1), ("axial", 2), ("sagittal", 0)), name)
    fig.suptitle(title, fontsize=9)
    return _save(fig, plt, path)


def extraction_scores(image: str, brain: str) -> dict:
    """The brain extraction of a head against its true brain mask: kept fraction, volume ratio, correlation."""
    from TensorPEFTLib.data import read_volume
    from TensorPEFTLib.data.skullstrip import extract_brain

    stored = read_volume(image)
    truth = read_volume(brain).squeezed > 0
    found = extract_brain(np.asarray(stored.squeezed, np.float32), stored.affine)
    return {"brain_kept": round(float((found.mask & truth).sum()) / max(float(truth.sum()), 1.0), 4),
            "mask_to_brain": round(float(found.mask.sum()) / max(float(truth.sum()), 1.0), 3),
            "correlation": None if found.correlation is None else round(found.correlation, 3), "head": found.head}


def main(argv: list[str] | None = None) -> int:
    from TensorPEFTLib.data.demo import HEAD_STYLES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", required=True, help="a hippocampus adapter folder (e.g. the demo's)")
    parser.add_argument("--work", default=os.path.join("tensorpeft-demo", "whole-head"), help="work folder")
    parser.add_argument("--subjects", type=int, default=1, help="brains per template (default 1)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the evaluation brains (default 7)")
    parser.add_argument("--styles", default="mean",
                        help=f"head styles, comma-separated, or all ({', '.join(HEAD_STYLES)}; default mean: the mean "
                             "head with and without extraction, and the brains)")
    parser.add_argument("--variants", default="lps,oblique", help="storages: lps, oblique or both (default)")
    parser.add_argument("--name", default=None, help="results file stem (default whole_head_cpu_<date>)")
    args = parser.parse_args(argv)
    styles = list(HEAD_STYLES) if args.styles == "all" else [s.strip() for s in args.styles.split(",") if s.strip()]
    unknown = [s for s in styles if s not in HEAD_STYLES]
    if unknown:
        parser.error(f"--styles: unknown {', '.join(unknown)}; choose from {', '.join(HEAD_STYLES)} or all")
    variants = [v for v in VARIANTS if v[0].split("-")[0] in args.variants.split(",")]
    if not variants:
        parser.error("--variants: choose lps, oblique or lps,oblique")

    from TensorPEFTLib.data.demo import build_whole_brain_eval
    from TensorPEFTLib.engine.jobs import evaluate

    sets = {}
    kinds = [("head", style) for style in styles] + ([("brain", "")] if "mean" in styles else [])
    for kind, style in kinds:
        folder = os.path.join(args.work, kind if style in ("", "mean") else f"head-{style}")
        if not os.path.isfile(os.path.join(folder, "dataset.json")):
            print(f"building the {kind} {style} cases in {folder} ...", file=sys.stderr)
            build_whole_brain_eval(folder, seed=args.seed, subjects_per_template=args.subjects, variants=VARIANTS,
                                   whole_head=kind == "head", head_style=style or "mean", progress=True)
        cases = json.load(open(os.path.join(folder, "dataset.json"), encoding="utf-8"))["test"]
        sets[(kind, style)] = (folder, [c for c in cases if c["variant"] in {v[0] for v in variants}])
    load_before = load_average()
    runs = [("head", style, mode) for style in styles for mode in (("auto", "off") if style == "mean" else ("auto",))]
    runs += [("brain", "", "auto")] if "mean" in styles else []
    rows = []
    for kind, style, mode in runs:
        folder, cases = sets[(kind, style)]
        masks = os.path.join(args.work, f"masks-{kind}{'-' + style if style else ''}-{mode}")
        os.makedirs(masks, exist_ok=True)
        for case in cases:
            image, label = os.path.join(folder, case["image"]), os.path.join(folder, case["label"])
            mask = os.path.join(masks, case["name"] + ".nii.gz")
            seconds, record = segment_case(args.adapter, image, mask, ["--skull-strip", mode])
            score = evaluate(mask, label, kind="segmentation")["cases"][0]
            reference_ml = float((read_label(label) > 0).sum()) * voxel_ml(label)
            row = {"name": case["name"], "subject": case["subject"], "variant": case["variant"], "scan": kind,
                   "style": style, "skull_strip": mode, "dice": score["dice"], "hd95": score["hd95"],
                   "mask_ml": record["foreground_ml"], "reference_ml": round(reference_ml, 2),
                   "outside_ml": far_volume_ml(mask, label), "wall_s": round(seconds, 1),
                   "segment_s": record["seconds"], "stripped": record.get("skull_stripped"),
                   "image": image, "label": label, "mask": mask}
            if kind == "head" and mode == "auto":
                row.update(extraction_scores(image, os.path.join(folder, case["brain"])))
            rows.append(row)
            print(f"{kind} {style} --skull-strip {mode} {case['name']}: Dice {score['dice']:.3f}, {seconds:.1f} s",
                  file=sys.stderr)
    load_after = load_average()

    stem = args.name or f"whole_head_cpu_{today()}"
    os.makedirs(RESULTS, exist_ok=True)
    heads = [r for r in rows if r["scan"] == "head"]
    first = next((r for r in heads if r["variant"].startswith("oblique")), heads[0])
    if len(styles) > 1:  # one head of each style, as the extraction found its brain
        shown = {f"{r['style']} head (Dice {r['dice']:.3f})": r for r in heads
                 if r["skull_strip"] == "auto" and r["subject"] == first["subject"] and r["variant"] == first["variant"]}
        png = styles_figure(os.path.join(RESULTS, stem + ".png"), shown,
                            f"{first['subject']}, {first['variant']}: heads of every style - brain found (blue), "
                            "reference hippocampus (green), segment's mask (red)")
    else:  # one head, with and without extraction
        masks = {f"{r['style']} head, --skull-strip {r['skull_strip']} (Dice {r['dice']:.3f})": r["mask"] for r in rows
                 if r["name"] == first["name"]}
        png = figure(os.path.join(RESULTS, stem + ".png"), first["image"], first["label"], masks,
                     f"{first['name']}: a whole head stored obliquely at 1 mm - brain found (blue), reference "
                     "hippocampus (green), segment's mask (red)")
    command = "python benchmarks/whole_head.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    lines = ["# Whole-head scans: segment with and without brain extraction", "",
             f"Adapter `{args.adapter}`; `tensorpeft segment` with its defaults and `--skull-strip` as given, one "
             "process per scan (the time includes starting Python, loading torch and the model). Dice / HD95 "
             "against the reference on the scan's own grid; *outside*: mL of the mask further than 10 mm from the "
             "reference hippocampus. The brain rows are skull-stripped brains of the same templates from the same "
             "seed (not the same deformations: the head's larger field of view draws another elastic field). "
             "*Brain kept* / *mask : brain* / *corr.*: the brain extraction of the stored scan against its true brain "
             "mask (fraction of the brain inside the mask, mask volume over brain volume, the correlation inside the "
             "brain it was accepted with; >= 0.3 is a T1 head).", "",
             "| case | scan | head style | --skull-strip | stripped | Dice | HD95 mm | mask mL | reference mL | "
             "outside mL | brain kept | mask : brain | corr. | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def cell(value, spec):
        return "" if value is None else format(value, spec)

    for r in rows:
        lines.append(f"| {r['name']} | {r['scan']} | {r['style']} | {r['skull_strip']} | "
                     f"{'yes' if r['stripped'] else 'no'} | {r['dice']:.3f} | {r['hd95']:.1f} | {r['mask_ml']:.2f} | "
                     f"{r['reference_ml']:.2f} | {r['outside_ml']:.2f} | {cell(r.get('brain_kept'), '.4f')} | "
                     f"{cell(r.get('mask_to_brain'), '.2f')} | {cell(r.get('correlation'), '.2f')} | "
                     f"{r['wall_s']:.1f} |")
    lines.append("")
    for kind, style, mode in runs:
        mine = [r for r in rows if r["scan"] == kind and r["style"] == style and r["skull_strip"] == mode]
        dice = [r["dice"] for r in mine]
        kept = [r["brain_kept"] for r in mine if "brain_kept" in r]
        extraction = f", brain kept {min(kept):.4f} (lowest)" if kept else ""
        lines.append(f"- {kind} scans{' (' + style + ')' if style else ''}, --skull-strip {mode}: Dice mean "
                     f"{np.mean(dice):.3f} (min {min(dice):.3f}), mask {np.mean([r['mask_ml'] for r in mine]):.2f} mL "
                     f"vs reference {np.mean([r['reference_ml'] for r in mine]):.2f} mL, outside "
                     f"{np.mean([r['outside_ml'] for r in mine]):.2f} mL{extraction}, "
                     f"{np.mean([r['wall_s'] for r in mine]):.1f} s a scan")
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


def styles_figure(path: str, rows: dict[str, dict], title: str) -> str:
    """One row per head style: the sagittal plane through the hippocampus and the coronal one, with the brain found
    (blue), the reference (green) and the mask (red)."""
    from TensorPEFTLib.data import read_volume
    from TensorPEFTLib.data.skullstrip import extract_brain
    from TensorPEFTLib.engine.report import _figure, _save, as_ras, centre_of

    plt, (fig, axes) = _figure(len(rows), 2, figsize=(7.0, 3.6 * len(rows)), squeeze=False)
    for row_axes, (name, r) in zip(axes, rows.items()):
        stored = read_volume(r["image"])
        data = np.asarray(stored.squeezed, np.float32)
        volume = as_ras(data, stored.affine)
        brain = as_ras(extract_brain(data, stored.affine).mask.astype(np.uint8), stored.affine)
        ref = as_ras(read_volume(r["label"]).array, stored.affine)
        ours = as_ras(read_volume(r["mask"]).array, stored.affine)
        centre = centre_of(ref, ref.shape)
        draw_planes(row_axes, volume, ((brain, "deepskyblue", 0.7), (ref, "lime", 1.0), (ours, "red", 1.0)), centre,
                    (("sagittal", 0), ("coronal", 1)), name)
    fig.suptitle(title, fontsize=9)
    return _save(fig, plt, path)


def read_label(path: str) -> np.ndarray:
    from TensorPEFTLib.data import read_volume

    return read_volume(path).squeezed


def voxel_ml(path: str) -> float:
    from TensorPEFTLib.data import read_volume

    return float(np.prod(read_volume(path, header_only=True).spacing)) / 1000.0


if __name__ == "__main__":
    raise SystemExit(main())
