"""SeLoRA (issue 4): ranks grow where capacity is needed, optimiser state survives growth, ranks are saved."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import TensorPEFTLib as tp
from TensorPEFTLib.adapters import AdapterError, adapter_layers
from TensorPEFTLib.adapters.selora import SeLoRAGrowth, SeLoRALayer, selora_ranks

from adapter_checks import check_merge_unmerge_save_load, ddpm_out, train_steps
from conftest import ddpm_input, tiny_ddpm


class TwoBranches(nn.Module):
    """Two independent Linear layers; the loss is the sum of one regression per branch."""

    def __init__(self) -> None:
        super().__init__()
        self.easy = nn.Linear(16, 16)
        self.hard = nn.Linear(16, 16)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.easy(x1), self.hard(x2)


def regression_problem():
    """``easy`` needs a rank-1 change of its weight, ``hard`` a rank-8 change: only ``hard`` needs more capacity."""
    torch.manual_seed(0)
    model = TwoBranches()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w_easy = model.easy.weight + 0.3 * torch.randn(16, 1, generator=gen) @ torch.randn(1, 16, generator=gen)
        w_hard = model.hard.weight + 0.3 * torch.randn(16, 8, generator=gen) @ torch.randn(8, 16, generator=gen)
        x1, x2 = torch.randn(256, 16, generator=gen), torch.randn(256, 16, generator=gen)
        y1, y2 = x1 @ w_easy.T + model.easy.bias, x2 @ w_hard.T + model.hard.bias

    def loss() -> torch.Tensor:
        a, b = model(x1, x2)
        return (a - y1).pow(2).mean() + (b - y2).pow(2).mean()

    return model, loss


def test_rank_grows_where_needed_and_loss_falls():
    model, loss_fn = regression_problem()
    tp.inject(model, tp.AdapterConfig(method="selora", options={"every": 20, "threshold": 1.1}))
    assert selora_ranks(model) == {"easy": 1, "hard": 1}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    growth = SeLoRAGrowth(model, optimizer)
    first = loss_fn().item()
    # 600 steps: with fresh Adam steps for new components (lr-sized from their first step) the ranks grow later than
    # they did with the carried step count (hard: rank 5 at step 400, 6 at 600; loss 0.22 at 600 vs 16.1 at start).
    for _ in range(600):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        growth.step(loss_fn)
        optimizer.step()
    ranks = selora_ranks(model)
    assert ranks["hard"] >= 4 and ranks["easy"] == 1, ranks
    assert loss_fn().item() < 0.05 * first
    assert any(h["grew"] for h in growth.history) and any(not h["grew"] for h in growth.history)


def test_growth_keeps_optimizer_state_and_output():
    model, loss_fn = regression_problem()
    tp.inject(model, tp.AdapterConfig(method="selora", options={"max_rank": 3}))
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
    layer: SeLoRALayer = model.hard
    old_a, old_b = layer.lora_A, layer.lora_B
    old_state = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in optimizer.state[old_a].items()}
    old_state_b = {k: v.clone() for k, v in optimizer.state[old_b].items()}
    before = loss_fn().item()
    optimizer.zero_grad()
    loss_fn().backward()
    grown = SeLoRAGrowth(model, optimizer, every=1, threshold=1e-9).step(loss_fn)  # λ tiny: every layer grows
    assert grown == {"easy": 2, "hard": 2}
    assert loss_fn().item() == pytest.approx(before, rel=1e-6, abs=1e-7)  # new B column is zero: no jump
    new_a, new_b = layer.lora_A, layer.lora_B
    ids = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert id(new_a) in ids and id(new_b) in ids and id(old_a) not in ids and old_a not in optimizer.state
    state = optimizer.state[new_a]
    assert torch.equal(state["step"], old_state["step"])
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key].shape == new_a.shape
        assert torch.equal(state[key][:1], old_state[key]) and not state[key][1:].any()
        assert torch.equal(optimizer.state[new_b][key][:, :1], old_state_b[key])
        assert not optimizer.state[new_b][key][:, 1:].any()
    assert new_a.grad is not None and new_a.grad.shape == new_a.shape
    optimizer.step()  # the optimiser runs on the grown parameters
    assert not torch.equal(new_b[:, 1:], torch.zeros_like(new_b[:, 1:]))
    # The cap holds: max_rank 3 stops growth there.
    for _ in range(3):
        optimizer.zero_grad()
        loss_fn().backward()
        SeLoRAGrowth(model, optimizer, every=1, threshold=1e-9).step(loss_fn)
    assert selora_ranks(model) == {"easy": 3, "hard": 3}


def test_ranks_saved_and_rebuilt_on_ddpm(tmp_path):
    model = tiny_ddpm()
    reference = ddpm_out(model)
    tp.inject(model, tp.AdapterConfig(method="selora"))
    assert (ddpm_out(model) - reference).abs().max().item() <= 1e-5
    layers = dict(adapter_layers(model))
    assert any(l.is_conv for l in layers.values()) and any(not l.is_conv for l in layers.values())
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, t = ddpm_input()
    model.train()
    loss_fn = lambda: (model(x, timesteps=t) - 1.0).pow(2).mean()  # noqa: E731
    optimizer.zero_grad()
    loss_fn().backward()
    # fisher_floor=0: some layers of the freshly built tiny DDPM have Fisher scores below the floor (MONAI zeroes
    # conv2), which the default keeps at their rank; here every layer must grow.
    SeLoRAGrowth(model, optimizer, every=1, threshold=1e-9, max_rank=2, fisher_floor=0).step(loss_fn)
    optimizer.step()
    ranks = selora_ranks(model)
    assert set(ranks.values()) == {2}
    model.eval()
    train_steps(model, steps=1)
    check_merge_unmerge_save_load(model, tmp_path / "adapter")  # load into a fresh model: identical outputs
    fresh = tiny_ddpm()
    tp.load_adapter(fresh, tmp_path / "adapter")
    assert selora_ranks(fresh) == ranks


def test_options_are_validated():
    model, _ = regression_problem()
    with pytest.raises(AdapterError, match="no selora layers"):
        SeLoRAGrowth(model)
    tp.inject(model, tp.AdapterConfig(method="selora"))
    with pytest.raises(AdapterError, match="every"):
        SeLoRAGrowth(model, every=0)


def test_finetune_grows_ranks_through_the_trainer_and_resume_keeps_them(tmp_path):
    """The engine's loop runs SeLoRA's hook: ranks are reported in step events, saved, and a resumed run rebuilds
    the grown layers before its optimiser state is restored."""
    import synthetic
    from TensorPEFTLib.engine import Events, TrainSettings, finetune

    data = synthetic.write_volume_dataset(str(tmp_path / "vol"), n=2)
    model = synthetic.save_tiny_model(str(tmp_path / "ddpm.safetensors"), "ddpm")
    # fisher_floor=0, as in the DDPM save/load test: MONAI's zeroed conv2 leaves some Fisher scores of a fresh tiny
    # DDPM near the 1e-16 floor, and on an AMD EPYC (no AVX-512) one layer's fell below it, so it stayed at rank 1
    cfg = tp.AdapterConfig(method="selora", options={"every": 2, "threshold": 1e-9, "max_rank": 3, "fisher_floor": 0})
    out = str(tmp_path / "run")
    seen: list[dict] = []

    class Capture(Events):
        def emit(self, event, **fields):
            seen.append({"event": event, **fields})

    common = dict(device="cpu", patch_size=(16, 16, 16), threads=1)
    first = finetune(model, data, out, cfg, TrainSettings(steps=4, lr=3e-3, eval_every=100, checkpoint_every=2),
                     events=Capture(quiet=True), **common)
    assert first.status == "completed"
    reports = [e["selora_ranks"] for e in seen if e["event"] == "step" and "selora_ranks" in e]
    assert [e["step"] for e in seen if e["event"] == "step" and "selora_ranks" in e] == [2, 4]
    assert set(reports[0].values()) == {2} and set(reports[-1].values()) == {3}  # λ tiny: every layer grows to the cap
    saved = json.load(open(os.path.join(out, "adapter_config.json")))
    assert {m["rank"] for m in saved["layer_meta"].values()} == {3}
    resumed = finetune(model, data, out, None, TrainSettings(steps=6, lr=3e-3, eval_every=100, checkpoint_every=2),
                       events=Events(quiet=True), resume=True, **common)
    assert resumed.status == "completed" and resumed.step == 6


def _one_layer_problem():
    """A 12 → 12 Linear fitting a rank-4 change of its weight (so the gradients stay informative while it trains)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 12))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        x = torch.randn(64, 12, generator=gen)
        target = model[0].weight + 0.5 * torch.randn(12, 4, generator=gen) @ torch.randn(4, 12, generator=gen)
        y = x @ target.T + model[0].bias
    return model, lambda: (model(x) - y).pow(2).mean()


