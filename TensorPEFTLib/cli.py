"""The ``tensorpeft`` command. It only parses arguments and calls the engine.

User mistakes end with one line on stderr (``tensorpeft: error: ...``) and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence

EXIT_USER_ERROR = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the user asked for something wrong": one line, exit code 2."""
    from .adapters import AdapterError
    from .data import DataError, DemoDataError, VolumeError
    from .data.preprocess import PreprocessingError
    from .engine import EngineError
    from .models import CheckpointError, PresetError, ShippedModelError

    return (AdapterError, PresetError, CheckpointError, DataError, VolumeError, DemoDataError, PreprocessingError,
            ShippedModelError, EngineError)


#: ``--skull-strip`` of finetune and segment
_SKULL_STRIP_HELP = ("whole-head scans (skull, scalp, neck): everything outside the brain is set to background before "
                     "the model sees it, the brain found by registering pydeface's mean head, whose brain is known, to "
                     "the scan (about 5-10 s a scan). auto (default): scans whose foreground is larger than a brain "
                     "(2.8 L) and register as a T1 head (others are left as they are, and said so); on: every scan, refusing one "
                     "that is not a T1 head; off: none (a skull-stripped brain is left alone by auto)")


def format_table(rows: list[dict[str, Any]], columns: Sequence[str], headers: Sequence[str] | None = None) -> str:
    """Plain-text table; integers get thousands separators, floats 4 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, bool) or value is None:
            return "" if value is None else str(value)
        if isinstance(value, int):
            return f"{value:,}"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    headers = list(headers or columns)
    body = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)]
    numeric = [all(r[i].replace(",", "").replace(".", "").lstrip("-").isdigit() for r in body if r[i]) for i in range(len(headers))]
    line = lambda cells: "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, body)])


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--threads 0`` is an argument error, not a silent 1)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _float(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def non_negative_float(text: str) -> float:
    value = _float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def min_component(text: str) -> float | None:
    """argparse type for ``segment --min-component``: ``auto`` (None) or mm³ >= 0."""
    if text.strip().lower() == "auto":
        return None
    try:
        return non_negative_float(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: give auto or a volume in mm³ (>= 0, e.g. 1000)") from None


def overlap_fraction(text: str) -> float:
    """argparse type for ``--overlap``: a fraction in [0, 1)."""
    value = _float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1 (e.g. 0.5), got {text}")
    return value


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# ------------------------------------------------------------------------------------------------ commands


def cmd_methods(args: argparse.Namespace) -> int:
    from .engine import list_methods

    rows = list_methods()
    if args.json:
        _print_json(rows)
    else:
        cols = ["name", "layers", "summary"] + (["lr_unetr", "lr_ddpm", "reference", "options"] if args.verbose else [])
        heads = ["name", "layers", "summary"] + (["lr UNETR", "lr DDPM", "reference", "options"] if args.verbose else [])
        print(format_table(rows, cols, heads))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .engine import list_models

    rows = list_models()
    if args.json:
        _print_json(rows)
    else:
        print(format_table(rows, ["name", "task", "parameters", "patch", "spacing", "description"],
                           ["name", "task", "parameters", "patch", "working grid", "description"]))
    return 0


def adapter_config_from_args(args: argparse.Namespace):
    """The AdapterConfig named by --method/--rank/... or by --config FILE (flags given on the line win)."""
    from .adapters import AdapterConfig

    base = AdapterConfig.from_json(args.config).to_dict() if getattr(args, "config", None) else {}
    given = {
        "method": args.method, "rank": args.rank, "alpha": args.alpha, "dropout": args.dropout, "bias": args.bias,
        "targets": args.targets, "trainable": args.trainable, "seed": getattr(args, "adapter_seed", None),
    }
    if getattr(args, "adapter_only", False):
        given["trainable"] = []
    options = dict(base.get("options", {}))
    for item in getattr(args, "option", None) or []:
        key, sep, value = item.partition("=")
        if not sep:
            from .adapters import AdapterError

            raise AdapterError(f"--option {item!r}: expected NAME=VALUE, e.g. --option every=40")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    merged = {**base, **{k: v for k, v in given.items() if v is not None}, "options": options}
    return AdapterConfig.from_dict(merged, source="command line")


def add_adapter_arguments(parser: argparse.ArgumentParser, default_method: str = "lora", default_rank: int = 4) -> None:
    group = parser.add_argument_group("adapter")
    group.add_argument("--method", default=None, help=f"adaptation method (see `tensorpeft methods`; default {default_method})")
    group.add_argument("--rank", type=int, default=None, help=f"adapter rank (default {default_rank})")
    group.add_argument("--alpha", type=float, default=None, help="scale = alpha / rank for low-rank methods (default: rank)")
    group.add_argument("--dropout", type=float, default=None, help="dropout on the adapter path (default 0)")
    group.add_argument("--bias", choices=["none", "adapted", "all"], default=None,
                       help="which biases train (default: the model family's published choice)")
    group.add_argument("--targets", nargs="+", default=None, metavar="REGEX|@SET",
                       help="module-name patterns to adapt (default: the method's published layers); named sets: "
                            "@defaults (those published layers), on a UNETR @decoder-upsamplers (its decoder's "
                            "ConvTranspose3d) and @upsamplers (every ConvTranspose3d), e.g. --targets @defaults "
                            "@decoder-upsamplers")
    group.add_argument("--trainable", nargs="*", default=None, metavar="REGEX",
                       help="extra parameters to train, searched in parameter names (default: e.g. the UNETR decoder)")
    group.add_argument("--adapter-only", action="store_true", help="train the adapter only (same as --trainable with no pattern)")
    group.add_argument("--option", action="append", metavar="NAME=VALUE", help="method option, repeatable")
    group.add_argument("--config", metavar="JSON", help="read adapter settings from a JSON file (flags override it)")
    parser.set_defaults(_default_method=default_method, _default_rank=default_rank)


def _apply_adapter_defaults(args: argparse.Namespace) -> None:
    if getattr(args, "config", None) is None:
        if args.method is None:
            args.method = args._default_method
        if args.rank is None:
            args.rank = args._default_rank


def cmd_params(args: argparse.Namespace) -> int:
    from .adapters.catalog import PAPER_COUNT_NOTES
    from .engine import parameter_report

    _apply_adapter_defaults(args)
    report = parameter_report(args.model, adapter_config_from_args(args))
    if args.json:
        _print_json(report)
        return 0
    print(f"{report['model']} + {report['method']} (rank {report['rank']}): {report['layers_wrapped']} layers adapted")
    print(format_table(
        [{"count": "total (with adapter)", "parameters": report["total"]},
         {"count": "trainable", "parameters": report["trainable"]},
         {"count": "adapter", "parameters": report["adapter"]}],
        ["count", "parameters"]))
    print(f"trainable: {report['trainable_percent']:.3f}% of the base model's {report['base_total']:,}")
    # Published counts differ in what they include (the adapted layers' biases above all): say what ours does.
    biases = report.get("trainable_adapted_biases", 0)
    other = report["trainable"] - report["adapter"] - biases
    without = f"; without those biases {report['trainable'] - biases:,}" if biases else ""
    print(f"counted as: adapter {report['adapter']:,} + biases of the adapted layers {biases:,} "
          f"(--bias {report.get('bias')}) + other trainable {other:,} (--trainable: e.g. the UNETR decoder, the "
          f"DDPM norms) = {report['trainable']:,} trainable{without}")
    note = PAPER_COUNT_NOTES.get(report["method"])
    if note:
        print(f"paper count: {note}")
    return 0


class OneLineParser(argparse.ArgumentParser):
    """An argument mistake is one line on stderr (what is wrong, where the help is) and exit code 2, not the whole
    usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # every process of a torchrun job parses the same command line: rank 0 alone says what is wrong with it
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n" if _env_rank() == 0 else None)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = OneLineParser(
        prog="tensorpeft",
        description="Parameter-efficient fine-tuning of 3D medical models (UNETR segmentation; 3D DDPM and latent "
                    "diffusion synthesis).",
        epilog="Run `tensorpeft COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"tensorpeft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("methods", help="list the adaptation methods", description="List the adaptation methods.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="also show each method's default learning rates, references and options")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("models", help="list the model presets and shipped pretrained models",
                       description="List the model presets (random weights) and the pretrained models shipped with "
                                   "TensorPEFT (demo-unetr, demo-ldm), which --model accepts by name.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("params", help="count total / trainable / adapter parameters",
                       description="Count the parameters a method trains on a model preset.")
    p.add_argument("--model", default="unetr-paper",
                   help="model preset, shipped model, checkpoint file or latent diffusion bundle folder (default "
                        "unetr-paper; see `tensorpeft models`)")
    add_adapter_arguments(p, default_method="lora-pt", default_rank=1)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_params)

    p = sub.add_parser("app", help="the browser app: the whole workflow in Slicer-core views (trame-slicer)",
                       description="Serve the browser app: load scans from a folder under --data-root, fine-tune with "
                                   "live progress and Cancel/Resume, segment and synthesize, shown in Slicer-core's "
                                   "slice and 3D views. Jobs run in worker processes, as from the Slicer module. "
                                   "Needs the app extra: pip install 'tensorpeft[app]'.")
    p.add_argument("--data-root", default=".", metavar="DIR",
                   help="the one folder the page may read and write (scans, models, runs; default: here)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only; any other address needs a token)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080; 0 picks a free one)")
    p.add_argument("--token", nargs="?", const="", default=None,
                   help="require this access token (16+ characters); --token alone generates one; required and "
                        "generated when --host is not a loopback address")
    p.add_argument("--worker-threads", type=int, default=0, metavar="N",
                   help="torch threads for fine-tuning jobs (default 0: one per core)")
    p.set_defaults(func=cmd_app)

    for extend in _EXTENSIONS:
        extend(sub)
    return parser


