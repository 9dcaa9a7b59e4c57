"""Shared checks for the tensor-network and growing-rank adapter suites (TenVOO, QuanTA, SeLoRA).

The foundation issue's contract, on the tiny DDPM: after an optimiser step ``merge`` gives the unmerged outputs
(≤ 1e-5), ``unmerge`` restores the weights (≤ 1e-6), save + load into a fresh model gives identical outputs.
"""

from __future__ import annotations

import torch
from torch import nn

import TensorPEFTLib as tp
from conftest import ddpm_input, tiny_ddpm


def ddpm_out(model: nn.Module) -> torch.Tensor:
    x, t = ddpm_input()
    with torch.no_grad():
        return model(x, timesteps=t)


def train_steps(model: nn.Module, steps: int = 2, lr: float = 1e-2) -> None:
    """A few Adam steps on a fixed random target so the adapter moves away from its start."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    x, t = ddpm_input()
    model.train()
    for _ in range(steps):
        loss = (model(x, timesteps=t) - 1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def base_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("base_layer.weight")}


def check_merge_unmerge_save_load(model: nn.Module, folder) -> None:
    """Merge/unmerge/save/load contract on an adapted (and trained) tiny DDPM."""
    unmerged = ddpm_out(model)
    before = base_weights(model)
    tp.merge(model)
    merged = ddpm_out(model)
    assert (merged - unmerged).abs().max().item() <= 1e-5
    tp.unmerge(model)
    after = base_weights(model)
    assert max((after[k] - before[k]).abs().max().item() for k in before) <= 1e-6
    assert (ddpm_out(model) - unmerged).abs().max().item() <= 1e-5
    tp.save_adapter(model, folder)
    fresh = tiny_ddpm()
    tp.load_adapter(fresh, folder)
    assert torch.equal(ddpm_out(fresh), unmerged)
