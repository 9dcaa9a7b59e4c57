"""Labels as a user's tool writes them: a left and a right hippocampus as FreeSurfer numbers them (17 and 53), where
the shipped model segments one structure (class 1). Fine-tune with ``finetune``'s defaults, segment held-out scans,
score each side.

    python benchmarks/own_labels.py                       # the defaults (--flip auto: flips that swap 17 and 53)
    python benchmarks/own_labels.py --flips auto,none     # and without left-right flips, side by side

1. Relabels the demo cohort's hippocampus subjects (``tensorpeft-demo/cohort``; built with ``tensorpeft demo-data`` if
   missing): each label's two hippocampi are told apart by their centre in world coordinates (the one further to
   the patient's left is 17, Left-Hippocampus in FreeSurfer's colour table, the other 53). Images are linked, not
   copied. The 7 training subjects train (``finetune`` holds out 2 of them to pick the best adapter); the 4 held-out
   subjects and the unseen-template subject are the test set.
2. ``tensorpeft finetune --model demo-unetr --data DATA --out RUN`` (defaults; ``--flip`` as asked), one process,
   events to ``RUN/events.jsonl``.
3. ``tensorpeft segment`` of every test scan, ``evaluate``: Dice / HD95 per side, and how much of each predicted side
   lies in the other side's reference hippocampus (left-right swaps).
4. Writes ``benchmarks/results/own_labels_<device>_<date>.md`` / ``.json`` and a figure (coronal and axial planes
   through the hippocampi, each side its colour).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from benchmarks.harness import fmt_load, load_average, machine_line, today, versions  # noqa: E402
from benchmarks.whole_brain import RESULTS  # noqa: E402
from TensorPEFTLib.atomic import write_text_atomically  # noqa: E402

LEFT, RIGHT = 17, 53  # FreeSurfer's Left-Hippocampus and Right-Hippocampus


def split_sides(label_path: str, out_path: str) -> dict:
    """The label's hippocampus voxels as 17 (patient's left: smaller world x) and 53, by connected component: the two
    hippocampi never touch. Returns each side's voxel count."""
    from scipy import ndimage

    from TensorPEFTLib.data import read_volume, write_volume

    label = read_volume(label_path)
    mask = np.asarray(label.squeezed) > 0
    parts, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if count < 2:
        raise SystemExit(f"{label_path}: {count} hippocampus component(s); expected a left and a right one")
    sizes = ndimage.sum(mask, parts, range(1, count + 1))
    largest = np.argsort(sizes)[::-1][:2] + 1  # specks of a thresholded atlas join their nearest side below
    centres = np.asarray(ndimage.center_of_mass(mask, parts, largest))
    world_x = centres @ label.affine[:3, :3].T[:, 0] + label.affine[0, 3]
    left_part, right_part = (largest[0], largest[1]) if world_x[0] < world_x[1] else (largest[1], largest[0])
    seeds = np.zeros(mask.shape, dtype=np.int64)
    seeds[parts == left_part], seeds[parts == right_part] = LEFT, RIGHT
    if count > 2:  # every other voxel of the mask goes to the nearer side
        _, nearest = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
        seeds = np.where(mask, seeds[tuple(nearest)], 0)
    write_volume(out_path, seeds.astype(np.uint8), like=label)
    return {"left_voxels": int((seeds == LEFT).sum()), "right_voxels": int((seeds == RIGHT).sum())}


