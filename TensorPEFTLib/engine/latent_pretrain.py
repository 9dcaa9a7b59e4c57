"""Pretraining a latent diffusion model from scratch on a CPU budget (the ``demo-ldm`` recipe).

Why latent and not pixel space: on one CPU thread a pixel-space DDPM at 64³ (``ddpm-small``, batch 2) takes 27.7 s
per step, about 200 steps in 90 minutes; the 32³ ``demo-ddpm`` had 800 steps and its samples were noise. The latent
model trains its autoencoder on 32³ crops (0.46 s per batch-2 step: it is fully convolutional, so it runs on whole
64x80x64 volumes afterwards) and then its diffusion U-Net on 16x20x16 latents (3 channels: 1.15 s per batch-8 step
on one thread; demo-ldm's 8 channels: 0.43 s on two), so thousands of steps fit.

Two stages, each checkpointed (``run/autoencoder.pt``, ``run/diffusion.pt``: plain tensors and numbers, read back
with ``torch.load(weights_only=True)``) every ``eval_every`` steps and resumable (``resume=True`` continues the
unfinished stage; a finished autoencoder is not trained again):

1. **Autoencoder** (MONAI ``AutoencoderKL``): L1 reconstruction + ``kl_weight`` · KL of random 32³ crops of the
   training volumes (random left-right flips), Adam, warm-up then cosine decay. No adversarial or perceptual loss:
   the perceptual network would have to be downloaded, and a discriminator does not converge in this budget.
2. **Diffusion** on the frozen autoencoder's latents: every training volume (and its mirror image) is encoded once
   (posterior mean and σ kept; each step draws a fresh posterior sample), scaled by 1 / std of the means (Rombach
   et al. 2022). v-prediction with the scaled-linear schedule of MONAI's latent diffusion tutorials (noise
   prediction left the samples noise after 500 steps: see ``presets.LATENT_SCHEDULE``), min-SNR-γ loss weighting (Hang et al. 2023, γ = 5), AdamW with warm-up and cosine decay, gradient clipping, and
   an exponential moving average (EMA) of the weights, which is what is exported.

Every step's randomness comes from (seed, stage, step), so a resumed run draws what an uninterrupted one draws.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import write_atomically
from .events import Events
from .runtime import EngineError


def _save_atomically(obj: dict[str, Any], path: str) -> None:
    write_atomically(path, lambda tmp: torch.save(obj, tmp))


def _restore(state: dict[str, Any] | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer, stage: str,
             steps: int, events: Events) -> tuple[int, list[float], float]:
    """A stage's checkpoint (or None) into ``model`` and ``optimizer``: (first step, losses so far, seconds so far)."""
    if state is None:
        return 0, [], 0.0
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    start = int(state["step"])
    events.message(f"{stage}: resuming at step {start} of {steps}")
    return start, list(state["losses"]), float(state["seconds"])


def _load(path: str) -> dict[str, Any] | None:
    return torch.load(path, map_location="cpu", weights_only=True) if os.path.isfile(path) else None


def _lr_at(step: int, total: int, peak: float, warmup: int, floor: float = 0.1) -> float:
    """Linear warm-up to ``peak``, then cosine decay to ``floor`` · peak at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def load_training_volumes(folder: str, size: tuple[int, ...]) -> torch.Tensor:
    """The synthesis set's volumes ``(N, 1, *size)`` in [0, 1], as fine-tuning sees them (``synthesis_transforms``)."""
    from ..data import find_cases, synthesis_transforms

    cases = find_cases(folder, require_labels=False)
    if not cases:
        raise EngineError(f"{folder}: no training volumes")
    transform = synthesis_transforms(size)
    return torch.stack([torch.as_tensor(transform({"image": c["image"]})["image"]).float() for c in cases])


