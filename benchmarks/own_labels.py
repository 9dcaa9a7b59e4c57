"""Labels as a user's tool writes them: a left and a right hippocampus as FreeSurfer numbers them (17 and 53), or
five structures on each side (``--structures subcortical``: thalamus 10/49, caudate 11/50, putamen 12/51, pallidum
13/52, hippocampus 17/53), where the shipped model segments one structure (class 1). Fine-tune with ``finetune``'s
defaults, segment held-out scans, score each structure and each side.

    python benchmarks/own_labels.py                       # the defaults (--flip auto: flips that swap 17 and 53)
    python benchmarks/own_labels.py --flips auto,none     # and without left-right flips, side by side
    python benchmarks/own_labels.py --structures subcortical   # 10 structures, 5 left-right pairs
    python benchmarks/own_labels.py --structures Thalamus,Caudate,Hippocampus   # any pairs: 6 structures
    python benchmarks/own_labels.py --structures aseg     # 16: aseg.stats' pairs, amygdala and accumbens too

1. Relabels the demo cohort's hippocampus subjects (``tensorpeft-demo/cohort``; built with ``tensorpeft demo-data`` if
   missing): each label's two hippocampi are told apart by their centre in world coordinates (the one further to
   the patient's left is 17, Left-Hippocampus in FreeSurfer's colour table, the other 53). ``subcortical``: each
   subject drawn again with the Harvard-Oxford maps of the ten structures through the same deformation
   (``demo.redraw_hippocampus_subject``; the image is the cohort's, checked), in FreeSurfer's values. Images are
   linked, not copied. The 7 training subjects train (``finetune`` holds out 2 of them to pick the best adapter); the 4 held-out
   subjects and the unseen-template subject are the test set.
2. ``tensorpeft finetune --model demo-unetr --data DATA --out RUN`` (defaults; ``--flip`` as asked), one process,
   events to ``RUN/events.jsonl``.
3. ``tensorpeft segment`` of every test scan, ``evaluate``: Dice / HD95 per structure, and how much of each
   predicted structure lies in its mirror-image partner's reference (left-right swaps).
4. Writes ``benchmarks/results/own_labels_<device>_<date>.md`` / ``.json`` and a figure (coronal and axial planes
   through the structures, each side its colour).
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
#: the label sets a user might bring: (Harvard-Oxford name of the left structure, of the right one) per pair
STRUCTURE_SETS = {
    "hippocampus": (("Left_Hippocampus", "Right_Hippocampus"),),
    "subcortical": tuple((f"Left_{s}", f"Right_{s}") for s in ("Thalamus", "Caudate", "Putamen", "Pallidum",
                                                               "Hippocampus")),
    # the paired structures of FreeSurfer's aseg.stats, as a user's aseg.mgz holds them (brain stem left out: it is
    # one midline structure, and the demo's label box cuts it); the base model knows four of the eight, and the
    # accumbens is 0.6 mL (170 voxels of 1.5 mm). The hippocampi stay last: the figure cuts through the last pair
    "aseg": tuple((f"Left_{s}", f"Right_{s}") for s in ("Lateral_Ventricle", "Thalamus", "Caudate", "Putamen",
                                                        "Pallidum", "Amygdala", "Accumbens", "Hippocampus")),
}


def structure_pairs(structures: str) -> tuple[tuple[str, str], ...]:
    """The (left, right) Harvard-Oxford names of a set in :data:`STRUCTURE_SETS`, or of a comma-separated list of
    structures (``Thalamus,Hippocampus``: a left and a right one each)."""
    from TensorPEFTLib.data.demo import FREESURFER_VALUES

    if structures in STRUCTURE_SETS:
        return STRUCTURE_SETS[structures]
    stems = [s.strip() for s in structures.split(",") if s.strip()]
    pairs = tuple((f"Left_{s}", f"Right_{s}") for s in stems)
    unknown = [s for s, pair in zip(stems, pairs) if not all(n in FREESURFER_VALUES for n in pair)]
    if not stems or unknown:
        known = sorted({n.split("_", 1)[1] for n in FREESURFER_VALUES if n.startswith("Left_")})
        raise SystemExit(f"--structures {structures!r}: give {' or '.join(sorted(STRUCTURE_SETS))}, or structures "
                         f"from {', '.join(known)} separated by commas")
    return pairs


def value_pairs(structures: str) -> list[tuple[int, int]]:
    """FreeSurfer's (left, right) label values of each pair in the set."""
    from TensorPEFTLib.data.demo import FREESURFER_VALUES

    return [(FREESURFER_VALUES[a], FREESURFER_VALUES[b]) for a, b in structure_pairs(structures)]