def cmd_app(args: argparse.Namespace) -> int:
    """Errors of the app's own options are one line here: the app process stays torch-free (``_user_errors``
    imports the engine)."""
    from .app.access import AccessError
    from .app.server import AppError, run

    if not 0 <= args.port <= 65535:
        return _app_error(f"--port {args.port}: choose 0 to 65535")
    if args.worker_threads < 0:
        return _app_error(f"--worker-threads {args.worker_threads}: choose 0 (one per core) or more")
    try:
        return run(args.data_root, host=args.host, port=args.port, token=args.token or None,
                   require_token=args.token is not None, worker_threads=args.worker_threads)
    except (AppError, AccessError) as err:
        return _app_error(str(err))
    except OSError as err:
        if err.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            return _app_error(f"--port {args.port}: already in use; choose another port (or 0 for a free one)")
        if err.errno in (99, 49, 10049):  # EADDRNOTAVAIL
            return _app_error(f"--host {args.host}: not an address of this machine")
        raise


def _app_error(message: str) -> int:
    print(f"tensorpeft: error: {message}", file=sys.stderr)
    return EXIT_USER_ERROR


#: later command groups (data, engine jobs) register here: each gets the subparsers object
_EXTENSIONS: list[Callable[[Any], None]] = []


# ------------------------------------------------------------------------------------------------ jobs


