"""Turn a run's measurements into rows, the issue's target verdicts, a Markdown report, a CSV and a PNG plot."""

from __future__ import annotations

import csv
import os
import statistics
from dataclasses import dataclass
from typing import Any

from .harness import EntryResult, SettingResult, fmt_load, median

#: the tensor methods the "≤ 1.15× LoRA" target is about
TENSOR_METHODS = ("lora-pt", "tcurlora", "tenvoo-l", "tenvoo-q")
#: methods drawn in the "tensor" colour of the plot
TENSOR_FAMILY = (*TENSOR_METHODS, "lotr", "quanta")


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _by_label(sr: SettingResult) -> dict[str, EntryResult]:
    return {r.entry.label: r for r in sr.results}


def rows_of(sr: SettingResult) -> list[dict[str, Any]]:
    """One dict per entry with every figure the tables, the CSV and the plot show (None where not measured)."""
    by = _by_label(sr)

    def med(label: str, what: str) -> float | None:
        r = by.get(label)
        return median(getattr(r, what)) if r else None

    def mem(label: str, key: str) -> float | None:
        r = by.get(label)
        return r.memory.get(key) if r and r.memory else None

    base_step, full_step, lora_step = med("base", "train_wall"), med("full", "train_wall"), med("lora", "train_wall")
    base_cpu = med("base", "train_cpu")
    base_inf_u, base_inf_m = med("base", "infer_unmerged"), med("base", "infer_merged")
    base_inf_u_cpu, base_inf_m_cpu = med("base", "infer_unmerged_cpu"), med("base", "infer_merged_cpu")
    full_peak = mem("full", "peak_mib")
    full_train = _train_mem(by.get("full"))
    rows = []
    for r in sr.results:
        e = r.entry
        step, cpu = median(r.train_wall), median(r.train_cpu)
        peak, rest = r.memory.get("peak_mib"), r.memory.get("rest_mib")
        train_mem = _train_mem(r)
        inf_u, inf_m = median(r.infer_unmerged), median(r.infer_merged)
        saved, gflop = r.memory.get("saved_mib"), r.memory.get("gflop")
        row: dict[str, Any] = {
            "label": e.label, "kind": e.kind, "method": e.method, "rank": e.rank if e.kind != "base" else None,
            "total": r.info.get("total"), "trainable": r.info.get("trainable"), "adapter": r.info.get("adapter"),
            "inject_s": r.info.get("inject_s"), "checkpointed_blocks": r.info.get("checkpointed_blocks"),
            "checkpoint_skipped": r.info.get("checkpoint_skipped"),
            "step_s": step, "step_cpu_s": cpu, "gflop": gflop, "gflop_x_base": _ratio(gflop, mem("base", "gflop")),
            "step_x_full": _ratio(step, full_step), "step_x_base": _ratio(step, base_step),
            "step_x_lora": _ratio(step, lora_step), "cpu_x_base": _ratio(cpu, base_cpu),
            "peak_mib": peak, "rest_mib": rest, "train_mem_mib": train_mem,
            "peak_x_full": _ratio(peak, full_peak), "train_mem_x_full": _ratio(train_mem, full_train),
            "peak_source": r.memory.get("peak_source"), "saved_mib": saved,
            "saved_x_full": _ratio(saved, mem("full", "saved_mib")),
            "infer_unmerged_s": inf_u, "infer_merged_s": inf_m,
            "infer_unmerged_x_base": _ratio(inf_u, base_inf_u), "infer_merged_x_base": _ratio(inf_m, base_inf_m),
            "infer_unmerged_cpu_x_base": _ratio(median(r.infer_unmerged_cpu), base_inf_u_cpu),
            "infer_merged_cpu_x_base": _ratio(median(r.infer_merged_cpu), base_inf_m_cpu),
            "infer_unmerged_x_plain": median([w for w, _ in r.paired_unmerged]),
            "infer_merged_x_plain": median([w for w, _ in r.paired_merged]),
            "infer_unmerged_cpu_x_plain": median([c for _, c in r.paired_unmerged]),
            "infer_merged_cpu_x_plain": median([c for _, c in r.paired_merged]),
            "merge_max_abs_diff": r.merge_diff,
            "compare": e.compare,
            "step_x_ours": _ratio(step, med(e.compare, "train_wall")) if e.compare else None,
            "cpu_x_ours": _ratio(cpu, med(e.compare, "train_cpu")) if e.compare else None,
            "gflop_x_ours": _ratio(gflop, mem(e.compare, "gflop")) if e.compare else None,
            "kernels_x_ours": _ratio(r.merge_info.get("kernels_unmerged"),
                                     by[e.compare].merge_info.get("kernels_unmerged")) if e.compare in by else None,
            "saved_x_ours": _ratio(saved, mem(e.compare, "saved_mib")) if e.compare else None,
            "peak_x_ours": _ratio(peak, mem(e.compare, "peak_mib")) if e.compare else None,
            "train_mem_x_ours": _ratio(train_mem, _train_mem(by.get(e.compare))) if e.compare else None,
            "step_x_base_iqr": _spread(r, by.get("base"), "train_wall"),
            "cpu_x_base_iqr": _spread(r, by.get("base"), "train_cpu"),
            "step_x_lora_iqr": _spread(r, by.get("lora"), "train_wall"),
            "step_x_ours_iqr": _spread(r, by.get(e.compare), "train_wall") if e.compare else None,
            "kernels_plain": r.merge_info.get("kernels_plain"), "kernels_unmerged": r.merge_info.get("kernels_unmerged"),
            "kernels_merged": r.merge_info.get("kernels_merged"),
            "merged_same_kernels": r.merge_info.get("merged_same_kernels"),
            "step_all_s": " ".join(f"{t:.3f}" for t in r.train_wall),
            "error": "; ".join(f"{k}: {v}" for k, v in r.errors.items()),
        }
        rows.append(row)
    return rows


