"""Every DDPM method fine-tuning the shipped latent diffusion model towards a target a person can see, at one budget.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/ldm_methods.py            # the README's table and figure
    python benchmarks/ldm_methods.py --methods tenvoo-l:4,full --steps 20      # a quick look at two methods

The target is the demo cohort's ``synthesis-ventricles`` set: brains of the pre-training template (MNI152) with the
lateral ventricles dilated by 3-5 mm (``data/demo.py``). The first ``--train`` of them fine-tune ``demo-ldm``
(``finetune`` as a user runs it: the same steps, batch, seed and data for every method, each method its catalog
default learning rate unless ``--lr METHOD=LR`` says otherwise; no validation); the others are the held-out target
the metrics compare with. Then each model (and the base, untouched) synthesizes ``--count`` volumes from the same
seeds, and for each set of samples:

- the TenVOO paper's metrics (``evaluate --kind synthesis``'s code): MS-SSIM with held-out target volume i paired to
  sample i, MMD on voxels, MMD and Fréchet distance on the shipped demo-unetr ViT features (not Med3D), against the
  held-out target brains and against the pre-training (source) brains;
- the realism checks against the target brains (not noise, brain-shaped, diverse);
- the visible change: the ventricle volume of each sample (mL of voxels darker than 0.25 within 10 mm of the atlas's
  lateral ventricles, :func:`synthesis_metrics.dark_volume_ml`), next to the real target and source brains' and to
  what the frozen autoencoder makes of them (encoded and decoded: the most a U-Net adapter can reach).

Writes ``benchmarks/results/<name>.md``, ``.json`` (every number) and ``.png`` (one row per model: the same axial and
coronal slices of its first samples), and with ``--figure PATH`` the README's figure: rows base samples / samples of
``--figure-method`` (default: the adapter that came closest to the target, and full fine-tuning) / target brains. Finished methods are kept in ``--work`` so a stopped run continues
(``--resume``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
#: every DDPM method of the catalog at the rank the TenVOO paper (or its own paper) uses on a DDPM
DEFAULT_METHODS = "tenvoo-l:4,tenvoo-q:4,quanta:4,lora:4,loha:4,lokr:4,selora:1,full"
#: axial and coronal slices (voxel indices of the 64 x 80 x 64 grid) through the lateral ventricles' bodies
SLICES = {"axial": 36, "coronal": 44}


def _load(paths: Sequence[str]) -> list[np.ndarray]:
    from TensorPEFTLib.data import read_volume

    return [np.asarray(read_volume(p).array, np.float32) for p in paths]


def unit_volumes(paths: Sequence[str], shape: Sequence[int]) -> list[np.ndarray]:
    """Real volumes as the DDPM sees them: [0, 1] (0-99.5 percentile) at the samples' shape."""
    from TensorPEFTLib.engine.jobs import unit_range_like

    return [unit_range_like(v, shape) for v in _load(paths)]


def autoencoded(model_source: str, volumes: Sequence[np.ndarray]) -> list[np.ndarray]:
    """The frozen autoencoder's reconstruction of each volume (a posterior draw with a fixed seed, decoded)."""
    import torch

    from TensorPEFTLib.engine.jobs import resolve_model
    from TensorPEFTLib.models.latent import latent_parts

    latent = latent_parts(resolve_model(model_source))
    out = []
    for index, v in enumerate(volumes):
        x = torch.as_tensor(v)[None, None].float()
        with torch.no_grad():
            y = latent.decode(latent.encode(x, torch.Generator().manual_seed(index)))
        out.append(y[0, 0].float().clamp(0, 1).numpy())
    return out