def kl_loss(mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma²) ‖ N(0, 1)) summed over the latent voxels, mean over the batch (MONAI's tutorials)."""
    kl = 0.5 * (mu.pow(2) + sigma.pow(2) - torch.log(sigma.pow(2).clamp_min(1e-12)) - 1)
    return kl.flatten(1).sum(1).mean()


def _crops(volumes: torch.Tensor, rng: np.random.Generator, batch: int, crop: int) -> torch.Tensor:
    picks = rng.integers(len(volumes), size=batch)
    out = []
    for index in picks:
        v = volumes[int(index)]
        corner = [int(rng.integers(0, s - crop + 1)) for s in v.shape[1:]]
        patch = v[:, corner[0]:corner[0] + crop, corner[1]:corner[1] + crop, corner[2]:corner[2] + crop]
        if rng.random() < 0.5:
            patch = torch.flip(patch, dims=[1])  # left-right (the volumes are RAS)
        out.append(patch)
    return torch.stack(out)


def train_autoencoder(ae: torch.nn.Module, volumes: torch.Tensor, run: str, *, steps: int, lr: float, batch: int,
                      crop: int, kl_weight: float, seed: int, checkpoint_every: int, resume: bool,
                      events: Events) -> dict[str, Any]:
    """Stage 1 (see the module docstring); leaves ``ae`` trained, frozen and in eval mode. Returns its history."""
    path = os.path.join(run, "autoencoder.pt")
    state = _load(path) if resume else None
    for p in ae.parameters():
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(ae.parameters(), lr=lr)
    start, losses, seconds = _restore(state, ae, optimizer, "autoencoder", steps, events)
    ae.train()
    warmup = min(50, max(1, steps // 10))
    began = time.time() - seconds
    for step in range(start, steps):
        rng = np.random.default_rng([seed, 1, step])
        torch.manual_seed(seed * 1_000_003 + step)
        x = _crops(volumes, rng, batch, crop)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        reconstruction, mu, sigma = ae(x)
        l1 = F.l1_loss(reconstruction.float(), x)
        loss = l1 + kl_weight * kl_loss(mu.float(), sigma.float())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        optimizer.step()
        losses.append(float(l1.detach()))
        done = step + 1
        if done % 10 == 0 or done == steps:
            events.emit("step", stage="autoencoder", step=done, steps=steps, l1=round(float(np.mean(losses[-10:])), 5),
                        seconds=round(time.time() - began, 1))
        if done % checkpoint_every == 0 or done == steps:
            _save_atomically({"step": done, "model": ae.state_dict(), "optimizer": optimizer.state_dict(),
                              "losses": losses, "seconds": time.time() - began}, path)
            events.emit("checkpoint", stage="autoencoder", step=done, path=path)
    ae.eval()
    for p in ae.parameters():
        p.requires_grad_(False)
    if state is not None and start >= steps:
        ae.load_state_dict(state["model"])
    return {"steps": steps, "l1_last_50": round(float(np.mean(losses[-50:])), 5) if losses else None,
            "seconds": round(time.time() - began, 1)}


@torch.no_grad()
def encode_all(ae: torch.nn.Module, volumes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and σ of every volume and of its left-right mirror image: ``(2N, C, *latent)`` each."""
    mus, sigmas = [], []
    for flip in (False, True):
        for v in volumes:
            x = v[None]
            if flip:
                x = torch.flip(x, dims=[2])
            mu, sigma = ae.encode(x)
            mus.append(mu[0])
            sigmas.append(sigma[0])
    return torch.stack(mus), torch.stack(sigmas)


def diffusion_target(scheduler: Any, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the U-Net learns to output: the noise (``epsilon``), the velocity √ᾱ·ε − √(1−ᾱ)·x₀ (``v_prediction``)
    or the clean sample (``sample``), as the scheduler's ``prediction_type`` says."""
    kind = getattr(scheduler, "prediction_type", "epsilon")
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, timesteps)
    if kind == "sample":
        return clean
    return noise


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float | None,
                    prediction_type: str = "epsilon") -> torch.Tensor:
    """Per-sample loss weights of min-SNR-γ (Hang et al. 2023): min(SNR, γ) / SNR for noise prediction,
    min(SNR, γ) / (SNR + 1) for v-prediction, min(SNR, γ) for x₀; ones without γ."""
    if not gamma:
        return torch.ones(len(timesteps))
    alpha = alphas_cumprod[timesteps].float()
    snr = alpha / (1 - alpha)
    clipped = torch.clamp(snr, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    if prediction_type == "sample":
        return clipped
    return clipped / snr


def train_diffusion(unet: torch.nn.Module, mu: torch.Tensor, sigma: torch.Tensor, scale: float, run: str, *,
                    schedule: dict[str, Any], steps: int, lr: float, batch: int, seed: int, ema_decay: float,
                    min_snr_gamma: float | None, checkpoint_every: int, resume: bool,
                    events: Events) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Stage 2 (see the module docstring). Returns the EMA weights and the history; ``unet`` keeps the raw weights."""
    from .synthesis import make_scheduler

    path = os.path.join(run, "diffusion.pt")
    scheduler = make_scheduler("ddpm", schedule)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    ema = {k: v.detach().clone().float() for k, v in unet.state_dict().items()}
    state = _load(path) if resume else None
    start, losses, seconds = _restore(state, unet, optimizer, "diffusion", steps, events)
    if state is not None:
        ema = {k: v.float() for k, v in state["ema"].items()}
    unet.train()
    warmup = min(100, max(1, steps // 10))
    began = time.time() - seconds
    for step in range(start, steps):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 7 + step)
        picks = torch.randint(0, len(mu), (batch,), generator=gen)
        z = (mu[picks] + sigma[picks] * torch.randn(mu[picks].shape, generator=gen)) * scale
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, scheduler.num_train_timesteps, (batch,), generator=gen)
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        noisy = scheduler.add_noise(z, noise, t)
        prediction = unet(noisy, timesteps=t).float()
        per_sample = (prediction - diffusion_target(scheduler, z, noise, t)).pow(2).flatten(1).mean(1)
        weights = min_snr_weights(scheduler.alphas_cumprod, t, min_snr_gamma, scheduler.prediction_type)
        loss = (per_sample * weights).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        decay = min(ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.is_floating_point():
                    ema[k].mul_(decay).add_(v.detach().float(), alpha=1 - decay)
                else:
                    ema[k].copy_(v)
        losses.append(float(per_sample.detach().mean()))
        done = step + 1
        if done % 10 == 0 or done == steps:
            events.emit("step", stage="diffusion", step=done, steps=steps, loss=round(float(np.mean(losses[-10:])), 5),
                        seconds=round(time.time() - began, 1))
        if done % checkpoint_every == 0 or done == steps:
            _save_atomically({"step": done, "model": unet.state_dict(), "optimizer": optimizer.state_dict(),
                              "ema": ema, "losses": losses, "seconds": time.time() - began, "scale_factor": scale},
                             path)
            events.emit("checkpoint", stage="diffusion", step=done, path=path)
    unet.eval()
    return ema, {"steps": steps, "noise_mse_last_50": round(float(np.mean(losses[-50:])), 5) if losses else None,
                 "seconds": round(time.time() - began, 1)}