def _spread(num: EntryResult | None, den: EntryResult | None, what: str) -> tuple[float, float] | None:
    """Interquartile range of the per-round ratios num/den (rounds are interleaved, so each ratio pairs two steps
    taken under nearly the same load)."""
    if num is None or den is None:
        return None
    a, b = getattr(num, what), getattr(den, what)
    if len(a) != len(b) or len(a) < 2:
        return None
    q = statistics.quantiles([x / y for x, y in zip(a, b)], n=4, method="inclusive")
    return q[0], q[2]


def _train_mem(r: EntryResult | None) -> float | None:
    if r is None or not r.memory or r.memory.get("peak_mib") is None:
        return None
    return r.memory["peak_mib"] - r.memory["rest_mib"]


# --------------------------------------------------------------------------------------------- targets


@dataclass
class Verdict:
    target: str
    measured: str
    verdict: str


def _judge(value: float | None, limit: float, spread: tuple[float, float] | None = None) -> str:
    if value is None:
        return "not measured"
    if value <= limit:
        return "met" if spread is None or spread[1] <= limit else "met (within the per-round spread)"
    missed = f"missed by {100 * (value / limit - 1):.1f} %"
    return missed + (" (within the per-round spread)" if spread is not None and spread[0] <= limit else "")


def _iqr(spread: tuple[float, float] | None) -> str:
    return "" if spread is None else f"; per-round IQR {spread[0]:.3f}–{spread[1]:.3f}"


def _flip(spread: tuple[float, float] | None) -> tuple[float, float] | None:
    return None if spread is None else (1 / spread[1], 1 / spread[0])


