"""``tensorpeft demo``: the whole product on the built-in demo, with nothing to download.

1. Builds the demo cohort (real T1 templates and atlases shipped in pip packages; see ``data/demo.py``).
2. Segmentation: the shipped ``demo-unetr`` (pre-trained on other subcortical structures, never the hippocampus)
   segments the held-out subjects as it is, then is fine-tuned with an adapter (default LoRA-PT, rank 1) on
   ``subjects`` labelled subjects and segments them again. Dice and HD95 of both, per subject and by group
   (``heldout``: new deformations of the training template; ``unseen-template``: a template no training subject uses;
   ``whole-head``: such a brain inside a whole head, skull and scalp included, which ``segment`` skull-strips).
3. Synthesis: the shipped latent diffusion model ``demo-ldm`` (pre-trained on MNI152 brains, 64x80x64 at 2.5 mm) is
   fine-tuned with TenVOO-Q on brains with enlarged ventricles (``synthesis-ventricles``: a change a person can see)
   and synthesizes a few volumes, with a slice grid PNG and a comparison PNG (rows base samples / adapted samples /
   target brains); the samples' ventricle volume, MMD to the target brains and the realism checks (not noise,
   brain-shaped, diverse) of the base and the adapted samples.

``--methods a,b,c`` fine-tunes several adapters on the same split and prints one comparison table (the benchmark
table of the README is made this way).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from ..adapters import AdapterConfig
from .events import Events
from .runtime import EngineError
from .trainer import TrainSettings

SEG_MODEL = "demo-unetr"
SYN_MODEL = "demo-ldm"
#: the cohort folder the demo fine-tunes the diffusion model towards
SYN_TARGET = "synthesis-ventricles"
#: the slices of the comparison figure: through the lateral ventricles' bodies on the 64 x 80 x 64 grid
SYN_SLICES = {"axial": 36, "coronal": 44}


@dataclass
class DemoSettings:
    """What the demo runs. The defaults are the README's main job; ``quick()`` is the smoke version (about 2 minutes on a 2-core CPU)."""

    method: str = "lora-pt"
    rank: int = 1
    subjects: int = 5          # labelled training subjects for the fine-tune
    val_subjects: int = 2      # further labelled subjects that pick the best adapter during training
    # None: what `tensorpeft finetune` chooses without flags (the demo is an example of the defaults, not a special
    # case): 1250 steps for 5 subjects, lr 1e-3, a fifth of the steps between validations, left-right flips, random
    # affine, a quarter of the labelled subjects held out for validation
    seg_steps: int | None = None
    seg_lr: float | None = None
    seg_eval_every: int | None = None
    # TenVOO-Q, the TenVOO paper's quantum-inspired variant: at its default rate and steps it moved demo-ldm's samples
    # further than TenVOO-L (ventricles 5.0 -> 11.0 mL against 8.4; results/ldm_methods_cpu_2026-12-03.md)
    syn_method: str = "tenvoo-q"
    syn_rank: int = 4
    syn_steps: int | None = None   # None: finetune's default for synthesis (catalog.SYNTHESIS_STEPS, 300)
    syn_lr: float | None = None     # None: the method's default for a DDPM (TenVOO-Q 1e-5, as its paper; catalog.DEFAULT_LR)
    syn_count: int = 3
    syn_sampler_steps: int = 25    # DDIM steps; 50 pushed the 2-core CPU demo past 10 minutes (base + adapted samples)
    synthesis: bool = True
    seed: int = 0
    cohort: dict[str, Any] = field(default_factory=dict)  # build_demo_cohort overrides

    @classmethod
    def quick(cls, **overrides: Any) -> "DemoSettings":
        """Tiny everything: proves the pipeline end to end in about a minute on 2 CPU cores (used by the tests)."""
        base = dict(subjects=2, val_subjects=1, seg_steps=4, seg_eval_every=2, syn_steps=2, syn_count=2,
                    syn_sampler_steps=3,
                    cohort=dict(n_test=1, n_unseen=1, n_synthesis_ventricles=2, seg_spacings=((1.5, 1.5, 1.5),)))
        base.update(overrides)
        return cls(**base)


