"""Pretraining recipes for the built-in demo models, and their export as shipped weights.

``demo-unetr``: the ``unetr-small`` preset trained from a seeded initialisation on the demo cohort's *source* task
(thalamus, caudate, putamen, pallidum; never the hippocampus), so fine-tuning to the hippocampus is a real transfer;
two stages (``demo-unetr-stage1``, then ``demo-unetr`` with the fine-tunes' patch sampling and loss), one command.
``demo-ddpm``: the ``ddpm-small`` preset trained on the cohort's whole-brain synthesis set.

The export is an fp16 safetensors file with the model spec inside plus a model card (JSON) holding the recipe, data,
steps, seed, final metrics and the file's SHA-256; ``models.load_model("demo-unetr")`` checks that hash.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..adapters import AdapterConfig, load_adapter
from ..atomic import copy_atomically
from ..models import build_model
from ..models.shipped import WEIGHTS_DIR, file_sha256
from .events import Events
from .runtime import EngineError
from .trainer import TrainSettings


@dataclass(frozen=True)
class Recipe:
    name: str
    preset: str
    task_folder: str  # inside the demo cohort
    steps: int
    lr: float
    batch_size: int
    seed: int = 0
    eval_every: int = 100
    affine: bool = False  # random affine augmentation of the training patches (segmentation)
    flip: str = "all"     # random flips (segmentation): all / lr / none
    spacing: tuple[float, float, float] | None = None  # working voxel size (segmentation), recorded in the model
    loss: str = "dice-ce"               # segmentation loss (engine.segmentation.SEGMENTATION_LOSSES)
    label_resampling: str = "linear"    # labels onto the working grid (engine.segmentation.LABEL_RESAMPLING)
    centre_jitter: int = 16             # voxels a foreground-centred patch moves off its centre (data.train_transforms)
    start_from: str | None = None       # a recipe whose trained weights this one continues (a second stage), not a
                                        # seeded fresh model; pretrain runs that recipe first in OUT/<its name>
    overrides: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    #: a latent diffusion recipe (engine.latent_pretrain): its autoencoder stage and diffusion settings
    #: (ae_steps, ae_lr, ae_batch, crop, kl_weight, ema_decay, min_snr_gamma); ``steps``/``lr``/``batch_size`` are the
    #: diffusion stage's
    latent: dict[str, Any] | None = None


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in [
        # Affine augmentation and left-right flips only: the source volumes are barely larger than the patch, and
        # without random affines the UNETR learned where the nuclei sit in the patch rather than what they look like
        # (the first shipped model, 1000 steps at 5e-4 without them, capped the hippocampus fine-tune near Dice 0.6).
        # 3000 steps, not 1500: at 1500 the loss was still falling (0.156 over the last 50 steps, 0.097 at 3000), and
        # the longer-trained base lifted the demo fine-tune's best validation Dice from 0.769 to 0.828.
        # Whole-brain subjects (0.9-1.5 mm, any orientation and intensity range) resampled to 1.5 mm: a 64³ patch
        # covers 96 mm, both hippocampi; patches come from anywhere in the brain, so the model learns to say "no"
        # everywhere else too (the crop-trained model it replaces found nothing on a whole-brain scan).
        Recipe("demo-unetr-stage1", "unetr-small", "subcortical", steps=3000, lr=1e-3, batch_size=2, affine=True,
               flip="lr", spacing=(1.5, 1.5, 1.5), loss="dice-ce-all", label_resampling="nearest",
               centre_jitter=0,  # what the first whole-brain demo-unetr (sha256 fbb7da6e...) was trained with
               description="unetr-small trained from scratch on thalamus+caudate+putamen+pallidum (one label) in "
                           "whole-brain T1s resampled to 1.5 mm RAS, foreground intensity scaling, random affine + "
                           "left-right flip augmentation"),
        # The second stage trains the first on the same source task with the recipe a fine-tune uses (foreground
        # patches off-centre by up to 16 voxels, nnU-Net's Dice + CE, labels through their one-hot classes): the first
        # stage always put a structure mid-patch, and a base that learned that passes it on to every fine-tune.
        # 600 steps at 3e-4. Measured 2026-12-02 with the demo's hippocampus fine-tune (LoRA-PT r=1, finetune's
        # defaults, 1 thread) from each base, two seeds, scored on the 4 held-out subjects and 12 whole-brain scans of
        # ICBM 2009a/2009c (RAS 1 mm and oblique 1.2 mm): held-out 0.782 -> 0.787 and 0.774 -> 0.791, whole-brain
        # mean 0.813 -> 0.821 and 0.772 -> 0.795, lowest scan 0.771 -> 0.782 and 0.689 -> 0.732. (A from-scratch
        # retrain with these settings, tried earlier, moved nothing beyond the seed-to-seed spread.)
        Recipe("demo-unetr", "unetr-small", "subcortical", steps=600, lr=3e-4, batch_size=2, affine=True, flip="lr",
               spacing=(1.5, 1.5, 1.5), start_from="demo-unetr-stage1",
               description="demo-unetr-stage1 trained on for 600 steps on the same source task with foreground patches "
                           "off-centre by up to 16 voxels, nnU-Net's Dice + cross-entropy and labels resampled through "
                           "their one-hot classes (what fine-tuning uses)"),
        Recipe("demo-ddpm", "ddpm-small", "synthesis", steps=800, lr=5e-4, batch_size=2, eval_every=100,
               description="ddpm-small trained from scratch on 32³ whole brains (6 mm); needs a cohort built with "
                           "synth_shape=(32, 32, 32), synth_spacing=6 (no longer shipped: replaced by demo-ldm)"),
        # The shipped synthesis model. Latent, not pixel space: see engine/latent_pretrain.py for the measured cost.
        # Sized for detail (2026-12-03, 2 CPU threads: autoencoder 1106 s, diffusion 1937 s): with 3 latent channels and
        # 1200 autoencoder steps the autoencoder blurred every brain past the grey/white boundary and the samples scored
        # 0.63-0.66x the real volumes' high-frequency ratio (the realism check needs >= 0.67x). 8 latent channels and
        # 6000 steps keep the corpus callosum and cerebellar folds (reconstruction L1 0.046 -> 0.033 on training
        # brains); on them 1500 diffusion steps gave 0.66-0.69x with the EMA weights (two of four failing), 4500 gave
        # 0.70-0.72x (all passing). README, "What made the samples sharper". The shipped file is this recipe's output: its
        # diffusion stage ran in one go on the finished autoencoder (a finished stage is not trained again on --resume).
        Recipe("demo-ldm", "ddpm-latent-small", "synthesis", steps=4500, lr=3e-4, batch_size=8, eval_every=100,
               overrides={"latent_channels": 8},
               latent=dict(ae_steps=6000, ae_lr=8e-4, ae_batch=2, crop=32, kl_weight=1e-6, ema_decay=0.999,
                           min_snr_gamma=5.0),
               description="latent diffusion model trained from scratch on 64 whole brains at 2.5 mm (64x80x64): "
                           "AutoencoderKL (4x down, 8 latent channels) on 32³ crops, then a diffusion U-Net on "
                           "16x20x16 latents (v-prediction, min-SNR weighting); EMA weights"),
    ]
}


def pretrain(recipe_name: str, out: str, *, cohort: str | None = None, steps: int | None = None,
             device: str = "auto", threads: int | None = None, events: Events | None = None,
             resume: bool = False, ship: bool = False, ae_steps: int | None = None) -> dict[str, Any]:
    """Run a recipe; writes ``out/run`` (the training run) and ``out/<recipe>.safetensors`` + ``.json`` (card).

    ``steps``: the recipe's (diffusion) steps instead; ``ae_steps``: a latent recipe's autoencoder steps instead.
    ``ship``: also copy both into the package's ``models/weights/`` (what ``tensorpeft demo`` loads) — for
    maintainers refreshing the shipped models.

    Under ``torchrun`` the training is data-parallel (``finetune``'s rules, the recipe's batch per rank); rank 0 alone
    builds the cohort, writes the initial weights and exports the result; the other ranks return an empty card.
    """
    from ..data import build_demo_cohort
    from ..data.preprocess import Preprocessing
    from ..models.checkpoints import save_model
    from .distributed import setup
    from .jobs import finetune

    ctx = setup(device)
    events = events or Events()
    if not ctx.is_main:
        events = Events.silent_sink()
    with ctx.agreement():
        if recipe_name not in RECIPES:
            raise EngineError(f"unknown recipe {recipe_name!r}; choose one of: {', '.join(RECIPES)}")
    recipe = RECIPES[recipe_name]
    if recipe.latent is not None:
        return pretrain_latent(recipe, out, cohort=cohort, steps=steps, ae_steps=ae_steps, device=device,
                               threads=threads, events=events, resume=resume, ship=ship)
    preprocessing = Preprocessing(spacing=recipe.spacing).to_dict() if recipe.spacing else None

    def fresh() -> torch.nn.Module:
        model = build_model(recipe.preset, **recipe.overrides)
        if preprocessing:
            model.tensorpeft_spec["preprocessing"] = preprocessing
        return model

    init = os.path.join(out, f"{recipe.name}-init.safetensors")
    run = os.path.join(out, "run")
    with ctx.agreement():  # rank 0 writes the cohort and the initial weights; the others wait for them here
        if ctx.is_main:
            os.makedirs(out, exist_ok=True)
        if cohort is None:
            cohort = os.path.join(out, "cohort")
            if ctx.is_main and not os.path.isfile(os.path.join(cohort, "dataset.json")):
                events.message(f"building the demo cohort in {cohort} ...")
                build_demo_cohort(cohort, seed=0)
        if not resume and ctx.is_main and recipe.start_from is None:
            torch.manual_seed(recipe.seed)  # the initial weights are part of the recipe
            save_model(fresh(), init)
    stage = None
    if recipe.start_from is not None:
        # the first stage in OUT/<its name>: kept once finished (its card is written last), so --resume goes on
        # with this stage; an unfinished first stage is resumed or started
        stage_out = os.path.join(out, recipe.start_from)
        init = os.path.join(stage_out, f"{recipe.start_from}.safetensors")
        stage_card = os.path.join(stage_out, f"{recipe.start_from}.json")
        needed = not os.path.isfile(stage_card)
        if ctx.active:
            needed = ctx.gather(needed)[0]  # rank 0's view of the shared folder decides for every rank
        if needed:
            events.message(f"{recipe.name} continues {recipe.start_from}: training that first, in {stage_out}")
            pretrain(recipe.start_from, stage_out, cohort=cohort, steps=steps, device=device, threads=threads,
                     events=events, resume=resume and os.path.isdir(os.path.join(stage_out, "run")))
        with ctx.agreement():  # the other ranks return from the first stage before rank 0 has exported it
            if ctx.is_main and file_sha256(init) != json.load(open(stage_card, encoding="utf-8")).get("sha256"):
                raise EngineError(f"{init} does not match its card {stage_card} (SHA-256); delete {stage_out} and "
                                  "run again")
        with open(stage_card, encoding="utf-8") as handle:
            stage = json.load(handle)
        resume = resume and os.path.isdir(run)  # the first stage may just have finished: this one starts fresh
    data = os.path.join(cohort, recipe.task_folder)
    settings = TrainSettings(steps=steps or recipe.steps, lr=recipe.lr, eval_every=recipe.eval_every,
                             checkpoint_every=recipe.eval_every, seed=recipe.seed, optimizer="adamw")
    started = time.time()
    result = finetune(init, data, run, AdapterConfig(method="full"), settings, val=None, auto_val=False,
                      device=device, events=events, resume=resume, overwrite=not resume,
                      batch_size=recipe.batch_size, affine=recipe.affine, flip=recipe.flip, threads=threads,
                      loss=recipe.loss, label_resampling=recipe.label_resampling,
                      centre_jitter=recipe.centre_jitter)
    if result.status != "completed":
        raise EngineError(f"pretraining {recipe.name} was cancelled at step {result.step}; continue with --resume")
    if not ctx.is_main:
        return {}

    # The trained weights: a fresh model of the preset with the run's (full) adapter loaded, exported as fp16.
    model = fresh()
    load_adapter(model, run)
    del model.tensorpeft  # drop the adapter bookkeeping: with "full" the weights are the whole state
    model.half()
    steps_done = result.step
    losses = [row["loss"] for row in result.history["steps"][-50:]]
    weights = os.path.join(out, f"{recipe.name}.safetensors")
    save_model(model, weights, extra={"recipe": recipe.name})
    card = {
        "name": recipe.name, "preset": recipe.preset, "overrides": recipe.overrides, "description": recipe.description,
        "recipe": {**asdict(recipe), "steps": steps_done}, "settings": asdict(settings),
        "preprocessing": preprocessing,
        "data": {"cohort": "tensorpeft demo-data (seed 0)", "task": recipe.task_folder},
        "final_metrics": {"mean_training_loss_last_50_steps": round(sum(losses) / len(losses), 5)},
        "training_seconds": round(time.time() - started, 1), "device": result.history["runtime"]["device_name"],
        **({"start_from": {"name": recipe.start_from, "sha256": stage["sha256"], "recipe": stage["recipe"],
                           "settings": stage["settings"], "training_seconds": stage["training_seconds"],
                           "device": stage["device"]}} if stage else {}),
        "torch": torch.__version__, "dtype": "float16", "sha256": file_sha256(weights),
        "command": f"tensorpeft pretrain --recipe {recipe.name} --out {out}",
    }
    return finish_card(card, weights, out, ship, events)


def finish_card(card: dict[str, Any], weights: str, out: str, ship: bool, events: Events) -> dict[str, Any]:
    """Write a recipe's model card beside its weights (``out/<name>.json``) and, with ``ship``, copy both into the
    package."""
    from ..data.demo import write_json

    card_path = os.path.join(out, f"{card['name']}.json")
    write_json(card_path, card)
    events.message(f"wrote {weights} ({os.path.getsize(weights) / 1e6:.2f} MB) and its model card {card_path}")
    if ship:
        ship_model(weights, card_path)
        events.message(f"shipped: {WEIGHTS_DIR / os.path.basename(weights)}")
    return card


def ship_model(weights: str, card_path: str) -> None:
    """Copy a pretrained model and its card into the package (atomically; the card last, so a half-copied pair is
    never taken as valid: the hash check would refuse it anyway)."""

    os.makedirs(WEIGHTS_DIR, exist_ok=True)
    for source in (weights, card_path):
        copy_atomically(source, WEIGHTS_DIR / os.path.basename(source))


def pretrain_latent(recipe: Recipe, out: str, *, cohort: str | None, steps: int | None, ae_steps: int | None,
                    device: str, threads: int | None, events: Events, resume: bool, ship: bool) -> dict[str, Any]:
    """A latent diffusion recipe (:mod:`.latent_pretrain`): autoencoder, then diffusion on its latents, then the
    export (EMA weights, fp16, autoencoder in the same file) with realism checks of samples of the EMA and of the raw
    weights in the card. One process (no torchrun)."""
    from ..data import build_demo_cohort
    from ..models.checkpoints import save_model
    from ..models.latent import latent_parts
    from ..models.presets import PRESETS
    from . import latent_pretrain as lp
    from .runtime import select_runtime

    runtime = select_runtime(device, "off", threads)
    settings = dict(recipe.latent or {})
    diffusion_steps = int(steps or recipe.steps)
    ae_total = int(ae_steps or settings["ae_steps"])
    size = tuple(PRESETS[recipe.preset].patch_size)
    os.makedirs(out, exist_ok=True)
    run = os.path.join(out, "run")
    os.makedirs(run, exist_ok=True)
    if not resume:
        for name in ("autoencoder.pt", "diffusion.pt"):
            if os.path.exists(os.path.join(run, name)):
                os.remove(os.path.join(run, name))
    if cohort is None:
        cohort = os.path.join(out, "cohort")
        if not os.path.isfile(os.path.join(cohort, recipe.task_folder, "dataset.json")):
            events.message(f"building the demo cohort's synthesis set in {cohort} ...")
            build_demo_cohort(cohort, seed=0, n_train=1, n_test=0, n_unseen=0, n_whole_head=0, n_source=0,
                              n_synthesis_target=0, n_synthesis_ventricles=0)
    data = os.path.join(cohort, recipe.task_folder)
    started = time.time()
    volumes = lp.load_training_volumes(data, size)
    events.message(f"{len(volumes)} training volumes of {'x'.join(map(str, size))} from {data}")

    torch.manual_seed(recipe.seed)  # the initial weights are part of the recipe
    model = build_model(recipe.preset, **recipe.overrides)
    parts = latent_parts(model)
    ae_history = lp.train_autoencoder(
        parts.autoencoder, volumes, run, steps=ae_total, lr=settings["ae_lr"], batch=settings["ae_batch"],
        crop=settings["crop"], kl_weight=settings["kl_weight"], seed=recipe.seed,
        checkpoint_every=recipe.eval_every, resume=resume, events=events)
    with torch.no_grad():
        reconstruction = [float(F_l1(parts.autoencoder.reconstruct(v[None]), v[None])) for v in volumes[:8]]
    ae_history["full_volume_l1"] = round(sum(reconstruction) / len(reconstruction), 5)
    mu, sigma = lp.encode_all(parts.autoencoder, volumes)
    scale = float(1.0 / mu.std())
    events.message(f"autoencoder: L1 {ae_history['full_volume_l1']:.4f} on whole volumes; latents "
                   f"{tuple(mu.shape[1:])}, scale factor {scale:.4g}")
    ema, diffusion_history = lp.train_diffusion(
        model, mu, sigma, scale, run, schedule=parts.schedule, steps=diffusion_steps, lr=recipe.lr,
        batch=recipe.batch_size, seed=recipe.seed, ema_decay=settings["ema_decay"],
        min_snr_gamma=settings.get("min_snr_gamma"), checkpoint_every=recipe.eval_every, resume=resume,
        events=events)

    # the exported model: EMA U-Net weights, the trained autoencoder, the scale factor in the spec
    # where generated volumes lie: the training volumes' voxel size and world centre (synthesize writes them there)
    from ..data import find_cases
    from ..data.demo import SYNTHESIS_SPACES
    from .jobs import _first_centre, _first_spacing

    cases = find_cases(data, require_labels=False)
    grid = {"spacing": list(_first_spacing(cases, size)), "centre": list(_first_centre(cases))}
    if recipe.task_folder in SYNTHESIS_SPACES:  # the brain whose space the training brains are in: fine-tuning
        grid["reference"] = SYNTHESIS_SPACES[recipe.task_folder]  # registers a user's scans to it (data.align)
    final = build_model(recipe.preset, **{**recipe.overrides, "scale_factor": scale})
    final.load_state_dict({k: v.to(final.state_dict()[k].dtype) for k, v in ema.items()})
    latent_parts(final).autoencoder.load_state_dict(parts.autoencoder.state_dict())
    final.tensorpeft_spec["synthesis_grid"] = grid
    raw = build_model(recipe.preset, **{**recipe.overrides, "scale_factor": scale})
    raw.load_state_dict(model.state_dict())
    latent_parts(raw).autoencoder.load_state_dict(parts.autoencoder.state_dict())
    realism = {}
    real = [v[0].numpy() for v in volumes]
    for label, candidate in (("ema", final), ("raw", raw)):
        realism[label] = sample_realism(candidate, real, size, runtime, count=int(settings.get("realism_samples", 4)),
                                        steps=int(settings.get("realism_steps", 50)))
        events.message(f"samples ({label} weights): {realism[label]['summary']}")
    final.half()
    latent_parts(final).autoencoder.half()
    weights = os.path.join(out, f"{recipe.name}.safetensors")
    save_model(final, weights, extra={"recipe": recipe.name})
    losses = diffusion_history["noise_mse_last_50"]
    card = {
        "name": recipe.name, "preset": recipe.preset, "overrides": {**recipe.overrides, "scale_factor": scale},
        "description": recipe.description,
        "recipe": {**asdict(recipe), "steps": diffusion_steps,
                   "latent": {**settings, "ae_steps": ae_total}},
        "synthesis_grid": grid,
        "data": {"cohort": "tensorpeft demo-data (seed 0)", "task": recipe.task_folder, "volumes": len(volumes),
                 "shape": list(size), "spacing_mm": grid["spacing"]},
        "schedule": parts.schedule,
        "final_metrics": {"mean_training_loss_last_50_steps": losses,
                          "autoencoder_l1_last_50_crops": ae_history["l1_last_50"],
                          "autoencoder_l1_whole_volumes": ae_history["full_volume_l1"],
                          "scale_factor": round(scale, 6),
                          "realism_ema": realism["ema"], "realism_raw": realism["raw"]},
        "autoencoder_seconds": ae_history["seconds"], "diffusion_seconds": diffusion_history["seconds"],
        "training_seconds": round(ae_history["seconds"] + diffusion_history["seconds"], 1),
        "wall_seconds_this_call": round(time.time() - started, 1),
        "device": runtime.describe().get("device_name", str(runtime.device)),
        "torch": torch.__version__, "dtype": "float16", "sha256": file_sha256(weights),
        "command": f"tensorpeft pretrain --recipe {recipe.name} --out {out}",
    }
    return finish_card(card, weights, out, ship, events)


def F_l1(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # noqa: N802
    return (a.float() - b.float()).abs().mean()


def sample_realism(model: torch.nn.Module, real: list, size: tuple[int, ...], runtime: Any, count: int = 4,
                   steps: int = 50) -> dict[str, Any]:
    """Realism checks (engine.synthesis_metrics.realism_checks) of ``count`` DDIM samples of ``model``."""
    from .synthesis import sample_volumes
    from .synthesis_metrics import realism_checks

    samples = sample_volumes(model, count, size, runtime, steps=steps, sampler="ddim", seed=0,
                             schedule=getattr(model, "tensorpeft_latent").schedule)
    checks = realism_checks(samples, real)
    return checks
