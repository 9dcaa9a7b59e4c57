"""Every adaptation method's name, one-line summary and source: the one place they are written.

Torch-free on purpose: a GUI lists the methods (with these summaries as help) before PyTorch is installed. The
implementations register themselves in :mod:`.registry`, which refuses a name missing here, and a test checks that
every name here has an implementation. The order is the order a GUI offers them in: the papers' methods first.
"""

from __future__ import annotations

from typing import NamedTuple


class MethodInfo(NamedTuple):
    summary: str  # one line for users (``tensorpeft methods``, the Slicer panel's help)
    reference: str  # the paper or library it follows


METHODS: dict[str, MethodInfo] = {
    "lora-pt": MethodInfo(
        "Truncated t-SVD of the stacked ViT weights (attention, MLP up, MLP down); U, S, V train.",
        "He et al. 2024, LoRA-PT (UNETR, principal tensor singular values and vectors)"),
    "tcurlora": MethodInfo(
        "Tensor CUR of the stacked ViT weights: C and R frozen, the r×r core per slice trains.",
        "He et al. 2025, tCURLoRA (tensor CUR decomposition based low-rank adaptation)"),
    "lotr": MethodInfo(
        "Tucker-2 update per ViT stack: shared L and R, an r×r core per layer (zero at start).",
        "Bershatsky et al. 2024, LoTR: Low Tensor Rank Weight Adaptation"),
    "tenvoo-l": MethodInfo(
        "Conv3d ΔW as a ten-core tensor network (loop through the kernel cores); Linear layers get QuanTA.",
        "TenVOO (tensor-network PEFT for 3D DDPMs), authors' release; QuanTA (Chen et al. 2024) for Linear"),
    "tenvoo-q": MethodInfo(
        "Conv3d ΔW as a ten-core tensor network with three r⁴ loop cores; Linear layers get QuanTA.",
        "TenVOO (tensor-network PEFT for 3D DDPMs), authors' release; QuanTA (Chen et al. 2024) for Linear"),
    "lora": MethodInfo(
        "Low-rank update B·A per layer (LoCon on convolutions and transposed convolutions); B starts at zero.",
        "Hu et al. 2021, LoRA; LyCORIS LoCon for Conv3d"),
    "pissa": MethodInfo(
        "LoRA started from the weight's top-r singular vectors; the frozen weight keeps the residual.",
        "Meng et al. 2024, PiSSA (here on Conv3d too)"),
    "dora": MethodInfo(
        "LoRA on the weight's direction plus a trained magnitude per output channel; B starts at zero.",
        "Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation; as Hugging Face peft's use_dora"),
    "loha": MethodInfo(
        "Hadamard product of two low-rank updates: rank up to r² for 2r's parameters.",
        "Hyeon-Woo et al. 2022, FedPara/LoHa; LyCORIS"),
    "lokr": MethodInfo(
        "Kronecker product of a small full matrix and a rank-r matrix carrying the kernel.",
        "Edalati et al. 2022, KronA; LyCORIS LoKr"),
    "ssf": MethodInfo(
        "Per-channel scale and shift of each adapted layer's output; 2·out parameters per layer.",
        "Lian et al. 2022, SSF"),
    "quanta": MethodInfo(
        "Linear ΔW as three two-axis tensors over a three-factor split of the features (frozen-copy start).",
        "Chen et al. 2024, QuanTA; TenVOO release for unequal in/out splits"),
    "selora": MethodInfo(
        "LoRA starting at rank 1 whose per-layer rank grows by a Fisher-score test (trainer hook SeLoRAGrowth).",
        "Mao et al. 2024, SeLoRA"),
    "full": MethodInfo(
        "No adapter: every weight trains (the baseline; needs the most memory and storage).",
        "-"),
}


#: How our parameter count relates to a paper's where the two differ, shown by ``tensorpeft params``. Our convention
#: throughout: trainable = adapter + the adapted layers' biases when they train (``--bias``; the DDPM family's
#: default "adapted", as in TenVOO's release) + the family's extra trainable parameters (UNETR decoder path incl.
#: ``out``, DDPM normalisation layers).
PAPER_COUNT_NOTES: dict[str, str] = {
    "lotr": ("The LoRA-PT paper's LoTR row (2.7033M at r=2 on its UNETR) fits four stacks with qkv fused: "
             "--option stacks=qkv-proj-up-down gives 2,703,330. The default, stacks=sa-up-down (LoRA-PT's own "
             "three stacks, q, k, v split), gives 2,697,282."),
    "tenvoo-q": ("The TenVOO paper's table gives 0.58M for TenVOO-Q r=4 on its DDPM: that is our count without the "
                 "adapted layers' biases (580,736), while its TenVOO-L (0.60M = 601,024) and LoCon (0.82M = 824,192) "
                 "rows include them, as we do for every method (603,904 here); the paper's parameter formula (eq. 6) "
                 "and its table disagree. --bias none drops the biases."),
}


