"""Seconds per training step of a pixel-space DDPM at 64³ against the two stages of a latent diffusion model, on
the CPU this runs on (issue 15: which kind of generative model fits a CPU pretraining budget).

    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/pixel_vs_latent.py

Each line: forward + backward + AdamW step on random inputs, the mean of 3 steps after one warm-up step.
"""

from __future__ import annotations

import time

import torch


def seconds_per_step(model: torch.nn.Module, shape: tuple[int, ...], diffusion: bool, steps: int = 3) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), 1e-4)
    x = torch.randn(shape)
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        if diffusion:
            loss = (model(x, timesteps=torch.randint(0, 1000, (shape[0],))) - x).pow(2).mean()
        else:
            reconstruction, _, _ = model(x)
            loss = (reconstruction - x).abs().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - start) / steps


def main() -> None:
    from monai.networks.nets import AutoencoderKL

    from TensorPEFTLib.models import build_model
    from TensorPEFTLib.models.latent import latent_parts

    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    pixel = build_model("ddpm-small")
    print(f"pixel DDPM (ddpm-small) at 64x64x64, batch 2: {seconds_per_step(pixel, (2, 1, 64, 64, 64), True):.2f} s/step")
    ldm = build_model("ddpm-latent-small")
    ae = latent_parts(ldm).autoencoder
    for p in ae.parameters():
        p.requires_grad_(True)
    ae.train()
    print(f"latent: AutoencoderKL on 32³ crops, batch 2: {seconds_per_step(ae, (2, 1, 32, 32, 32), False):.2f} s/step")
    print(f"latent: AutoencoderKL on whole 64x80x64 volumes, batch 1: "
          f"{seconds_per_step(ae, (1, 1, 64, 80, 64), False):.2f} s/step")
    print(f"latent: diffusion U-Net on 3x16x20x16 latents, batch 8: "
          f"{seconds_per_step(ldm, (8, 3, 16, 20, 16), True):.2f} s/step")
    assert isinstance(ae, AutoencoderKL)


if __name__ == "__main__":
    main()
