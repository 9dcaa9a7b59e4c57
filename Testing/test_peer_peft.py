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


# ----------------------------------------------------------------------------------------------- DoRA (issue 19)


def _dora_key_map(theirs: nn.Module) -> dict[str, str]:
    """Our state-dict key -> peft's, for the adapter tensors. peft's module keeps the magnitude at
    ``lora_magnitude_vector.default.weight``; we (and peft's adapter files) call it ``lora_magnitude_vector``."""
    mapping = {}
    for key in theirs.state_dict():
        if "lora_" not in key:
            continue
        ours = key.replace("base_model.model.", "").replace(".default", "")
        mapping[ours[: -len(".weight")] if ours.endswith("lora_magnitude_vector.weight") else ours] = key
    return mapping


def _dora_pair(case: str):
    """Our DoRA and peft's on the same model, with the same random A, B and magnitude (not their start values:
    B = 0 would hide every difference in the direction's norm)."""
    make, targets, forward = CASES[case]
    ours = make()
    tp.inject(ours, tp.AdapterConfig(method="dora", rank=2, alpha=4, targets=targets, trainable=[]))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in adapter_layers(ours):
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            m = layer.lora_magnitude_vector
            m.mul_(1 + 0.1 * torch.randn(m.shape, generator=gen))
    names = [n for n, _ in adapter_layers(ours)]
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=names, lora_dropout=0.0, bias="none", use_dora=True)
    theirs = peft.get_peft_model(make(), config)
    mapping = _dora_key_map(theirs)
    ours_state = {k: v for k, v in ours.state_dict().items() if ".lora_" in k}
    assert set(mapping) == set(ours_state)
    peft_state = theirs.state_dict()
    assert all(peft_state[mapping[k]].shape == v.shape for k, v in ours_state.items())  # peft's magnitude shapes
    theirs.load_state_dict({mapping[k]: v for k, v in ours_state.items()}, strict=False)
    return ours, theirs, forward, names


@pytest.mark.parametrize("case", list(CASES))
def test_dora_matches_peft_outputs_gradients_and_merged_weights(case):
    ours, theirs, forward, names = _dora_pair(case)
    with torch.no_grad():
        assert (forward(ours) - forward(theirs)).abs().max().item() <= 1e-5

    # Same gradients: the norm is detached in both (DoRA §4.3), the magnitude and both factors train.
    forward(ours).pow(2).mean().backward()
    forward(theirs).pow(2).mean().backward()
    mapping = _dora_key_map(theirs)
    peft_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        if ".lora_" in name:
            other = peft_params[mapping[name]].grad
            assert p.grad is not None and (p.grad - other).abs().max().item() <= 1e-5 * max(1.0, other.abs().max().item()), name

    with torch.no_grad():
        expected = forward(ours)
        tp.merge(ours)
        theirs.merge_adapter()
        peft_layers = {n.replace("base_model.model.", ""): m for n, m in theirs.named_modules()}
        for name, layer in adapter_layers(ours):
            theirs_weight = peft_layers[name].get_base_layer().weight
            assert (layer.base_layer.weight - theirs_weight).abs().max().item() <= 1e-5, name
        assert (forward(ours) - expected).abs().max().item() <= 1e-5
        assert (forward(ours) - forward(theirs)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_our_dora_adapter_file_loads_into_peft(tmp_path, case):
    from safetensors.torch import load_file

    ours, _, forward, names = _dora_pair(case)
    tp.save_adapter(ours, tmp_path)
    saved = load_file(tmp_path / "adapter.safetensors")
    assert any(k.endswith(".lora_magnitude_vector") for k in saved)  # peft's file key for the magnitude
    make = CASES[case][0]
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=names, lora_dropout=0.0, bias="none", use_dora=True)
    fresh = peft.get_peft_model(make(), config)
    result = peft.set_peft_model_state_dict(fresh, {f"base_model.model.{k}": v for k, v in saved.items()})
    assert not [k for k in result.unexpected_keys if "lora_" in k]
    with torch.no_grad():
        assert (forward(fresh) - forward(ours)).abs().max().item() <= 1e-5


def test_dora_dropout_path_matches_peft_in_training():
    """With dropout, both compute W x again on the dropped-out input for the adapter's terms (same RNG draws)."""
    torch.manual_seed(0)
    make = lambda: nn.Sequential(nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 6))  # noqa: E731
    ours = make()
    tp.inject(ours, tp.AdapterConfig(method="dora", rank=3, alpha=6, dropout=0.3, targets=["0", "2"], trainable=[]))
    with torch.no_grad():
        for _, layer in adapter_layers(ours):
            layer.lora_B.weight.normal_(0, 0.1)
    torch.manual_seed(0)
    config = peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"], lora_dropout=0.3, use_dora=True)
    theirs = peft.get_peft_model(make(), config)
    mapping = _dora_key_map(theirs)
    theirs.load_state_dict({mapping[k]: v for k, v in ours.state_dict().items() if ".lora_" in k}, strict=False)
    ours.train()
    theirs.train()
    x = torch.randn(16, 12, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    a = ours(x)
    torch.manual_seed(11)
    b = theirs(x)
    assert (a - b).abs().max().item() <= 1e-5
