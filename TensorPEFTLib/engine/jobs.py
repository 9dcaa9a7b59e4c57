"""The product's jobs: fine-tune, segment, synthesize, evaluate. The CLI and the Slicer worker call these."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn

from ..adapters import (AdapterConfig, inject, load_adapter, merge, model_family,
                        read_adapter_config, summary)
from ..models import PRESETS, is_shipped
from .events import Events
from .runtime import EngineError, Runtime, select_runtime
from .trainer import TrainResult, Trainer, TrainSettings, checkpoint_path

TASK_OF_FAMILY = {"unetr": "segmentation", "ddpm": "synthesis"}
#: ``--flip`` choices: axes of the RAS-oriented training volumes flipped at random (axis 0 = left-right); the same
#: names choose the axes of test-time mirroring in ``segment --mirror``
FLIP_AXES = {"all": (0, 1, 2), "lr": (0,), "none": ()}
MIRROR_CHOICES = ("auto",) + tuple(FLIP_AXES)


# ----------------------------------------------------------------------------------------------- models


def resolve_model(source: str) -> nn.Module:
    """A preset name (random weights), a shipped model's name (``demo-unetr``, ``demo-ddpm``), a file saved by
    TensorPEFT (spec inside), or a checkpoint fitting a preset."""
    from ..models.checkpoints import load_model

    return load_model(source)


def model_source_of(source: str) -> str:
    """What an adapter records as its base: a preset or shipped model's name as is, a file as an absolute path."""
    named = source in PRESETS or is_shipped(source)
    return source if named and not os.path.exists(source) else os.path.abspath(source)


def task_of(model: nn.Module) -> str:
    family = model_family(model)
    if family not in TASK_OF_FAMILY:
        raise EngineError(f"{type(model).__name__} is neither a UNETR nor a DiffusionModelUNet; nothing to fine-tune here")
    return TASK_OF_FAMILY[family]


def model_input_size(model: nn.Module) -> tuple[int, int, int]:
    """UNETR's fixed input size (its ViT position embedding) or the DDPM preset's training size."""
    spec = getattr(model, "tensorpeft_spec", None) or {}
    preset = PRESETS.get(spec.get("preset", ""))
    kwargs = {**(preset.kwargs if preset else {}), **spec.get("overrides", {})}
    if "img_size" in kwargs:
        size = kwargs["img_size"]
        return tuple(int(s) for s in (size if isinstance(size, (list, tuple)) else (size,) * 3))  # type: ignore[return-value]
    return tuple(preset.patch_size) if preset else (32, 32, 32)  # type: ignore[return-value]


def num_classes_of(model: nn.Module) -> int:
    out = getattr(model, "out", None)
    conv = getattr(out, "conv", None)
    conv = getattr(conv, "conv", conv)
    if conv is not None and hasattr(conv, "out_channels"):
        return int(conv.out_channels)
    return 2


# ----------------------------------------------------------------------------------------------- finetune


#: learning rates that worked, per task and method (measured on the demo: every UNETR method, full fine-tuning
#: included, at 1e-3; TenVOO-L on the DDPM turned its samples into blobs at 1e-3 within 60 steps and kept brains at
#: 1e-4, the TenVOO paper uses 1e-5..5e-5)
DEFAULT_LR = {"segmentation": {"*": 1e-3}, "synthesis": {"*": 1e-4, "full": 5e-5}}


def default_lr(task_kind: str, method: str) -> float:
    table = DEFAULT_LR[task_kind]
    return table.get(method, table["*"])


def default_steps(task_kind: str, num_train: int) -> int:
    """Enough optimiser steps for ``num_train`` subjects: 400 for up to 8 (the demo's 5 subjects: validation Dice still
    rose from 240 to 400 steps), 50 per subject beyond; synthesis 300."""
    if task_kind != "segmentation":
        return 300
    return max(400, 50 * int(num_train))