def redraw_labels(cohort: str, name: str, structures: str, stored_image: str, out_path: str) -> dict:
    """The subject ``name`` drawn again with the set's structures as labels (FreeSurfer values); the image drawn must
    be the cohort's. Returns each value's voxel count."""
    from TensorPEFTLib.data import read_volume, write_volume
    from TensorPEFTLib.data.demo import FREESURFER_VALUES, redraw_hippocampus_subject

    names = [n for pair in structure_pairs(structures) for n in pair]
    parameters = json.load(open(os.path.join(cohort, "dataset.json"), encoding="utf-8"))["parameters"]
    image, classes, affine = redraw_hippocampus_subject(name, names, parameters)
    stored = read_volume(stored_image)
    if not np.array_equal(image, np.asarray(stored.squeezed)):
        raise SystemExit(f"{stored_image}: the redrawn image differs from the cohort's; rebuild the cohort")
    values = np.zeros(len(names) + 1, dtype=np.uint8)
    values[1:] = [FREESURFER_VALUES[n] for n in names]
    label = values[classes]
    write_volume(out_path, label, affine)
    return {f"voxels_{v}": int((label == v).sum()) for v in values[1:]}


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


def build_dataset(cohort: str, work: str, structures: str = "hippocampus") -> tuple[str, list[dict]]:
    """``work/data`` (imagesTr/labelsTr: the demo's 7 training subjects, FreeSurfer labels) and the test cases."""
    source = os.path.join(cohort, "hippocampus")
    if not os.path.isdir(os.path.join(source, "imagesTr")):
        print(f"building the demo cohort in {cohort} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "TensorPEFTLib.cli", "demo-data", cohort], check=True)
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
            if structures == "hippocampus":
                sides = split_sides(os.path.join(source, f"labels{split}", name), label)
            elif os.path.exists(label):  # drawn already (a second run on the same work folder)
                sides = {}
            else:
                sides = redraw_labels(cohort, name[: -len(".nii.gz")], structures, image, label)
            if split == "Ts":
                tests.append({"name": name[: -len(".nii.gz")], "image": image, "label": label, **sides})
    return data, tests


def swapped_fraction(mask_path: str, label_path: str, pairs=((LEFT, RIGHT),)) -> dict:
    """Of each predicted structure of ``pairs``, the fraction lying in its partner's reference (the other side)."""
    from TensorPEFTLib.data import read_volume

    mask, ref = np.asarray(read_volume(mask_path).squeezed), np.asarray(read_volume(label_path).squeezed)
    out = {}
    for left, right in pairs:
        for side, other in ((left, right), (right, left)):
            predicted = mask == side
            out[side] = round(float((predicted & (ref == other)).sum()) / max(float(predicted.sum()), 1.0), 4)
    return out


def figure(path: str, tests: list[dict], masks: dict[str, str], title: str, pairs=((LEFT, RIGHT),)) -> str:
    """Each test subject's planes, the structures' contours (left: reference lime, ours red; right: cyan, magenta).
    One pair: coronal and axial through the hippocampi. Several: axial and coronal through the structures' centroid
    (the basal ganglia, in front of the hippocampi) and a coronal through the hippocampi (the last pair), each zoomed
    to the structures (12 mm around them)."""
    from benchmarks.whole_head import draw_planes
    from TensorPEFTLib.data import read_volume
    from TensorPEFTLib.engine.report import _figure, _save, as_ras, centre_of, view_slice

    several = len(pairs) > 1
    columns = 3 if several else 2
    plt, (fig, axes) = _figure(len(tests), columns, figsize=(3.5 * columns, 3.4 * len(tests)), squeeze=False)
    for row, case in zip(axes, tests):
        stored = read_volume(case["image"])
        volume = as_ras(np.asarray(stored.squeezed, np.float32), stored.affine)
        ref = as_ras(read_volume(case["label"]).array, stored.affine)
        ours = as_ras(read_volume(masks[case["name"]]).array, stored.affine)
        overlays = [(ref == left, "lime", 1.6) for left, _ in pairs] + [(ref == right, "cyan", 1.6) for _, right in pairs]
        overlays += [(ours == left, "red", 0.9) for left, _ in pairs]
        overlays += [(ours == right, "magenta", 0.9) for _, right in pairs]
        hippocampi = centre_of(np.isin(ref, pairs[-1]), ref.shape)  # through the last pair (the hippocampi)
        if not several:
            draw_planes(row, volume, overlays, hippocampi, (("coronal", 1), ("axial", 2)), case["name"])
            continue
        everything = np.isin(ref, [v for pair in pairs for v in pair])
        middle = tuple(int(round(c)) for c in np.argwhere(everything).mean(0))  # in front of the hippocampi
        draw_planes(row[:2], volume, overlays, middle, (("axial", 2), ("coronal", 1)), case["name"])
        draw_planes(row[2:], volume, overlays, hippocampi, (("coronal", 1),), "through the hippocampi")
        box = np.zeros(ref.shape, dtype=bool)  # the structures' bounding box, 12 voxels (1 mm scans: 12 mm) wider
        lows = np.maximum(np.argwhere(everything).min(0) - 12, 0)
        box[tuple(slice(a, b) for a, b in zip(lows, np.argwhere(everything).max(0) + 13))] = True
        for ax, (view, axis, centre) in zip(row, (("axial", 2, middle), ("coronal", 1, middle),
                                                  ("coronal", 1, hippocampi))):
            rows, cols = np.nonzero(view_slice(box, view, centre[axis]))
            if len(rows):
                ax.set_xlim(cols.min() - 0.5, cols.max() + 0.5)
                ax.set_ylim(rows.max() + 0.5, rows.min() - 0.5)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()))  # the title just above the first row
    return _save(fig, plt, path)