# ----------------------------------------------------------------------------------------------- data


def build_cohort(out: str, settings: DemoSettings, events: Events) -> str:
    """The demo cohort, only the tasks the demo uses (the pre-training tasks are for ``tensorpeft pretrain``)."""
    from ..data import build_demo_cohort

    cohort = os.path.join(out, "cohort")
    params = dict(n_train=settings.subjects + settings.val_subjects, n_source=0, n_synthesis=0, n_synthesis_target=0,
                  n_synthesis_ventricles=8 if settings.synthesis else 0)
    params.update(settings.cohort)
    marker = os.path.join(cohort, "dataset.json")
    if os.path.isfile(marker):
        saved = json.load(open(marker, encoding="utf-8")).get("parameters", {})
        same = all(saved.get(k) == json.loads(json.dumps(v)) for k, v in params.items())  # tuples saved as lists
        if saved.get("seed") == settings.seed and same:
            events.message(f"using the demo cohort in {cohort}")
            return cohort
    events.message(f"building the demo cohort in {cohort} ...")
    build_demo_cohort(cohort, seed=settings.seed, progress=events.human, **params)
    return cohort


def _write_datalist(path: str, training: list[dict[str, Any]]) -> str:
    from ..data.demo import write_json

    write_json(path, {"training": training})
    return path


def split_hippocampus(cohort: str, out: str, settings: DemoSettings) -> dict[str, Any]:
    """The datalist (absolute paths) of the labelled subjects handed to ``finetune`` (which holds out its own
    validation subjects, as it does for a user); the test subjects with their groups."""
    # Absolute: a datalist's relative paths are read relative to the datalist's own folder (splits/), so paths
    # relative to the working folder broke the README's `make demo` (default --out ./tensorpeft-demo).
    task = os.path.abspath(os.path.join(cohort, "hippocampus"))
    meta = json.load(open(os.path.join(task, "dataset.json"), encoding="utf-8"))

    def absolute(entry: dict[str, Any]) -> dict[str, Any]:
        return {**entry, "image": os.path.normpath(os.path.join(task, entry["image"])),
                "label": os.path.normpath(os.path.join(task, entry["label"]))}

    labelled = [absolute(e) for e in meta["training"]]
    if len(labelled) < settings.subjects + settings.val_subjects:
        raise EngineError(f"{task}: {len(labelled)} labelled subjects, the demo needs --subjects {settings.subjects} "
                          f"+ {settings.val_subjects} for validation")
    given = labelled[:settings.subjects + settings.val_subjects]
    splits = os.path.join(out, "splits")
    os.makedirs(splits, exist_ok=True)
    return {
        "train": _write_datalist(os.path.join(splits, "labelled.json"), given),
        "images": os.path.join(task, "imagesTs"), "labels": os.path.join(task, "labelsTs"),
        "groups": {e["name"]: e.get("group", "heldout") for e in meta["test"]},
        "labelled_names": [e["name"] for e in given],
    }


# ----------------------------------------------------------------------------------------------- segmentation


def _scores(masks: str, split: dict[str, Any]) -> dict[str, Any]:
    from .jobs import evaluate

    rows = evaluate(masks, split["labels"], kind="segmentation")["cases"]
    for row in rows:
        row["group"] = split["groups"].get(row["case"], "heldout")
    by_group = {}
    for group in sorted({r["group"] for r in rows}):
        members = [r for r in rows if r["group"] == group]
        by_group[group] = {k: float(np.nanmean([r[k] for r in members])) if any(np.isfinite(r[k]) for r in members)
                           else float("nan") for k in ("dice", "hd95")}
        by_group[group]["n"] = len(members)
    return {"cases": rows, "groups": by_group}


