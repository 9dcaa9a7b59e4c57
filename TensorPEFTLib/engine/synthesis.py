"""Synthesis (3D DDPM, pixel or latent): the fine-tuning task and sampling.

Training follows MONAI's 3D DDPM recipe: intensities in [0, 1], a DDPM scheduler with 1000 steps and the
scaled-linear β schedule, noise-prediction MSE (or the MSE of whatever the schedule's ``prediction_type`` says the
model predicts: the shipped latent model predicts v). The scheduler settings travel with the adapter (``extra`` metadata)
so sampling uses the schedule the model was trained with.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .events import Events
from .runtime import Runtime

#: MONAI's 3D DDPM tutorial schedule; also what the shipped demo DDPM was trained with.
SCHEDULE = {"num_train_timesteps": 1000, "schedule": "scaled_linear_beta", "beta_start": 0.0005, "beta_end": 0.0195}


def make_scheduler(kind: str = "ddpm", schedule: dict[str, Any] | None = None):
    from monai.networks.schedulers import DDIMScheduler, DDPMScheduler

    settings = dict(schedule or SCHEDULE)
    if kind == "ddim":
        return DDIMScheduler(**settings, clip_sample=False)
    return DDPMScheduler(**settings, clip_sample=False)


class SynthesisTask:
    """Fine-tune a DDPM on volumes: noise-prediction MSE at uniformly drawn timesteps. Validation is the same loss
    on held-out volumes at fixed noise and timesteps (lower is better).

    A latent diffusion model (``latent``: the U-Net's :class:`~TensorPEFTLib.models.latent.LatentParts`) learns the
    same loss on the frozen autoencoder's scaled latents of the volumes (MONAI's ``LatentDiffusionInferer``
    training): the volumes are encoded without gradients, the noise has the latents' shape. Without a recorded
    scale factor it is set to 1 / std of the first training volumes' latents before training.
    """

    kind = "synthesis"
    metric = "val_loss"
    higher_is_better = False

    def __init__(self, train_cases: list[dict], val_cases: list[dict], *, size: Sequence[int], runtime: Runtime,
                 batch_size: int = 1, flip: bool = True, schedule: dict[str, Any] | None = None,
                 sample_steps: int = 25, shard: tuple[int, int] = (0, 1), latent: Any = None,
                 pixdim: Sequence[float] | None = None, align: Any = None) -> None:
        from monai.data import CacheDataset

        from ..data import synthesis_transforms

        self.size = tuple(int(s) for s in size)
        self.runtime, self.batch_size, self.sample_steps = runtime, batch_size, sample_steps
        self.shard = (int(shard[0]), int(shard[1]))  # (rank, ranks): see segmentation.global_batch_picks
        self.schedule = dict(schedule or SCHEDULE)
        self.scheduler = make_scheduler("ddpm", self.schedule)
        self.train_transform = synthesis_transforms(self.size, flip_prob=0.5 if flip else 0.0, pixdim=pixdim,
                                                    align=align)
        self.train_data = CacheDataset(train_cases, self.train_transform, progress=False, num_workers=0)
        self.val_data = (CacheDataset(val_cases, synthesis_transforms(self.size, pixdim=pixdim, align=align),
                                      progress=False, num_workers=0)
                         if val_cases else None)
        self.latent = latent
        if latent is not None:
            latent.autoencoder.to(runtime.device)
            if latent.scale_factor is None:
                # from the volumes as they are, not through the training transform: its random flips come from an
                # unseeded generator, so the factor (and every latent after it) changed from run to run and on --resume
                plain = synthesis_transforms(self.size, pixdim=pixdim, align=align)
                first = [torch.as_tensor(plain(dict(c))["image"]) for c in train_cases[:4]]
                latent.fit_scale_factor(torch.stack(first).float().to(runtime.device))

    def _to_latents(self, image: torch.Tensor, seed: int) -> torch.Tensor:
        """Volumes ``(B, 1, *size)`` → a latent model's scaled latents ``(B, C, *size / downsample)``, the posterior
        draw seeded so that a step repeats, and this rank's rows of the global batch's draw (as noise and timesteps)."""
        rank, ranks = self.shard
        rows = (rank * image.shape[0], image.shape[0] * ranks)
        return self.latent.encode(image, torch.Generator().manual_seed(seed), rows=rows).float()

    def batch(self, step: int, micro: int, seed: int) -> dict[str, torch.Tensor]:
        from .segmentation import global_batch_picks

        rng = np.random.default_rng(seed)
        picks = global_batch_picks(rng, len(self.train_data), self.batch_size, self.shard)
        images = []
        for j, index in picks:
            self.train_transform.set_random_state(seed=(seed + 7919 * j) % (2**31 - 1))
            images.append(torch.as_tensor(self.train_data[int(index)]["image"]))
        gen = torch.Generator().manual_seed(seed)
        image = torch.stack(images).float()
        if self.latent is not None:
            image = self._to_latents(image.to(self.runtime.device), seed + 1).cpu()
        # noise and timesteps of the whole global batch from the step's stream, then this rank's rows (one process:
        # all of them, drawn as before)
        rank, ranks = self.shard
        rows = slice(rank * self.batch_size, (rank + 1) * self.batch_size)
        noise = torch.randn((image.shape[0] * ranks, *image.shape[1:]), generator=gen)[rows]
        timesteps = torch.randint(0, self.scheduler.num_train_timesteps, (image.shape[0] * ranks,), generator=gen)[rows]
        device = self.runtime.device
        return {"image": image.to(device), "noise": noise.to(device), "timesteps": timesteps.to(device)}

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        from .latent_pretrain import diffusion_target

        noisy = self.scheduler.add_noise(batch["image"], batch["noise"], batch["timesteps"])
        prediction = model(noisy, timesteps=batch["timesteps"])
        target = diffusion_target(self.scheduler, batch["image"], batch["noise"], batch["timesteps"])
        return F.mse_loss(prediction.float(), target.float())

    def evaluate(self, model: nn.Module) -> dict[str, float] | None:
        if self.val_data is None:
            return None
        losses = []
        gen = torch.Generator().manual_seed(1234)  # the same noise and timesteps at every evaluation
        for index, item in enumerate(self.val_data):
            image = torch.as_tensor(item["image"])[None].float()
            if self.latent is not None:
                image = self._to_latents(image.to(self.runtime.device), 4321 + index).cpu()
            for t in (50, 250, 500, 750):
                noise = torch.randn(image.shape, generator=gen)
                batch = {"image": image.to(self.runtime.device), "noise": noise.to(self.runtime.device),
                         "timesteps": torch.tensor([t], device=self.runtime.device)}
                losses.append(float(self.loss(model, batch)))
        return {"val_loss": float(np.mean(losses))}

    def report(self, model: nn.Module, out: str, history: dict[str, Any]) -> list[str]:
        from .report import synthesis_report

        with torch.no_grad(), self.runtime.autocast():
            samples = sample_volumes(model, 2, self.size, self.runtime, steps=self.sample_steps, sampler="ddim",
                                     seed=0, schedule=self.schedule)
        real = [np.asarray(self.train_data[i]["image"])[0] for i in range(min(2, len(self.train_data)))]
        return [synthesis_report(os.path.join(out, "report.png"), history, [s for s in samples], real)]


def sample_volumes(model: nn.Module, count: int, size: Sequence[int], runtime: Runtime, *, steps: int = 50,
                   sampler: str = "ddim", seed: int = 0, schedule: dict[str, Any] | None = None,
                   events: Events | None = None) -> list[np.ndarray]:
    """Generate ``count`` volumes of ``size`` by reverse diffusion; returns arrays clipped to [0, 1].

    ``sampler``: ``ddim`` (``steps`` denoising steps, fast) or ``ddpm`` (the full chain; ``steps`` ignored).
    A latent diffusion model (its U-Net carries :class:`~TensorPEFTLib.models.latent.LatentParts`) denoises latents
    of ``size / downsample`` and decodes them at the end, as ``LatentDiffusionInferer.sample`` does.
    """
    from ..models.latent import latent_parts

    latent = latent_parts(model)
    if schedule is None and latent is not None:
        # a latent model carries the schedule it was trained with (v-prediction for demo-ldm): sampling it with the
        # default noise-prediction schedule gives noise
        schedule = latent.schedule
    scheduler = make_scheduler(sampler, schedule)
    if sampler == "ddim":
        scheduler.set_timesteps(num_inference_steps=steps)
    model.eval()
    volumes = []
    gen = torch.Generator().manual_seed(seed)
    total = len(scheduler.timesteps)
    channels, shape = 1, tuple(int(s) for s in size)
    if latent is not None:
        latent.autoencoder.to(runtime.device)
        channels, shape = latent.latent_channels, tuple(s // latent.downsample for s in shape)
    for index in range(count):
        x = torch.randn((1, channels, *shape), generator=gen).to(runtime.device)
        for k, t in enumerate(scheduler.timesteps):
            with torch.no_grad(), runtime.autocast():
                eps = model(x, timesteps=torch.tensor([int(t)], device=runtime.device)).float()
            x, _ = scheduler.step(eps, int(t), x)
            if events is not None:
                events.update_bar(1)
                if (k + 1) % max(1, total // 10) == 0 or k + 1 == total:
                    events.emit("step", step=index * total + k + 1, steps=count * total, volume=index + 1)
        if latent is not None:
            with torch.no_grad(), runtime.autocast():
                x = latent.decode(x).float()
        volumes.append(x[0, 0].clamp(0, 1).cpu().numpy())
    return volumes


def default_affine(size: Sequence[int], spacing: Sequence[float] = (1.0, 1.0, 1.0),
                   centre: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """RAS affine of a generated volume: voxels of ``spacing`` mm, the volume's centre at ``centre`` (world mm; the
    training volumes' centre, so generated brains lie where the training brains lay)."""
    affine = np.diag([*map(float, spacing), 1.0])
    affine[:3, 3] = np.asarray(centre, dtype=float) - 0.5 * (np.asarray(size, dtype=float) - 1) * np.asarray(
        spacing, dtype=float)
    return affine