def split_validation(cases: list[dict], seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out about a quarter of the labelled cases (at least one) for validation when 4 or more are given, so the
    best adapter is chosen on cases it did not train on; a seeded shuffle, so the split repeats."""
    if len(cases) < 4:
        return cases, []
    order = np.random.default_rng(seed).permutation(len(cases))
    n_val = max(1, int(round(len(cases) / 4)))
    val = [cases[i] for i in sorted(order[:n_val])]
    train = [cases[i] for i in sorted(order[n_val:])]
    return train, val


def working_preprocessing(model: nn.Module, cases: list[dict], spacing: Sequence[float] | None) -> Any:
    """The grid a segmentation model works at: ``spacing`` if given, else the one the model records, else (a raw
    preset, or a checkpoint from elsewhere) the median spacing of the training cases, as nnU-Net plans it."""
    from ..data import read_volume
    from ..data.preprocess import Preprocessing, plan_spacing, ras_spacing

    recorded = Preprocessing.from_dict((getattr(model, "tensorpeft_spec", None) or {}).get("preprocessing"))
    if spacing is not None:
        base = recorded or Preprocessing()
        return Preprocessing(spacing=tuple(spacing), orientation=base.orientation, intensity=base.intensity,
                             crop_foreground=base.crop_foreground)
    if recorded is not None and recorded.spacing is not None:
        return recorded
    planned = plan_spacing(ras_spacing(read_volume(c["image"], header_only=True).affine) for c in cases)
    return Preprocessing(spacing=planned)


def finetune(model_source: str, data: str, out: str, cfg: AdapterConfig | None, settings: TrainSettings, *,
             val: str | None = None, device: str = "auto", amp: str = "auto", events: Events | None = None,
             resume: bool = False, overwrite: bool = False, batch_size: int | None = None,
             patch_size: Sequence[int] | None = None, spacing: Sequence[float] | None = None, affine: bool = True,
             elastic: bool = False, flip: str = "lr", auto_val: bool = True,
             threads: int | None = None) -> TrainResult:
    """Fine-tune ``model_source`` on the cases in ``data`` and write the adapter folder ``out``.

    Every data problem is reported before training starts. ``resume`` continues from ``out/checkpoint``.
    The defaults are the recipe that works for 5-10 subjects: ``settings.steps`` / ``lr`` / ``eval_every`` left
    ``None`` are chosen by :func:`default_steps` / :func:`default_lr` / a tenth of the steps; without ``val``
    (and ``auto_val``) a quarter of the cases is held out (:func:`split_validation`).
    Segmentation cases are resampled to the model's working spacing (``spacing`` overrides; see
    :func:`working_preprocessing`), which the adapter records for ``segment``.
    ``flip``: random flips in segmentation training on ``lr`` (left-right only, default: plausible for brain
    structures, and the axis ``segment`` then mirrors along), ``all`` axes (the LoRA-PT recipe) or ``none``.
    ``affine``: random rotation / scaling / shift of each training patch (see
    :func:`~TensorPEFTLib.data.train_transforms`); on by default, since with few subjects a UNETR otherwise learns
    where a structure sits in the patch.
    """
    import dataclasses

    if flip not in FLIP_AXES:
        raise EngineError(f"--flip {flip!r}: choose one of {', '.join(FLIP_AXES)}")
    from ..data import case_name, find_cases, validate_cases

    events = events or Events()
    out = os.fspath(out)
    ckpt = checkpoint_path(out)
    if resume and ckpt is None:
        raise EngineError(f"{out}: no checkpoint to resume from; run without --resume")
    if not resume and not overwrite and (ckpt or os.path.isfile(os.path.join(out, "adapter_config.json"))):
        raise EngineError(f"{out} already holds a fine-tuning run; use --resume to continue it, --overwrite to replace it, "
                          "or choose another --out")

    model = resolve_model(model_source)
    task_kind = task_of(model)
    if not os.path.exists(model_source) and model_source in PRESETS:
        events.message(f"note: {model_source} is a preset with random weights; pass a pretrained checkpoint for real use")

    train_cases = find_cases(data, "training", require_labels=task_kind == "segmentation")
    val_cases = find_cases(val, "training", require_labels=task_kind == "segmentation") if val else []
    if not train_cases:
        raise EngineError(f"{data}: no training cases found (expected imagesTr/ or a datalist with 'training')")
    if not val_cases and auto_val:
        train_cases, val_cases = split_validation(train_cases, settings.seed)
        if val_cases:
            events.message(f"no --val given: {len(val_cases)} of the {len(train_cases) + len(val_cases)} cases pick the "
                           f"best adapter ({', '.join(c.get('name', os.path.basename(c['image'])) for c in val_cases)})")
    num_classes = num_classes_of(model) if task_kind == "segmentation" else None
    events.message(f"checking {len(train_cases) + len(val_cases)} case(s) before training ...")
    validate_cases(train_cases + val_cases, num_classes, require_labels=task_kind == "segmentation",
                   require_foreground=task_kind == "segmentation")

    if resume:
        saved = read_adapter_config(ckpt)
        load_adapter(model, ckpt)
        if cfg is not None and cfg.to_dict() != saved["config"]:
            events.message("note: --resume continues with the checkpoint's adapter settings; other adapter flags are ignored")
        cfg = AdapterConfig.from_dict(saved["config"])
    else:
        if cfg is None:
            raise EngineError("choose an adapter: --method NAME --rank R")
        inject(model, cfg)
    report = summary(model)
    settings = dataclasses.replace(
        settings,
        steps=settings.steps or default_steps(task_kind, len(train_cases)),
        lr=settings.lr or default_lr(task_kind, cfg.method))
    if not settings.eval_every:
        settings = dataclasses.replace(settings, eval_every=max(1, settings.steps // 10))
    if not settings.checkpoint_every:
        settings = dataclasses.replace(settings, checkpoint_every=settings.eval_every)

    runtime = select_runtime(device, amp, threads)
    model.to(runtime.device)
    size = tuple(patch_size) if patch_size else model_input_size(model)
    prep = None
    if task_kind == "segmentation":
        from .segmentation import SegmentationTask

        prep = working_preprocessing(model, train_cases, spacing)
        events.message(f"working grid: {prep.describe()} (every case is resampled to it)")
        task: Any = SegmentationTask(train_cases, val_cases, patch_size=size, num_classes=num_classes, runtime=runtime,
                                     batch_size=batch_size or 2, preprocessing=prep, affine=affine, elastic=elastic,
                                     flip_axes=FLIP_AXES[flip])
    else:
        from .synthesis import SynthesisTask

        task = SynthesisTask(train_cases, val_cases, size=size, runtime=runtime, batch_size=batch_size or 1)

    hooks = growth_hooks(model, cfg)
    meta = {
        "task": task_kind, "method": cfg.method, "rank": cfg.rank, "base_model_source": model_source_of(model_source),
        "base_spec": getattr(model, "tensorpeft_spec", None), "patch_size": list(size),
        "preprocessing": prep.to_dict() if prep else None, "num_classes": num_classes,
        "trainable": report["trainable"], "adapter_parameters": report["adapter"], "total_parameters": report["total"],
        "train_cases": len(train_cases), "val_cases": len(val_cases),
        "train_names": [c.get("name", case_name(c["image"])) for c in train_cases],
        "val_names": [c.get("name", case_name(c["image"])) for c in val_cases],
        "train_steps": settings.steps, "train_lr": settings.lr,
    }
    if task_kind == "segmentation":
        meta.update(flip=flip, affine=affine, elastic=elastic)  # segment --mirror auto mirrors along the same axes
    if task_kind == "synthesis":
        meta["schedule"] = task.schedule
        meta["spacing"] = list(_first_spacing(train_cases, size))
    trainer = Trainer(model, task, settings, out, runtime, events, hooks=hooks, extra_meta=meta)
    events.message(f"{report['method']} rank {cfg.rank}: {report['trainable']:,} trainable of {report['base_total']:,} "
                   f"({report['trainable_percent']:.2f}%), {report['layers_wrapped']} layers adapted; "
                   f"device {runtime.name}")
    # Hooks keep their own state between steps; build the optimiser after the adapter is in place (done above).
    for hook in hooks:
        bind = getattr(hook, "bind", None)
        if bind:
            bind(trainer.optimizer)
    return trainer.run(resume_from=ckpt if resume else None)


def growth_hooks(model: nn.Module, cfg: AdapterConfig) -> list[Any]:
    """Trainer hooks a method needs (SeLoRA grows ranks during training)."""
    if cfg.method != "selora":
        return []
    from ..adapters import selora

    return [selora.trainer_hook(model, cfg)]


def _first_spacing(cases: list[dict], size: Sequence[int]) -> tuple[float, float, float]:
    """Voxel size for generated volumes: the training volumes' field of view spread over ``size``."""
    from ..data import read_volume

    vol = read_volume(cases[0]["image"], header_only=True)
    fov = np.asarray(vol.shape[:3], dtype=float) * np.asarray(vol.spacing)
    return tuple(float(round(f / s, 3)) for f, s in zip(fov, size))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- inference