def verdicts(sr: SettingResult, rows: list[dict[str, Any]]) -> list[Verdict]:
    """The issue's targets on one setting, each with the measured figure and met / missed by how much."""
    by = {r["label"]: r for r in rows}
    out: list[Verdict] = []
    lora = by.get("lora")
    if lora and lora["step_x_base"] is not None:
        out.append(Verdict("lora step ≤ 1.05× frozen base",
                           f"{lora['step_x_base']:.3f}× (CPU time {_fx(lora['cpu_x_base'])}{_iqr(lora['step_x_base_iqr'])}; "
                           f"FLOPs {_fx(lora['gflop_x_base'])})",
                           _judge(lora["step_x_base"], 1.05, lora["step_x_base_iqr"])))
    peft = by.get("peft lora")
    if peft and peft["step_x_ours"] is not None:
        ours_t, ours_c, spread = 1 / peft["step_x_ours"], _inverse(peft["cpu_x_ours"]), _flip(peft["step_x_ours_iqr"])
        out.append(Verdict("our lora ≤ 1.0× peft LoRA, step time",
                           f"{ours_t:.3f}× (CPU time {_fx(ours_c)}{_iqr(spread)}; FLOPs "
                           f"{_fx(_inverse(peft['gflop_x_ours']))}, forward kernels {_fx(_inverse(peft['kernels_x_ours']))})",
                           _judge(ours_t, 1.0, spread)))
        if peft["peak_x_ours"]:
            ours_m, saved = 1 / peft["peak_x_ours"], _inverse(peft["saved_x_ours"])
            out.append(Verdict("our lora ≤ 1.0× peft LoRA, peak memory",
                               f"{ours_m:.3f}× peak (training increment {_fx(_inverse(peft['train_mem_x_ours']))}, "
                               f"saved activations {_fx(saved)})", _judge(ours_m, 1.0)))
    for name in TENSOR_METHODS:
        row = by.get(name)
        if row and row["step_x_lora"] is not None:
            out.append(Verdict(f"{name} step ≤ 1.15× lora", f"{row['step_x_lora']:.3f}×{_iqr(row['step_x_lora_iqr'])}",
                               _judge(row["step_x_lora"], 1.15, row["step_x_lora_iqr"])))
        elif row and row["error"]:
            out.append(Verdict(f"{name} step ≤ 1.15× lora", "n/a", f"not applicable ({row['error'][:90]})"))
    traced = [r for r in rows if r["kind"] == "ours" and r["method"] != "full" and r["merged_same_kernels"] is not None]
    if traced:
        same = [r["label"] for r in traced if r["merged_same_kernels"]]
        differ = [f"{r['label']} ({r['kernels_merged']} vs {r['kernels_plain']})" for r in traced
                  if not r["merged_same_kernels"]]
        out.append(Verdict("merged inference ≤ 1.01× base: same kernels as the base model",
                           f"{len(same)}/{len(traced)} methods run exactly the base model's "
                           f"{traced[0]['kernels_plain']} aten kernels (same ops, same shapes) once merged"
                           + (f"; different: {', '.join(differ)}" if differ else ""),
                           "met" if not differ else f"missed for {len(differ)} methods"))
    for key, what in (("infer_merged_x_plain", "wall time"), ("infer_merged_cpu_x_plain", "CPU time")):
        merged = [(r[key], r["label"]) for r in rows
                  if r["kind"] == "ours" and r[key] is not None and r["method"] != "full"]
        if not merged:
            continue
        worst, who = max(merged)
        misses = [f"{label} {v:.3f}×" for v, label in sorted(merged, reverse=True) if v > 1.01]
        floor = [f"{label} {by[label][key]:.3f}×" for label in ("base", "full") if by.get(label, {}).get(key)]
        out.append(Verdict(f"merged inference ≤ 1.01× base, every method ({what}, paired)",
                           f"median over methods {statistics.median(v for v, _ in merged):.3f}×, worst {who} "
                           f"{worst:.3f}×; {len(merged) - len(misses)}/{len(merged)} within"
                           + (f" (over: {', '.join(misses)})" if misses else "")
                           + (f"; noise floor (plain model vs its copy): {', '.join(floor)}" if floor else ""),
                           _judge(worst, 1.01)))
    full_ref = by.get("full (no ckpt)") or by.get("full")
    if full_ref and full_ref["peak_mib"]:
        adapters = [(r["peak_mib"] / full_ref["peak_mib"], r["label"]) for r in rows
                    if r["kind"] == "ours" and r["method"] != "full" and r["peak_mib"]]
        if adapters:
            worst, who = max(adapters)
            cuda = sr.setting.device.startswith("cuda")
            what = "CUDA max allocated" if cuda else "CPU peak RSS, indicative only: the target is for CUDA"
            ckpt = "with" if sr.setting.checkpointing else "without"
            target = "adapters + checkpointing peak memory ≤ 60 % of full fine-tuning"
            floor = min(adapters)
            measured = (f"worst {who} {100 * worst:.0f} %, best {floor[1]} {100 * floor[0]:.0f} % "
                        f"(adapters {ckpt} checkpointing, full without; {what})")
            verdict = _judge(worst, 0.60) if cuda and sr.setting.checkpointing else "not measured on CUDA here"
            out.append(Verdict(target, measured, verdict))
    return out


def _inverse(value: float | None) -> float | None:
    return 1 / value if value else None


def _fx(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}×"


# --------------------------------------------------------------------------------------------- markdown / csv