@pytest.mark.parametrize("make_optimizer", [
    lambda params: torch.optim.Adam(params, lr=1e-2),
    lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1),
    lambda params: torch.optim.Adam(params, lr=1e-2, amsgrad=True),
], ids=["adam", "adamw", "amsgrad"])
def test_new_rank_components_step_as_fresh_adam_parameters(make_optimizer):
    """Growth at step 30: the new row of A / column of B must move as a fresh Adam parameter given the same
    gradients (first update lr-sized), the old components as if nothing had grown, also across a state_dict
    round trip of the optimiser (a resumed run). With Adam's carried step count the new column's first update
    is about 0.57 lr here (up to 3.2 lr late in a run)."""
    model, loss_fn = _one_layer_problem()
    tp.inject(model, tp.AdapterConfig(method="selora", options={"max_rank": 2}))
    layer: SeLoRALayer = model[0]
    optimizer = make_optimizer([layer.lora_A, layer.lora_B])
    for _ in range(30):
        optimizer.zero_grad()
        loss_fn().backward()
        optimizer.step()
    # Reference: the old factors with their carried state, the new components as separate fresh parameters.
    old = [nn.Parameter(layer.lora_A.detach().clone()), nn.Parameter(layer.lora_B.detach().clone())]
    carried = make_optimizer(old)
    for ref, p in zip(old, (layer.lora_A, layer.lora_B)):
        carried.state[ref] = {k: v.clone() for k, v in optimizer.state[p].items()}
    optimizer.zero_grad()
    loss_fn().backward()
    assert SeLoRAGrowth(model, optimizer, every=1, threshold=1e-9).step(loss_fn) == {"0": 2}
    new = [nn.Parameter(layer.lora_A[1:].detach().clone()), nn.Parameter(layer.lora_B[:, 1:].detach().clone())]
    fresh = make_optimizer(new)
    before = layer.lora_B[:, 1:].detach().clone()
    for step in range(4):
        if step == 2:  # resume: a new optimiser from the saved state, and a new growth hook bound to it
            reloaded = make_optimizer([layer.lora_A, layer.lora_B])
            reloaded.load_state_dict(optimizer.state_dict())
            optimizer = reloaded
            SeLoRAGrowth(model, every=1000).bind(optimizer)
        if step:
            optimizer.zero_grad()
            loss_fn().backward()
        a_grad, b_grad = layer.lora_A.grad, layer.lora_B.grad
        old[0].grad, old[1].grad = a_grad[:1].clone(), b_grad[:, :1].clone()
        new[0].grad, new[1].grad = a_grad[1:].clone(), b_grad[:, 1:].clone()
        optimizer.step()
        carried.step()
        fresh.step()
        if step == 0:
            first = (layer.lora_B[:, 1:] - before).abs()
            assert first.max().item() == pytest.approx(1e-2, rel=1e-3)  # lr-sized, as a fresh parameter's first step
        torch.testing.assert_close(layer.lora_A.detach(), torch.cat([old[0], new[0]], 0).detach(), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(layer.lora_B.detach(), torch.cat([old[1], new[1]], 1).detach(), rtol=1e-5, atol=1e-7)


def test_layer_whose_fisher_score_is_always_tiny_keeps_its_rank():
    """A layer that barely reaches the loss (its Fisher score about 1e-18 from the first test on, so its own peak
    is tiny too) keeps its rank: its FI ratio is noise-level arithmetic however far above λ it lands. The
    ``idle_fraction`` rule, relative to that own peak, let it grow."""
    model, _ = regression_problem()
    gen = torch.Generator().manual_seed(2)
    x1, x2, y1, y2 = (torch.randn(64, 16, generator=gen) for _ in range(4))

    def loss_fn() -> torch.Tensor:
        a, b = model(x1, x2)
        return (a - y1).pow(2).mean() + 1e-9 * (b - y2).pow(2).mean()

    tp.inject(model, tp.AdapterConfig(method="selora"))
    growth = SeLoRAGrowth(model, every=1, threshold=1.1)
    loss_fn().backward()
    grown = growth.step(loss_fn)
    rows = {h["layer"]: h for h in growth.history}
    assert rows["hard"]["fisher"] < 1e-16 and rows["hard"]["fisher_new"] / rows["hard"]["fisher"] >= 1.1
    assert grown == {"easy": 2} and rows["hard"]["idle"]
    # Both rules off: the paper's rule, which grows it.
    model, _ = regression_problem()
    tp.inject(model, tp.AdapterConfig(method="selora", options={"fisher_floor": 0, "idle_fraction": 0}))
    loss_fn().backward()
    assert SeLoRAGrowth(model, every=1).step(loss_fn) == {"easy": 2, "hard": 2}