def run_flip(flip: str, data: str, tests: list[dict], work: str, threads: int | None, seed: int = 0,
             pairs=((LEFT, RIGHT),), options: list[str] | None = None) -> dict:
    """One fine-tune with ``--flip flip`` and finetune's defaults but ``options`` (finetune flags), scored on ``tests``."""
    from TensorPEFTLib.engine.jobs import evaluate

    run = os.path.join(work, f"run-flip-{flip}")
    command = [sys.executable, "-m", "TensorPEFTLib.cli", "finetune", "--model", "demo-unetr", "--data", data,
               "--out", run, "--overwrite", "--flip", flip, "--events", os.path.join(work, f"events-{flip}.jsonl"),
               "--quiet", "--seed", str(seed)] + (["--threads", str(threads)] if threads else []) + list(options or [])
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
    val_structures = {int(e["step"]): e["structures"] for e in history.get("evals", []) if e.get("structures")}
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
                      "dice_left": round(float(np.mean([row["structures"][a]["dice"] for a, _ in pairs])), 4),
                      "dice_right": round(float(np.mean([row["structures"][b]["dice"] for _, b in pairs])), 4),
                      "structures": {int(v): round(row["structures"][v]["dice"], 4) for pair in pairs for v in pair},
                      "swapped": swapped_fraction(masks[row["case"]], case["label"], pairs)})
    used = saved.get("flip")
    if saved.get("mirror_pairs"):
        used += " + swap " + ", ".join("<->".join(map(str, pair)) for pair in saved["mirror_pairs"])
    return {"flip": flip, "seed": seed, "flip_used": used, "mirror_pairs": saved.get("mirror_pairs"),
            "label_map": saved.get("label_map"), "head_init": saved.get("head_init", "copy"),
            "patch_centres": saved.get("patch_centres", "voxels"),
            "num_classes": saved.get("num_classes"), "trainable": saved.get("trainable"),
            "train_s": round(train_s, 1), "segment_s": round(segment_s, 1), "val_dice": val_dice,
            "val_structures": val_structures,
            "cases": cases, "masks": masks}