def _three(text: str, kind: type) -> tuple:
    """``"64"`` → (64, 64, 64); ``"128x128x96"`` (or commas) → three values of ``kind``; () when it is not that."""
    parts = [p for p in text.lower().replace(",", "x").split("x") if p]
    try:
        values = tuple(kind(p) for p in parts)
    except ValueError:
        return ()
    return values * 3 if len(values) == 1 else values


def _size(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    from .engine import EngineError

    values = _three(text, int)
    if len(values) != 3:
        raise EngineError(f"size {text!r}: give one number (e.g. 64) or three (e.g. 128x128x96)")
    if min(values) < 1:
        raise EngineError(f"size {text!r}: every side must be >= 1 (e.g. 64 or 128x128x96)")
    return values  # type: ignore[return-value]


def _spacing(text: str | None) -> tuple[float, float, float] | None:
    if text is None:
        return None
    values = _three(text, float)
    if len(values) != 3 or not all(0 < v < float("inf") for v in values):  # nan and inf too
        from .engine import EngineError

        raise EngineError(f"--spacing {text!r}: give one voxel size in mm (e.g. 1.5) or three (e.g. 1x1x2)")
    return values  # type: ignore[return-value]


def _env_rank() -> int:
    """This process's rank in a torchrun job, from the environment (0 outside one; read without importing torch)."""
    import os

    try:
        return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0
    except ValueError:
        return 0


def _events(args: argparse.Namespace):
    from .engine import Events

    if _env_rank() != 0:
        return Events.silent_sink()  # rank 0 speaks for a torchrun job (progress, events file, messages)
    return Events(getattr(args, "events", None), quiet=getattr(args, "quiet", False))


def add_runtime_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("runtime")
    group.add_argument("--device", default="auto", help="auto (CUDA, else MPS, else CPU), cuda, cuda:N, mps or cpu")
    group.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "off"],
                       help="mixed precision (auto: bf16/fp16 on CUDA; bf16 on CPUs with native bf16 (AVX512-BF16/AMX), else off)")
    group.add_argument("--threads", type=positive_int, default=None,
                       help="CPU threads (default: every core this process may use, whatever the load; pass fewer "
                            "when other work shares the machine). On CPU the same seed, thread count, torch and "
                            "machine give the same adapter bytes; another thread count gives a slightly different "
                            "one. --resume uses the run's recorded count.")
    group.add_argument("--events", metavar="FILE|-", default=None,
                       help="write JSON-lines progress events (start, step, eval, checkpoint, done, error) to FILE or stdout (-)")
    group.add_argument("--quiet", "-q", action="store_true", help="no progress bar or messages")


def cmd_finetune(args: argparse.Namespace) -> int:
    from .engine import EXIT_CANCELLED, TrainSettings, finetune

    resume_only = args.resume and args.method is None and args.config is None
    _apply_adapter_defaults(args)
    cfg = None if resume_only else adapter_config_from_args(args)
    settings = TrainSettings(steps=args.steps, lr=args.lr, weight_decay=args.weight_decay, optimizer=args.optimizer,
                             accumulate=args.accumulate, eval_every=args.eval_every,
                             checkpoint_every=args.checkpoint_every, seed=args.seed)
    events = _events(args)
    result = finetune(args.model, args.data, args.out, cfg, settings, val=args.val, device=args.device, amp=args.amp,
                      events=events, resume=args.resume, overwrite=args.overwrite, batch_size=args.batch_size,
                      patch_size=_size(args.patch_size), spacing=_spacing(args.spacing), affine=args.affine,
                      elastic=args.elastic, flip=args.flip, auto_val=not args.no_val, threads=args.threads,
                      checkpointing=args.checkpointing, autoencoder=args.autoencoder, align=args.align,
                      skull_strip=args.skull_strip, labels=args.labels, head_init=args.head_init,
                      patch_centres=args.patch_centres)
    events.close()
    if result.status == "cancelled":
        if _env_rank() == 0:
            print(f"cancelled at step {result.step}; checkpoint kept in {args.out} (continue with --resume)", file=sys.stderr)
        return EXIT_CANCELLED
    if not args.quiet and args.events != "-" and _env_rank() == 0:
        best = f", best validation {result.best:.4f}" if result.best is not None else ""
        print(f"adapter written to {result.out} ({result.step} steps, {result.seconds:.0f} s{best})")
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    from .engine import segment

    events = _events(args)
    records = segment(args.image, args.out, model_source=args.model, adapter=args.adapter, device=args.device,
                      amp=args.amp, sw_batch_size=args.sw_batch_size, overlap=args.overlap,
                      min_component_mm3=args.min_component, mirror=args.mirror, events=events, threads=args.threads,
                      skip_existing=args.skip_existing, skull_strip=args.skull_strip)
    events.close()
    if _env_rank() != 0:
        return 0  # rank 0 lists every rank's masks
    if args.json:
        _print_json(records)
    elif not args.quiet and args.events != "-":
        for r in records:
            print(f"{r['mask']}  ({r['foreground_ml']:.2f} ml foreground, {r['seconds']:.0f} s)")
    return 0


