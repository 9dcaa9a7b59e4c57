"""LoRA-PT, tCURLoRA and LoTR: stacking, exact start, training, merge/save, counts, errors.

Expected counts are written as the papers' formulas over the model's shapes (see /work/shared/reference.md), so a
wrong stacking or a factor left out of the model changes them.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_unetr, unetr_input
from torch import nn

import TensorPEFTLib as tp
from TensorPEFTLib.adapters import AdapterError, adapter_layers
from TensorPEFTLib.adapters.tensor_algebra import t_pinv, t_svd, t_svd_product, truncated_t_svd

METHODS = ["lora-pt", "tcurlora", "lotr"]


def _weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _effective(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each adapted layer's effective weight W + ΔW, recomputed from the current factors."""
    for group in model.tensorpeft_groups.values():
        group.clear_cache()
    with torch.no_grad():
        out = {n: (layer.base_layer.weight + layer.delta_weight()).clone() for n, layer in adapter_layers(model)}
    for group in model.tensorpeft_groups.values():
        group.clear_cache()
    return out


def _train_step(model: nn.Module, x: torch.Tensor, lr: float = 1e-2) -> None:
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    target = torch.randn(1, 2, *x.shape[2:], generator=torch.Generator().manual_seed(3))
    loss = (model(x) - target).pow(2).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def _original_stack(model: nn.Module, blocks: int, part: str) -> torch.Tensor:
    """The stacks as the papers define them, built from an un-adapted model by hand."""
    slices = []
    for b in range(blocks):
        blk = model.vit.blocks[b]
        if part == "sa":
            d = blk.attn.out_proj.weight.shape[0]
            qkv = blk.attn.qkv.weight.detach()
            slices += [blk.attn.out_proj.weight.detach(), qkv[:d], qkv[d:2 * d], qkv[2 * d:]]
        else:
            slices.append((blk.mlp.linear1 if part == "up" else blk.mlp.linear2).weight.detach())
    return torch.stack(slices).clone()


# --------------------------------------------------------------------------------------------- structure


def test_stacks_follow_the_paper_layout() -> None:
    model = tiny_unetr()
    original = {part: _original_stack(model, 4, part) for part in ("sa", "up", "down")}
    tp.inject(model, tp.AdapterConfig(method="tcurlora", rank=2))
    groups = model.tensorpeft_groups
    assert set(groups) == {"sa", "up", "down"}
    assert (groups["sa"].n, groups["sa"].rows, groups["sa"].cols) == (16, 48, 48)
    assert (groups["up"].n, groups["up"].rows, groups["up"].cols) == (4, 192, 48)
    assert (groups["down"].n, groups["down"].rows, groups["down"].cols) == (4, 48, 192)
    assert groups["sa"].member_names[:2] == ["vit.blocks.0.attn.out_proj", "vit.blocks.0.attn.qkv"]
    # C = W(:, I, :) must be taken from the stack in the order out_proj, q, k, v per block.
    for part, group in groups.items():
        assert torch.equal(group.C, original[part][:, :, group.col_index])
        assert torch.equal(group.R, original[part][:, group.row_index, :])


@pytest.mark.parametrize("method", METHODS)
def test_group_computes_once_per_forward_and_members_read_their_slices(method: str) -> None:
    model = tiny_unetr()
    tp.inject(model, tp.AdapterConfig(method=method, rank=2))
    with torch.no_grad():  # non-zero factors so each slice is distinct
        for p in model.tensorpeft_groups.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    calls = {name: 0 for name in model.tensorpeft_groups}
    for name, group in model.tensorpeft_groups.items():
        original = group.compute_deltas

        def counted(name=name, original=original):
            calls[name] += 1
            return original()

        group.compute_deltas = counted
    with torch.no_grad():
        model(unetr_input())
    assert calls == {"sa": 1, "up": 1, "down": 1}
    for group in model.tensorpeft_groups.values():
        del group.compute_deltas  # back to the method
    sa = model.tensorpeft_groups["sa"]
    with torch.no_grad():
        full = sa.stack_delta()
        qkv = model.vit.blocks[1].attn.qkv.delta_weight()
        out_proj = model.vit.blocks[1].attn.out_proj.delta_weight()
    assert torch.equal(out_proj, full[4])
    assert torch.equal(qkv, torch.cat([full[5], full[6], full[7]], dim=0))


# --------------------------------------------------------------------------------------------- exact start


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("depth,hidden", [(4, 48), (8, 32)])
def test_output_unchanged_at_injection(method: str, depth: int, hidden: int) -> None:
    model = tiny_unetr(num_layers=depth, hidden=hidden)
    x = unetr_input()
    with torch.no_grad():
        before = model(x)
    tp.inject(model, tp.AdapterConfig(method=method, rank=2))
    with torch.no_grad():
        after = model(x)
    assert (after - before).abs().max() <= 1e-5