def structure_table(runs: list[dict], pairs) -> list[str]:
    """Per structure, the mean Dice of the held-out subjects and the unseen-template subject(s) of each run."""
    from TensorPEFTLib.data.demo import FREESURFER_VALUES

    names = {v: n for n, v in FREESURFER_VALUES.items()}
    lines = ["| structure (value) | " + " | ".join(f"{r['flip']}: held-out | {r['flip']}: unseen" for r in runs) + " |",
             "|---|" + "---|---|" * len(runs)]
    for value in [v for pair in pairs for v in pair]:
        cells = []
        for run in runs:
            for unseen in (False, True):
                scores = [c["structures"][value] for c in run["cases"] if ("_unseen_" in c["case"]) == unseen]
                cells.append(f"{np.mean(scores):.3f}" if scores else "")
        lines.append(f"| {names.get(value, value)} ({value}) | " + " | ".join(cells) + " |")
    return lines


def validation_table(run: dict) -> list[str]:
    """The fine-tune's validation Dice of each structure at each evaluation (the 2 validation subjects)."""
    evals = run.get("val_structures") or {}
    if not evals:
        return []
    names = list(next(iter(evals.values())))
    return ["", f"Validation Dice per structure during the fine-tune (--flip {run['flip']}; mean of its 2 validation "
            "subjects):", "", "| step | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)] + [
        f"| {step} | " + " | ".join(f"{scores.get(n, float('nan')):.2f}" for n in names) + " |"
        for step, scores in sorted(evals.items())]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cohort", default=os.path.join("tensorpeft-demo", "cohort"), help="demo cohort folder")
    parser.add_argument("--structures", default="hippocampus",
                        help="the labels: a left and a right hippocampus (default), subcortical (five structures a "
                             "side), aseg (eight a side: aseg.stats' paired structures), or a comma-separated list "
                             "of structures (Thalamus,Caudate,Hippocampus)")
    parser.add_argument("--work", default=None,
                        help="work folder (default tensorpeft-demo/own-labels, or own-labels-<structures>)")
    parser.add_argument("--flips", default="auto", help="--flip values to run, comma-separated (default auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the fine-tune")
    parser.add_argument("--seed", type=int, default=0, help="finetune --seed (another draw of the same recipe)")
    parser.add_argument("--steps", type=int, default=None, help="finetune --steps (default: finetune's default)")
    parser.add_argument("--head-init", choices=["copy", "probe"], default=None,
                        help="finetune --head-init (default: finetune's default)")
    parser.add_argument("--patch-centres", choices=["voxels", "classes"], default=None,
                        help="finetune --patch-centres (default: finetune's default)")
    parser.add_argument("--name", default=None, help="results file stem (default own_labels[_subcortical]_cpu_<date>)")
    args = parser.parse_args(argv)

    pairs = value_pairs(args.structures)
    set_name = args.structures.lower().replace(",", "-").replace(" ", "")
    work = args.work or os.path.join("tensorpeft-demo", "own-labels" + (
        "" if args.structures == "hippocampus" else f"-{set_name}"))
    data, tests = build_dataset(args.cohort, work, args.structures)
    load_before = load_average()
    options = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in ("steps", "head_init", "patch_centres")
               if getattr(args, name)]
    runs = [run_flip(flip.strip(), data, tests, work, args.threads, args.seed, pairs, options)
            for flip in args.flips.split(",") if flip.strip()]
    load_after = load_average()

    suffix = "" if args.structures == "hippocampus" else f"_{set_name}"
    stem = args.name or f"own_labels{suffix}_cpu_{today()}"
    os.makedirs(RESULTS, exist_ok=True)
    figure_path = os.path.join(RESULTS, stem + ".png")
    first = runs[0]
    values = ", ".join(f"{a}/{b}" for a, b in pairs)
    figure(figure_path, tests, first["masks"],
           f"demo-unetr + lora-pt r1 on labels {values} (left: reference lime / ours red; right: cyan / magenta); "
           f"--flip {first['flip']}", pairs)
    several = len(pairs) > 1
    left_head = "Dice left (mean of %d)" % len(pairs) if several else f"Dice left ({LEFT})"
    right_head = "Dice right (mean of %d)" % len(pairs) if several else f"Dice right ({RIGHT})"
    title = (f"{len(pairs)} structures a side, FreeSurfer's values " + values if several
             else "a left and a right hippocampus (FreeSurfer 17 / 53)")
    lines = [f"# Own labels: {title} on a one-structure model ({today()})", "",
             machine_line("cpu"), "", f"`python benchmarks/own_labels.py --flips {args.flips}"
             f"{f' --structures {args.structures}' if several else ''}{f' --seed {args.seed}' if args.seed else ''}"
             f"{f' --steps {args.steps}' if args.steps else ''}"
             f"{f' --head-init {args.head_init}' if args.head_init else ''}"
             f"{f' --patch-centres {args.patch_centres}' if args.patch_centres else ''}`; "
             f"{versions()}", "",
             f"Load average before / after: {fmt_load(load_before)} / {fmt_load(load_after)}.", "",
             f"| --flip | used | classes | train s | case | Dice mean | {left_head} | {right_head} | HD95 mm | "
             "left predicted in right (worst) | right predicted in left (worst) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        for case in run["cases"]:
            to_right = max(case["swapped"][a] for a, _ in pairs)
            to_left = max(case["swapped"][b] for _, b in pairs)
            lines.append(f"| {run['flip']} | {run['flip_used']} | {run['num_classes']} | {run['train_s']} | "
                         f"{case['case']} | {case['dice']:.3f} | {case['dice_left']:.3f} | {case['dice_right']:.3f} | "
                         f"{case['hd95']:.1f} | {to_right:.1%} | {to_left:.1%} |")
        mean = lambda key: float(np.mean([c[key] for c in run["cases"]]))  # noqa: E731
        lines.append(f"| **{run['flip']}** | | | | **mean** | **{mean('dice'):.3f}** | {mean('dice_left'):.3f} | "
                     f"{mean('dice_right'):.3f} | {mean('hd95'):.1f} | | |")
    if several:
        lines += ["", "Dice per structure (mean over the held-out subjects; the unseen-template subject):", ""]
        lines += structure_table(runs, pairs)
        for run in runs:
            lines += validation_table(run)
    lines += ["", "New output layer: " + ", ".join(f"--flip {r['flip']}: {r['head_init']}" for r in runs)
              + "; patch centres: " + ", ".join(f"--flip {r['flip']}: {r['patch_centres']}" for r in runs) + ".",
              "", f"Figure: `{os.path.basename(figure_path)}`.", ""]
    write_text_atomically(os.path.join(RESULTS, stem + ".md"), "\n".join(lines) + "\n")
    write_text_atomically(os.path.join(RESULTS, stem + ".json"),
                          json.dumps({"structures": args.structures, "pairs": pairs,
                                      "runs": [{k: v for k, v in r.items() if k != "masks"} for r in runs],
                                      "tests": tests}, indent=1, default=str) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
