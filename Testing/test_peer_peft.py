"""Peer check against Hugging Face peft: same factors give the same outputs, and our saved adapter loads into peft."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import TensorPEFTLib as tp
from TensorPEFTLib.adapters import adapter_layers

from conftest import ddpm_input, tiny_ddpm, tiny_unetr, unetr_input

peft = pytest.importorskip("peft")


def _peft_model(model: nn.Module, targets: list[str], rank: int, alpha: float):
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, bias="none")
    return peft.get_peft_model(model, config)


def _randomise_factors(model: nn.Module) -> None:
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in adapter_layers(model):
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


CASES = {
    # Linear layers of the ViT
    "linear": (tiny_unetr, [r"vit\.blocks\.\d+\.attn\.qkv", r"vit\.blocks\.\d+\.mlp\.linear1"], lambda m: m(unetr_input())),
    # Conv3d layers of the DDPM resnets
    "conv3d": (tiny_ddpm, [r".*resnets\.\d+\.conv1\.conv"], lambda m: m(*ddpm_input()[:1], timesteps=ddpm_input()[1])),
}


@pytest.mark.parametrize("case", list(CASES))
def test_same_factors_same_outputs_and_adapter_loads_into_peft(tmp_path, case):
    make, targets, forward = CASES[case]
    ours = make()
    tp.inject(ours, tp.AdapterConfig(method="lora", rank=2, alpha=4, targets=targets, trainable=[]))
    _randomise_factors(ours)
    names = [n for n, _ in adapter_layers(ours)]

    theirs = _peft_model(make(), names, 2, 4)
    # copy our factors into peft's layers (peft keeps them under an adapter name, "default")
    ours_state = {k: v for k, v in ours.state_dict().items() if ".lora_" in k}
    peft_state = {k.replace("base_model.model.", "").replace(".default", ""): k for k in theirs.state_dict() if ".lora_" in k}
    assert set(peft_state) == set(ours_state)
    theirs.load_state_dict({peft_state[k]: v for k, v in ours_state.items()}, strict=False)

    with torch.no_grad():
        a, b = forward(ours), forward(theirs)
    assert (a - b).abs().max().item() <= 1e-5

    # our saved adapter, read back as a state dict, loads into a fresh peft model with identical outputs
    from safetensors.torch import load_file

    tp.save_adapter(ours, tmp_path)
    saved = load_file(tmp_path / "adapter.safetensors")
    fresh = _peft_model(make(), names, 2, 4)
    result = peft.set_peft_model_state_dict(fresh, {f"base_model.model.{k}": v for k, v in saved.items()})
    assert not [k for k in result.unexpected_keys if "lora_" in k]
    with torch.no_grad():
        assert (forward(fresh) - a).abs().max().item() <= 1e-5