def test_lora_pt_starts_from_the_truncated_t_svd_with_the_residual_frozen() -> None:
    model = tiny_unetr()
    w_up = _original_stack(model, 4, "up")
    tp.inject(model, tp.AdapterConfig(method="lora-pt", rank=3))
    group = model.tensorpeft_groups["up"]
    principal = t_svd_product(*truncated_t_svd(w_up, 3))
    with torch.no_grad():
        assert torch.allclose(group.stack_delta(), principal, atol=1e-5)
        residual = torch.stack([model.vit.blocks[b].mlp.linear1.base_layer.weight for b in range(4)])
        assert torch.allclose(residual, w_up - principal, atol=1e-5)
    assert group.S.shape == (4, 3) and group.U.shape == (4, 192, 3) and group.V.shape == (4, 48, 3)


def test_lora_pt_starts_from_the_exact_t_svd_on_wide_random_weights() -> None:
    """Slices wider than 512 with a flat (random-init) spectrum: the default init is the exact truncated t-SVD. The
    randomized t-SVD the default used there (8 power iterations) was 17 % off on the paper UNETR."""
    from monai.networks.nets import ViT

    torch.manual_seed(0)
    vit = ViT(in_channels=1, img_size=16, patch_size=16, hidden_size=520, mlp_dim=520, num_layers=2, num_heads=8)
    stacks = {"sa": [], "up": [], "down": []}
    for blk in vit.blocks:
        qkv = blk.attn.qkv.weight.detach()
        stacks["sa"] += [blk.attn.out_proj.weight.detach(), *qkv.chunk(3)]
        stacks["up"].append(blk.mlp.linear1.weight.detach())
        stacks["down"].append(blk.mlp.linear2.weight.detach())
    stacks = {name: torch.stack(slices).double() for name, slices in stacks.items()}
    tp.inject(vit, tp.AdapterConfig(method="lora-pt", rank=1))
    for name, w in stacks.items():
        u, s, v = t_svd(w)  # every singular triplet, LAPACK, float64
        exact = t_svd_product(u[..., :1], s[:, :1], v[..., :1])
        with torch.no_grad():
            init = vit.tensorpeft_groups[name].stack_delta().double()
        assert (init - exact).norm() / exact.norm() < 1e-5, name


def test_tcurlora_choice_of_columns_and_rows_and_its_core() -> None:
    model = tiny_unetr()
    w = _original_stack(model, 4, "down")
    tp.inject(model, tp.AdapterConfig(method="tcurlora", rank=3))
    group = model.tensorpeft_groups["down"]
    # Released-code rule, written with the full FFT (all n bins): top column norms summed over slices, then rows.
    w_hat = torch.fft.fft(w, dim=0)
    cols = torch.linalg.vector_norm(w_hat, dim=1).sum(dim=0).argsort(descending=True)[:3]
    rows = torch.linalg.vector_norm(w_hat[:, :, cols], dim=2).sum(dim=0).argsort(descending=True)[:3]
    assert group.col_index.tolist() == cols.tolist()
    assert group.row_index.tolist() == rows.tolist()
    assert torch.allclose(group.U0, t_pinv(w[:, rows][:, :, cols]), atol=1e-5)
    assert torch.equal(group.U, group.U0) and group.U.requires_grad and not group.U0.requires_grad


def test_lotr_starts_with_zero_cores_and_orthonormal_shared_factors() -> None:
    model = tiny_unetr()
    tp.inject(model, tp.AdapterConfig(method="lotr", rank=4))
    group = model.tensorpeft_groups["up"]
    assert torch.count_nonzero(group.M) == 0 and group.M.shape == (4, 4, 4)
    assert torch.allclose(group.L.T @ group.L, torch.eye(4), atol=1e-5)
    assert torch.allclose(group.R.T @ group.R, torch.eye(4), atol=1e-5)


