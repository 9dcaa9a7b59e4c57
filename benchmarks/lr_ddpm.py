"""How far a few steps at a given learning rate move the shipped DDPM's weights, per method: the measurement behind
the per-method default learning rates of the DDPM family (``adapters.catalog.DEFAULT_LR``).

    python benchmarks/lr_ddpm.py --data COHORT/synthesis-icbm --steps 6
    python benchmarks/lr_ddpm.py --data ... --methods tenvoo-l:4,lora:4 --lrs 1e-3,1e-4,1e-5

Each (method, lr) is one ``finetune`` run on ``demo-ddpm`` (Adam, poly decay, gradient clipping at 1, as finetune
trains). The adapter is then merged into a fresh copy of the base model and, for every weight the run changed,
``max|W_after - W_before| / max|W_before|`` is taken; the table shows the largest ratio over the model's layers
(``dW/W``) and the validation loss (noise-prediction MSE on the held-out volumes, lower is better) after the run. A ratio near or above 1 means the run replaced weights instead of adjusting them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.harness import machine_line, today  # noqa: E402
from TensorPEFTLib.adapters import AdapterConfig, load_adapter, merge_and_unload  # noqa: E402
from TensorPEFTLib.engine import Events, TrainSettings, finetune  # noqa: E402
from TensorPEFTLib.engine.jobs import resolve_model  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
DEFAULT_METHODS = "tenvoo-l:4,tenvoo-q:4,quanta:4,lora:4,loha:4,lokr:4,selora:1,full"


def weight_ratio(base: torch.nn.Module, adapted: torch.nn.Module) -> tuple[float, str]:
    """Largest ``max|ΔW| / max|W|`` over the weights (dimension ≥ 2) that differ, and the layer it is in."""
    before = {k: v.float() for k, v in base.state_dict().items() if v.ndim >= 2}
    worst, where = 0.0, ""
    for key, value in adapted.state_dict().items():
        if key in before and value.shape == before[key].shape:
            delta = float((value.float() - before[key]).abs().max())
            scale = float(before[key].abs().max()) or 1.0
            if delta / scale > worst:
                worst, where = delta / scale, key
    return worst, where


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="synthesis training volumes (imagesTr/)")
    parser.add_argument("--model", default="demo-ldm")  # the results file was measured on the earlier demo-ddpm
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--lrs", default="1e-3,1e-4,3e-5,1e-5")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default=None)
    args = parser.parse_args(argv)

    rows = []
    work = tempfile.mkdtemp(prefix="lr_ddpm_")
    base = resolve_model(args.model)
    for item in args.methods.split(","):
        method, _, rank = item.partition(":")
        for lr in (float(x) for x in args.lrs.split(",")):
            out = os.path.join(work, f"{method}_{lr:g}")
            cfg = AdapterConfig(method=method, rank=int(rank or 4))
            settings = TrainSettings(steps=args.steps, lr=lr, eval_every=args.steps, checkpoint_every=args.steps)
            start = time.perf_counter()
            result = finetune(args.model, args.data, out, cfg, settings, device="cpu", threads=args.threads,
                              events=Events(quiet=True), overwrite=True)
            seconds = time.perf_counter() - start
            model = resolve_model(args.model)
            load_adapter(model, out)
            merge_and_unload(model)
            ratio, layer = weight_ratio(base, model)
            rows.append({"method": method, "rank": cfg.rank, "lr": lr, "steps": args.steps, "dw_over_w": ratio,
                         "layer": layer, "val_loss": result.best, "seconds": round(seconds, 1)})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    stem = args.name or f"lr_ddpm_cpu_{today()}"
    os.makedirs(RESULTS, exist_ok=True)
    lines = [f"# Weight change after {args.steps} fine-tuning steps of {args.model}, per method and learning rate", "",
             f"{machine_line('cpu')}. `python benchmarks/lr_ddpm.py {' '.join(argv or sys.argv[1:])}`", "",
             "dW/W = largest max|W_after - W_before| / max|W_before| over the model's weights; val loss = "
             "noise-prediction MSE on the held-out volumes after the run (lower is better).", "",
             "| method | lr | dW/W | layer | val loss |", "|---|---|---|---|---|"]
    for r in rows:
        val = f"{r['val_loss']:.4f}" if r["val_loss"] is not None else ""
        lines.append(f"| {r['method']} r={r['rank']} | {r['lr']:g} | {r['dw_over_w']:.3g} | {r['layer']} | {val} |")
    with open(os.path.join(RESULTS, stem + ".md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")
    with open(os.path.join(RESULTS, stem + ".json"), "w") as handle:
        json.dump({"machine": machine_line('cpu'), "rows": rows}, handle, indent=1)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
