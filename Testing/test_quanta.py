"""QuanTA (issue 4): factorisation, the contraction planner, counts, frozen-copy start, merge/save/load."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import TensorPEFTLib as tp
from TensorPEFTLib.adapters import AdapterError, adapter_layers
from TensorPEFTLib.adapters.quanta import (
    ContractionPlan,
    QuanTALayer,
    balanced_factors,
    channel_factors,
    quanta_parameter_count,
)

from adapter_checks import check_merge_unmerge_save_load, ddpm_out, train_steps
from conftest import tiny_ddpm


def test_channel_factors_table_balanced_and_refused():
    assert channel_factors(1024) == (16, 16, 4) and channel_factors(6) == (3, 2, 1)
    assert balanced_factors(36) == (4, 3, 3) and channel_factors(1000) == (10, 10, 10)
    assert channel_factors(13) == (13, 1, 1)  # small primes are still a (dense) split
    with pytest.raises(AdapterError, match="no sensible three-factor split"):
        channel_factors(2 * 37)
    assert channel_factors(74, {74: [37, 2, 1]}) == (37, 2, 1)
    with pytest.raises(AdapterError, match="product"):
        channel_factors(74, {"74": [5, 5, 3]})


def test_contraction_plan_matches_plain_einsum():
    gen = torch.Generator().manual_seed(0)
    equation = "bade,cefg,xghi,yjk,zjlm,Cmop,BpqA,oqrs,dftr,hlst->ABCabcxyz"
    shapes = [(2, 2, 3, 3), (1, 3, 3, 3), (3, 3, 3, 3), (3, 3, 3), (3, 3, 3, 3), (1, 3, 3, 3), (2, 3, 3, 3),
              (3, 3, 3, 3), (3, 3, 3, 3), (3, 3, 3, 3)]
    ops = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    plan = ContractionPlan(equation, shapes)
    assert len(plan.steps) == len(shapes) - 1
    torch.testing.assert_close(plan(*ops), torch.einsum(equation, *ops), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("fin,fout", [(64, 64), (128, 512), (512, 128), (96, 32)])
def test_quanta_counts_and_chain_semantics(fin, fout):
    layer = QuanTALayer(nn.Linear(fin, fout), tp.AdapterConfig(method="quanta", rank=3, options={"init": "zero"}), "l")
    cores = sum(c.numel() for c in layer.cores)
    fi, fo = channel_factors(fin), channel_factors(fout)
    if fi == fo:
        assert cores == sum((a * b) ** 2 for a, b in itertools.combinations(fi, 2))
    else:
        assert cores == 9 * (fi[1] * fi[2] + fo[2] * fi[0] + fo[0] * fo[1])
    assert cores == quanta_parameter_count(fin, fout, 3)
    # ΔW·x equals the circuit: T₀ on (i₂, i₃), then T₁ on (i₁, ·), then T₂ - applied to x step by step.
    with torch.no_grad():
        for c in layer.cores:
            c.normal_(generator=torch.Generator().manual_seed(c.numel()))
    x = torch.randn(fin, dtype=torch.float32)
    t0, t1, t2 = layer.cores
    y = torch.einsum("abc,BCbc->aBC", x.reshape(fi), t0)
    y = torch.einsum("aBC,DEaC->DBE", y, t1)
    y = torch.einsum("DBE,FGDB->FGE", y, t2).reshape(-1)
    torch.testing.assert_close(layer.delta_weight() @ x, y, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("init", ["frozen-copy", "zero"])
def test_quanta_injection_unchanged_and_linear_only(init):
    model = tiny_ddpm()
    reference = ddpm_out(model)
    summary = tp.inject(model, tp.AdapterConfig(method="quanta", rank=2, options={"init": init}))
    assert (ddpm_out(model) - reference).abs().max().item() <= 1e-5
    layers = list(adapter_layers(model))
    assert layers and all(isinstance(l.base_layer, nn.Linear) for _, l in layers)
    assert summary["adapter"] == sum(quanta_parameter_count(l.base_layer.in_features, l.base_layer.out_features, 2)
                                     for _, l in layers)


def test_quanta_merge_unmerge_save_load(tmp_path):
    model = tiny_ddpm()
    tp.inject(model, tp.AdapterConfig(method="quanta", rank=2))
    train_steps(model)
    check_merge_unmerge_save_load(model, tmp_path / "adapter")