def test_lotr_fused_qkv_layout_gives_four_stacks_of_whole_weights(tmp_path) -> None:
    """``stacks=qkv-proj-up-down``: one stack per weight shape, each layer's whole weight a slice (qkv fused), the
    grouping of the LoRA-PT paper's LoTR count; exact start, training and save/load as the default layout."""
    model = tiny_unetr()
    x = unetr_input()
    with torch.no_grad():
        before = model(x)
    cfg = tp.AdapterConfig(method="lotr", rank=2, trainable=[], options={"stacks": "qkv-proj-up-down"})
    report = tp.inject(model, cfg)
    groups = model.tensorpeft_groups
    assert list(groups) == ["qkv", "proj", "up", "down"]
    shapes = {name: (g.n, g.rows, g.cols) for name, g in groups.items()}
    assert shapes == {"qkv": (4, 144, 48), "proj": (4, 48, 48), "up": (4, 192, 48), "down": (4, 48, 192)}
    assert report["adapter"] == sum(rows * 2 + cols * 2 + n * 4 for n, rows, cols in shapes.values())
    with torch.no_grad():
        assert (model(x) - before).abs().max() <= 1e-5
        for p in groups.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        qkv = model.vit.blocks[2].attn.qkv.delta_weight()
        assert torch.equal(qkv, groups["qkv"].stack_delta()[2])  # one slice per fused qkv weight
        after = model(x)
    tp.save_adapter(model, tmp_path / "adapter")
    fresh = tiny_unetr()
    tp.load_adapter(fresh, tmp_path / "adapter")  # the saved option rebuilds the same four stacks
    with torch.no_grad():
        assert (fresh(x) - after).abs().max() <= 1e-6
    with pytest.raises(AdapterError, match="option stacks must be one of"):
        tp.inject(tiny_unetr(), tp.AdapterConfig(method="lotr", rank=2, options={"stacks": "sa"}))


# --------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("method", METHODS)
def test_factors_are_model_parameters_and_one_step_changes_every_vit_weight(method: str) -> None:
    model = tiny_unetr()
    tp.inject(model, tp.AdapterConfig(method=method, rank=2))
    group_params = {id(p) for p in model.tensorpeft_groups.parameters()}
    assert group_params and group_params <= {id(p) for p in model.parameters() if p.requires_grad}
    assert any(k.startswith("tensorpeft_groups.sa.") for k in model.state_dict())
    before = _effective(model)
    x = unetr_input()
    model.train()
    (model(x) - 1.0).pow(2).mean().backward()
    grads = {n: p.grad for n, p in model.tensorpeft_groups.named_parameters()}
    for name, grad in grads.items():
        assert grad is not None, name
        if method != "lotr" or name.endswith(".M"):  # LoTR's L, R get no gradient while M = 0 (as LoRA's A)
            assert grad.abs().sum() > 0, name
    model.zero_grad()
    _train_step(model, x)
    after = _effective(model)
    assert before.keys() == after.keys() and len(after) == 4 * 4
    for name in before:
        assert (after[name] - before[name]).abs().max() > 1e-6, f"{name} did not change"


@pytest.mark.parametrize("method", METHODS)
def test_merge_unmerge_save_load_after_training(method: str, tmp_path) -> None:
    model = tiny_unetr()
    cfg = tp.AdapterConfig(method=method, rank=2)
    tp.inject(model, cfg)
    x = unetr_input()
    _train_step(model, x)
    with torch.no_grad():
        unmerged = model(x)
        weights = _weights(model)
        tp.merge(model)
        merged = model(x)
        tp.unmerge(model)
        restored = _weights(model)
    assert (merged - unmerged).abs().max() <= 1e-5
    assert max((restored[k] - weights[k]).abs().max().item() for k in weights) <= 1e-6

    tp.save_adapter(model, tmp_path / "adapter")
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "adapter" / "adapter.safetensors"))
    group_keys = {k for k in saved if k.startswith("tensorpeft_groups.")}
    # Only what trained: the factors, no recomputable buffers (C, R, U0, indices).
    assert group_keys == {f"tensorpeft_groups.{k}" for k, _ in model.tensorpeft_groups.named_parameters()}

    fresh = tiny_unetr()
    tp.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        reloaded = fresh(x)
    assert (reloaded - unmerged).abs().max() <= 1e-6


# --------------------------------------------------------------------------------------------- counts


def _expected_adapter(method: str, r: int, blocks: int, d: int, d_mlp: int) -> int:
    """The papers' counts: real U (d1×r×n), S (r×n), V (d2×r×n) for LoRA-PT; r×r×n for tCURLoRA;
    LoTR: L (d1×r) + R (d2×r) + M (r×r×n) per stack. Stacks: (4·blocks, d, d), (blocks, d_mlp, d), (blocks, d, d_mlp)."""
    stacks = [(4 * blocks, d, d), (blocks, d_mlp, d), (blocks, d, d_mlp)]
    if method == "lora-pt":
        return sum(n * (d1 * r + d2 * r + r) for n, d1, d2 in stacks)
    if method == "tcurlora":
        return sum(n * r * r for n, _, _ in stacks)
    return sum(d1 * r + d2 * r + n * r * r for n, d1, d2 in stacks)


@pytest.mark.parametrize("method", METHODS)
def test_counts_on_small_models(method: str) -> None:
    for depth, hidden in [(4, 48), (8, 32)]:
        model = tiny_unetr(num_layers=depth, hidden=hidden)
        report = tp.inject(model, tp.AdapterConfig(method=method, rank=2, trainable=[]))
        assert report["adapter"] == _expected_adapter(method, 2, depth, hidden, 4 * hidden)
        assert report["trainable"] == report["adapter"]