#: Each method's default learning rate per model family: what ``finetune`` trains with when ``--lr`` is not given
#: (the Slicer panel's "auto" too), recorded in the adapter's ``adapter_config.json`` as ``train_lr``. ``"*"`` is
#: every method the family does not name.
#:
#: UNETR: every method at 1e-3, the LoRA-PT / tCURLoRA recipe (the demo's measured Dice rests on it).
#: DDPM (pixel and latent diffusion U-Nets), measured with benchmarks/lr_ddpm.py (results/lr_ddpm_cpu_2026-12-02.md):
#: 6 ``finetune`` steps of the shipped demo-ddpm on the demo's ICBM brains, then the largest max|ΔW| / max|W| over the
#: model's weights. TenVOO-L: 12.7 at 1e-3, 0.88 at 1e-4, 0.22 at 3e-5, 0.13 at 1e-5; TenVOO-Q: 25.9, 3.2, 0.67,
#: 0.28 (a product of ten trained cores: one step changes ΔW by a product of changes). 1e-5 is also the TenVOO
#: paper's rate. The others at 1e-4: LoHa 0.14 (0.94 at 1e-3), QuanTA 0.019, LoKr 0.010, LoRA 0.002, SeLoRA 0.001;
#: full fine-tuning 0.022 at 1e-4 and 0.007 at 3e-5 (at 1e-3 its validation loss doubled, 0.017 → 0.039), so 5e-5.
#: QuanTA 1e-3 (dW/W 0.19 there, between TenVOO-L's at 1e-5 and 3e-5): at 1e-4 it could not move the samples.
#: Measured with benchmarks/ldm_methods.py (results/ldm_methods_cpu_2026-12-02.md and ldm_methods_lr_cpu_2026-12-02.md): 300
#: steps of demo-ldm towards brains with enlarged ventricles, the samples' ventricle volume went from 5.4 mL (base)
#: to 7.2 mL with QuanTA at 1e-4 (its 8 samples indistinguishable from the base's by eye) and to 12.2 mL at 1e-3;
#: the other methods at their defaults reached 10.8-23.8 mL (the target brains: 43.5 mL).
#: The sharper demo-ldm of 2026-12-03 (8 latent channels) is stiffer: at 1e-4 LoRA, LoHa, LoKr and SeLoRA left its
#: samples' ventricles where they were (4.2-4.9 mL, base 5.0) after the same 300 steps; at 1e-3 they reached LoRA
#: 15.0, SeLoRA 12.2, LoHa 9.5, LoKr 9.2 mL, every sample still brain-shaped (results/ldm_methods_lr_cpu_2026-12-03.md;
#: the frozen autoencoder itself renders the target brains at 21.5 mL, the most an adapter can reach). So 1e-3 for
#: them, as on a UNETR. QuanTA moved little at any rate (4.4 mL at 1e-3, 5.6 at 1e-2: it adapts only the attention
#: block's Linear layers); TenVOO-L/Q keep their paper's 1e-5 (8.4 and 11.0 mL) and full fine-tuning 5e-5 (15.7 mL).
DEFAULT_LR: dict[str, dict[str, float]] = {
    "unetr": {"*": 1e-3},
    "ddpm": {"*": 1e-3, "full": 5e-5, "tenvoo-l": 1e-5, "tenvoo-q": 1e-5},
    "generic": {"*": 1e-3},
}


#: ``finetune``'s steps without ``--steps`` (:func:`default_steps`): a segmentation fine-tune of up to 12 cases, and
#: synthesis. Measured 2026-12-02 on the demo (LoRA-PT r=1, 1 thread, 5 + 2 whole-brain subjects, paired seeds 0 / 1;
#: 4 held-out subjects and 12 whole-brain scans of unseen templates): 1000 -> 1250 steps lifted held-out Dice
#: 0.787 -> 0.805 and 0.791 -> 0.813, the whole-brain mean 0.821 -> 0.830 and 0.795 -> 0.810, the lowest whole-brain
#: scan 0.782 -> 0.794 and 0.732 -> 0.765; validation Dice was still rising at step 1000 in 3 of 4 runs.
SEGMENTATION_STEPS = 1250
SYNTHESIS_STEPS = 300
#: ... and, for more than two structures, twice :data:`SEGMENTATION_STEPS` and at least this many per structure.
#: Structures new to a model are learned one after another, not side by side. On the demo's one-structure model
#: (benchmarks/own_labels.py, 5 + 2 subjects, 2026-12-04): a left and a right hippocampus are found in 1250 steps; with
#: thalamus and caudate beside them (6 structures) 1500 steps left the right hippocampus at validation Dice 0.05 (a
#: run where the caudates were also not recognised as a left-right pair, so flips mixed them up); with
#: ten FreeSurfer structures 1250 steps kept adapters without either hippocampus in both draws (seed 1 without the
#: pallidi too), 2500 found every structure in both (mean Dice of 5 test subjects 0.612 -> 0.814, 0.494 -> 0.811).
#: Not measured: 3-5 structures and six at 2500 (given 2500 as the ten's subset), and more than ten (250 each, the
#: ten's rate).
SEGMENTATION_STEPS_PER_STRUCTURE = 250


def default_steps(task_kind: str, num_train: int = 0, structures: int = 1) -> int:
    """Optimiser steps ``finetune`` runs without ``--steps``: :data:`SEGMENTATION_STEPS` for up to 12 cases, 100 per
    case beyond; for more than two structures (``structures``: the classes besides background) at least twice
    :data:`SEGMENTATION_STEPS` and :data:`SEGMENTATION_STEPS_PER_STRUCTURE` per structure; :data:`SYNTHESIS_STEPS`
    for synthesis. Torch-free, so the GUIs estimate a run's time by the same rule."""
    if task_kind != "segmentation":
        return SYNTHESIS_STEPS
    steps = max(SEGMENTATION_STEPS, 100 * int(num_train))
    if structures > 2:
        steps = max(steps, 2 * SEGMENTATION_STEPS, SEGMENTATION_STEPS_PER_STRUCTURE * int(structures))
    return steps


def default_lr(method: str, family: str) -> float:
    """The learning rate ``finetune`` uses for ``method`` on a model of ``family`` (``unetr``, ``ddpm``, ``generic``)
    when none is given."""
    table = DEFAULT_LR.get(family, DEFAULT_LR["generic"])
    return table.get(str(method).strip().lower(), table["*"])