def set_metrics(samples: list[np.ndarray], target: list[np.ndarray], source: list[np.ndarray],
                roi: np.ndarray | None, spacing: float, features: bool) -> dict[str, Any]:
    """The paper's metrics against the target and the source set, realism against the target, ventricle volume."""
    from TensorPEFTLib.engine.scoring import evaluate_synthesis
    from TensorPEFTLib.engine.synthesis_metrics import dark_volume_ml

    row: dict[str, Any] = {}
    for name, real in (("target", target), ("source", source)):
        m = evaluate_synthesis(samples, real, features=features)
        row[name] = {k: m.get(k) for k in ("ms_ssim", "ms_ssim_scales", "mmd_voxels", "mmd_features", "fd_features")}
        if name == "target":
            row["realism"] = {k: m["realism"][k] for k in ("hf_vs_real", "mask_dice", "diversity_vs_real", "pass",
                                                              "summary")}
    if roi is not None:
        ml = [dark_volume_ml(s, roi, spacing) for s in samples]
        row["ventricles_ml"] = {"mean": float(np.mean(ml)), "sd": float(np.std(ml)), "each": [round(v, 2) for v in ml]}
    return row


def run_methods(model: str, train: list[str], target: list[str], source: list[str], work: str, *,
                methods: Sequence[tuple[str, int]], steps: int, count: int, sampler_steps: int = 25,
                lrs: dict[str, float] | None = None, threads: int = 1, seed: int = 0, roi: np.ndarray | None = None,
                spacing: float = 2.5, features: bool = True, resume: bool = False,
                log=print) -> dict[str, Any]:
    """Fine-tune ``model`` on ``train`` with each of ``methods`` (``(name, rank)``) for ``steps`` steps, sample
    ``count`` volumes from each and from the base, and measure them (see the module docstring). Each finished
    method's record is kept in ``work/<method>.json`` (``resume``: reused)."""
    from TensorPEFTLib.adapters import AdapterConfig
    from TensorPEFTLib.data.demo import write_json
    from TensorPEFTLib.engine import Events, TrainSettings, finetune
    from TensorPEFTLib.engine.jobs import synthesize

    os.makedirs(work, exist_ok=True)
    datalist = os.path.join(work, "train.json")
    write_json(datalist, {"training": [{"image": os.path.abspath(p)} for p in train]})
    quiet = Events(quiet=True)
    common = dict(steps=sampler_steps, seed=seed, device="cpu", threads=threads, events=quiet)

    def sample(folder: str, **source_args: Any) -> tuple[list[np.ndarray], float]:
        shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        paths = synthesize(folder, count, **common, **source_args)
        return _load(paths), time.perf_counter() - started

    base_samples, base_seconds = sample(os.path.join(work, "samples-base"), model_source=model)
    shape = base_samples[0].shape
    target_v, source_v = unit_volumes(target, shape), unit_volumes(source, shape)
    result: dict[str, Any] = {"shape": list(shape), "rows": [], "reference": {}}
    base = {"label": "base (no fine-tune)", "method": "base", "trainable": 0, "train_seconds": 0.0,
            "sample_seconds": round(base_seconds, 1), **set_metrics(base_samples, target_v, source_v, roi, spacing,
                                                                      features)}
    result["rows"].append(base)
    log(f"base: {json.dumps(base.get('ventricles_ml'))}")
    samples = {"base": base_samples}
    for method, rank in methods:
        label = f"{method} r={rank}" if method != "full" else "full"
        record = os.path.join(work, f"{method}.json")
        folder = os.path.join(work, f"samples-{method}")
        if resume and os.path.isfile(record) and os.path.isdir(folder):
            row = json.load(open(record, encoding="utf-8"))
            samples[method] = _load(sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".nii.gz")))
            row["kept"] = True
            result["rows"].append(row)
            log(f"{label}: kept from {record}")
            continue
        run = os.path.join(work, f"run-{method}")
        cfg = AdapterConfig(method=method, rank=rank)
        lr = (lrs or {}).get(method)
        settings = TrainSettings(steps=steps, lr=lr, eval_every=steps, checkpoint_every=steps, seed=seed)
        started = time.perf_counter()
        outcome = finetune(model, datalist, run, cfg, settings, device="cpu", threads=threads, events=quiet,
                           overwrite=True, auto_val=False)
        train_seconds = time.perf_counter() - started
        if outcome.status != "completed":
            raise RuntimeError(f"{label}: fine-tuning stopped ({outcome.status})")
        saved = json.load(open(os.path.join(run, "adapter_config.json"), encoding="utf-8"))
        adapted, sample_seconds = sample(folder, adapter=run)
        samples[method] = adapted
        row = {"label": label, "method": method, "rank": rank, "lr": saved.get("train_lr"),
               "lr_is_default": lr is None, "trainable": saved["trainable"], "steps": steps,
               "train_seconds": round(train_seconds, 1), "sample_seconds": round(sample_seconds, 1),
               **set_metrics(adapted, target_v, source_v, roi, spacing, features)}
        write_json(record, row)
        result["rows"].append(row)
        log(f"{label}: lr {row['lr']:g}, {train_seconds:.0f} s, ventricles {json.dumps(row.get('ventricles_ml'))}, "
            f"MMD feat target {row['target']['mmd_features']}")
    # the reference rows: the real sets, and what the frozen autoencoder can represent of them
    reference = result["reference"]
    if roi is not None:
        from TensorPEFTLib.engine.synthesis_metrics import dark_volume_ml

        for name, vols in (("target", target_v), ("source", source_v)):
            real_ml = [dark_volume_ml(v, roi, spacing) for v in vols]
            recon_ml = [dark_volume_ml(v, roi, spacing) for v in autoencoded(model, vols)]
            reference[name] = {"ventricles_ml": float(np.mean(real_ml)), "ventricles_ml_sd": float(np.std(real_ml)),
                               "autoencoded_ventricles_ml": float(np.mean(recon_ml)), "count": len(vols)}
    reference["target_vs_source"] = set_metrics(target_v, target_v, source_v, None, spacing, features)["source"]
    result["samples"] = samples
    result["target_volumes"] = target_v
    return result