def cmd_synthesize(args: argparse.Namespace) -> int:
    from .engine import synthesize

    events = _events(args)
    paths = synthesize(args.out, args.count, model_source=args.model, adapter=args.adapter, steps=args.steps,
                       sampler=args.sampler, size=_size(args.size), seed=args.seed, device=args.device, amp=args.amp,
                       events=events, threads=args.threads, autoencoder=args.autoencoder)
    events.close()
    if not args.quiet and args.events != "-":
        print("\n".join(paths))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .engine import evaluate

    result = evaluate(args.pred, args.ref, kind=args.kind, window=args.window, figure=args.figure, align=args.align)
    lone = result.get("unmatched_references") or []
    if lone:
        names = ", ".join(os_basename(r) for r in lone[:5]) + (" ..." if len(lone) > 5 else "")
        print(f"note: {len(lone)} reference(s) have no prediction and are not in the mean: {names}", file=sys.stderr)
    if args.json:
        _print_json(result)
    elif result["kind"] == "segmentation":
        rows = result["cases"] + [{"case": "mean", **result["mean"]}]
        values = list(result["mean"].get("structures") or {})
        for row in rows:  # several structures: a Dice column for each label value
            for v in values:
                row[f"dice_{v}"] = (row.get("structures") or {}).get(v, {}).get("dice", float("nan"))
        print(format_table(rows, ["case", "dice", "hd95", *(f"dice_{v}" for v in values)],
                           ["case", "Dice", "HD95 (mm)", *(f"Dice {v}" for v in values)]))
    else:
        mean = result["mean"]
        print(format_table([mean], ["generated", "real", "pairs", "ms_ssim", "fd_features", "mmd_features", "mmd_voxels"],
                           ["generated", "real", "pairs", "MS-SSIM", "FD (features)", "MMD (features)", "MMD (voxels)"]))
        print(f"MS-SSIM: real volume i paired with generated volume i (sorted by name), window {mean['ms_ssim_window']}, "
              f"{mean['ms_ssim_scales']} scale(s); features: {mean.get('feature_network', 'not computed')}; MMD: "
              f"squared, Gaussian kernel, median-distance bandwidth")
        realism = mean.get("realism")
        if realism:
            print(f"realism of the generated volumes vs the real ones: {realism['summary']}; "
                  f"all passed: {'yes' if realism['pass']['all'] else 'no'}")
        if result.get("figure"):
            print(f"figure: {result['figure']}")
    return 0


def os_basename(path: str) -> str:
    import os

    return os.path.basename(path)


def cmd_demo_data(args: argparse.Namespace) -> int:
    from .data import build_demo_cohort
    from .engine.outputs import check_output_folder

    check_output_folder(args.out, option="demo-data OUT")
    sizes = {k: v for k, v in (("n_train", args.train), ("n_test", args.test)) if v is not None}
    summary = build_demo_cohort(args.out, seed=args.seed, progress=not args.quiet and not args.json, **sizes)
    if args.json:
        _print_json(summary)
    else:
        print(f"demo cohort written to {args.out} in {summary.get('seconds', 0):.1f} s")
    return 0


def _ddpm_lr_help() -> str:
    """The DDPM learning-rate defaults as `finetune --help` states them, read from the catalog so the text cannot
    drift from what finetune uses."""
    from .adapters.catalog import DEFAULT_LR

    named = {k: v for k, v in DEFAULT_LR["ddpm"].items() if k != "*"}
    by_rate: dict[float, list[str]] = {}
    for method, rate in named.items():
        by_rate.setdefault(rate, []).append(method)
    parts = [f"{_rate(rate)} {'/'.join(sorted(methods))}" for rate, methods in sorted(by_rate.items())]
    return ", ".join(parts + [f"{_rate(DEFAULT_LR['ddpm']['*'])} the others"])


def _rate(value: float) -> str:
    """1e-05 -> 1e-5, as the help texts write rates."""
    return f"{value:.0e}".replace("e-0", "e-")


