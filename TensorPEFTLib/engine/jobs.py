"""The product's jobs: fine-tune, segment, synthesize, evaluate. The CLI and the Slicer worker call these."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torch import nn

from ..adapters import (AdapterConfig, get_method, inject, load_adapter, merge_and_unload, model_family,
                        read_adapter_config, summary)
from ..adapters.catalog import default_steps
from ..data.labels import mirror_permutation
from ..models import PRESETS, is_shipped
from ..models.presets import TASK_OF_FAMILY
from .events import Events
from .head_probe import check_head_init
from .labels import (FLIP_CHOICES, LabelPlan, adapter_label_map, apply_label_plan, check_label_specs, flip_swaps,
                     plan_labels, prepare_adapter_model, resolve_flip)
from .outputs import RunLock, check_output_file, check_output_folder
from .runtime import EngineError, Interrupted, Runtime, place_model, select_runtime
from .trainer import BEST_DIR, CHECKPOINT_DIR, LAST_DIR, TrainResult, Trainer, TrainSettings, checkpoint_path
#: ``--flip`` choices: axes of the RAS-oriented training volumes flipped at random (axis 0 = left-right); the same
#: names choose the axes of test-time mirroring in ``segment --mirror``
FLIP_AXES = {"all": (0, 1, 2), "lr": (0,), "none": ()}
MIRROR_CHOICES = ("auto",) + tuple(FLIP_AXES)
#: what segment writes for a single image
MASK_EXTENSIONS = (".nii.gz", ".nii", ".seg.nrrd", ".nrrd", ".mgz")
#: a case whose voxels are this many times larger or smaller than the working grid's gets a warning in finetune
#: (segment refuses it: see preprocess.check_spacing)
SPACING_WARN_RATIO = 3.0


# ----------------------------------------------------------------------------------------------- models


def resolve_model(source: str, autoencoder: str | None = None) -> nn.Module:
    """A preset name (random weights), a shipped model's name (``demo-unetr``, ``demo-ldm``), a file saved by
    TensorPEFT (spec inside), a checkpoint fitting a preset, or a latent diffusion model's MONAI bundle folder
    (``configs/inference.json`` defining an ``AutoencoderKL`` and a ``DiffusionModelUNet``, ``models/`` with both
    weights; ``autoencoder``: the autoencoder's weights from another file): then the diffusion U-Net with its frozen
    autoencoder attached (:func:`~TensorPEFTLib.models.latent.load_latent_model`)."""
    from ..models.checkpoints import CheckpointError, load_model
    from ..models.latent import is_latent_bundle, load_latent_model

    if autoencoder or is_latent_bundle(source):
        if not os.path.isdir(source):
            raise CheckpointError(f"--autoencoder {autoencoder}: needs --model to be the latent diffusion model's MONAI "
                                  f"bundle folder (its configs/inference.json describes both networks), not {source}")
        return load_latent_model(source, autoencoder)
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
    """UNETR's fixed input size (its ViT position embedding), the DDPM preset's training size, or the image size a
    latent diffusion bundle samples at (its latent shape times the autoencoder's down-sampling)."""
    from ..models.latent import latent_parts

    latent = latent_parts(model)
    if latent is not None:
        shape = latent.image_shape()
        if shape is None:
            raise EngineError(f"{latent.source}: the bundle config gives no latent_shape, so the image size is unknown: "
                              f"give it (--size for synthesize, --patch-size for finetune), sides multiples of "
                              f"{size_multiple(model)}")
        return shape  # type: ignore[return-value]
    spec = getattr(model, "tensorpeft_spec", None) or {}
    preset = PRESETS.get(spec.get("preset", ""))
    kwargs = {**(preset.kwargs if preset else {}), **spec.get("overrides", {})}
    if "img_size" in kwargs:
        size = kwargs["img_size"]
        return tuple(int(s) for s in (size if isinstance(size, (list, tuple)) else (size,) * 3))  # type: ignore[return-value]
    return tuple(preset.patch_size) if preset else (32, 32, 32)  # type: ignore[return-value]


def size_multiple(model: nn.Module) -> int:
    """What every side of a DDPM's input must be a multiple of: 2 to the number of its down-sampling blocks (a
    side that does not halve evenly cannot be joined to its skip connection on the way up). 1 for a UNETR. A latent
    model's image sides also pass its autoencoder's down-sampling first."""
    from ..models.latent import latent_parts

    blocks = getattr(model, "down_blocks", None)
    if blocks is None:
        return 1
    latent = latent_parts(model)
    return (latent.downsample if latent else 1) * 2 ** sum(
        1 for block in blocks if getattr(block, "downsampler", None) is not None)


def check_input_size(model: nn.Module, size: Sequence[int], option: str) -> tuple[int, int, int]:
    """Refuse, before any work, a patch or volume size the network cannot take: a UNETR only its own input size
    (the ViT's position embedding is fixed), a DDPM multiples of :func:`size_multiple`."""
    size = tuple(int(s) for s in size)
    text = "x".join(map(str, size))
    if min(size) < 1:
        raise EngineError(f"{option} {text}: every side must be >= 1")
    if model_family(model) == "unetr":
        own = model_input_size(model)
        if size != own:
            raise EngineError(f"{option} {text}: this UNETR takes only its own input size {'x'.join(map(str, own))} "
                              f"(its position embedding is fixed); drop {option}")
        return size  # type: ignore[return-value]
    step = size_multiple(model)
    if any(s % step for s in size):
        from ..models.latent import latent_parts

        near = "x".join(str(max(step, int(round(s / step)) * step)) for s in size)
        latent = latent_parts(model)
        how = (f"its autoencoder shrinks the volume {latent.downsample}x and its U-Net halves the latents "
               f"{(step // latent.downsample).bit_length() - 1} times" if latent else
               f"it halves the volume {step.bit_length() - 1} times")
        kind = "latent diffusion model" if latent else "DDPM"
        raise EngineError(f"{option} {text}: this {kind} needs every side to be a multiple of {step} ({how}), "
                          f"e.g. {near}")
    return size  # type: ignore[return-value]


def num_classes_of(model: nn.Module) -> int:
    """Classes a segmentation model predicts (background included)."""
    from ..models.heads import output_classes

    return output_classes(model)


# ----------------------------------------------------------------------------------------------- finetune


#: the model family a task name stands for (``default_lr("synthesis", ...)`` = a DDPM's default)
FAMILY_OF_TASK = {task: family for family, task in TASK_OF_FAMILY.items()}


def default_lr(family: str, method: str) -> float:
    """The learning rate ``finetune`` uses without ``--lr``: the method's default for the model family (``unetr``,
    ``ddpm``; a task name, ``segmentation`` or ``synthesis``, stands for its family). The table and the measurement
    behind it live with the methods: :data:`TensorPEFTLib.adapters.catalog.DEFAULT_LR`."""
    from ..adapters.catalog import default_lr as method_default_lr

    return method_default_lr(method, FAMILY_OF_TASK.get(family, family))


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


def working_preprocessing(model: nn.Module, cases: list[dict], spacing: Sequence[float] | None,
                          skull_strip: str | None = None) -> Any:
    """The grid a segmentation model works at: ``spacing`` if given, else the one the model records, else (a raw
    preset, or a checkpoint from elsewhere) the median spacing of the training cases, as nnU-Net plans it.
    ``skull_strip`` (one of :data:`~TensorPEFTLib.data.preprocess.SKULL_STRIP_CHOICES`) replaces the recorded mode."""
    from ..data import read_volume
    from ..data.preprocess import Preprocessing, plan_spacing, ras_spacing

    recorded = Preprocessing.from_dict((getattr(model, "tensorpeft_spec", None) or {}).get("preprocessing"))
    if spacing is not None:
        base = recorded or Preprocessing()
        prep = Preprocessing(spacing=tuple(spacing), orientation=base.orientation, intensity=base.intensity,
                             crop_foreground=base.crop_foreground, skull_strip=base.skull_strip)
    elif recorded is not None and recorded.spacing is not None:
        prep = recorded
    else:
        prep = Preprocessing(spacing=plan_spacing(ras_spacing(read_volume(c["image"], header_only=True).affine)
                                                  for c in cases))
    return prep if skull_strip is None else dataclasses.replace(prep, skull_strip=skull_strip)


def check_training_geometry(model: nn.Module, cases: list[dict], prep: Any, patch_size: Sequence[int],
                            events: Events) -> None:
    """Before training: warn where the working grid is far from the model's own (``--spacing 10`` on a 1.5 mm model)
    or a case's voxels are far from the working grid (a 10 mm scan upsampled); refuse cases smaller than one patch
    once resampled, as ``segment`` does."""
    from ..data import DataError, read_volume
    from ..data.preprocess import Preprocessing, ras_spacing, resampled_shape

    working = np.asarray(prep.spacing, dtype=np.float64) if prep.spacing else None
    recorded = Preprocessing.from_dict((getattr(model, "tensorpeft_spec", None) or {}).get("preprocessing"))
    if working is not None and recorded is not None and recorded.spacing is not None:
        ratio = working / np.asarray(recorded.spacing, dtype=np.float64)
        if np.any(np.maximum(ratio, 1 / ratio) > SPACING_WARN_RATIO):
            events.warn(f"working voxel size {_mm(working)} mm is {np.max(np.maximum(ratio, 1 / ratio)):.1f}x off the "
                        f"{_mm(recorded.spacing)} mm this model was pre-trained at; its features are tuned to that scale")
    far, small = [], []
    for case in cases:
        header = read_volume(case["image"], header_only=True)
        if working is not None:
            have = np.asarray(ras_spacing(header.affine))
            ratio = have / working
            if np.any(np.maximum(ratio, 1 / ratio) > SPACING_WARN_RATIO):
                far.append(f"{case['image']} ({_mm(have)} mm)")
        extent = resampled_shape(header.shape, header.affine, prep.spacing)
        if any(e < p for e, p in zip(extent, patch_size)):
            small.append(f"{case['image']}: {'x'.join(map(str, extent))} voxels at the working grid, smaller than the "
                         f"model's {'x'.join(map(str, patch_size))} patch; give scans with a larger field of view")
    if far:
        more = f" and {len(far) - 3} more" if len(far) > 3 else ""
        events.warn(f"voxel size more than {SPACING_WARN_RATIO:g}x off the working grid {_mm(working)} mm, so "
                    f"resampled a long way: {', '.join(far[:3])}{more}")
    if small:
        raise DataError(small[0] if len(small) == 1 else f"{len(small)} cases are smaller than one patch:\n  " +
                        "\n  ".join(small), small)


def _mm(values: Any) -> str:
    return "x".join(f"{float(v):.3g}" for v in values)


def finetune(model_source: str, data: str, out: str, cfg: AdapterConfig | None, settings: TrainSettings, *,
             val: str | None = None, device: str = "auto", amp: str = "auto", events: Events | None = None,
             resume: bool = False, overwrite: bool = False, batch_size: int | None = None,
             patch_size: Sequence[int] | None = None, spacing: Sequence[float] | None = None, affine: bool = True,
             elastic: bool = False, flip: str = "auto", auto_val: bool = True,
             threads: int | None = None, loss: str = "dice-ce", label_resampling: str = "linear",
             centre_jitter: int = 16, checkpointing: bool | None = None, autoencoder: str | None = None,
             align: str = "auto", skull_strip: str | None = None, labels: Sequence[str] | None = None,
             head_init: str = "copy", patch_centres: str = "voxels") -> TrainResult:
    """Fine-tune ``model_source`` on the cases in ``data`` and write the adapter folder ``out``.

    Every data problem is reported before training starts. ``resume`` continues from ``out/checkpoint``.
    The defaults are the recipe that works for 5-10 subjects: ``settings.steps`` / ``lr`` / ``eval_every`` left
    ``None`` are chosen by :func:`default_steps` / :func:`default_lr` / a fifth of the steps; without ``val``
    (and ``auto_val``) a quarter of the cases is held out (:func:`split_validation`).
    Segmentation cases are resampled to the model's working spacing (``spacing`` overrides; see
    :func:`working_preprocessing`), which the adapter records for ``segment``.
    ``flip``: random flips in segmentation training on ``lr`` (left-right only: plausible for brain structures, and
    the axis ``segment`` then mirrors along), ``all`` axes (the LoRA-PT recipe) or ``none``; ``auto`` (default):
    ``lr``, swapping each left class with its right partner when the labels tell left from right, or ``none`` when
    such a class has no partner (:func:`.labels.resolve_flip`); a resumed run keeps its own.
    ``labels``: which label values are the structures, one class each (``--labels``, see
    :func:`~TensorPEFTLib.data.labels.parse_label_specs`); None: every non-zero value in the labels. Labels with more
    structures than the model predicts get a wider output layer (:func:`.labels.apply_label_plan`); the adapter
    records the map and ``segment`` writes masks in these values.
    ``affine``: random rotation / scaling / shift of each training patch (see
    :func:`~TensorPEFTLib.data.train_transforms`); on by default, since with few subjects a UNETR otherwise learns
    where a structure sits in the patch.
    ``loss`` / ``label_resampling`` (segmentation): see :data:`~.segmentation.SEGMENTATION_LOSSES` and
    :data:`~.segmentation.LABEL_RESAMPLING`; ``centre_jitter``: how far (voxels) a foreground-centred training patch is
    moved off its centre voxel (:func:`~TensorPEFTLib.data.train_transforms`); a resumed run keeps the ones it
    started with.
    ``head_init`` (segmentation labels with more structures than the model predicts): how the wider output layer
    starts: ``copy`` (default: every new class a copy of the old foreground,
    :func:`~TensorPEFTLib.models.heads.set_output_classes`) or ``probe`` (fitted to the base model's features over a
    few training patches, :mod:`.head_probe`). ``patch_centres``: how a patch's label centre is drawn with several
    structures (:data:`~.segmentation.PATCH_CENTRES`: ``voxels``, the default, or ``classes``).
    ``checkpointing``: activation checkpointing of the UNETR's ViT blocks or the DDPM's resnet blocks
    (:mod:`.checkpointing`): less activation memory for recomputing those blocks in backward, the same gradients.
    ``None``: off for a new run, the run's own setting on ``resume``.
    ``autoencoder``: for a latent diffusion bundle (``model_source``), autoencoder weights from another file than the
    bundle's (see :func:`resolve_model`); the adapter records it, and its scale factor.
    ``align`` (synthesis): ``auto`` registers the volumes to the reference brain the base model names, ``off`` takes
    them as they are (:func:`synthesis_alignment`).
    ``skull_strip``: brain extraction of whole-head scans (``auto``: scans larger than a brain; ``on``; ``off``), for
    segmentation on the working grid (:class:`~TensorPEFTLib.data.SkullStripd`) and recorded for ``segment``, for
    synthesis before the registration; ``None``: the model's recorded mode, else ``auto``; a resumed run keeps its own.

    Under ``torchrun`` (see :mod:`.distributed`) the job is data-parallel: ``batch_size`` patches per rank, rank 0
    alone checks the data, holds the run lock and writes the run; every check's outcome is agreed by all ranks.
    """
    from .distributed import setup

    ctx = setup(device)
    events = events or Events()
    if not ctx.is_main:
        events = Events.silent_sink()
    out = os.fspath(out)
    lock = RunLock(out, "finetune") if ctx.is_main else None  # one writer per run: rank 0
    try:
        with ctx.agreement():
            if flip not in FLIP_CHOICES:
                raise EngineError(f"--flip {flip!r}: choose one of {', '.join(FLIP_CHOICES)}")
            if labels:
                check_label_specs(labels)  # a typo is reported before the data are read
            if ctx.is_main:
                check_output_folder(out)
            if batch_size is not None and batch_size < 1:
                raise EngineError(f"--batch-size must be >= 1, got {batch_size}")
            _check_existing_run(out, resume, overwrite)
            model, task_kind, num_classes, train_cases, val_cases, plan = _prepare_finetune(
                model_source, data, val, patch_size, auto_val, settings.seed, events, ctx.is_main, autoencoder,
                labels)
            new_head = False
            if task_kind == "segmentation":
                plan = ctx.broadcast(plan)  # rank 0 alone read the labels
                if not plan.plain or len(plan.label_map.values) > 1:  # one structure labelled 1: nothing to say
                    events.message(plan.describe())
                classes_before = num_classes_of(model)
                num_classes = apply_label_plan(model, plan, events)
                new_head = num_classes > classes_before
            elif labels:
                raise EngineError("--labels is for segmentation; a DDPM learns from the images alone")
            flip = resolve_flip(flip, plan, events) if task_kind == "segmentation" else "lr"
            swaps = flip_swaps(flip, plan)
            if lock is not None:
                lock.acquire()
                _check_existing_run(out, resume, overwrite)  # again, now that no other process can start one here
                if overwrite and not resume:
                    clear_run(out)
        return _finetune(model, model_source, task_kind, num_classes, train_cases, val_cases, out, cfg, settings,
                         plan=plan, device=device, amp=amp, events=events, resume=resume, batch_size=batch_size,
                         patch_size=patch_size, spacing=spacing, affine=affine, elastic=elastic, flip=flip,
                         swaps=swaps, threads=threads, loss=loss, label_resampling=label_resampling,
                         centre_jitter=centre_jitter, checkpointing=checkpointing, align=align,
                         skull_strip=skull_strip, ctx=ctx, patch_centres=patch_centres,
                         head_init=check_head_init(head_init) if new_head else None)
    except KeyboardInterrupt:
        kept = checkpoint_path(out)
        if kept:
            raise Interrupted(f"finetune interrupted; {kept} is intact: continue with --resume") from None
        raise Interrupted("finetune interrupted before its first checkpoint; nothing was saved") from None
    finally:
        if lock is not None:
            lock.release()


def _prepare_finetune(model_source: str, data: str, val: str | None, patch_size: Sequence[int] | None,
                      auto_val: bool, seed: int, events: Events, check_data: bool, autoencoder: str | None = None,
                      labels: Sequence[str] | None = None
                      ) -> tuple[nn.Module, str, int | None, list[dict], list[dict], LabelPlan | None]:
    """The model, its task, the training and validation cases, every case checked (``check_data``: rank 0 of a
    data-parallel job reads every file once for all ranks), and how the labels become classes (rank 0's; None on
    the others and for synthesis)."""
    from ..data import find_cases, validate_cases

    model = resolve_model(model_source, autoencoder)
    task_kind = task_of(model)
    if patch_size is not None:
        check_input_size(model, patch_size, "--patch-size")
    else:
        model_input_size(model)  # a latent bundle without a latent shape: ask for --patch-size before any work
    if not os.path.exists(model_source) and model_source in PRESETS:
        events.message(f"note: {model_source} is a preset with random weights; pass a pretrained checkpoint for real use")

    train_cases = find_cases(data, "training", require_labels=task_kind == "segmentation")
    val_cases = find_cases(val, "training", require_labels=task_kind == "segmentation") if val else []
    if not train_cases:
        raise EngineError(f"{data}: no training cases found (expected imagesTr/ or a datalist with 'training')")
    if task_kind == "synthesis" and any(c.get("label") for c in train_cases + val_cases):
        events.warn(f"{data} has labels, but a DDPM learns from the images alone: the labels are unused "
                    "(to train a segmentation adapter, give a UNETR as --model)")
    if auto_val and not val_cases:
        train_cases, val_cases = split_validation(train_cases, seed)
        if val_cases:
            events.message(f"no --val given: {len(val_cases)} of the {len(train_cases) + len(val_cases)} cases pick the "
                           f"best adapter ({', '.join(c.get('name', os.path.basename(c['image'])) for c in val_cases)})")
    num_classes = num_classes_of(model) if task_kind == "segmentation" else None
    plan = None
    if check_data:
        events.message(f"checking {len(train_cases) + len(val_cases)} case(s) before training ...")
        # label values are checked against the label plan, not the model's classes: any values can be mapped
        report = validate_cases(train_cases + val_cases, None, require_labels=task_kind == "segmentation",
                                require_foreground=task_kind == "segmentation")
        if task_kind == "segmentation":
            plan = plan_labels(report, labels)
    return model, task_kind, num_classes, train_cases, val_cases, plan


RUN_FILES = ("adapter_config.json", "adapter.safetensors", "history.json", "metrics.csv", "report.png")
RUN_FOLDERS = (CHECKPOINT_DIR, CHECKPOINT_DIR + ".old", CHECKPOINT_DIR + ".new", BEST_DIR, LAST_DIR)


def _check_existing_run(out: str, resume: bool, overwrite: bool) -> None:
    ckpt = checkpoint_path(out)
    if resume and ckpt is None:
        raise EngineError(f"{out}: no checkpoint to resume from; run without --resume")
    if not resume and not overwrite and (ckpt or os.path.isfile(os.path.join(out, "adapter_config.json"))):
        raise EngineError(f"{out} already holds a fine-tuning run; use --resume to continue it, --overwrite to replace it, "
                          "or choose another --out")


def clear_run(out: str) -> None:
    """``--overwrite``: remove the earlier run's files (the adapter's config first, so a half-cleared folder never
    looks like a finished run), leaving anything else the user put there."""
    import shutil

    for name in RUN_FILES:
        path = os.path.join(out, name)
        if os.path.isfile(path):
            os.remove(path)
    for name in RUN_FOLDERS:
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)


def unfinished_run_message(folder: str) -> str | None:
    """For an adapter folder that is a fine-tuning run without its final adapter: what to do instead."""
    ckpt = checkpoint_path(folder)
    if ckpt is None or os.path.isfile(os.path.join(folder, "adapter_config.json")):
        return None
    try:
        saved = read_adapter_config(ckpt)
        where = f" (stopped at step {saved.get('trained_steps', '?')} of {saved.get('train_steps', '?')})"
    except Exception:  # noqa: BLE001 - only for the message
        where = ""
    best = os.path.join(folder, BEST_DIR)
    alternative = f", or use the best adapter so far: --adapter {best}" if os.path.isdir(best) else ""
    return (f"{folder}: this fine-tuning run has not finished{where}; continue it with `tensorpeft finetune ... "
            f"--out {folder} --resume`{alternative}")


def finetune_steps(task_kind: str, num_train: int, num_classes: int | None, events: Events) -> int:
    """``finetune``'s steps without ``--steps`` (:func:`default_steps` for the cases and the classes besides
    background); says so when the structures' count, not the cases', set it."""
    structures = (num_classes or 2) - 1
    steps = default_steps(task_kind, num_train, structures)
    if steps > default_steps(task_kind, num_train):
        events.message(f"{steps} steps: finetune's default for {structures} structures (structures new to the model are "
                       "learned one after another; --steps to choose)")
    return steps


def _probe_new_head(model: nn.Module, task: Any, seed: int, ctx: Any, events: Events) -> Any:
    """The wider output layer fitted to the base model's features (:mod:`.head_probe`); says what the fit found."""
    from .head_probe import probe_output_layer

    started = time.perf_counter()
    probed = probe_output_layer(model, task, seed=seed, ctx=ctx)
    if probed is not None:
        events.message(f"the new output layer starts from a linear probe of the base model's features "
                       f"({time.perf_counter() - started:.0f} s): {probed.describe(['background'] + task.class_names)}")
    return probed


def _finetune(model: nn.Module, model_source: str, task_kind: str, num_classes: int | None,
              train_cases: list[dict], val_cases: list[dict], out: str, cfg: AdapterConfig | None,
              settings: TrainSettings, *, ctx: Any, **options: Any) -> TrainResult:
    """Build the trainer (every rank agreeing that it could) and run it."""
    with ctx.agreement():
        trainer, ckpt = _build_trainer(model, model_source, task_kind, num_classes, train_cases, val_cases, out, cfg,
                                       settings, ctx=ctx, **options)
    return trainer.run(resume_from=ckpt)


def _build_trainer(model: nn.Module, model_source: str, task_kind: str, num_classes: int | None,
                   train_cases: list[dict], val_cases: list[dict], out: str, cfg: AdapterConfig | None,
                   settings: TrainSettings, *, device: str, amp: str, events: Events, resume: bool,
                   batch_size: int | None, patch_size: Sequence[int] | None, spacing: Sequence[float] | None,
                   affine: bool, elastic: bool, flip: str, threads: int | None, loss: str, label_resampling: str,
                   centre_jitter: int, checkpointing: bool | None, ctx: Any, align: str = "auto",
                   skull_strip: str | None = None, plan: LabelPlan | None = None,
                   swaps: Sequence[tuple[int, int]] = (), head_init: str | None = None,
                   patch_centres: str = "voxels") -> tuple[Trainer, str | None]:
    from ..data import case_name

    ckpt = checkpoint_path(out) if resume else None
    probe_accuracy = None

    if resume:
        saved = read_adapter_config(ckpt)
        if plan is not None and task_kind == "segmentation":
            started = adapter_label_map(saved, int(saved.get("num_classes") or num_classes or 2))
            if started.values != plan.label_map.values:  # names may be added on resume; values may not change
                raise EngineError(f"this run started with {started.describe()}, but the labels now give "
                                  f"{plan.label_map.describe()}; resume with the labels it started with "
                                  "(or start a new run)")
        load_adapter(model, ckpt)
        if cfg is not None and cfg.to_dict() != saved["config"]:
            events.message("note: --resume continues with the checkpoint's adapter settings; other adapter flags are ignored")
        cfg = AdapterConfig.from_dict(saved["config"])
        # a resumed run keeps its own length and schedule unless told otherwise (the defaults depend on the split)
        settings = dataclasses.replace(
            settings, steps=settings.steps or saved.get("train_steps"), lr=settings.lr or saved.get("train_lr"),
            eval_every=settings.eval_every or saved.get("train_eval_every"),
            checkpoint_every=settings.checkpoint_every or saved.get("train_checkpoint_every"))
        # runs from before these were recorded used MONAI's DiceCELoss as it comes and nearest-neighbour labels
        loss = saved.get("loss", "dice-ce-all")
        label_resampling = saved.get("label_resampling", "nearest")
        centre_jitter = int(saved.get("centre_jitter", 0))
        patch_centres = saved.get("patch_centres", "voxels")
        head_init = saved.get("head_init")  # recorded again; the checkpoint holds the layer
        probe_accuracy = saved.get("head_probe_accuracy")
        if task_kind == "segmentation" and saved.get("flip"):  # the flips (and label swaps) it started with
            flip = saved["flip"]
            swaps = [(int(a), int(b)) for a, b in saved.get("mirror_pairs") or []]
        # a synthesis run trains on the volumes as it started: registered to the reference brain or not
        align = "auto" if saved.get("aligned_to") else "off"
        # and its cases as they were stripped (runs from before brain extraction: auto, which left their brains alone)
        skull_strip = (saved.get("preprocessing") or {}).get("skull_strip") or saved.get("skull_strip") or "auto"
        recorded = bool(saved.get("checkpointing", False))
        if checkpointing is None:
            checkpointing = recorded
        elif checkpointing != recorded:  # allowed: it changes memory and time, not the gradients
            events.message(f"note: this run started with{'' if recorded else 'out'} activation checkpointing; it "
                           f"continues with{'' if checkpointing else 'out'} (same gradients, other memory and time)")
        if threads is None and saved.get("train_threads"):
            threads = int(saved["train_threads"])  # the same thread count as before, so the run ends as an uninterrupted one
            events.message(f"resuming with the run's {threads} CPU thread(s)")
        if batch_size is None and saved.get("train_batch_size"):
            batch_size = int(saved["train_batch_size"])  # patches per rank, as before
        before = (int(saved.get("train_ranks", 1)), int(saved.get("train_batch_size") or 0))
        if before[1] and before != (ctx.world_size, batch_size):
            events.warn(f"this run trained with {before[0]} rank(s) x {before[1]} patches and resumes with "
                        f"{ctx.world_size} x {batch_size}: a global batch of {before[0] * before[1]} becomes "
                        f"{ctx.world_size * batch_size}, so it will not end with an uninterrupted run's weights")
    else:
        if cfg is None:
            raise EngineError("choose an adapter: --method NAME --rank R")
        inject(model, cfg)
    report = summary(model)
    lr_given = settings.lr is not None
    settings = dataclasses.replace(
        settings, steps=settings.steps or finetune_steps(task_kind, len(train_cases), num_classes, events),
        lr=settings.lr or default_lr(model_family(model), cfg.method))
    if not lr_given:
        events.message(f"learning rate {settings.lr:g}: {cfg.method}'s default on a {model_family(model)} model "
                       "(--lr to choose another)")
    if not settings.eval_every:
        # Five validations: each is a sliding window over whole validation scans (4 s for the demo's two on the
        # 2-core CPU), and with the poly-decayed learning rate the best adapter is nearly always one of the last.
        settings = dataclasses.replace(settings, eval_every=max(1, settings.steps // 5))
    if not settings.checkpoint_every:
        settings = dataclasses.replace(settings, checkpoint_every=settings.eval_every)

    if ctx.active and device_is_cuda(device):
        device = f"cuda:{ctx.local_rank}"  # each rank its own GPU (setup() made it the current one)
    runtime = select_runtime(device, amp, threads)
    place_model(model, runtime)
    checkpointing = bool(checkpointing)
    if checkpointing:
        from .checkpointing import enable_checkpointing

        blocks = enable_checkpointing(model)
        events.message(f"activation checkpointing: {len(blocks)} blocks ({blocks[0]} ... {blocks[-1]}) recomputed in "
                       f"backward instead of keeping their activations")
    size = tuple(patch_size) if patch_size else model_input_size(model)
    per_rank = batch_size or (2 if task_kind == "segmentation" else 1)
    shard = (ctx.rank, ctx.world_size)
    # Only rank 0 validates: the others need no validation cases (caching them would cost every rank the
    # preprocessing of whole scans).
    own_val = val_cases if ctx.is_main else []
    prep = None
    if task_kind == "segmentation":
        from .segmentation import SegmentationTask

        prep = working_preprocessing(model, train_cases, spacing, skull_strip)
        events.message(f"working grid: {prep.describe()} (every case is resampled to it)")
        if ctx.is_main:
            check_training_geometry(model, train_cases + val_cases, prep, size, events)
        task: Any = SegmentationTask(train_cases, own_val, patch_size=size, num_classes=num_classes, runtime=runtime,
                                     batch_size=per_rank, preprocessing=prep, affine=affine, elastic=elastic,
                                     flip_axes=FLIP_AXES[flip], loss=loss, label_resampling=label_resampling,
                                     centre_jitter=centre_jitter, shard=shard, patch_centres=patch_centres,
                                     label_map=None if plan is None or plan.plain else plan.label_map,
                                     flip_swap=mirror_permutation(swaps, num_classes) if swaps else None,
                                     class_names=None if plan is None else [
                                         plan.class_name(k) for k in range(1, plan.label_map.num_classes)])
        if head_init == "probe" and not resume:
            probed = _probe_new_head(model, task, settings.seed, ctx, events)
            probe_accuracy = None if probed is None else [None if a != a else round(a, 3) for a in probed.accuracy]
    else:
        from .synthesis import SynthesisTask

        from ..models.latent import latent_parts

        latent = latent_parts(model)
        alignment = synthesis_alignment(model, train_cases + val_cases, size, align, skull_strip or "auto")
        pixdim = None if alignment is not None else synthesis_training_spacing(model, train_cases)
        if alignment is not None:
            events.message(f"training volumes registered (affine) to the model's reference brain: "
                           f"{alignment.describe()}")
            align_synthesis_cases(train_cases + own_val, alignment, events)
        elif pixdim is not None:
            events.message(f"training volumes resampled to the model's {'x'.join(f'{p:g}' for p in pixdim)} mm grid "
                           f"(RAS), then centred in {'x'.join(map(str, size))} voxels")
        task = SynthesisTask(train_cases, own_val, size=size, runtime=runtime, batch_size=per_rank, shard=shard,
                             latent=latent, schedule=latent.schedule if latent else None, pixdim=pixdim,
                             align=alignment)
        if latent is not None:
            events.message(f"latent diffusion: {latent.latent_channels}-channel latents at 1/{latent.downsample} of "
                           f"{'x'.join(map(str, size))}, scale factor {latent.scale_factor:.4g}; the autoencoder stays "
                           "frozen")

    hooks = growth_hooks(model, cfg)
    meta = {
        "task": task_kind, "method": cfg.method, "rank": cfg.rank, "base_model_source": model_source_of(model_source),
        "base_spec": getattr(model, "tensorpeft_spec", None), "patch_size": list(size),
        "preprocessing": prep.to_dict() if prep else None, "num_classes": num_classes,
        "trainable": report["trainable"], "adapter_parameters": report["adapter"], "total_parameters": report["total"],
        "train_cases": len(train_cases), "val_cases": len(val_cases),
        "train_names": [c.get("name", case_name(c["image"])) for c in train_cases],
        "val_names": [c.get("name", case_name(c["image"])) for c in val_cases],
        "train_steps": settings.steps, "train_lr": settings.lr, "train_eval_every": settings.eval_every,
        "train_checkpoint_every": settings.checkpoint_every,
        "train_threads": runtime.threads if runtime.device.type == "cpu" else None,
        "checkpointing": checkpointing,
        # patches per rank and ranks: --resume takes the same per-rank batch, and says so if the ranks changed
        "train_batch_size": per_rank, "train_ranks": ctx.world_size,
    }
    if task_kind == "segmentation":
        # segment --mirror auto mirrors along the same axes; --resume trains on with the same loss and labels
        meta.update(flip=flip, affine=affine, elastic=elastic, loss=loss, label_resampling=label_resampling,
                    centre_jitter=centre_jitter, patch_centres=patch_centres)
        if head_init is not None:  # how a wider output layer started (runs from before this: copy)
            meta["head_init"] = head_init
        if probe_accuracy is not None:  # the probe's accuracy per class on the base features (background first)
            meta["head_probe_accuracy"] = probe_accuracy
        if swaps:  # the classes a left-right flip exchanged; segment's mirroring exchanges them too
            meta["mirror_pairs"] = [list(pair) for pair in swaps]
        if plan is not None:  # segment writes masks in the user's values; --resume checks the labels still agree
            meta.update(label_map=plan.label_map.to_dict(), label_values_found=plan.found)
    if task_kind == "synthesis":
        meta["schedule"] = task.schedule
        if alignment is not None:  # the samples lie where the reference brain does
            meta.update(spacing=list(alignment.spacing), centre=list(alignment.centre), aligned_to=alignment.reference,
                        skull_strip=alignment.skull_strip)
        else:
            meta["spacing"] = list(pixdim) if pixdim is not None else list(_first_spacing(train_cases, size))
            meta["centre"] = list(_first_centre(train_cases))
        if task.latent is not None:  # synthesize rebuilds the same latent model: autoencoder file and scale factor
            meta["latent"] = task.latent.record()
    trainer = Trainer(model, task, settings, out, runtime, events, hooks=hooks, extra_meta=meta, dist=ctx)
    events.message(f"{report['method']} rank {cfg.rank}: {report['trainable']:,} trainable of {report['base_total']:,} "
                   f"({report['trainable_percent']:.2f}%), {report['layers_wrapped']} layers adapted; "
                   f"device {runtime.name}")
    if ctx.active:
        # The learning rate is the one given (or the default), not scaled with the global batch: what scaling suits
        # adapters is not settled (docs/scale.md), and a resumed run must keep its schedule.
        events.message(f"data parallel: {ctx.world_size} ranks ({ctx.backend}) x {per_rank} patch(es) = global batch "
                       f"{ctx.world_size * per_rank} per step (x{settings.accumulate} accumulated); learning rate "
                       f"{settings.lr:g}, not scaled with the batch (see docs/scale.md)")
    # Hooks keep their own state between steps; build the optimiser after the adapter is in place (done above).
    for hook in hooks:
        bind = getattr(hook, "bind", None)
        if bind:
            bind(trainer.optimizer)
    return trainer, ckpt if resume else None


def device_is_cuda(device: str) -> bool:
    """Whether ``--device`` means a CUDA GPU here (``auto`` with one visible)."""
    from .distributed import wants_cuda

    return wants_cuda(device)


def growth_hooks(model: nn.Module, cfg: AdapterConfig) -> list[Any]:
    """Trainer hooks a method needs (SeLoRA grows ranks during training): each method's spec says which."""
    return get_method(cfg.method).training_hooks(model, cfg)


def _first_centre(cases: list[dict]) -> tuple[float, float, float]:
    """World (RAS mm) centre of the first training volume: generated volumes are placed where the data lies."""
    from ..data import read_volume

    vol = read_volume(cases[0]["image"], header_only=True)
    affine = np.asarray(vol.affine, dtype=float)
    centre = affine[:3, :3] @ ((np.asarray(vol.shape[:3], dtype=float) - 1) / 2) + affine[:3, 3]
    return tuple(float(round(c, 3)) for c in centre)  # type: ignore[return-value]


def synthesis_grid(model: nn.Module, saved: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Voxel size and world centre (RAS mm) of generated volumes: what the adapter's training data had, else what
    the base model records (its ``synthesis_grid``, else its working spacing), else 1 mm around the origin."""
    spec = getattr(model, "tensorpeft_spec", None) or {}
    grid = spec.get("synthesis_grid") or {}
    prep = spec.get("preprocessing") or {}
    spacing = saved.get("spacing") or grid.get("spacing") or prep.get("spacing") or (1.0, 1.0, 1.0)
    centre = saved.get("centre") or grid.get("centre") or (0.0, 0.0, 0.0)
    return tuple(float(s) for s in spacing), tuple(float(c) for c in centre)


def synthesis_training_spacing(model: nn.Module, cases: list[dict], tolerance: float = 0.02
                               ) -> tuple[float, float, float] | None:
    """The voxel size a synthesis fine-tune resamples its volumes to: the base model's recorded synthesis grid
    (``demo-ldm``: 2.5 mm) when the first training volume's voxels differ from it by more than ``tolerance``
    (relative), else None. Without it a user's 1 mm whole-brain scans were centre-cropped to 64x80x64 *voxels*, a
    64 mm block of the brain's middle, and 100 LoRA steps on such crops turned demo-ldm's samples into texture.
    Volumes already on the grid (the demo's, the pre-training set's) go through unresampled, as pre-training fed
    them: resampling onto the world-fixed lattice would shift them by half a voxel."""
    from ..data import read_volume

    grid = ((getattr(model, "tensorpeft_spec", None) or {}).get("synthesis_grid") or {}).get("spacing")
    if not grid or not cases:
        return None
    target = np.asarray(grid, dtype=float)
    spacing = np.asarray(read_volume(cases[0]["image"], header_only=True).spacing[:3], dtype=float)
    if np.all(np.abs(spacing - target) <= tolerance * target):
        return None
    return tuple(float(g) for g in target)  # type: ignore[return-value]


def synthesis_alignment(model: nn.Module, cases: list[dict], size: Sequence[int], align: str = "auto",
                        skull_strip: str = "auto") -> Any:
    """The :class:`~TensorPEFTLib.data.align.AlignTarget` a synthesis fine-tune registers its volumes to, or None.

    ``align="auto"``: when the base model names the reference brain it was pre-trained in (its ``synthesis_grid``'s
    ``reference``; ``demo-ldm``: MNI152) and some volume is not already on the model's grid. A generative model
    learns where anatomy lies: demo-ldm's pre-training brains were posed within 3° and 3 mm of MNI152, a user's scans
    come tilted and shifted in scanner space, and fine-tuning on them unaligned taught the model a blur of poses.
    ``"off"``: never (the volumes are resampled and centred as they are, see :func:`synthesis_training_spacing`).
    ``skull_strip``: whole-head volumes are skull-stripped before they are registered (``auto``: those larger than a
    brain; ``on``; ``off``)."""
    from ..data import read_volume
    from ..data.align import REFERENCES, AlignTarget

    if align not in ("auto", "off"):
        raise EngineError(f"--align {align!r}: choose auto or off")
    grid = (getattr(model, "tensorpeft_spec", None) or {}).get("synthesis_grid") or {}
    if align == "off" or grid.get("reference") not in REFERENCES or not cases:
        return None
    spacing = tuple(float(s) for s in np.broadcast_to(np.asarray(grid.get("spacing", 1.0), dtype=float), (3,)))
    target = AlignTarget(str(grid["reference"]), tuple(int(s) for s in size), spacing,  # type: ignore[arg-type]
                         tuple(float(c) for c in grid.get("centre", (0.0, 0.0, 0.0))),  # type: ignore[arg-type]
                         skull_strip=skull_strip)
    for case in cases:
        header = read_volume(case["image"], header_only=True)
        if not target.holds(header.affine, header.shape):
            return target
    return None


def align_synthesis_cases(cases: list[dict], target: Any, events: Events) -> None:
    """Register every volume to ``target`` before training (the data loader reuses the result), reporting each; a
    volume that does not align (correlation below :data:`~TensorPEFTLib.data.align.MIN_CORRELATION`) stops the run
    with its name and what to do."""
    from ..data.align import MIN_CORRELATION, aligned_volume
    from ..data.skullstrip import SkullStripError

    poor, correlations = [], []
    events.start_bar(len(cases), f"registering {len(cases)} volume(s) to {target.reference.upper()}", unit="volume")
    for case in cases:
        try:
            _, fit = aligned_volume(str(case["image"]), target)
        except SkullStripError as err:
            events.close_bar()
            raise EngineError(f"{err}; or --align off to train on the volumes as they are") from None
        correlations.append(fit.correlation)
        events.update_bar(1, correlation=fit.correlation)
        if fit.correlation < MIN_CORRELATION:
            poor.append((str(case["image"]), fit.correlation))
    events.close_bar()
    events.message(f"registered {len(cases)} volume(s): correlation with the reference {min(correlations):.3f} "
                   f"(lowest) to {max(correlations):.3f}")
    if poor:
        path, value = poor[0]
        more = f" (and {len(poor) - 1} more)" if len(poor) > 1 else ""
        raise EngineError(
            f"{path}{more}: does not align to the model's reference brain (correlation {value:.2f} after affine "
            f"registration; skull-stripped T1 brains reach 0.96-0.98): the model makes skull-stripped T1 brains, so "
            f"give T1 scans (whole heads are skull-stripped with --skull-strip auto or on; or strip them first with "
            f"SynthStrip or HD-BET), or --align off to train on the volumes as they are")


def _first_spacing(cases: list[dict], size: Sequence[int]) -> tuple[float, float, float]:
    """Voxel size for generated volumes: the training volumes' field of view spread over ``size``."""
    from ..data import read_volume

    vol = read_volume(cases[0]["image"], header_only=True)
    fov = np.asarray(vol.shape[:3], dtype=float) * np.asarray(vol.spacing)
    return tuple(float(round(f / s, 3)) for f, s in zip(fov, size))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------- inference


def check_adapter_folder(adapter: str) -> None:
    """A clear answer for a run folder that has no finished adapter yet (cancelled or still training)."""
    unfinished = unfinished_run_message(adapter)
    if unfinished:
        raise EngineError(unfinished)


def load_adapted_model(model_source: str | None, adapter: str | None, runtime: Runtime,
                       autoencoder: str | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Base model (from ``model_source`` or the adapter's record of it) with the adapter loaded, merged and unloaded:
    the base architecture with the adapted weights, so inference costs exactly what the base model costs. A latent
    model gets the autoencoder and scale factor it was fine-tuned with (``autoencoder`` overrides the file)."""
    from ..models.latent import latent_parts

    if adapter:
        check_adapter_folder(adapter)
    saved: dict[str, Any] = read_adapter_config(adapter) if adapter else {}
    source = model_source or saved.get("base_model_source")
    if not source:
        raise EngineError("give --model (a checkpoint file or preset); the adapter does not record its base model")
    recorded = saved.get("latent") or {}
    if autoencoder is None and model_source is None and os.path.isfile(recorded.get("autoencoder") or ""):
        autoencoder = recorded["autoencoder"]  # the autoencoder file the run was fine-tuned with
    model = resolve_model(source, autoencoder)
    parts = latent_parts(model)
    if parts is not None and recorded.get("scale_factor"):
        parts.scale_factor = float(recorded["scale_factor"])
    if adapter:
        prepare_adapter_model(model, saved)  # the output layer it was trained with
        load_adapter(model, adapter)
        merge_and_unload(model)
    place_model(model, runtime).eval()
    return model, saved


def _image_list(image: str) -> list[str]:
    """The scans ``image`` names: a file; a folder holding one DICOM series (one scan); or a folder of volume files
    and DICOM series folders (each a scan)."""
    from ..data import is_volume_file
    from ..data.dicom import is_dicom_series

    p = Path(image)
    if p.is_dir():
        files = sorted(str(f) for f in p.iterdir() if f.is_file() and is_volume_file(f) and not f.name.startswith("."))
        if not files and is_dicom_series(p):
            return [str(p)]
        files += sorted(str(f) for f in p.iterdir() if f.is_dir() and not f.name.startswith(".") and is_dicom_series(f))
        if not files:
            raise EngineError(f"{image}: no .nii, .nii.gz, .nrrd or .mgz images, and no DICOM series, in this folder")
        return sorted(files)
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
            min_component_mm3: float | None = None, mirror: str = "auto", events: Events | None = None,
            threads: int | None = None, skip_existing: bool = False,
            skull_strip: str | None = None) -> list[dict[str, Any]]:
    """Segment an image or every image of a folder; masks are written on each image's own grid.

    ``out``: a file path for a single image (``.nii.gz``, ``.nrrd`` or ``.seg.nrrd``), else a folder where each mask
    keeps its image's case name (``<case>.nii.gz``). ``min_component_mm3``: pieces of a structure smaller than this
    are removed (None: a quarter of the structure's largest piece, at most 1000 mm³:
    :func:`~.segmentation.remove_small_components`). ``mirror``: test-time mirroring along ``lr``, ``all`` or
    ``none`` of the axes; ``auto`` takes the flips the adapter was trained with (none without an adapter).
    ``skip_existing``: leave images whose mask is already there (every mask is written whole or not at all, so one
    that exists is finished): a killed job run again continues where it stopped. ``skull_strip``: brain extraction
    of whole-head scans (``auto``/``on``/``off``; ``None``: what the adapter or model records, else ``auto``).

    Under ``torchrun`` each rank segments every N-th image of the sorted list (:meth:`~.distributed.Distributed.shard`:
    no rank needs to ask another which files are its own, and each mask has exactly one writer); ranks without an
    image load no model. Rank 0 gathers the records at the end, reports for the job and returns all of them.
    """
    from ..data import case_name
    from .distributed import SEGMENT_TIMEOUT, PeerError, setup
    from .segmentation import segment_images

    # gloo whatever the device: the ranks exchange only a few Python objects at the start and the end
    ctx = setup(device, backend="gloo", collective_timeout=SEGMENT_TIMEOUT)
    events = events or Events()
    if not ctx.is_main:
        events = Events.silent_sink()
    with ctx.agreement():
        if mirror not in MIRROR_CHOICES:
            raise EngineError(f"--mirror {mirror!r}: choose one of {', '.join(MIRROR_CHOICES)}")
        if not 0.0 <= overlap < 1.0:
            raise EngineError(f"--overlap {overlap:g}: must be at least 0 and below 1 (e.g. 0.5)")
        if sw_batch_size < 1:
            raise EngineError(f"--sw-batch-size must be >= 1, got {sw_batch_size}")
        if min_component_mm3 is not None and min_component_mm3 < 0:
            raise EngineError(f"--min-component must be >= 0 mm³, got {min_component_mm3:g}")
        images = _image_list(image)
        # one scan (a file, or a DICOM series folder) may go to a mask file
        single_file = len(images) == 1 and images[0] == str(Path(image)) and _has_extension(out)
        if single_file:
            check_output_file(out, MASK_EXTENSIONS)
            outputs = [out]
        else:
            check_output_folder(out)
            outputs = [os.path.join(out, case_name(p) + ".nii.gz") for p in images]
        if adapter:
            check_adapter_folder(adapter)
        mine = ctx.shard(list(range(len(images))))
        done = [i for i in mine if skip_existing and os.path.isfile(outputs[i])]
        todo = [i for i in mine if i not in done]
        if ctx.active:
            events.message(f"{len(images)} image(s) shared by {ctx.world_size} ranks (rank r takes images r, "
                           f"r + {ctx.world_size}, ...)" + (f"; ranks {len(images)}-{ctx.world_size - 1} have none"
                                                            if len(images) < ctx.world_size else ""))
        if done:
            events.message(f"--skip-existing: {len(done)} of {len(mine)} mask(s) already written, left as they are")
        model, label_map, mirror_classes = None, None, None
        if todo:
            if ctx.active and device_is_cuda(device):
                device = f"cuda:{ctx.local_rank}"
            runtime = select_runtime(device, amp, threads)
            model, saved = load_adapted_model(model_source, adapter, runtime)
            if task_of(model) != "segmentation":
                raise EngineError("segment needs a UNETR; this model is a DDPM (use synthesize)")
            patch = tuple(saved.get("patch_size") or model_input_size(model))
            prep = inference_preprocessing(model, saved)
            if skull_strip is not None:
                prep = dataclasses.replace(prep, skull_strip=skull_strip)
            if mirror == "auto":
                mirror = saved.get("flip") or "none"
            label_map = adapter_label_map(saved, num_classes_of(model))
            pairs = (saved.get("mirror_pairs") or []) if FLIP_AXES[mirror][:1] == (0,) else []
            mirror_classes = mirror_permutation(pairs, num_classes_of(model)) if pairs else None
            swapped = ", ".join(" <-> ".join(str(label_map.output_values()[k]) for k in pair) for pair in pairs)
            events.message(f"working grid: {prep.describe()}; mirroring: {mirror}"
                           + (f" (the mirrored pass swaps {swapped})" if swapped else ""))
    # With one bad file among many the others are still segmented and the bad ones named at the end (segment_images
    # checks every header before the first scan, each scan's voxels just before its turn); one file fails at once.
    failures: list[tuple[str, Exception]] = []
    records: list[dict[str, Any]] = []
    with ctx.agreement():  # one file that fails, or a full disk, stops every rank with one line
        if model is not None:
            events.emit("start", kind="segment", images=len(todo), out=out, mirror=mirror,
                        preprocessing=prep.to_dict(), **runtime.describe(), **_ranks_fields(ctx, len(images)))
            records = segment_images(model, [images[i] for i in todo], [outputs[i] for i in todo], runtime, events,
                                     patch_size=patch, preprocessing=prep, sw_batch_size=sw_batch_size,
                                     overlap=overlap, min_component_mm3=min_component_mm3,
                                     mirror_axes=FLIP_AXES[mirror], failures=None if single_file else failures,
                                     label_map=label_map, mirror_classes=mirror_classes)
            for record in records:
                record["mirror"] = mirror
        elif not ctx.active or ctx.is_main:
            events.emit("start", kind="segment", images=0, out=out, mirror=mirror, **_ranks_fields(ctx, len(images)))
    if ctx.active:
        # Rank 0 speaks for the job: every rank's masks and failures, in the order of the images.
        shares = ctx.gather((records, [(p, str(e)) for p, e in failures]))
        order = {path: n for n, path in enumerate(images)}
        records = sorted((r for share, _ in shares for r in share), key=lambda r: order.get(r["image"], 0))
        failures = sorted(((p, EngineError(e)) for _, share in shares for p, e in share),  # type: ignore[misc]
                          key=lambda f: order.get(f[0], 0))
    events.emit("done", status="completed" if not failures else "failed", out=out, masks=[r["mask"] for r in records],
                failed=[p for p, _ in failures], skull_stripped=sum(bool(r.get("skull_stripped")) for r in records),
                structures=label_map.segment_names() if label_map is not None else {})
    if failures:
        names = "; ".join(str(err) for _, err in failures[:3]) + (f"; and {len(failures) - 3} more" if len(failures) > 3 else "")
        message = (f"{len(failures)} of {len(images)} images could not be segmented ({len(records)} masks "
                   f"written to {out}): {names}")
        raise EngineError(message) if ctx.is_main else PeerError(message)
    return records


def _ranks_fields(ctx: Any, images: int) -> dict[str, Any]:
    """What a sharded segment's start event adds: the ranks and the whole job's image count."""
    return {"ranks": ctx.world_size, "job_images": images} if ctx.active else {}


def _has_extension(path: str) -> bool:
    """``mask.nii.gz`` or ``mask.png`` name a file (the second refused for its type); ``masks`` a folder."""
    return Path(path).suffix != "" and not os.path.isdir(path)


def synthesize(out: str, count: int, *, model_source: str | None = None, adapter: str | None = None,
               steps: int = 50, sampler: str = "ddim", size: Sequence[int] | None = None, seed: int = 0,
               device: str = "auto", amp: str = "auto", events: Events | None = None,
               threads: int | None = None, autoencoder: str | None = None) -> list[str]:
    """Generate ``count`` volumes into the folder ``out`` (NIfTI, RAS affine with the training data's voxel size),
    plus ``samples.png`` with three views of each. A latent diffusion bundle samples latents and decodes them with
    its autoencoder (``autoencoder``: another weights file for it)."""
    from ..data import write_volume
    from ..models.latent import latent_parts
    from .report import slice_grid
    from .synthesis import default_affine, sample_volumes

    if count < 1:
        raise EngineError(f"--count must be >= 1, got {count}")
    if steps < 1:
        raise EngineError(f"--steps must be >= 1, got {steps} (a volume needs at least one denoising step)")
    if sampler not in ("ddim", "ddpm"):
        raise EngineError(f"--sampler {sampler!r}: choose ddim or ddpm")
    check_output_folder(out)
    events = events or Events()
    runtime = select_runtime(device, amp, threads)
    model, saved = load_adapted_model(model_source, adapter, runtime, autoencoder)
    if task_of(model) != "synthesis":
        raise EngineError("synthesize needs a DDPM; this model is a UNETR (use segment)")
    shape = check_input_size(model, size, "--size") if size else tuple(saved.get("patch_size") or model_input_size(model))
    spacing, centre = synthesis_grid(model, saved)
    os.makedirs(out, exist_ok=True)
    events.emit("start", kind="synthesize", count=count, steps=steps, sampler=sampler, out=out, **runtime.describe())
    latent = latent_parts(model)
    # the schedule the model was trained with: the adapter's record, else a latent bundle's own scheduler settings
    schedule = saved.get("schedule") or (latent.schedule if latent is not None else None)
    chain = steps if sampler == "ddim" else int((schedule or {}).get("num_train_timesteps", 1000))
    events.start_bar(count * chain, f"synthesizing {count} volume(s)")
    volumes = sample_volumes(model, count, shape, runtime, steps=steps, sampler=sampler, seed=seed,
                             schedule=schedule, events=events)
    events.close_bar()
    paths = []
    for index, volume in enumerate(volumes, start=1):
        path = os.path.join(out, f"synth_{index:03d}.nii.gz")
        write_volume(path, volume.astype(np.float32), like=default_affine(shape, spacing, centre))
        paths.append(path)
    grid = slice_grid(os.path.join(out, "samples.png"), volumes[:6], [os.path.basename(p) for p in paths[:6]])
    write_synthesis_record(out, model, saved, adapter, shape, spacing, centre)
    events.emit("done", status="completed", out=out, volumes=paths, png=grid)
    return paths


#: written next to generated volumes: which model made them, on which grid, in which reference brain's space
SYNTHESIS_RECORD = "synthesis.json"


def write_synthesis_record(out: str, model: nn.Module, saved: dict[str, Any], adapter: str | None,
                           shape: Sequence[int], spacing: Sequence[float], centre: Sequence[float]) -> None:
    """``out/synthesis.json``: the grid of the generated volumes and the reference brain whose space they are in -
    the adapter's (``aligned_to``: its training volumes were registered to it), or for the base model alone the
    reference its pre-training brains were in; none for an adapter trained on unregistered volumes. ``evaluate``
    registers real scans to that reference before comparing."""
    from ..data.demo import write_json

    base = ((getattr(model, "tensorpeft_spec", None) or {}).get("synthesis_grid") or {}).get("reference")
    reference = saved.get("aligned_to") if adapter else base
    write_json(os.path.join(out, SYNTHESIS_RECORD), {
        "model": saved.get("base_model_source") if adapter else None, "adapter": os.path.abspath(adapter) if adapter else None,
        "shape": [int(s) for s in shape], "spacing": [float(s) for s in spacing], "centre": [float(c) for c in centre],
        "reference": reference})


def synthesis_reference(pred: str) -> str | None:
    """The reference brain generated volumes at ``pred`` (a file or folder written by ``synthesize``) are in, from
    their ``synthesis.json``; None without one."""
    import json

    folder = pred if os.path.isdir(pred) else os.path.dirname(os.path.abspath(pred))
    try:
        with open(os.path.join(folder, SYNTHESIS_RECORD), encoding="utf-8") as f:
            return json.load(f).get("reference")
    except (OSError, ValueError, AttributeError):
        return None


def real_like_generated(path: str, shape: Sequence[int], affine: np.ndarray, reference: str | None,
                        align: str = "auto") -> np.ndarray:
    """A real scan as the generated volumes are: on their grid (``shape``, voxel → world ``affine``) and in [0, 1]
    (0-99.5 percentile, as synthesis training scales volumes). A scan already on that grid is taken as it is; else,
    with a ``reference`` and ``align="auto"``, it is registered to that reference brain (as fine-tuning registered
    its volumes); else it is resampled onto the grid in world space. (Before, every scan was centre-cropped in
    voxels: a user's 1 mm scan gave a 64 mm block of its middle to compare with whole 2.5 mm brains.)"""
    from ..data import read_volume
    from ..data.align import AlignTarget, aligned_volume, resample_through

    target = AlignTarget.of_grid(reference or "", shape, affine)
    header = read_volume(path, header_only=True)
    if reference and align == "auto" and not target.holds(header.affine, header.shape):
        on_grid, _ = aligned_volume(path, target)  # reads the scan itself, once per process
        return unit_range_like(on_grid, shape)
    volume = read_volume(path)
    array = np.asarray(volume.squeezed, dtype=np.float32)
    if not target.holds(volume.affine, array.shape):
        array = resample_through(array, volume.affine, np.eye(4), shape, affine)
    return unit_range_like(array, shape)



def evaluate(pred: str, ref: str, *, kind: str = "auto", window: int = 7, figure: str | None = None,
             features: bool = True, align: str = "auto") -> dict[str, Any]:
    """Score predictions against references (``segmentation``: Dice/HD95 per case) or generated volumes against
    real ones (``synthesis``: the TenVOO paper's MS-SSIM with real volume i paired to generated volume i, FD and MMD
    on the shipped demo-unetr's features, MMD on voxels; see :func:`.scoring.evaluate_synthesis`). ``auto``: label
    maps → segmentation, else synthesis. ``window``: the MS-SSIM window; ``figure``: where synthesis writes its PNG
    (default ``evaluation.png`` in the generated volumes' folder). Real volumes are brought onto the generated
    volumes' grid (:func:`real_like_generated`; ``align="off"``: never registered, only resampled)."""
    from ..data import read_volume
    from .scoring import evaluate_segmentations, evaluate_synthesis

    preds, refs = _image_list(pred), _image_list(ref)
    pair = Path(pred).is_file() and Path(ref).is_file()  # two files: score them against each other, whatever the names
    if kind == "auto":
        sample = np.asarray(read_volume(preds[0]).array)
        kind = "segmentation" if np.issubdtype(sample.dtype, np.integer) or np.array_equal(sample, np.round(sample)) else "synthesis"
    if kind == "segmentation":
        rows, unmatched = evaluate_segmentations(preds, refs, pair=pair)
        mean: dict[str, Any] = {k: float(np.nanmean([r[k] for r in rows])) for k in ("dice", "hd95")}
        values = sorted({v for r in rows for v in r.get("structures") or {}})
        if values:  # several structures: each one's mean over the cases that have it in either map
            import warnings

            with warnings.catch_warnings():  # a structure without any HD95 (empty everywhere) is NaN, not a warning
                warnings.simplefilter("ignore", RuntimeWarning)
                mean["structures"] = {v: {k: float(np.nanmean([r["structures"][v][k] for r in rows
                                                               if v in r.get("structures") or {}]))
                                          for k in ("dice", "hd95")} for v in values}
        return {"kind": kind, "cases": rows, "mean": mean, "unmatched_references": unmatched}
    if kind != "synthesis":
        raise EngineError(f"--kind {kind!r}: choose auto, segmentation or synthesis")
    gen = [np.asarray(read_volume(p).array, dtype=np.float32) for p in preds]
    # generated volumes are in [0, 1] already; a --pred volume outside it (real scans, to see what real data scores)
    # is brought to [0, 1] as the references are
    gen = [g if g.min() >= 0 and g.max() <= 1 else unit_range_like(g, g.shape) for g in gen]
    if align not in ("auto", "off"):
        raise EngineError(f"--align {align!r}: choose auto or off")
    grid = read_volume(preds[0], header_only=True).affine
    reference = synthesis_reference(pred)
    real = [real_like_generated(r, gen[0].shape, grid, reference, align) for r in refs]
    if figure is None:
        figure = os.path.join(pred if Path(pred).is_dir() else os.path.dirname(os.path.abspath(pred)), "evaluation.png")
    check_output_file(figure, (".png",), option="--figure")
    metrics = evaluate_synthesis(gen, real, win_size=window, features=features, figure=figure)
    return {"kind": kind, "mean": metrics, "figure": metrics.pop("figure", None),
            "pairs": [{"real": os.path.basename(r), "generated": os.path.basename(g)}
                      for r, g in zip(refs, preds)][:metrics["pairs"]]}


def unit_range_like(volume: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """A real volume brought to the generated volumes' [0, 1] range and shape (MONAI transforms, as in training)."""
    from monai.transforms import ResizeWithPadOrCrop, ScaleIntensityRangePercentiles

    v = ScaleIntensityRangePercentiles(lower=0.0, upper=99.5, b_min=0.0, b_max=1.0, clip=True)(volume[None])
    return np.asarray(ResizeWithPadOrCrop(tuple(shape))(v))[0]