def load_adapted_model(model_source: str | None, adapter: str | None, runtime: Runtime) -> tuple[nn.Module, dict[str, Any]]:
    """Base model (from ``model_source`` or the adapter's record of it) with the adapter loaded and merged."""
    saved: dict[str, Any] = read_adapter_config(adapter) if adapter else {}
    source = model_source or saved.get("base_model_source")
    if not source:
        raise EngineError("give --model (a checkpoint file or preset); the adapter does not record its base model")
    model = resolve_model(source)
    if adapter:
        load_adapter(model, adapter)
        merge(model)  # inference at exactly the base model's cost
    model.to(runtime.device).eval()
    return model, saved


def _image_list(image: str) -> list[str]:
    from ..data import is_volume_file

    p = Path(image)
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.is_file() and is_volume_file(f) and not f.name.startswith("."))
        if not files:
            raise EngineError(f"{image}: no .nii, .nii.gz or .nrrd images in this folder")
        return files
    if not p.is_file():
        raise EngineError(f"{image}: no such image file or folder")
    return [str(p)]


def inference_preprocessing(model: nn.Module, saved: dict[str, Any]) -> Any:
    """The working grid for inference: the adapter's record, else the base model's, else the input grid.

    Adapters written before working spacings existed (``pixdim`` but no ``preprocessing``) keep what they were
    trained with: whole-volume percentile intensities, no foreground crop."""
    from ..data.preprocess import Preprocessing

    if saved.get("preprocessing"):
        return Preprocessing.from_dict(saved["preprocessing"])
    if saved and "preprocessing" not in saved:
        pixdim = saved.get("pixdim")
        return Preprocessing(spacing=tuple(pixdim) if pixdim else None, intensity="percentile", crop_foreground=False)
    recorded = Preprocessing.from_dict((getattr(model, "tensorpeft_spec", None) or {}).get("preprocessing"))
    return recorded or Preprocessing()