def _fmt(value: Any, spec: str = "", suffix: str = "") -> str:
    if value is None or value == "":
        return "-"
    return f"{value:{spec}}{suffix}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    head = ("| method | rank | trainable | adapter | step (s) | × full | × base | × lora | CPU time × base | "
            "FLOPs × base | peak mem (MiB) | × full | training mem (MiB) | saved activations (MiB) | infer unmerged × plain | "
            "infer merged × plain | note |")
    lines = [head, "|" + "---|" * 2 + "---:|" * 14 + "---|"]
    for r in rows:
        note = r["error"] or ""
        if r["compare"] and r["step_x_ours"] is not None:
            note = (f"vs our {r['compare']}: time {_fx(r['step_x_ours'])} (CPU {_fx(r['cpu_x_ours'])}, FLOPs "
                    f"{_fx(r['gflop_x_ours'])}, forward kernels {_fx(r['kernels_x_ours'])}), "
                    f"peak {_fx(r['peak_x_ours'])}, training mem {_fx(r['train_mem_x_ours'])}, "
                    f"saved activations {_fx(r['saved_x_ours'])}" + (f"; {note}" if note else ""))
        if r["checkpoint_skipped"]:
            note += (f"{'; ' if note else ''}checkpointing {r['checkpointed_blocks']} blocks, "
                     f"{r['checkpoint_skipped']} holding stack members left out")
        if r["kernels_unmerged"] is not None and r["kind"] != "base" and r["method"] != "full":
            same = "the base's" if r["merged_same_kernels"] else f"{r['kernels_merged']}, base {r['kernels_plain']}:"
            note += (f"{'; ' if note else ''}kernels unmerged {r['kernels_unmerged']}, merged {same} "
                     f"{'' if r['merged_same_kernels'] else 'different'}").rstrip()
        if r["merge_max_abs_diff"] is not None and r["kind"] != "base" and r["method"] != "full":
            note += f"{'; ' if note else ''}merging moved the output by ≤ {r['merge_max_abs_diff']:.1e}"
        lines.append("| " + " | ".join([
            r["label"], _fmt(r["rank"]), _fmt(r["trainable"], ","), _fmt(r["adapter"], ","),
            _fmt(r["step_s"], ".3f"), _fmt(r["step_x_full"], ".3f", "×"), _fmt(r["step_x_base"], ".3f", "×"),
            _fmt(r["step_x_lora"], ".3f", "×"), _fmt(r["cpu_x_base"], ".3f", "×"), _fmt(r["gflop_x_base"], ".3f", "×"),
            _fmt(r["peak_mib"], ",.0f"), _fmt(r["peak_x_full"], ".3f", "×"),
            _fmt(r["train_mem_mib"], ",.0f"), _fmt(r["saved_mib"], ",.1f"),
            _fmt(r["infer_unmerged_x_plain"], ".3f", "×"), _fmt(r["infer_merged_x_plain"], ".3f", "×"),
            note.replace("|", "/"),
        ]) + " |")
    return "\n".join(lines)


CSV_FIELDS = [
    "date", "machine", "device", "torch", "monai", "peft", "lycoris", "threads", "command", "model", "size", "batch",
    "checkpointing", "bf16", "label", "kind", "method", "rank", "total", "trainable", "adapter", "inject_s",
    "checkpointed_blocks", "checkpoint_skipped", "step_s", "step_cpu_s", "step_x_full", "step_x_base", "step_x_lora", "cpu_x_base",
    "peak_mib", "rest_mib", "train_mem_mib", "peak_x_full", "train_mem_x_full", "saved_mib", "saved_x_full",
    "peak_source", "infer_unmerged_s",
    "infer_merged_s", "infer_unmerged_x_base", "infer_merged_x_base", "infer_unmerged_cpu_x_base",
    "infer_merged_cpu_x_base", "infer_unmerged_x_plain", "infer_merged_x_plain", "infer_unmerged_cpu_x_plain",
    "infer_merged_cpu_x_plain", "merge_max_abs_diff", "compare", "step_x_ours", "cpu_x_ours",
    "peak_x_ours", "train_mem_x_ours", "saved_x_ours", "step_x_base_iqr", "cpu_x_base_iqr", "step_x_lora_iqr",
    "step_x_ours_iqr", "gflop", "gflop_x_base", "gflop_x_ours", "kernels_x_ours", "kernels_plain", "kernels_unmerged", "kernels_merged", "merged_same_kernels", "step_all_s", "load_before", "load_after", "error",
]


