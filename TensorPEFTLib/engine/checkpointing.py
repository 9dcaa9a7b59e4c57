"""Activation checkpointing of a model's large blocks (``finetune --checkpointing``).

Training keeps every block's activations until backward. With checkpointing a block keeps only its inputs and
runs again during backward to rebuild the rest: less memory for about one more forward pass of those blocks. The
gradients are those of the plain pass (the same operations run again on the same inputs).

Which blocks (:data:`CHECKPOINT_BLOCKS`): the transformer blocks of UNETR's ViT and the resnet blocks of the DDPM
U-Net, the repeated blocks that hold most of each model's activations and take plain tensors in and out.

Torch's non-reentrant checkpoint (``use_reentrant=False``) is used because the reentrant one needs an input that
requires a gradient (a frozen base with an adapter inside a block has none), drops keyword arguments (the DDPM
resnet's ``emb``), and offers no hook to run the recomputation in a context. That hook matters for the cross-layer
adapters (LoRA-PT, tCURLoRA, LoTR): their shared factors are computed once per model pass, outside every block, and
a recomputed block must read those very tensors again (``adapters.recompute_context``).
"""

from __future__ import annotations

import re
from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint
from torch import nn

from ..adapters import model_family, recompute_context
from .runtime import EngineError

#: per model family, the modules wrapped (full-name regular expressions)
CHECKPOINT_BLOCKS: dict[str, tuple[str, ...]] = {
    "unetr": (r"vit\.blocks\.\d+",),
    "ddpm": (r"(down|up)_blocks\.\d+\.resnets\.\d+", r"middle_block\.resnet_[12]"),
}
_WHAT = "the transformer blocks of a UNETR's ViT and the resnet blocks of a DDPM U-Net"


class CheckpointedForward:
    """Installed as a block's ``forward``: its class's forward, under activation checkpointing while gradients are
    on (without them nothing is kept for backward, so there is nothing to save).

    An object, not a closure, so that ``copy.deepcopy`` of the model gives the copy's block its own wrapper (a
    closure would keep calling the original block) and the model still pickles.
    """

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        block = self.block
        inner = type(block).forward
        if not torch.is_grad_enabled():
            return inner(block, *args, **kwargs)
        # context_fn is called now, at the forward: it captures the adapter groups' results of this pass for the
        # recomputation (see adapters.recompute_context)
        return checkpoint(inner, block, *args, use_reentrant=False, context_fn=partial(recompute_context, block),
                          **kwargs)


def checkpoint_modules(model: nn.Module, patterns: tuple[str, ...] | list[str]) -> list[str]:
    """Put every module whose full name matches one of ``patterns`` under activation checkpointing; returns their
    names (modules already wrapped are counted, not wrapped twice)."""
    compiled = [re.compile(p) for p in patterns]
    names = []
    for name, module in model.named_modules():
        if name and any(p.fullmatch(name) for p in compiled):
            if not isinstance(module.__dict__.get("forward"), CheckpointedForward):
                module.forward = CheckpointedForward(module)  # an instance attribute: nn.Module.__call__ finds it
            names.append(name)
    return names


def enable_checkpointing(model: nn.Module) -> list[str]:
    """Checkpoint the blocks of :data:`CHECKPOINT_BLOCKS` for this model's family; returns the wrapped blocks' names.

    Parameter and module names do not change (the block's ``forward`` is replaced, the block stays where it is), so
    adapters, state dicts and architecture fingerprints are the same with and without checkpointing.
    """
    family = model_family(model)
    if family not in CHECKPOINT_BLOCKS:
        raise EngineError(f"--checkpointing knows {_WHAT}; {type(model).__name__} is neither: drop --checkpointing")
    names = checkpoint_modules(model, CHECKPOINT_BLOCKS[family])
    if not names:
        raise EngineError(f"--checkpointing found none of {_WHAT} in this {type(model).__name__}; drop --checkpointing")
    return names


def disable_checkpointing(model: nn.Module) -> int:
    """Undo :func:`enable_checkpointing` / :func:`checkpoint_modules`; returns how many blocks were unwrapped."""
    count = 0
    for module in model.modules():
        if isinstance(module.__dict__.get("forward"), CheckpointedForward):
            del module.__dict__["forward"]
            count += 1
    return count


def checkpointed_blocks(model: nn.Module) -> list[str]:
    """Names of the modules currently under activation checkpointing."""
    return [name for name, module in model.named_modules()
            if isinstance(module.__dict__.get("forward"), CheckpointedForward)]