def segment(image: str, out: str, *, model_source: str | None = None, adapter: str | None = None,
            device: str = "auto", amp: str = "auto", sw_batch_size: int = 4, overlap: float = 0.5,
            min_component_mm3: float = 1000.0, mirror: str = "auto", events: Events | None = None,
            threads: int | None = None) -> list[dict[str, Any]]:
    """Segment an image or every image of a folder; masks are written on each image's own grid.

    ``out``: a file path for a single image (``.nii.gz``, ``.nrrd`` or ``.seg.nrrd``), else a folder where each mask
    keeps its image's case name (``<case>.nii.gz``). ``mirror``: test-time mirroring along ``lr``, ``all`` or
    ``none`` of the axes; ``auto`` takes the flips the adapter was trained with (none without an adapter).
    """
    from ..data import case_name
    from .segmentation import segment_images

    if mirror not in MIRROR_CHOICES:
        raise EngineError(f"--mirror {mirror!r}: choose one of {', '.join(MIRROR_CHOICES)}")
    events = events or Events()
    images = _image_list(image)
    runtime = select_runtime(device, amp, threads)
    model, saved = load_adapted_model(model_source, adapter, runtime)
    if task_of(model) != "segmentation":
        raise EngineError("segment needs a UNETR; this model is a DDPM (use synthesize)")
    single_file = len(images) == 1 and not Path(image).is_dir() and Path(out).suffix != ""
    if single_file:
        outputs = [out]
    else:
        os.makedirs(out, exist_ok=True)
        outputs = [os.path.join(out, case_name(p) + ".nii.gz") for p in images]
    patch = tuple(saved.get("patch_size") or model_input_size(model))
    prep = inference_preprocessing(model, saved)
    if mirror == "auto":
        mirror = saved.get("flip") or "none"
    events.message(f"working grid: {prep.describe()}; mirroring: {mirror}")
    events.emit("start", kind="segment", images=len(images), out=out, mirror=mirror,
                preprocessing=prep.to_dict(), **runtime.describe())
    records = segment_images(model, images, outputs, runtime, events, patch_size=patch, preprocessing=prep,
                             sw_batch_size=sw_batch_size, overlap=overlap, min_component_mm3=min_component_mm3,
                             mirror_axes=FLIP_AXES[mirror])
    for record in records:
        record["mirror"] = mirror
    events.emit("done", status="completed", out=out, masks=[r["mask"] for r in records])
    return records