def write_csv(path: str, meta: dict[str, Any], settings: list[tuple[SettingResult, list[dict[str, Any]]]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for sr, rows in settings:
            s = sr.setting
            common = {**meta, "model": s.preset, "size": "x".join(map(str, s.size)), "batch": s.batch,
                      "checkpointing": s.checkpointing, "bf16": s.bf16, "load_before": fmt_load(sr.load_before),
                      "load_after": fmt_load(sr.load_after)}
            for row in rows:
                writer.writerow({**common, **{k: _csv_value(v) for k, v in row.items()}})


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        return "-".join(f"{v:.4g}" for v in value)
    return value


DEFINITIONS = """\
How it was measured:
- **Step** = zero_grad + forward + loss + backward + Adam step (batch {batch}); UNETR: cross-entropy against random
  labels, DDPM: noise-prediction MSE at random timesteps. Median of the timed rounds; **CPU time** is the worker
  process's CPU time per step (less sensitive to other jobs taking the cores than wall time).
- **Frozen base** (`base` row): the same model with no adapter, every weight frozen except the extras all methods of
  this family train (UNETR: the decoder path `decoder2..5` + `out`; DDPM: the normalisation layers and the biases of
  the adapted layers), and the input of every layer the adapters wrap marked as needing a gradient, so backward
  runs through the same layers as an adapted model but computes no adapter gradient: the floor of any adapter on
  those layers. Its inference is the plain model's forward.
- Every method trains its adapter plus those same extras (the papers' setting); `full` trains everything.
- **Isolation and order**: each row runs in its own worker process (forked from one server that imported the
  libraries); the parent asks every worker for one step per round, rotating the starting worker each round, so
  load drifts on a shared machine hit all rows alike.
- **FLOPs**: multiply-adds ×2 of one forward + backward (matmuls and convolutions, `torch.utils.flop_counter`),
  exact and machine-independent: what a method asks for, whatever the machine makes of it.
- **Peak mem**: {peak_what}. **Training mem** = peak minus the resting footprint right before the first step
  (model, adapter, libraries), i.e. activations + gradients + optimiser state. **Saved activations**: the bytes
  autograd keeps for backward in one training forward (unique storages, weights excluded), counted exactly by a
  saved-tensor hook: the same on any machine, free of allocator noise.
- **Inference**: eval mode, no gradients, one forward pass ({infer_what}); unmerged = the adapter active,
  merged = after `tp.merge` (peft: `merge_adapter`, LyCORIS: `merge_to` + `restore`). **Paired**: each worker
  also holds a plain copy of the base model and runs it right before or after its own forward (alternating); the
  ratio is the median of those per-round ratios, so load drifts cancel. The `base` and `full` rows (a plain model
  against its copy) show the noise floor. The CSV also has the ratios across workers to the `base` row.
- **Peers**: Hugging Face peft LoRA (UNETR) and LyCORIS LoCon/LoHa/LoKr (DDPM) on exactly the layers our LoRA
  wraps, at the rank of the method they are compared with, training the same extras. LyCORIS LoCon runs in its
  bypass mode (a thin r-channel path like ours and peft's; its default forms ΔW and runs a second full
  convolution); LoHa/LoKr in their default mode.
- Tensor-stack methods (`lora-pt`, `tcurlora`, `lotr`) stack transformer-block layers and do not apply to the DDPM.
  `tenvoo-l`/`tenvoo-q` give Linear layers QuanTA (the TenVOO release's choice), so on UNETR (Linear only) they run
  QuanTA. SeLoRA runs at its starting rank: its rank grows only through its trainer hook, which this step does not call.
"""


def markdown_report(meta: dict[str, Any], settings: list[tuple[SettingResult, list[dict[str, Any]]]],
                    args_summary: str, cuda_commands: list[str], plot_name: str | None) -> str:
    first = settings[0][0].setting
    cuda = first.device.startswith("cuda")
    lines = [
        f"# Adaptation methods side by side: training step, memory, inference ({'CUDA' if cuda else 'CPU'})",
        "",
        f"- Machine: {meta['machine']}",
        f"- Software: torch {meta['torch']}, MONAI {meta['monai']}, peft {meta['peft']}, lycoris-lora {meta['lycoris']}, "
        f"Python {meta['python']}; torch threads per worker: {meta['threads']}",
        f"- Date: {meta['date']}",
        f"- Command: `{meta['command']}`",
        f"- Rounds: {args_summary}",
        "",
    ]
    if not cuda:
        lines += [
            "**The CPU is shared** with other jobs (load averages per model below): wall times are noisy; ratios come "
            "from interleaved rounds in one run, and the CPU-time column is a second, steadier measure.",
            "",
        ]
    lines.append(DEFINITIONS.format(
        batch=first.batch,
        peak_what=("CUDA `max_memory_allocated` over the training steps" if cuda else
                   "the worker's resident-set high-water mark over the training steps (`VmHWM`, reset right before "
                   "the first step; it includes the ~0.5 GiB of torch/MONAI every worker maps)"),
        infer_what="one denoising call of the DDPM"))
    if plot_name:
        lines += [f"![step time and memory per method]({plot_name})", ""]
    for sr, rows in settings:
        s = sr.setting
        extras = [x for x, on in (("activation checkpointing", s.checkpointing), ("bf16 autocast", s.bf16)) if on]
        lines += [
            f"## {s.preset}, input {s.batch}×1×{'×'.join(map(str, s.size))}{' (' + ', '.join(extras) + ')' if extras else ''}",
            "",
            f"Load average before / after: {fmt_load(sr.load_before)} / {fmt_load(sr.load_after)}; "
            f"{sr.seconds / 60:.1f} min.",
            "",
            "| target | measured | verdict |",
            "|---|---|---|",
            *[f"| {v.target} | {v.measured} | {v.verdict} |" for v in verdicts(sr, rows)],
            "",
            markdown_table(rows),
            "",
        ]
    if cuda_commands:
        lines += ["## Still to run on a GPU", "", "The paper presets on CUDA (not measured in this run):", "",
                  *[f"    {c}" for c in cuda_commands], ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- plot


def _colour(row: dict[str, Any]) -> str:
    if row["kind"] == "base":
        return "#9e9e9e"
    if row["kind"] in ("peft", "lycoris"):
        return "#2e7d32"
    if row["method"] == "full":
        return "#424242"
    return "#ef6c00" if row["method"] in TENSOR_FAMILY else "#1565c0"


def plot(path: str, settings: list[tuple[SettingResult, list[dict[str, Any]]]], title: str) -> None:
    """Per model: step time (bars, with the ratio to the frozen base) and peak memory (resting part + training
    increment), one bar per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(settings)
    height = max(len(rows) for _, rows in settings) * 0.32 + 1.4
    fig, axes = plt.subplots(n, 2, figsize=(13, height * n), squeeze=False)
    cuda = settings[0][0].setting.device.startswith("cuda")
    for (sr, rows), (ax_t, ax_m) in zip(settings, axes):
        rows = [r for r in rows if r["step_s"] is not None]
        labels = [r["label"] for r in rows]
        y = list(range(len(rows)))[::-1]
        colours = [_colour(r) for r in rows]
        steps = [r["step_s"] for r in rows]
        ax_t.barh(y, steps, color=colours)
        for yi, r in zip(y, rows):
            ax_t.text(r["step_s"], yi, f" {_fx(r['step_x_base'], 2)} base", va="center", fontsize=8)
        base = next((r["step_s"] for r in rows if r["kind"] == "base"), None)
        if base:
            ax_t.axvline(base, color="#9e9e9e", linestyle="--", linewidth=1)
        ax_t.set_yticks(y, labels, fontsize=9)
        ax_t.set_xlabel("training step, median wall time (s); dashed: the frozen base")
        ax_t.set_xlim(0, max(steps) * 1.25)
        ax_t.set_title(f"{sr.setting.label}: step time", fontsize=10)
        rest = [r["rest_mib"] or 0 for r in rows]
        train = [max(0.0, r["train_mem_mib"] or 0) for r in rows]
        ax_m.barh(y, rest, color="#cfd8dc")
        ax_m.barh(y, train, left=rest, color=colours)
        for yi, r in zip(y, rows):
            if r["peak_mib"]:
                ax_m.text(r["peak_mib"], yi, f" {r['peak_mib']:,.0f} ({_fx(r['peak_x_full'], 2)} full)", va="center",
                          fontsize=8)
        ax_m.set_yticks(y, [""] * len(y))
        ax_m.set_xlabel("peak memory (MiB): " + ("CUDA max allocated" if cuda else "peak RSS")
                        + "; coloured part: the training increment")
        ax_m.set_xlim(0, max(r["peak_mib"] or 0 for r in rows) * 1.35)
        ax_m.set_title(f"{sr.setting.label}: peak memory", fontsize=10)
    from matplotlib.patches import Patch

    legend = [Patch(color=c, label=t) for c, t in (
        ("#9e9e9e", "frozen base"), ("#424242", "full fine-tuning"), ("#1565c0", "ours, per-layer"),
        ("#ef6c00", "ours, tensor methods"), ("#2e7d32", "peer (peft, LyCORIS)"),
        ("#cfd8dc", "resting memory (model, adapter, libraries)"))]
    fig.suptitle(title, fontsize=11)
    fig.legend(handles=legend, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.5 / (height * n), 1, 1 - 0.35 / (height * n)))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