def segment_and_score(model: str | None, adapter: str | None, split: dict[str, Any], masks: str, *, device: str,
                      threads: int | None) -> dict[str, Any]:
    from .jobs import segment

    segment(split["images"], masks, model_source=model, adapter=adapter, device=device, threads=threads,
            events=Events(quiet=True))
    return _scores(masks, split)


def finetune_segmentation(method: str, rank: int, split: dict[str, Any], out: str, settings: DemoSettings, *,
                          device: str, threads: int | None, events: Events) -> dict[str, Any]:
    """Fine-tune the shipped UNETR with one adapter, segment the test subjects, score them."""
    from .jobs import finetune

    run = os.path.join(out, f"unetr-{method}-r{rank}")
    cfg = AdapterConfig(method=method, rank=rank)
    train = TrainSettings(steps=settings.seg_steps, lr=settings.seg_lr, eval_every=settings.seg_eval_every,
                          checkpoint_every=None, seed=settings.seed)
    events.message(f"fine-tuning {SEG_MODEL} with {method} (rank {rank}) on {len(split['labelled_names'])} labelled "
                   "subjects (finetune's defaults) ...")
    started = time.time()
    result = finetune(SEG_MODEL, split["train"], run, cfg, train, device=device, events=events, overwrite=True,
                      threads=threads)
    seconds = time.time() - started
    if result.status != "completed":
        raise EngineError(f"fine-tuning {method} was cancelled at step {result.step}")
    saved = json.load(open(os.path.join(run, "adapter_config.json"), encoding="utf-8"))
    scores = segment_and_score(None, run, split, os.path.join(out, "masks", f"{method}-r{rank}"), device=device,
                               threads=threads)
    return {"method": method, "rank": rank, "adapter": run, "train_seconds": round(seconds, 1),
            "train_subjects": saved.get("train_names", []), "val_subjects": saved.get("val_names", []),
            "steps": saved.get("train_steps"), "lr": saved.get("train_lr"),
            "trainable": saved["trainable"], "adapter_parameters": saved["adapter_parameters"],
            "total_parameters": saved["total_parameters"], "best_val_dice": result.best,
            "report": os.path.join(run, "report.png"), "masks": os.path.join(out, "masks", f"{method}-r{rank}"),
            **scores}


# ----------------------------------------------------------------------------------------------- synthesis