def synthesize(out: str, count: int, *, model_source: str | None = None, adapter: str | None = None,
               steps: int = 50, sampler: str = "ddim", size: Sequence[int] | None = None, seed: int = 0,
               device: str = "auto", amp: str = "auto", events: Events | None = None,
               threads: int | None = None) -> list[str]:
    """Generate ``count`` volumes into the folder ``out`` (NIfTI, RAS affine with the training data's voxel size),
    plus ``samples.png`` with three views of each."""
    from ..data import write_volume
    from .report import slice_grid
    from .synthesis import default_affine, sample_volumes

    if count < 1:
        raise EngineError(f"--count must be >= 1, got {count}")
    if sampler not in ("ddim", "ddpm"):
        raise EngineError(f"--sampler {sampler!r}: choose ddim or ddpm")
    events = events or Events()
    runtime = select_runtime(device, amp, threads)
    model, saved = load_adapted_model(model_source, adapter, runtime)
    if task_of(model) != "synthesis":
        raise EngineError("synthesize needs a DDPM; this model is a UNETR (use segment)")
    shape = tuple(size) if size else tuple(saved.get("patch_size") or model_input_size(model))
    spacing = saved.get("spacing") or (1.0, 1.0, 1.0)
    os.makedirs(out, exist_ok=True)
    events.emit("start", kind="synthesize", count=count, steps=steps, sampler=sampler, out=out, **runtime.describe())
    chain = steps if sampler == "ddim" else int((saved.get("schedule") or {}).get("num_train_timesteps", 1000))
    events.start_bar(count * chain, f"synthesizing {count} volume(s)")
    volumes = sample_volumes(model, count, shape, runtime, steps=steps, sampler=sampler, seed=seed,
                             schedule=saved.get("schedule"), events=events)
    events.close_bar()
    paths = []
    for index, volume in enumerate(volumes, start=1):
        path = os.path.join(out, f"synth_{index:03d}.nii.gz")
        write_volume(path, volume.astype(np.float32), like=default_affine(shape, spacing))
        paths.append(path)
    grid = slice_grid(os.path.join(out, "samples.png"), volumes[:6], [os.path.basename(p) for p in paths[:6]])
    events.emit("done", status="completed", out=out, volumes=paths, png=grid)
    return paths


def evaluate(pred: str, ref: str, *, kind: str = "auto") -> dict[str, Any]:
    """Score predictions against references (``segmentation``: Dice/HD95 per case) or generated volumes against
    real ones (``synthesis``: MS-SSIM and MMD). ``auto``: label maps → segmentation, else synthesis."""
    from ..data import read_volume
    from .evaluate import evaluate_segmentations, evaluate_synthesis

    preds, refs = _image_list(pred), _image_list(ref)
    if kind == "auto":
        sample = np.asarray(read_volume(preds[0]).array)
        kind = "segmentation" if np.issubdtype(sample.dtype, np.integer) or np.array_equal(sample, np.round(sample)) else "synthesis"
    if kind == "segmentation":
        rows = evaluate_segmentations(preds, refs)
        mean = {k: float(np.nanmean([r[k] for r in rows])) for k in ("dice", "hd95")}
        return {"kind": kind, "cases": rows, "mean": mean}
    if kind != "synthesis":
        raise EngineError(f"--kind {kind!r}: choose auto, segmentation or synthesis")
    gen = [np.asarray(read_volume(p).array, dtype=np.float32) for p in preds]
    real = [unit_range_like(np.asarray(read_volume(r).array, dtype=np.float32), gen[0].shape) for r in refs]
    return {"kind": kind, "mean": evaluate_synthesis(gen, real)}


def unit_range_like(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A real volume brought to the generated volumes' [0, 1] range and shape (MONAI transforms, as in training)."""
    from monai.transforms import ResizeWithPadOrCrop, ScaleIntensityRangePercentiles

    v = ScaleIntensityRangePercentiles(lower=0.0, upper=99.5, b_min=0.0, b_max=1.0, clip=True)(volume[None])
    return np.asarray(ResizeWithPadOrCrop(tuple(shape))(v))[0]

