"""Smoke test of the benchmark harness (benchmarks/run.py): a tiny run end to end, and the checkpointing helper.

The measurements themselves are not asserted (they are results, kept in benchmarks/results/), only that one
command produces the Markdown, CSV and PNG with a row per entry and the target table.
"""

from __future__ import annotations

import csv
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import TensorPEFTLib as tp  # noqa: E402
from benchmarks import run  # noqa: E402
from benchmarks.harness import Setting, apply_checkpointing, loss_of, make_batch  # noqa: E402


def test_one_command_writes_markdown_csv_and_plot(tmp_path):
    code = run.main(["--models", "unetr-small:16", "--methods", "full,lora:2", "--no-peers", "--checkpointing",
                     "--warmup", "0", "--rounds", "1", "--infer-warmup", "0", "--infer-rounds", "1",
                     "--out", str(tmp_path), "--name", "smoke"])
    assert code == 0
    text = (tmp_path / "smoke.md").read_text(encoding="utf-8")
    assert "lora step ≤ 1.05× frozen base" in text and "Command: `python benchmarks/run.py" in text
    with open(tmp_path / "smoke.csv", newline="", encoding="utf-8") as handle:
        rows = {r["label"]: r for r in csv.DictReader(handle)}
    assert set(rows) == {"base", "full", "lora", "full (no ckpt)"}
    for row in rows.values():
        assert not row["error"], row["error"]
        assert float(row["step_s"]) > 0 and float(row["peak_mib"]) > 0 and float(row["infer_merged_s"]) > 0
        assert row["torch"] == torch.__version__ and row["date"]
    assert int(rows["lora"]["adapter"]) > 0 and int(rows["lora"]["checkpointed_blocks"]) > 0
    assert rows["full (no ckpt)"]["checkpointed_blocks"] == "0"
    assert float(rows["lora"]["merge_max_abs_diff"]) < 1e-4
    assert (tmp_path / "smoke.png").stat().st_size > 10_000


@pytest.fixture
def one_thread():
    # two threads on a shared 2-core machine make small steps several times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("method", ["lora", "lora-pt"])
def test_checkpointing_keeps_gradients_and_checkpoints_stack_members_too(method, one_thread):
    setting = Setting("unetr-small", (16, 16, 16))
    grads = []
    for checkpointing in (False, True):
        model = setting.build()
        tp.inject(model, tp.AdapterConfig(method=method, rank=1, trainable=[]))
        if checkpointing:
            done, skipped = apply_checkpointing(model, setting.family)
            # the cross-layer groups' factors are computed outside the blocks: the ViT blocks are checkpointed too
            assert done == 4 + 4 + 4 and skipped == 0  # 4 ViT blocks, encoder1-4, decoder2-5
        loss_of(model, make_batch(setting, torch.device("cpu"))).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-6), name


def test_memory_benchmark_quick_run_writes_labelled_results(tmp_path):
    """benchmarks/memory.py end to end on one small model: each configuration in its own process, full fine-tuning
    as the reference of every ratio, the quick run labelled as such."""
    import json

    from benchmarks import memory

    code = memory.main(["--quick", "--models", "unetr-small:16", "--methods", "lora:2", "--out", str(tmp_path),
                        "--name", "mem"])
    assert code == 0
    data = json.loads((tmp_path / "mem.json").read_text(encoding="utf-8"))
    rows = data["results"]
    assert {(r["method"], r["variant"]) for r in rows} == {
        (m, v) for m in ("full", "lora") for v in ("fp32", "fp32 + ckpt", "bf16", "bf16 + ckpt")}
    for row in rows:
        assert row["ok"], row.get("error")
        assert row["peak_mib"] > 0 and row["train_mib"] >= 0 and row["step_s"] > 0
        assert row["checkpointed_blocks"] == (4 if row["checkpointing"] else 0)  # unetr-small: 4 ViT blocks
    assert len({r["peak_source"] for r in rows}) == 1
    text = (tmp_path / "mem.md").read_text(encoding="utf-8")
    assert "QUICK" in text and "Machine:" in text and "| lora (r=2) |" in text and "(1.00×)" in text


def test_whole_brain_spreads_separate_orientation_from_voxel_size():
    from benchmarks.whole_brain import dice_spreads

    def row(storage, mm, dice):
        return {"subject": "b", "storage": storage, "spacing_mm": [mm] * 3, "dice": dice}

    rows = [row("RAS", 1.0, 0.78), row("LPS", 1.0, 0.77), row("oblique", 1.0, 0.76),
            row("RAS", 1.2, 0.80), row("LPS", 1.2, 0.79), row("oblique", 1.2, 0.795)]
    spread, orientation = dice_spreads(rows)
    assert spread == {"b": pytest.approx(0.04)}  # 0.80 - 0.76, across voxel sizes
    assert orientation == {"b": pytest.approx(0.02)}  # the 1.0 mm orientations: 0.78 - 0.76