def _add_job_commands(sub: Any) -> None:
    from .adapters.catalog import (SEGMENTATION_STEPS, SEGMENTATION_STEPS_PER_STRUCTURE, SYNTHESIS_STEPS, default_lr,
                                   default_steps)

    p = sub.add_parser("finetune", help="fine-tune a model with an adapter on labelled cases",
                       description="Fine-tune a pretrained UNETR (segmentation) or DDPM (synthesis) with an adapter. "
                                   "Writes OUT/adapter.safetensors + adapter_config.json (best validation score, else "
                                   "last), OUT/last/, OUT/checkpoint/ (for --resume), history.json, metrics.csv, report.png.")
    p.add_argument("--model", required=True,
                   help="pretrained checkpoint (.safetensors/.pt/bundle folder) or preset name; a latent diffusion model "
                        "is its MONAI bundle folder (configs/inference.json defining AutoencoderKL + "
                        "DiffusionModelUNet, models/ with both weights): its U-Net is adapted, its autoencoder frozen")
    p.add_argument("--autoencoder", default=None, metavar="FILE",
                   help="the autoencoder's weights of a latent diffusion model, when they are not in the bundle folder "
                        "given as --model (default: the file its configs/inference.json names, e.g. "
                        "models/autoencoder.pt)")
    p.add_argument("--data", required=True, help="training data: Decathlon folder (imagesTr/, labelsTr/) or MONAI datalist JSON")
    p.add_argument("--val", help="validation data (same layout), scored during training")
    p.add_argument("--labels", nargs="+", metavar="SPEC", default=None,
                   help="which label values are the structures to learn, one class each: e.g. --labels 17 53 "
                        "(FreeSurfer's left and right hippocampus), 17+53 (both as one structure), left=17 right=53 "
                        "(named); other values are background. Default: every non-zero value in the labels, one class "
                        "each, named as a Slicer .seg.nrrd names them. More structures than the model predicts get a "
                        "wider output layer; segment writes masks in these values")
    p.add_argument("--out", required=True, help="adapter folder to write")
    add_adapter_arguments(p, default_method="lora-pt", default_rank=1)
    t = p.add_argument_group("training")
    t.add_argument("--steps", type=positive_int, default=None,
                   help=f"optimiser steps (default: {SEGMENTATION_STEPS} for up to {SEGMENTATION_STEPS // 100} segmentation "
                        f"cases, 100 per case beyond; for more than two structures at least {2 * SEGMENTATION_STEPS} and "
                        f"{SEGMENTATION_STEPS_PER_STRUCTURE} per structure; {SYNTHESIS_STEPS} synthesis)")
    t.add_argument("--lr", type=float, default=None,
                   help="learning rate, decayed polynomially (default: the method's own for the model family, recorded in "
                        f"adapter_config.json: {_rate(default_lr('lora', 'unetr'))} on a UNETR; on a DDPM {_ddpm_lr_help()}; "
                        "`tensorpeft methods -v` lists them)")
    t.add_argument("--weight-decay", type=float, default=1e-5, help="weight decay (default 1e-5)")
    t.add_argument("--optimizer", choices=["adam", "adamw"], default="adam")
    t.add_argument("--batch-size", type=positive_int, default=None, help="patches per step (default 2 segmentation, 1 synthesis)")
    t.add_argument("--accumulate", type=positive_int, default=1, help="gradient accumulation steps (default 1)")
    t.add_argument("--patch-size", default=None, help="training patch, e.g. 64 or 128x128x96 (default: the model's size)")
    t.add_argument("--spacing", default=None,
                   help="working voxel size in mm, e.g. 1.5 or 1x1x1.2: every case is resampled to it (default: the "
                        "spacing the model records, else the median of the training cases)")
    t.add_argument("--affine", action=argparse.BooleanOptionalAction, default=True,
                   help="random rotation (±10°), scaling (±10 %%) and shift (±8 voxels) of each training patch (default "
                        "on: with few subjects the model then learns what a structure looks like, not where it sits)")
    t.add_argument("--elastic", action="store_true", help="add random elastic deformation")
    t.add_argument("--flip", choices=["auto", "all", "lr", "none"], default="auto",
                   help="random flips in segmentation training: lr (left-right only, plausible for brain anatomy), "
                        "all axes (the LoRA-PT recipe) or none; auto (default): lr. When your labels tell a left from "
                        "a right structure (17 and 53), a left-right flip also swaps each left label with its "
                        "mirror-image partner; without a partner for each (a left structure alone) auto is none")
    t.add_argument("--head-init", choices=["copy", "probe"], default="copy",
                   help="segmentation labels with more structures than the model predicts get a wider output layer; "
                        "copy (default): every new structure starts as the model's old one and training tells them "
                        "apart; probe: it starts fitted to what the base model's features already tell apart (a "
                        "linear probe over 16 training patches): the structures the base model segments come "
                        "sooner, one it calls background later")
    t.add_argument("--patch-centres", choices=["voxels", "classes"], default="voxels",
                   help="with several structures, where the labelled half of the training patches is centred: any "
                        "labelled voxel (default: a structure in proportion to its size) or a structure first, each "
                        "as often (nnU-Net's way)")
    t.add_argument("--align", choices=["auto", "off"], default="auto",
                   help="synthesis: register each training volume (12-parameter affine) to the brain the base model "
                        "was pre-trained on, and sample it on the model's grid, so the model learns how your brains "
                        "look, not how they were posed in the scanner (default auto: when the model names that "
                        "reference, as demo-ldm does (MNI152), and the volumes are not already on its grid; whole heads "
                        "are skull-stripped first (--skull-strip); a volume that does not align - another contrast - is "
                        "refused by name); off: resample and centre the volumes as they are")
    t.add_argument("--skull-strip", choices=["auto", "on", "off"], default=None,
                   help=_SKULL_STRIP_HELP + "; recorded in the adapter for segment, kept on --resume")
    t.add_argument("--no-val", action="store_true",
                   help="without --val, train on every case (default: hold out a quarter of 4 or more cases to pick "
                        "the best adapter)")
    t.add_argument("--eval-every", type=positive_int, default=None, help="validate every N steps (default: a fifth of the steps)")
    t.add_argument("--checkpoint-every", type=positive_int, default=None,
                   help="write a resumable checkpoint every N steps (default: as --eval-every)")
    t.add_argument("--seed", type=int, default=0,
                   help="seed of sampling and augmentation (default 0): on CPU the same seed and --threads give the "
                        "same adapter bytes")
    t.add_argument("--checkpointing", action=argparse.BooleanOptionalAction, default=None,
                   help="activation checkpointing: the ViT blocks (UNETR) or resnet blocks (DDPM) keep only their "
                        "inputs and run again in backward, for less memory at more compute; the gradients are the "
                        "same (default off; --resume keeps the run's setting)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace an earlier run in --out")
    add_runtime_arguments(p)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("segment", help="segment an image or a folder of images",
                       description="Segment images with a UNETR and an adapter (merged first: no overhead). Each scan, "
                                   "a whole head or a skull-stripped brain at any voxel size, orientation and intensity "
                                   "range, is resampled to the working grid the adapter (or model) records, "
                                   "skull-stripped if it is a whole head, intensity-scaled on its brain and cropped to "
                                   "it; masks are written on each image's own grid.")
    p.add_argument("--image", required=True,
                   help="a scan (.nii, .nii.gz, .nrrd, .mgz), a folder holding one DICOM series, or a folder of "
                        "scans and DICOM series folders")
    p.add_argument("--out", required=True, help="mask file (single image) or folder")
    p.add_argument("--model", default=None, help="base model (default: the one the adapter was trained on)")
    p.add_argument("--adapter", default=None, help="adapter folder (omit to run the base model alone)")
    p.add_argument("--sw-batch-size", type=positive_int, default=4, help="sliding-window batch (halved automatically on GPU OOM)")
    p.add_argument("--overlap", type=overlap_fraction, default=0.5,
                   help="sliding-window overlap, at least 0 and below 1 (default 0.5)")
    p.add_argument("--min-component", type=min_component, default=None, metavar="MM3|auto",
                   help="remove pieces of a structure smaller than this many mm³ (0 keeps all). auto (default): "
                        "pieces under a quarter of the structure's largest piece in the mask and under 1000 mm³ "
                        "(LoRA-PT's threshold), so a structure under 1 mL, such as the accumbens, is kept")
    p.add_argument("--mirror", choices=("auto", "none", "lr", "all"), default="auto",
                   help="test-time mirroring: average the prediction over flips along these axes (lr = left-right: 2 "
                        "passes; all: 8; a left and a right label swap in the flipped pass, as in training). auto "
                        "(default): the flips the adapter was trained with, none without one")
    p.add_argument("--skull-strip", choices=["auto", "on", "off"], default=None,
                   help=_SKULL_STRIP_HELP + " (default: what the adapter was trained with, else auto)")
    p.add_argument("--skip-existing", action="store_true",
                   help="leave images whose mask is already in --out (masks are written whole or not at all): run a "
                        "killed job again with this flag and it continues where it stopped")
    p.add_argument("--json", action="store_true", help="print the written masks as JSON")
    add_runtime_arguments(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("synthesize", help="generate volumes with a DDPM or a latent diffusion model",
                       description="Generate MRI volumes with a DDPM (pixel space, or a latent diffusion model given as "
                                   "its MONAI bundle folder: latents are denoised, then decoded by its autoencoder) and "
                                   "an adapter; writes NIfTI files and samples.png.")
    p.add_argument("--out", required=True, help="folder for the generated volumes")
    p.add_argument("--count", type=positive_int, default=4, help="number of volumes (default 4)")
    p.add_argument("--model", default=None,
                   help="base model: preset, shipped model, checkpoint or latent diffusion bundle folder (default: the "
                        "one the adapter was trained on)")
    p.add_argument("--autoencoder", default=None, metavar="FILE",
                   help="the autoencoder's weights of a latent diffusion model, when they are not in the bundle folder "
                        "given as --model (default: the file the adapter was fine-tuned with, else the one the "
                        "bundle's configs/inference.json names, e.g. models/autoencoder.pt)")
    p.add_argument("--adapter", default=None, help="adapter folder (omit to sample the base model)")
    p.add_argument("--steps", type=positive_int, default=50, help="DDIM steps (default 50)")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    p.add_argument("--size", default=None,
                   help="volume size in voxels, e.g. 32 or 128x128x96 (default: the training size; a latent bundle's "
                        "latent shape times its autoencoder's down-sampling)")
    p.add_argument("--seed", type=int, default=0)
    add_runtime_arguments(p)
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser("evaluate", help="Dice/HD95 of masks, or MS-SSIM/FD/MMD of generated volumes",
                       description="Score masks against reference labels (matched by case name) or generated volumes "
                                   "against real ones with the TenVOO paper's metrics, computed as its released code "
                                   "does: MS-SSIM of each real volume paired with one generated volume (sorted by "
                                   "name; Gaussian window, 5 scales where the size allows, fewer on small volumes), "
                                   "the Frechet distance and MMD between the two sets' features (of the shipped "
                                   "demo-unetr's ViT encoder: the paper's Med3D cannot be downloaded here, so the "
                                   "numbers compare runs of this tool, not the paper's) and MMD on the voxels. "
                                   "Synthesis also writes a figure (the pairs and the feature sets).")
    p.add_argument("--pred", required=True, help="predicted mask(s) or generated volume(s): file or folder")
    p.add_argument("--ref", required=True, help="reference label(s) or real volume(s): file or folder")
    p.add_argument("--kind", choices=["auto", "segmentation", "synthesis"], default="auto")
    p.add_argument("--window", type=positive_int, default=7,
                   help="synthesis: MS-SSIM window in voxels, odd (default 7 as the TenVOO release; it uses 5 for BraTS)")
    p.add_argument("--figure", default=None, metavar="PNG",
                   help="synthesis: where to write the figure (default: evaluation.png in the --pred folder)")
    p.add_argument("--align", choices=["auto", "off"], default="auto",
                   help="synthesis: real scans not on the generated volumes' grid are registered to the reference "
                        "brain the generated volumes are in (auto, when synthesize recorded one in synthesis.json: the "
                        "fine-tune registered its volumes to it), else resampled onto that grid in world space (off: "
                        "always resampled)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo-data", help="build the demo cohort from templates shipped in pip packages",
                       description="Build the demo cohort (hippocampus task, source task, synthesis set) from real "
                                   "anatomy shipped inside installed packages. Nothing is downloaded.")
    p.add_argument("out", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", type=int, default=None, help="training subjects for the hippocampus task")
    p.add_argument("--test", type=int, default=None, help="held-out subjects")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", "-q", action="store_true")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("pretrain", help="train a built-in demo model from scratch (recipes)",
                       description="Run a pretraining recipe (demo-unetr, demo-unetr-stage1, demo-ldm, demo-ddpm) on the demo cohort and export fp16 "
                                   "weights with a model card (recipe, data, steps, seed, metrics, SHA-256).")
    p.add_argument("--recipe", required=True,
                   help="demo-unetr (trains its first stage, demo-unetr-stage1, first), demo-unetr-stage1, demo-ldm "
                        "(the shipped synthesis model) or demo-ddpm (the old 32³ pixel DDPM)")
    p.add_argument("--out", required=True, help="folder for the run, the weights and the card")
    p.add_argument("--cohort", default=None, help="an existing demo cohort (default: build one in OUT/cohort)")
    p.add_argument("--steps", type=positive_int, default=None,
                   help="override the recipe's steps (a latent recipe: its diffusion steps)")
    p.add_argument("--autoencoder-steps", type=positive_int, default=None,
                   help="override a latent recipe's autoencoder steps (demo-ldm: 6000)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted recipe run")
    p.add_argument("--ship", action="store_true",
                   help="also copy the weights and card into the package (replaces the shipped model; maintainers)")
    add_runtime_arguments(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("demo", help="the whole product on the built-in demo: fine-tune, segment, synthesize",
                       description="Build the demo cohort from real anatomy shipped in pip packages, fine-tune the shipped "
                                   "UNETR (never trained on the hippocampus) on a few labelled subjects, segment held-out "
                                   "subjects and compare with the base model (Dice, HD95); then fine-tune the shipped DDPM "
                                   "with TenVOO-Q and synthesize volumes. Nothing is downloaded.")
    p.add_argument("--out", default="tensorpeft-demo", help="output folder (default ./tensorpeft-demo)")
    p.add_argument("--method", default="lora-pt", help="adapter for the UNETR (default lora-pt; see `tensorpeft methods`)")
    p.add_argument("--methods", default=None, metavar="A,B,...",
                   help="compare several adapters on the same split in one table, each NAME or NAME:RANK "
                        "(e.g. lora:4,lora-pt:1,tcurlora:8; overrides --method)")
    p.add_argument("--rank", type=int, default=1, help="adapter rank (default 1)")
    p.add_argument("--subjects", type=positive_int, default=None, help="labelled training subjects (default 5, plus 2 more that pick the best adapter; 2 with --quick)")
    p.add_argument("--steps", type=positive_int, default=None, help=f"UNETR fine-tuning steps (default: finetune's, {default_steps('segmentation', 5)} for 5 subjects; 4 with --quick)")
    p.add_argument("--lr", type=float, default=None, help="UNETR fine-tuning learning rate (default 1e-3)")
    p.add_argument("--no-synthesis", action="store_true", help="skip the DDPM part")
    p.add_argument("--quick", action="store_true", help="smoke version, about 2 minutes on a 2-core CPU (small cohort, a few steps)")
    p.add_argument("--seed", type=int, default=0, help="seed of the cohort and the training (default 0)")
    p.add_argument("--json", action="store_true", help="print the final summary as JSON")
    add_runtime_arguments(p)
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from .engine.demo import DemoSettings, format_summary, run_demo
    from .engine.outputs import check_output_folder

    from .engine import EngineError

    check_output_folder(args.out)
    chosen: dict[str, Any] = dict(method=args.method, rank=args.rank, synthesis=not args.no_synthesis, seed=args.seed)
    for flag, key, value in (("--subjects", "subjects", args.subjects), ("--steps", "seg_steps", args.steps)):
        if value is not None:
            if value < 1:
                raise EngineError(f"{flag} must be at least 1, got {value}")
            chosen[key] = value
    if args.rank < 1:
        raise EngineError(f"--rank must be at least 1, got {args.rank}")
    if args.lr is not None:
        chosen["seg_lr"] = args.lr
    settings = DemoSettings.quick(**chosen) if args.quick else DemoSettings(**chosen)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    events = _events(args)
    if args.json:
        events.quiet = True
    summary = run_demo(args.out, settings, methods=methods, device=args.device, threads=args.threads, events=events)
    events.close()
    if args.json:
        _print_json(_json_summary(summary))
    elif args.events != "-":
        print(format_summary(summary))
    return 0


def _json_summary(summary: dict[str, Any]) -> dict[str, Any]:
    """The final summary for machines: per model Dice/HD95 by group, trainable parameters, seconds, output paths."""
    seg = summary["segmentation"]
    models = [{"model": "base", **{g: v for g, v in seg["base"]["groups"].items()}}]
    for r in seg["adapted"]:
        models.append({"model": f"{r['method']} r={r['rank']}", "method": r["method"], "rank": r["rank"],
                       "trainable": r["trainable"], "total_parameters": r["total_parameters"],
                       "train_seconds": r["train_seconds"], "adapter": r["adapter"], "masks": r["masks"],
                       **{g: v for g, v in r["groups"].items()}})
    out = {"segmentation": models, "cases": seg["adapted"][0]["cases"], "base_cases": seg["base"]["cases"],
           "png": seg["png"], "seconds": summary["seconds"], "summary": f"{summary['out']}/summary.json"}
    if "synthesis" in summary:
        out["synthesis"] = {k: summary["synthesis"][k] for k in
                            ("method", "rank", "trainable", "total_parameters", "train_seconds", "sample_seconds",
                             "mmd_to_target", "realism", "volumes", "png", "target", "ventricles_ml",
                             "compare_png")}
    return out


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .engine.outputs import check_output_folder
    from .engine.pretrain import pretrain

    check_output_folder(args.out)
    events = _events(args)
    card = pretrain(args.recipe, args.out, cohort=args.cohort, steps=args.steps, device=args.device,
                    threads=args.threads, events=events, resume=args.resume, ship=args.ship,
                    ae_steps=args.autoencoder_steps)
    events.close()
    if args.events != "-" and _env_rank() == 0:
        print(json.dumps(card, indent=2))
    return 0


_EXTENSIONS.append(_add_job_commands)


def _report_error(args: argparse.Namespace, message: str, kind: str) -> None:
    """Tell an events reader (the Slicer module) about the failure too."""
    if getattr(args, "events", None):
        from .engine import Events

        events = Events(args.events)
        events.emit("error", message=message, kind=kind)
        events.close()


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    if argv is None and _env_world_size() > 1:
        # A torchrun worker ends here without the interpreter's teardown: c10d's C++ objects (rank 0 hosts the
        # rendezvous store, whose server thread may still be serving a peer that has not closed yet) are destroyed
        # by static destructors in no set order, and now and then that calls std::terminate ("terminate called
        # without an active exception", SIGABRT) after every output was written, so torchrun reports the finished
        # job as failed. Outputs are written and renamed and the event stream closed by now: flush and leave.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _main(argv: Sequence[str] | None = None) -> int:
    import warnings

    # MONAI announces future default changes on every run; they are for library authors, not for users.
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"monai(\.|$)")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"monai\.utils\.deprecate_utils")
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, or an argument error already reported in one line
        return int(stop.code or 0)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    from .engine.outputs import is_write_failure
    from .engine.runtime import Interrupted

    # resolved before the command runs: an except clause that imports (the data package is lazy) is a window in which
    # torchrun's SIGTERM, after another rank died, turned the survivor's one-line error into a KeyboardInterrupt trace
    user_errors = _user_errors()
    previous = _terminate_as_interrupt()
    try:
        try:
            return int(args.func(args) or 0)
        finally:
            _ignore_terminate()  # the command is over: a late SIGTERM must not cut its one-line report short
    except user_errors as err:
        if type(err).__name__ == "PeerError":
            return EXIT_USER_ERROR  # another rank of this torchrun job failed and printed why
        _report_error(args, str(err), "user")
        print(f"tensorpeft: error: {_rank_prefix()}{err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Interrupted as err:
        _report_error(args, str(err), "interrupted")
        print(f"tensorpeft: {_rank_prefix()}{err}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        _report_error(args, "interrupted", "interrupted")
        print(f"tensorpeft: {_rank_prefix()}interrupted (outputs are written whole or not at all)", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as err:
        if not is_write_failure(err):
            _report_error(args, f"{type(err).__name__}: {err}", "internal")
            raise
        message = f"cannot write {err.filename or 'an output'}: {err.strerror}; free some space or choose another place"
        _report_error(args, message, "user")
        print(f"tensorpeft: error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as err:
        cause = _wrapped_user_error(err, user_errors)
        if cause is not None:  # a user's mistake raised inside a MONAI pipeline, which wraps it in a RuntimeError
            _report_error(args, str(cause), "user")
            print(f"tensorpeft: error: {_rank_prefix()}{cause}", file=sys.stderr)
            return EXIT_USER_ERROR
        _report_error(args, f"{type(err).__name__}: {err}", "internal")
        raise
    finally:
        _restore_signal(previous)
        _leave_process_group()


def _wrapped_user_error(err: BaseException, user_errors: tuple[type[BaseException], ...]) -> BaseException | None:
    """The user error behind ``err`` (followed through ``__cause__``: MONAI's Compose re-raises what a transform raised
    as ``RuntimeError("applying transform ...")``), or None."""
    seen = err.__cause__
    while seen is not None:
        if isinstance(seen, user_errors):
            return seen
        seen = seen.__cause__
    return None


def _rank_prefix() -> str:
    """``[rank N] `` before a message from rank N > 0 of a torchrun job (rank 0 and plain runs: nothing)."""
    module = sys.modules.get("TensorPEFTLib.engine.distributed")
    return module.rank_prefix() if module is not None else ""


def _leave_process_group() -> None:
    """Destroy the process group a command joined under torchrun (torch warns at exit about one left open)."""
    module = sys.modules.get("TensorPEFTLib.engine.distributed")
    if module is not None:
        module.shutdown()


EXIT_INTERRUPTED = 130


def _terminate_as_interrupt() -> Any:
    """SIGTERM (a scheduler's stop, the Slicer module's Cancel) raises KeyboardInterrupt like Ctrl-C from the start
    of a job, so temp files are removed and a lock released instead of the process dying mid-write (the training
    loop installs its own graceful handler on top: finish the step, checkpoint, stop)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def _ignore_terminate() -> None:
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _restore_signal(previous: Any) -> None:
    import signal

    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
