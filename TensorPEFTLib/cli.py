"""The ``tensorpeft`` command. It only parses arguments and calls the engine.

User mistakes end with one line on stderr (``tensorpeft: error: ...``) and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence

EXIT_USER_ERROR = 2


def _user_errors() -> tuple[type[BaseException], ...]:
    from .adapters import AdapterError
    from .models import PresetError

    errors: list[type[BaseException]] = [AdapterError, PresetError]
    for module, name in [("TensorPEFTLib.models", "CheckpointError"), ("TensorPEFTLib.data", "DataError"),
                         ("TensorPEFTLib.engine", "EngineError")]:
        try:
            errors.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


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


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# ------------------------------------------------------------------------------------------------ commands


def cmd_methods(args: argparse.Namespace) -> int:
    from .engine import list_methods

    rows = list_methods()
    if args.json:
        _print_json(rows)
    else:
        cols = ["name", "layers", "summary"] + (["reference", "options"] if args.verbose else [])
        print(format_table(rows, cols))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .engine import list_models

    rows = list_models()
    if args.json:
        _print_json(rows)
    else:
        print(format_table(rows, ["name", "task", "parameters", "patch", "description"]))
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
    group.add_argument("--targets", nargs="+", default=None, metavar="REGEX",
                       help="module-name patterns to adapt (default: the method's published layers)")
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
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="tensorpeft",
        description="Parameter-efficient fine-tuning of 3D medical models (UNETR segmentation, 3D DDPM synthesis).",
        epilog="Run `tensorpeft COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"tensorpeft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("methods", help="list the adaptation methods", description="List the adaptation methods.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--verbose", "-v", action="store_true", help="also show references and options")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("models", help="list the model presets", description="List the model presets.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("params", help="count total / trainable / adapter parameters",
                       description="Count the parameters a method trains on a model preset.")
    p.add_argument("--model", default="unetr-paper", help="model preset (default unetr-paper; see `tensorpeft models`)")
    add_adapter_arguments(p, default_method="lora-pt", default_rank=1)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_params)

    for extend in _EXTENSIONS:
        extend(sub)
    return parser


#: later command groups (data, engine jobs) register here: each gets the subparsers object
_EXTENSIONS: list[Callable[[Any], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USER_ERROR
    try:
        return int(args.func(args) or 0)
    except _user_errors() as err:
        print(f"tensorpeft: error: {err}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("tensorpeft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