def finetune_synthesis(cohort: str, out: str, settings: DemoSettings, *, device: str, threads: int | None,
                       events: Events) -> dict[str, Any]:
    """Fine-tune the shipped DDPM towards the enlarged-ventricle brains, synthesize with the base and the adapted
    model from the same seeds, and compare: ventricle volume, MMD to the target brains, realism checks, a PNG."""
    from ..data import find_cases, read_volume
    from ..data.demo import SYNTH_SPACING_MM, synthesis_ventricle_roi
    from ..adapters.catalog import default_steps
    from .jobs import finetune, synthesize, unit_range_like
    from .report import sample_rows
    from .scoring import monai_voxel_mmd
    from .synthesis_metrics import dark_volume_ml, realism_checks

    data = os.path.join(cohort, SYN_TARGET)
    run = os.path.join(out, f"ddpm-{settings.syn_method}-r{settings.syn_rank}")
    cfg = AdapterConfig(method=settings.syn_method, rank=settings.syn_rank)
    steps = settings.syn_steps or default_steps("synthesis")
    train = TrainSettings(steps=steps, lr=settings.syn_lr, eval_every=steps, checkpoint_every=steps,
                          seed=settings.seed)
    events.message(f"fine-tuning {SYN_MODEL} with {settings.syn_method} (rank {settings.syn_rank}) on brains with "
                   "enlarged ventricles ...")
    part_started = started = time.time()
    result = finetune(SYN_MODEL, data, run, cfg, train, device=device, events=events, overwrite=True, threads=threads)
    train_seconds = time.time() - started
    if result.status != "completed":
        raise EngineError(f"fine-tuning the DDPM was cancelled at step {result.step}")
    saved = json.load(open(os.path.join(run, "adapter_config.json"), encoding="utf-8"))
    events.message(f"synthesizing {settings.syn_count} volume(s) with the base and the adapted DDPM ...")
    quiet = Events(quiet=True)
    common = dict(steps=settings.syn_sampler_steps, seed=settings.seed, device=device, threads=threads, events=quiet)
    started = time.time()
    adapted = synthesize(os.path.join(out, "synthesis"), settings.syn_count, adapter=run, **common)
    sample_seconds = time.time() - started
    base = synthesize(os.path.join(out, "synthesis-base"), settings.syn_count, model_source=SYN_MODEL, **common)
    real = [np.asarray(read_volume(c["image"]).array, np.float32) for c in find_cases(data, require_labels=False)]
    shape = np.asarray(read_volume(adapted[0]).array).shape
    real = [unit_range_like(v, shape) for v in real]

    def load(paths: list[str]) -> list[np.ndarray]:
        return [np.asarray(read_volume(p).array, np.float32) for p in paths]

    base_v, adapted_v = load(base), load(adapted)
    realism = {"base": realism_checks(base_v, real), "adapted": realism_checks(adapted_v, real)}
    ventricles = None
    roi = synthesis_ventricle_roi(shape, SYNTH_SPACING_MM)  # the model samples on the synthesis sets' grid
    if roi.shape == tuple(shape):
        ventricles = {name: round(float(np.mean([dark_volume_ml(v, roi, SYNTH_SPACING_MM) for v in vols])), 2)
                      for name, vols in (("base", base_v), ("adapted", adapted_v), ("target", real))}
    compare = sample_rows(os.path.join(out, "synthesis", "compare.png"),
                          [(f"base {SYN_MODEL}", base_v), (f"{settings.syn_method} r={settings.syn_rank}", adapted_v),
                           ("target brains", real)], SYN_SLICES)
    part_seconds = time.time() - part_started
    return {"method": settings.syn_method, "rank": settings.syn_rank, "adapter": run, "volumes": adapted,
            "png": os.path.join(out, "synthesis", "samples.png"), "compare_png": compare, "target": data,
            "trainable": saved["trainable"], "adapter_parameters": saved["adapter_parameters"],
            "total_parameters": saved["total_parameters"],
            "train_seconds": round(train_seconds, 1), "sample_seconds": round(sample_seconds, 1),
            "seconds": round(part_seconds, 1), "steps": steps,
            "lr": saved.get("train_lr"), "ventricles_ml": ventricles,
            "mmd_to_target": {"base": monai_voxel_mmd(base_v, real), "adapted": monai_voxel_mmd(adapted_v, real)},
            "realism": realism}


# ----------------------------------------------------------------------------------------------- report


def overlay_report(path: str, split: dict[str, Any], base_masks: str, adapted: dict[str, Any]) -> str:
    """One row per test group (its first subject): coronal slice through the hippocampi with the reference (green),
    the base model's mask (blue) and the adapted model's mask (red)."""
    from ..data import read_volume
    from .report import _figure, _save, as_ras, centre_of, view_slice

    picks: dict[str, dict[str, Any]] = {}
    for row in adapted["cases"]:
        picks.setdefault(row["group"], row)
    rows = list(picks.values())
    plt, (fig, axes) = _figure(len(rows), 3, figsize=(10, 3.4 * len(rows)), squeeze=False)
    for ax_row, row in zip(axes, rows):
        name = row["case"]
        stored = read_volume(os.path.join(split["images"], name + ".nii.gz"))

        def load(folder: str) -> np.ndarray:  # each mask on the scan's grid, shown in RAS planes
            return as_ras(read_volume(os.path.join(folder, name + ".nii.gz")).array, stored.affine)

        image = as_ras(np.asarray(stored.array, np.float32), stored.affine)
        ref, base, ours = load(split["labels"]), load(base_masks), load(adapted["masks"])
        centre = centre_of(ref, ref.shape)
        for ax, view in zip(ax_row, ("coronal", "axial", "sagittal")):
            index = centre[{"axial": 2, "coronal": 1, "sagittal": 0}[view]]
            ax.imshow(view_slice(image, view, index), cmap="gray")
            for mask, colour in ((ref, "lime"), (base, "deepskyblue"), (ours, "red")):
                plane = view_slice(mask, view, index)
                if plane.any():
                    ax.contour(plane > 0, levels=[0.5], colors=colour, linewidths=1.2)
            ax.set_axis_off()
            ax.set_title(f"{name} ({row['group']})\n{view}" if view == "coronal" else view, fontsize=8)
    fig.suptitle(f"reference (green), base model (blue), {method_label(adapted['method'], adapted['rank'])} (red)", fontsize=10)
    return _save(fig, plt, path)