# ----------------------------------------------------------------------------------------------------- output


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.{digits}f}"
    return str(value)


def markdown(result: dict[str, Any], header: list[str]) -> str:
    lines = header + [
        "| model | lr | trainable | train s | ventricles mL (sd) | MS-SSIM tgt ↑ | MMD vox tgt ↓ | MMD feat tgt ↓ | "
        "FD feat tgt ↓ | MS-SSIM src | MMD vox src | MMD feat src | FD feat src | realism vs target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        t, s, v = r["target"], r["source"], r.get("ventricles_ml") or {}
        passed = r["realism"]["pass"]
        realism = ", ".join(f"{k.replace('_', ' ')} {'yes' if passed[k] else 'no'}"
                            for k in ("not_noise", "brain_shaped", "diverse"))
        lr = "-" if r["method"] == "base" else f"{r['lr']:g}" + ("" if r.get("lr_is_default", True) else " (set)")
        lines.append(
            f"| {r['label']} | {lr} | {r['trainable']:,} | {r['train_seconds']:.0f} | "
            f"{_fmt(v.get('mean'), 3)} ({_fmt(v.get('sd'), 2)}) | {_fmt(t['ms_ssim'])} | {_fmt(t['mmd_voxels'])} | "
            f"{_fmt(t['mmd_features'])} | {_fmt(t['fd_features'])} | {_fmt(s['ms_ssim'])} | {_fmt(s['mmd_voxels'])} | "
            f"{_fmt(s['mmd_features'])} | {_fmt(s['fd_features'])} | {realism} |")
    ref = result["reference"]
    if "target" in ref:
        lines += ["", "Ventricle volume of the real brains (mean over the set) and of the frozen autoencoder's "
                  "reconstructions of them (the most a U-Net adapter can reach):", "",
                  "| set | brains | ventricles mL | autoencoded mL |", "|---|---|---|---|"]
        for name in ("source", "target"):
            x = ref[name]
            lines.append(f"| {name} | {x['count']} | {x['ventricles_ml']:.1f} (sd {x['ventricles_ml_sd']:.1f}) | "
                         f"{x['autoencoded_ventricles_ml']:.1f} |")
    tvs = ref.get("target_vs_source")
    if tvs:
        lines += ["", f"The held-out target brains themselves against the source brains: MS-SSIM {_fmt(tvs['ms_ssim'])}, "
                  f"MMD voxels {_fmt(tvs['mmd_voxels'])}, MMD features {_fmt(tvs['mmd_features'])}, FD features "
                  f"{_fmt(tvs['fd_features'])}."]
    return "\n".join(lines) + "\n"


def rows_figure(path: str, rows: list[tuple[str, list[np.ndarray]]], per_row: int = 3, dpi: int = 80) -> str:
    """One row per set of volumes: the axial and coronal slices (:data:`SLICES`) of its first ``per_row`` volumes,
    all at the same positions and grey scale [0, 1] (:func:`TensorPEFTLib.engine.report.sample_rows`)."""
    from TensorPEFTLib.engine.report import sample_rows

    return sample_rows(path, rows, SLICES, per_row, dpi)


def _jsonable(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("samples", "target_volumes")}


def main(argv: list[str] | None = None) -> int:
    from benchmarks.harness import machine_line, parse_methods, today
    from TensorPEFTLib.atomic import write_text_atomically

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="demo-ldm")
    parser.add_argument("--cohort", default=None, help="a demo cohort with synthesis/ and synthesis-ventricles/ "
                        "(built into --work if not given)")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--train", type=int, default=8, help="target brains to fine-tune on; the rest are held out")
    parser.add_argument("--heldout", type=int, default=8)
    parser.add_argument("--source", type=int, default=16, help="pre-training brains to compare with")
    parser.add_argument("--count", type=int, default=8, help="volumes sampled per model")
    parser.add_argument("--sampler-steps", type=int, default=25)
    parser.add_argument("--lr", action="append", default=[], metavar="METHOD=LR",
                        help="another learning rate than the method's default (repeatable)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-features", action="store_true", help="skip FD and feature MMD (no demo-unetr)")
    parser.add_argument("--work", default=os.path.join(os.path.expanduser("~"), ".cache", "tensorpeft", "ldm_methods"))
    parser.add_argument("--resume", action="store_true", help="keep the methods --work already holds")
    parser.add_argument("--name", default=None)
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--figure", default=None, help="also write the README figure here")
    parser.add_argument("--figure-method", default=None, help="the adapted rows of --figure, comma-separated "
                        "(default: the adapter whose samples' ventricle volume came closest to the target's, and full)")
    args = parser.parse_args(argv)

    try:
        lrs = {k.strip().lower(): float(v) for k, _, v in (item.partition("=") for item in args.lr)}
    except ValueError:
        parser.error("--lr takes METHOD=LR, e.g. --lr tenvoo-l=1e-4")
    methods = parse_methods(args.methods)
    if args.figure_method:
        unknown = [m for m in args.figure_method.lower().split(",") if m.strip() not in {n for n, _ in methods}]
        if unknown:
            parser.error(f"--figure-method {','.join(unknown)}: not among --methods ({args.methods})")
    import torch

    torch.set_num_threads(args.threads)
    from TensorPEFTLib.data import build_demo_cohort, find_cases
    from TensorPEFTLib.data.demo import SYNTH_SPACING_MM, synthesis_ventricle_roi

    cohort = args.cohort or os.path.join(args.work, "cohort")
    if args.cohort is None:
        need = args.train + args.heldout
        marker = os.path.join(cohort, "dataset.json")
        params = json.load(open(marker)).get("parameters", {}) if os.path.isfile(marker) else {}
        if params.get("n_synthesis_ventricles") != need or params.get("n_synthesis") != args.source:
            build_demo_cohort(cohort, seed=0, n_train=1, n_test=0, n_unseen=0, n_whole_head=0, n_source=0, n_synthesis=args.source,
                              n_synthesis_target=0, n_synthesis_ventricles=need)
    ventricles = [c["image"] for c in find_cases(os.path.join(cohort, "synthesis-ventricles"), require_labels=False)]
    source = [c["image"] for c in find_cases(os.path.join(cohort, "synthesis"), require_labels=False)][:args.source]
    if len(ventricles) < args.train + 2:
        parser.error(f"{cohort}: {len(ventricles)} target brains; --train {args.train} leaves fewer than 2 held out")
    train, target = ventricles[:args.train], ventricles[args.train:args.train + args.heldout]
    started = time.perf_counter()
    result = run_methods(args.model, train, target, source, os.path.join(args.work, "runs"),
                         methods=methods, steps=args.steps, count=args.count,
                         sampler_steps=args.sampler_steps, lrs=lrs, threads=args.threads,
                         roi=synthesis_ventricle_roi(), spacing=SYNTH_SPACING_MM, features=not args.no_features,
                         resume=args.resume)
    seconds = time.perf_counter() - started
    stem = args.name or f"ldm_methods_cpu_{today()}"
    os.makedirs(args.out, exist_ok=True)
    command = "python benchmarks/ldm_methods.py " + " ".join(argv if argv is not None else sys.argv[1:])
    header = [f"# Fine-tuning {args.model} towards enlarged ventricles: every DDPM method at one budget", "",
              f"{machine_line('cpu')}, {args.threads} torch thread(s), {seconds / 60:.1f} min in all"
              + (f" (this invocation; kept from an earlier one with --resume: "
                 f"{', '.join(r['label'] for r in result['rows'] if r.get('kept'))})" if any(
                     r.get("kept") for r in result["rows"]) else "") + ". "
              f"Command: `{command.strip()}`", "",
              f"Each method: `finetune` on {len(train)} target brains (synthesis-ventricles), {args.steps} steps of "
              f"batch 1, seed 0, no validation; its default learning rate unless marked (set). Each model samples "
              f"{args.count} volumes ({args.sampler_steps} DDIM steps, the same seeds for every model). Metrics "
              f"against {len(target)} held-out target brains (tgt) and {len(source)} pre-training brains (src): "
              "MS-SSIM with real volume i paired to sample i (higher = closer), MMD on voxels, MMD and Fréchet "
              "distance on demo-unetr ViT features (lower = closer; the sets are small, so FD is noisy). "
              "Ventricle volume: voxels < 0.25 within 10 mm of the atlas's lateral ventricles. Realism: each "
              "sample against the target brains (issue 15's checks).", ""]
    write_text_atomically(os.path.join(args.out, stem + ".md"), markdown(result, header))
    meta = {"command": command.strip(), "machine": machine_line("cpu"), "threads": args.threads,
            "minutes": round(seconds / 60, 2), "steps": args.steps, "count": args.count, "train": train,
            "target": target, "source": source}
    write_text_atomically(os.path.join(args.out, stem + ".json"),
                          json.dumps({**meta, **_jsonable(result)}, indent=1, default=float) + "\n")
    rows = [(r["label"], result["samples"][r["method"]]) for r in result["rows"]]
    rows.append(("target (held out)", result["target_volumes"]))
    rows_figure(os.path.join(args.out, stem + ".png"), rows, dpi=55)
    if args.figure:
        target_ml = result["reference"]["target"]["ventricles_ml"]
        adapted = {r["method"]: r for r in result["rows"] if r["method"] != "base"}
        closest = lambda rows: min(rows, key=lambda r: abs(r["ventricles_ml"]["mean"] - target_ml))["method"]  # noqa: E731
        if args.figure_method:
            picks = [m.strip().lower() for m in args.figure_method.split(",") if m.strip()]
        else:  # the adapter that came closest to the target, and full fine-tuning for scale
            peft = [r for m, r in adapted.items() if m != "full"]
            picks = ([closest(peft)] if peft else []) + (["full"] if "full" in adapted else [])
        rows_figure(args.figure, [("base demo-ldm", result["samples"]["base"])]
                    + [(f"{adapted[m]['label']}, {args.steps} steps", result["samples"][m]) for m in picks]
                    + [("target brains", result["target_volumes"])])
    print(markdown(result, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
