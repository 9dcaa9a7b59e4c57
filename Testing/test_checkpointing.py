"""Activation checkpointing (``finetune --checkpointing``) with every adaptation method.

The contract (issue 19): with the UNETR's ViT blocks or the DDPM's resnet blocks checkpointed, one loss's gradient
with respect to every trainable parameter equals the plain pass's to 1e-6 (fp32, one thread), for all 14 methods.
Before the fix, LoRA-PT, tCURLoRA and LoTR raised ``CheckpointError: Recomputed values ... have different metadata``:
their shared stack factors were built inside whichever block ran first and cleared after the pass, so a recomputed
block rebuilt them.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import ddpm_input, tiny_ddpm, tiny_unetr, unetr_input
from torch import nn

import TensorPEFTLib as tp
from TensorPEFTLib.adapters import method_names
from TensorPEFTLib.adapters.model import original_name
from TensorPEFTLib.engine import EngineError
from TensorPEFTLib.engine.checkpointing import checkpointed_blocks, disable_checkpointing, enable_checkpointing

#: the cross-layer methods stack the linear layers of transformer blocks: UNETR's ViT only
STACK_METHODS = ("lora-pt", "tcurlora", "lotr")
#: gradients with and without checkpointing may differ by this much at most (the issue's bound)
GRAD_TOLERANCE = 1e-6
#: the largest difference found per (model, method), printed at the end of the module (pytest -s) for the record
MEASURED: dict[str, float] = {}


@pytest.fixture(autouse=True)
def one_thread():
    # one thread: the same reduction order in both passes (and two threads on a shared 2-core machine are slower)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def report_measured():
    yield
    if MEASURED:
        print("\nlargest |gradient with checkpointing - without| per case:")
        for case, diff in sorted(MEASURED.items()):
            print(f"  {case:24s} {diff:.3g}")


def _unetr_loss(model: nn.Module) -> torch.Tensor:
    x = unetr_input()
    target = torch.randint(0, 2, (1, *x.shape[2:]), generator=torch.Generator().manual_seed(5))
    return F.cross_entropy(model(x), target)


def _ddpm_loss(model: nn.Module) -> torch.Tensor:
    x, t = ddpm_input()
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    return F.mse_loss(model(x, timesteps=t), noise)


MODELS = {"unetr": (tiny_unetr, _unetr_loss), "ddpm": (tiny_ddpm, _ddpm_loss)}
CASES = [("unetr", m) for m in method_names()] + [("ddpm", m) for m in method_names() if m not in STACK_METHODS]


def _adapted(family: str, method: str, checkpointing: bool) -> nn.Module:
    build, _ = MODELS[family]
    model = build()
    tp.inject(model, tp.AdapterConfig(method=method, rank=2))
    if checkpointing:
        assert enable_checkpointing(model)
    return model.train()


def _gradients(model: nn.Module, loss_of) -> dict[str, torch.Tensor]:
    loss_of(model).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def test_the_catalog_has_the_14_methods():
    assert len(method_names()) == 14 and set(STACK_METHODS) <= set(method_names())


@pytest.mark.parametrize("family,method", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_gradients_with_and_without_checkpointing_agree(family, method):
    _, loss_of = MODELS[family]
    plain = _adapted(family, method, checkpointing=False)
    ckpt = _adapted(family, method, checkpointing=True)
    expected = {"unetr": 4, "ddpm": 11}[family]  # tiny UNETR: 4 ViT blocks; tiny DDPM: 3 down, 2 middle, 6 up resnets
    assert len(checkpointed_blocks(ckpt)) == expected
    for (name, a), (_, b) in zip(plain.state_dict().items(), ckpt.state_dict().items()):
        assert torch.equal(a, b), name  # the same model and adapter before the passes

    # A block of the checkpointed model must run twice per training pass (once more in backward): counted on the
    # first module inside the first block, whose hooks run again on recomputation (torch stops a recomputation once
    # it has what backward needs, so a module late in the block may not run again).
    inner = (ckpt.vit.blocks[0] if family == "unetr" else ckpt.down_blocks[0].resnets[0]).norm1
    calls = []
    inner.register_forward_pre_hook(lambda *_: calls.append(1))

    want = _gradients(plain, loss_of)
    got = _gradients(ckpt, loss_of)
    assert len(calls) == 2, "the block was not recomputed: checkpointing is not in effect"
    assert want.keys() == got.keys() and want
    # every parameter the adapter added gets a gradient, and some of it is non-zero (else the test were vacuous);
    # full fine-tuning adds none: there, any weight's
    base_names = {n for n, _ in MODELS[family][0]().named_parameters()}
    added = [n for n, p in plain.named_parameters() if p.requires_grad and original_name(n) not in base_names]
    assert set(added) <= set(want), sorted(set(added) - set(want))[:5]
    own = [want[n] for n in added] if method != "full" else list(want.values())
    assert own and any(g.abs().max() > 0 for g in own), "no gradient reached the adapter"
    worst = max((want[n] - got[n]).abs().max().item() for n in want)
    MEASURED[f"{family} {method}"] = worst
    assert worst <= GRAD_TOLERANCE, (method, worst)



# --------------------------------------------------------------------------------------------- the shared factors


def _stack_grads(method: str, checkpointing: bool, batch: int = 1, passes: int = 1) -> dict[str, torch.Tensor]:
    model = _adapted("unetr", method, checkpointing)
    target = torch.randint(0, 2, (batch, 32, 32, 32), generator=torch.Generator().manual_seed(5))
    loss = sum(F.cross_entropy(model(unetr_input(batch=batch) * (1 + i)), target) for i in range(passes))
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_equal_grads(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor], case: str) -> None:
    assert want.keys() == got.keys()
    worst = max((want[n] - got[n]).abs().max().item() for n in want)
    MEASURED[case] = worst
    assert worst <= GRAD_TOLERANCE, worst


@pytest.mark.parametrize("method", STACK_METHODS)
def test_shared_factors_are_computed_once_per_pass_outside_the_blocks(method, monkeypatch):
    """One ``compute_deltas`` per group and pass, none in the recomputations of backward."""
    from TensorPEFTLib.adapters.tensor_stack import TensorStackGroup

    calls = []
    for cls in TensorStackGroup.__subclasses__():
        original = cls.compute_deltas
        monkeypatch.setattr(cls, "compute_deltas", lambda self, _f=original: calls.append(self) or _f(self))
    model = _adapted("unetr", method, checkpointing=True)
    calls.clear()  # LoRA-PT's injection computed them once to fold the residual
    groups = list(model.tensorpeft_groups.values())
    assert all(g._cache is None for g in groups)
    _unetr_loss(model).backward()
    assert sorted(map(id, calls)) == sorted(map(id, groups))
    assert all(g._cache is None for g in groups)  # nothing held after the pass


@pytest.mark.parametrize("method", STACK_METHODS)
def test_two_passes_then_one_backward(method):
    """Gradient accumulation within one graph: each recomputed block reads the results of its own pass, though
    the second pass computed new ones (equal in value, other tensors) before backward ran."""
    _assert_equal_grads(_stack_grads(method, False, passes=2), _stack_grads(method, True, passes=2),
                        f"unetr {method} 2 passes")


@pytest.mark.parametrize("method", ["lora-pt", "tcurlora"])
def test_materialised_updates_under_checkpointing(method, monkeypatch):
    """With many tokens a member forms its ΔW from the shared factors instead of applying them to activations
    (``StackMemberLayer.adapter_forward``); that product is repeated in the recomputation, not read from the
    forward's. (LoTR's inner size is its rank: at rank 2 its factored path is always the cheaper one.)"""
    from TensorPEFTLib.adapters.tensor_stack import StackSlices

    reads = []
    original = StackSlices.__getitem__
    monkeypatch.setattr(StackSlices, "__getitem__", lambda self, i: reads.append(i) or original(self, i))
    want = _stack_grads(method, False, batch=6)
    assert reads, "batch 6 of the tiny UNETR should take the materialised path"
    _assert_equal_grads(want, _stack_grads(method, True, batch=6), f"unetr {method} batch 6")


def test_a_block_called_alone_computes_the_factors_itself():
    """Outside the model's forward (no pre-hook) the first member computes the group's results inside the
    checkpointed block; the recomputation then repeats that computation, as the forward did."""
    grads = []
    for checkpointing in (False, True):
        model = _adapted("unetr", "lora-pt", checkpointing)
        x = torch.randn(1, 8, 48, generator=torch.Generator().manual_seed(4))
        model.vit.blocks[1](x).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        for group in model.tensorpeft_groups.values():
            group.clear_cache()
    _assert_equal_grads(grads[0], grads[1], "unetr lora-pt block alone")


# --------------------------------------------------------------------------------------------- the helper


def test_inference_output_unchanged_and_checkpointing_undone():
    model = _adapted("unetr", "lotr", checkpointing=False).eval()
    with torch.no_grad():
        before = model(unetr_input())
    names = enable_checkpointing(model)
    assert enable_checkpointing(model) == names  # wrapping twice changes nothing
    with torch.no_grad():
        assert torch.equal(model(unetr_input()), before)
    assert disable_checkpointing(model) == len(names) and checkpointed_blocks(model) == []


def test_names_and_copies_are_unaffected(tmp_path):
    plain = _adapted("unetr", "lora-pt", checkpointing=False)
    ckpt = _adapted("unetr", "lora-pt", checkpointing=True)
    assert list(plain.state_dict()) == list(ckpt.state_dict())
    assert tp.adapters.architecture_fingerprint(plain) == tp.adapters.architecture_fingerprint(ckpt)
    copied = copy.deepcopy(ckpt)
    assert checkpointed_blocks(copied) == checkpointed_blocks(ckpt)
    assert copied.vit.blocks[0].forward.block is copied.vit.blocks[0]  # the copy runs its own blocks
    _assert_equal_grads(_gradients(plain, _unetr_loss), _gradients(copied, _unetr_loss), "unetr lora-pt deepcopy")
    assert all(p.grad is None for p in ckpt.parameters())  # nothing reached the original


def test_unknown_architecture_is_refused_in_one_line():
    with pytest.raises(EngineError, match="knows the transformer blocks .* Sequential is neither") as err:
        enable_checkpointing(nn.Sequential(nn.Linear(2, 2)))
    assert "\n" not in str(err.value)


# --------------------------------------------------------------------------------------------- finetune


@pytest.fixture(scope="module")
def seg_data(tmp_path_factory):
    import synthetic

    root = tmp_path_factory.mktemp("ckpt")
    synthetic.write_segmentation_dataset(str(root / "data"), n_train=2, n_test=0, seed=0)
    return root, synthetic.save_tiny_model(str(root / "unetr.safetensors"))


def _finetune_cli(root, model: str, out: str, *extra: str) -> int:
    from TensorPEFTLib.cli import main

    return main(["finetune", "--model", model, "--data", str(root / "data"), "--out", out, "--method", "lora-pt",
                 "--rank", "1", "--steps", "2", "--batch-size", "1", "--no-val", "--device", "cpu", "--amp", "off",
                 "--threads", "1", "--quiet", *extra])


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_finetune_checkpointing_trains_the_same_adapter_and_resume_keeps_it(seg_data, capsys):
    from safetensors.torch import load_file

    root, model = seg_data
    plain, ckpt = str(root / "plain"), str(root / "ckpt")
    assert _finetune_cli(root, model, plain) == 0
    assert _finetune_cli(root, model, ckpt, "--checkpointing") == 0
    saved = json.load(open(os.path.join(ckpt, "adapter_config.json")))
    assert saved["checkpointing"] is True and saved["trained_steps"] == 2
    assert json.load(open(os.path.join(plain, "adapter_config.json")))["checkpointing"] is False
    # the same gradients, so the same two Adam steps: the same adapter
    a, b = load_file(os.path.join(plain, "adapter.safetensors")), load_file(os.path.join(ckpt, "adapter.safetensors"))
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    MEASURED["finetune lora-pt 2 steps (weights)"] = worst
    assert worst <= GRAD_TOLERANCE

    capsys.readouterr()
    assert _finetune_cli(root, model, ckpt, "--resume", "--steps", "3", "--events", "-") == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    start = next(e for e in events if e["event"] == "start")
    assert start["checkpointing"] is True and start["resumed"] is True  # kept without the flag
    assert json.load(open(os.path.join(ckpt, "adapter_config.json")))["checkpointing"] is True