def _fmt(value: float, digits: int = 3) -> str:
    return "-" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def method_label(method: str, rank: int) -> str:
    """``lora-pt r=1``; ``full`` and ``ssf`` have no rank, so none is shown."""
    return method if method in ("full", "ssf") else f"{method} r={rank}"


def segmentation_table(base: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """Markdown: per method, trainable parameters, time, and Dice / HD95 by group; the base model first."""
    groups = sorted(base["groups"], key=lambda g: (g != "heldout", g))
    head = "| model | trainable | train s | " + " | ".join(f"Dice {g} | HD95 {g} (mm)" for g in groups) + " |"
    lines = [head, "|" + "---|" * (3 + 2 * len(groups))]

    def row(label: str, trainable: str, seconds: str, scores: dict[str, Any]) -> str:
        cells = " | ".join(f"{_fmt(scores['groups'][g]['dice'])} | {_fmt(scores['groups'][g]['hd95'], 1)}"
                           for g in groups)
        return f"| {label} | {trainable} | {seconds} | {cells} |"

    lines.append(row(f"{SEG_MODEL} (no adapter)", "0", "-", base))
    for r in results:
        share = 100.0 * r["trainable"] / base_parameters(r)
        lines.append(row(method_label(r["method"], r["rank"]), f"{r['trainable']:,} ({share:.1f} %)", f"{r['train_seconds']:.0f}", r))
    return "\n".join(lines)


def base_parameters(result: dict[str, Any]) -> int:
    """The base model's parameter count of a run (its total less the adapter's own), what ``finetune``'s "N trainable
    of M (x%)" line and ``tensorpeft params`` divide by, so the demo's percentages are theirs."""
    return int(result["total_parameters"]) - int(result.get("adapter_parameters") or 0)


def case_table(base: dict[str, Any], adapted: dict[str, Any]) -> str:
    lines = ["| subject | group | base Dice | base HD95 | adapted Dice | adapted HD95 |", "|---|---|---|---|---|---|"]
    base_rows = {r["case"]: r for r in base["cases"]}
    for r in adapted["cases"]:
        b = base_rows[r["case"]]
        lines.append(f"| {r['case']} | {r['group']} | {_fmt(b['dice'])} | {_fmt(b['hd95'], 1)} | {_fmt(r['dice'])} | "
                     f"{_fmt(r['hd95'], 1)} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- main


def _method_and_rank(text: str, default_rank: int) -> tuple[str, int]:
    """``lora-pt`` or ``tcurlora:8`` (a method with its own rank)."""
    name, _, rank = text.partition(":")
    try:
        value = int(rank) if rank else default_rank
    except ValueError:
        value = 0
    if value < 1:
        raise EngineError(f"--methods {text!r}: write NAME or NAME:RANK with a rank >= 1, e.g. tcurlora:8")
    return name.strip(), value


def run_demo(out: str, settings: DemoSettings | None = None, *, methods: Sequence[str] | None = None,
             device: str = "auto", threads: int | None = None, events: Events | None = None) -> dict[str, Any]:
    """Run the demo into ``out``; returns the summary also written to ``out/summary.json``."""
    from ..data.demo import write_json
    from ..models import shipped_path

    settings = settings or DemoSettings()
    events = events or Events()
    started = time.time()
    out = os.path.abspath(out)  # every path in the summary is absolute, wherever it is read from
    os.makedirs(out, exist_ok=True)
    for name in (SEG_MODEL,) + ((SYN_MODEL,) if settings.synthesis else ()):
        shipped_path(name)  # fail before any work if a shipped model is missing or damaged
    runs = [_method_and_rank(m, settings.rank) for m in (methods or [settings.method])]
    cohort = build_cohort(out, settings, events)
    split = split_hippocampus(cohort, out, settings)

    events.message(f"segmenting {len(split['groups'])} test subjects with {SEG_MODEL} as shipped ...")
    base = segment_and_score(SEG_MODEL, None, split, os.path.join(out, "masks", "base"), device=device,
                             threads=threads)
    results = [finetune_segmentation(m, r, split, out, settings, device=device, threads=threads, events=events)
               for m, r in runs]
    first = results[0]
    report = overlay_report(os.path.join(out, "segmentation.png"), split, os.path.join(out, "masks", "base"), first)
    summary: dict[str, Any] = {
        "out": out, "settings": asdict(settings), "device": device,
        "segmentation": {"model": SEG_MODEL, "train_subjects": first["train_subjects"],
                         "val_subjects": first["val_subjects"],
                         "base": base, "adapted": results, "png": report,
                         "table": segmentation_table(base, results), "cases": case_table(base, first)},
    }
    if settings.synthesis:
        summary["synthesis"] = finetune_synthesis(cohort, out, settings, device=device, threads=threads, events=events)
    summary["seconds"] = round(time.time() - started, 1)
    path = os.path.join(out, "summary.json")
    write_json(path, summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """What the terminal shows at the end of ``tensorpeft demo``."""
    seg = summary["segmentation"]
    first = seg["adapted"][0]
    lines = ["", f"Hippocampus segmentation: {SEG_MODEL} fine-tuned on {len(seg['train_subjects'])} subjects "
             f"({len(seg['val_subjects'])} more for validation)", "", seg["table"], "", seg["cases"], "",
             f"masks: {first['masks']}  (base model: {os.path.join(summary['out'], 'masks', 'base')})",
             f"overlays: {seg['png']}   training curves: {first['report']}"]
    syn = summary.get("synthesis")
    if syn:
        mmd = syn["mmd_to_target"]
        lines += ["", f"MRI synthesis: {SYN_MODEL} fine-tuned with {syn['method']} r={syn['rank']} "
                  f"({syn['trainable']:,} trainable of {base_parameters(syn):,}, {syn['train_seconds']:.0f} s); "
                  f"{len(syn['volumes'])} volumes in {syn['sample_seconds']:.0f} s",
                  *([f"ventricle volume (mL, mean of the samples): base {syn['ventricles_ml']['base']:.1f}, adapted "
                     f"{syn['ventricles_ml']['adapted']:.1f}; the target brains {syn['ventricles_ml']['target']:.1f}"]
                    if syn.get("ventricles_ml") else []),
                  f"MMD to the enlarged-ventricle target brains (lower is closer): base {mmd['base']:.4f}, "
                  f"adapted {mmd['adapted']:.4f}",
                  *(f"realism vs the target brains, {k} samples: {v['summary']}"
                    for k, v in syn.get("realism", {}).items()),
                  f"volumes: {os.path.dirname(syn['volumes'][0])}   slices: {syn['png']}",
                  f"base / adapted / target side by side: {syn['compare_png']}"]
    lines += ["", f"done in {summary['seconds']:.0f} s; summary: {os.path.join(summary['out'], 'summary.json')}"]
    return "\n".join(lines)