@pytest.fixture(scope="module")
def paper_unetr() -> nn.Module:
    return tp.build_model("unetr-paper")


@pytest.mark.parametrize("method,rank,trainable,adapter", [
    # reference.md: 165,960 adapter + 2,678,562 decoder path = 2,844,522 (paper 2.8445M)
    ("lora-pt", 1, 2_844_522, 165_960),
    # reference.md: 72·r² = 4,608 adapter + 2,678,562 = 2,683,170 (paper 2.683M)
    ("tcurlora", 8, 2_683_170, 4_608),
])
def test_paper_unetr_counts(paper_unetr: nn.Module, method: str, rank: int, trainable: int, adapter: int) -> None:
    model = copy.deepcopy(paper_unetr)
    report = tp.inject(model, tp.AdapterConfig(method=method, rank=rank))
    assert report["adapter"] == adapter == _expected_adapter(method, rank, 12, 768, 3072)
    assert report["trainable"] == trainable


@pytest.mark.parametrize("stacks,trainable,adapter", [
    # default: LoRA-PT's three stacks, 3 shared L/R pairs: (768+768)·2 + 48·4 + 2·((3072+768)·2 + 12·4) = 18,720
    ("sa-up-down", 2_697_282, 18_720),
    # four stacks, qkv fused: (2304+768)·2 + (768+768)·2 + 2·(3840·2) + 4·12·4 = 24,768; + decoder 2,678,562 =
    # 2,703,330, the LoRA-PT paper's LoTR row (2.7033M)
    ("qkv-proj-up-down", 2_703_330, 24_768),
])
def test_paper_unetr_lotr_counts_of_both_layouts(paper_unetr: nn.Module, stacks: str, trainable: int,
                                                 adapter: int) -> None:
    model = copy.deepcopy(paper_unetr)
    report = tp.inject(model, tp.AdapterConfig(method="lotr", rank=2, options={"stacks": stacks}))
    assert (report["adapter"], report["trainable"]) == (adapter, trainable)


# --------------------------------------------------------------------------------------------- errors


def test_vit_with_layers_of_different_sizes_is_refused() -> None:
    model = tiny_unetr()
    model.vit.blocks[1].mlp.linear1 = nn.Linear(48, 96)
    with pytest.raises(AdapterError, match=r"up layers: their slices differ in size \(192×48 .*96×48"):
        tp.inject(model, tp.AdapterConfig(method="lora-pt", rank=1))


def test_missing_role_in_one_block_is_refused() -> None:
    model = tiny_unetr()
    targets = [r"vit\.blocks\.\d+\.attn\.qkv", r"vit\.blocks\.[013]\.attn\.out_proj"]
    with pytest.raises(AdapterError, match=r"block vit\.blocks\.2 has no selected out_proj"):
        tp.inject(model, tp.AdapterConfig(method="tcurlora", rank=1, targets=targets))


def test_narrowed_targets_give_fewer_stacks() -> None:
    model = tiny_unetr()
    tp.inject(model, tp.AdapterConfig(method="lotr", rank=1, targets=[r"mlp\.linear1"]))
    assert list(model.tensorpeft_groups) == ["up"]


def test_layer_outside_transformer_blocks_and_too_large_rank_are_refused() -> None:
    generic = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(AdapterError, match="none of these"):
        tp.inject(generic, tp.AdapterConfig(method="lora-pt", rank=1, targets=[".*"]))
    with pytest.raises(AdapterError, match="rank 49 is too large"):
        tp.inject(tiny_unetr(), tp.AdapterConfig(method="tcurlora", rank=49))


def test_bare_monai_vit_gets_vit_targets_by_default() -> None:
    from monai.networks.nets import ViT

    torch.manual_seed(0)
    vit = ViT(in_channels=1, img_size=16, patch_size=8, hidden_size=24, mlp_dim=48, num_layers=2, num_heads=2).eval()
    x = torch.randn(1, 1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = vit(x)[0]
    report = tp.inject(vit, tp.AdapterConfig(method="lora-pt", rank=2))
    assert report["layers_wrapped"] == 8
    with torch.no_grad():
        assert (vit(x)[0] - before).abs().max() <= 1e-5


def test_fft_route_for_large_ranks_gives_the_same_update(monkeypatch) -> None:
    import TensorPEFTLib.adapters.tensor_stack as tensor_stack

    model = tiny_unetr()
    tp.inject(model, tp.AdapterConfig(method="lora-pt", rank=2))
    group = model.tensorpeft_groups["sa"]
    with torch.no_grad():
        group.S.mul_(1.5)  # any trained state
        circulant = group.stack_delta()
        monkeypatch.setattr(tensor_stack, "CIRCULANT_MAX_INNER", 0)
        fft = group.stack_delta()
    assert torch.allclose(fft, circulant, atol=1e-5) and circulant.abs().max() > 1e-3