def build_dataset(cohort: str, work: str) -> tuple[str, list[dict]]:
    """``work/data`` (imagesTr/labelsTr: the demo's 7 training subjects, 17/53 labels) and the test cases."""
    source = os.path.join(cohort, "hippocampus")
    if not os.path.isdir(os.path.join(source, "imagesTr")):
        print(f"building the demo cohort in {cohort} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "TensorPEFTLib.cli", "demo-data", "--out", cohort], check=True)
    data = os.path.join(work, "data")
    tests = []
    for split in ("Tr", "Ts"):
        os.makedirs(os.path.join(data, f"images{split}"), exist_ok=True)
        os.makedirs(os.path.join(data, f"labels{split}"), exist_ok=True)
        for name in sorted(os.listdir(os.path.join(source, f"images{split}"))):
            if not name.endswith(".nii.gz") or "_head_" in name:
                continue
            image = os.path.join(data, f"images{split}", name)
            if not os.path.lexists(image):
                os.symlink(os.path.abspath(os.path.join(source, f"images{split}", name)), image)
            label = os.path.join(data, f"labels{split}", name)
            sides = split_sides(os.path.join(source, f"labels{split}", name), label)
            if split == "Ts":
                tests.append({"name": name[: -len(".nii.gz")], "image": image, "label": label, **sides})
    return data, tests


def swapped_fraction(mask_path: str, label_path: str) -> dict:
    """Of each predicted side, the fraction lying in the other side's reference hippocampus."""
    from TensorPEFTLib.data import read_volume

    mask, ref = np.asarray(read_volume(mask_path).squeezed), np.asarray(read_volume(label_path).squeezed)
    out = {}
    for side, other in ((LEFT, RIGHT), (RIGHT, LEFT)):
        predicted = mask == side
        out[side] = round(float((predicted & (ref == other)).sum()) / max(float(predicted.sum()), 1.0), 4)
    return out


def figure(path: str, tests: list[dict], masks: dict[str, str], title: str) -> str:
    from benchmarks.whole_head import draw_planes
    from TensorPEFTLib.data import read_volume
    from TensorPEFTLib.engine.report import _figure, _save, as_ras, centre_of

    plt, (fig, axes) = _figure(len(tests), 2, figsize=(7.0, 3.4 * len(tests)), squeeze=False)
    for row, case in zip(axes, tests):
        stored = read_volume(case["image"])
        volume = as_ras(np.asarray(stored.squeezed, np.float32), stored.affine)
        ref = as_ras(read_volume(case["label"]).array, stored.affine)
        ours = as_ras(read_volume(masks[case["name"]]).array, stored.affine)
        centre = centre_of(ref > 0, ref.shape)
        overlays = ((ref == LEFT, "lime", 1.6), (ref == RIGHT, "cyan", 1.6),
                    (ours == LEFT, "red", 0.9), (ours == RIGHT, "magenta", 0.9))
        draw_planes(row, volume, overlays, centre, (("coronal", 1), ("axial", 2)), case["name"])
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # the title just above the first row
    return _save(fig, plt, path)


def run_flip(flip: str, data: str, tests: list[dict], work: str, threads: int | None, seed: int = 0) -> dict:
    from TensorPEFTLib.engine.jobs import evaluate

    run = os.path.join(work, f"run-flip-{flip}")
    command = [sys.executable, "-m", "TensorPEFTLib.cli", "finetune", "--model", "demo-unetr", "--data", data,
               "--out", run, "--overwrite", "--flip", flip, "--events", os.path.join(work, f"events-{flip}.jsonl"),
               "--quiet", "--seed", str(seed)] + (["--threads", str(threads)] if threads else [])
    print(" ".join(command), file=sys.stderr)
    events_file = os.path.join(work, f"events-{flip}.jsonl")
    if os.path.exists(events_file):  # --events appends: this run's events alone
        os.remove(events_file)
    started = time.perf_counter()
    subprocess.run(command, check=True)
    train_s = time.perf_counter() - started
    saved = json.load(open(os.path.join(run, "adapter_config.json"), encoding="utf-8"))
    history = json.load(open(os.path.join(run, "history.json"), encoding="utf-8"))
    val_dice = [round(float(e["dice"]), 4) for e in history.get("evals", []) if "dice" in e]
    masks_dir = os.path.join(work, f"masks-flip-{flip}")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "TensorPEFTLib.cli", "segment", "--adapter", run, "--image",
                    os.path.join(data, "imagesTs"), "--out", masks_dir, "--quiet"], check=True)
    segment_s = time.perf_counter() - started
    scores = evaluate(masks_dir, os.path.join(data, "labelsTs"))
    masks = {c["name"]: os.path.join(masks_dir, c["name"] + ".nii.gz") for c in tests}
    cases = []
    for row in scores["cases"]:
        case = next(c for c in tests if c["name"] == row["case"])
        cases.append({"case": row["case"], "dice": round(row["dice"], 4), "hd95": round(row["hd95"], 2),
                      "dice_left": round(row["structures"][LEFT]["dice"], 4),
                      "dice_right": round(row["structures"][RIGHT]["dice"], 4),
                      "swapped": swapped_fraction(masks[row["case"]], case["label"])})
    used = saved.get("flip")
    if saved.get("mirror_pairs"):
        used += " + swap " + ", ".join("<->".join(map(str, pair)) for pair in saved["mirror_pairs"])
    return {"flip": flip, "seed": seed, "flip_used": used, "mirror_pairs": saved.get("mirror_pairs"),
            "label_map": saved.get("label_map"),
            "num_classes": saved.get("num_classes"), "trainable": saved.get("trainable"),
            "train_s": round(train_s, 1), "segment_s": round(segment_s, 1), "val_dice": val_dice,
            "cases": cases, "masks": masks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", default=os.path.join("tensorpeft-demo", "cohort"), help="demo cohort folder")
    parser.add_argument("--work", default=os.path.join("tensorpeft-demo", "own-labels"), help="work folder")
    parser.add_argument("--flips", default="auto", help="--flip values to run, comma-separated (default auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the fine-tune")
    parser.add_argument("--seed", type=int, default=0, help="finetune --seed (another draw of the same recipe)")
    parser.add_argument("--name", default=None, help="results file stem (default own_labels_cpu_<date>)")
    args = parser.parse_args(argv)

    data, tests = build_dataset(args.cohort, args.work)
    load_before = load_average()
    runs = [run_flip(flip.strip(), data, tests, args.work, args.threads, args.seed)
            for flip in args.flips.split(",") if flip.strip()]
    load_after = load_average()

    stem = args.name or f"own_labels_cpu_{today()}"
    os.makedirs(RESULTS, exist_ok=True)
    figure_path = os.path.join(RESULTS, stem + ".png")
    first = runs[0]
    figure(figure_path, tests, first["masks"],
           f"demo-unetr + lora-pt r1 on labels 17 (left, reference lime / ours red) and 53 (right, cyan / magenta); "
           f"--flip {first['flip']}")
    lines = [f"# Own labels: a left and a right hippocampus (FreeSurfer 17 / 53) on a one-structure model ({today()})", "",
             machine_line("cpu"), "", f"`python benchmarks/own_labels.py --flips {args.flips}"
             f"{f' --seed {args.seed}' if args.seed else ''}`; {versions()}", "",
             f"Load average before / after: {fmt_load(load_before)} / {fmt_load(load_after)}.", "",
             "| --flip | used | classes | train s | case | Dice mean | Dice left (17) | Dice right (53) | HD95 mm | "
             "left predicted in right | right predicted in left |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for case in run["cases"]:
            lines.append(f"| {run['flip']} | {run['flip_used']} | {run['num_classes']} | {run['train_s']} | "
                         f"{case['case']} | {case['dice']:.3f} | {case['dice_left']:.3f} | {case['dice_right']:.3f} | "
                         f"{case['hd95']:.1f} | {case['swapped'][LEFT]:.1%} | {case['swapped'][RIGHT]:.1%} |")
        mean = lambda key: float(np.mean([c[key] for c in run["cases"]]))  # noqa: E731
        lines.append(f"| **{run['flip']}** | | | | **mean** | **{mean('dice'):.3f}** | {mean('dice_left'):.3f} | "
                     f"{mean('dice_right'):.3f} | {mean('hd95'):.1f} | | |")
    lines += ["", f"Figure: `{os.path.basename(figure_path)}`.", ""]
    write_text_atomically(os.path.join(RESULTS, stem + ".md"), "\n".join(lines) + "\n")
    write_text_atomically(os.path.join(RESULTS, stem + ".json"),
                          json.dumps({"runs": [{k: v for k, v in r.items() if k != "masks"} for r in runs],
                                      "tests": tests}, indent=1, default=str) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
