"""The ``tensorpeft`` command: listings, parameter counts, one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from TensorPEFTLib.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_methods_lists_every_registered_method(capsys):
    from TensorPEFTLib.adapters import method_names

    code, out, _ = run_cli(capsys, "methods", "--json")
    assert code == 0
    names = [row["name"] for row in json.loads(out)]
    assert names == method_names() and {"full", "lora", "pissa", "loha", "lokr", "ssf"} <= set(names)


def test_models_counts_presets(capsys):
    code, out, _ = run_cli(capsys, "models", "--json")
    rows = {row["name"]: row for row in json.loads(out)}
    assert code == 0
    # MONAI 1.6.1 sizes of the papers' configurations (reference.md)
    assert rows["unetr-paper"]["parameters"] == 93_029_602
    assert rows["ddpm-paper"]["parameters"] == 166_669_313


def test_params_json_matches_library_count(capsys):
    code, out, _ = run_cli(capsys, "params", "--model", "unetr-small", "--method", "lora", "--rank", "2",
                           "--adapter-only", "--json")
    report = json.loads(out)
    assert code == 0
    # 4 blocks x (qkv 192->576, out_proj 192->192, linear1 192->768, linear2 768->192), r(in+out) each
    expected = 4 * 2 * ((192 + 576) + (192 + 192) + (192 + 768) + (768 + 192))
    assert report["adapter"] == report["trainable"] == expected


def test_params_counts_dora_as_lora_plus_one_magnitude_per_output(capsys):
    code, out, _ = run_cli(capsys, "params", "--model", "unetr-small", "--method", "dora", "--rank", "2",
                           "--adapter-only", "--json")
    report = json.loads(out)
    assert code == 0 and report["method"] == "dora"
    lora = 4 * 2 * ((192 + 576) + (192 + 192) + (192 + 768) + (768 + 192))  # as the LoRA count above
    assert report["adapter"] == report["trainable"] == lora + 4 * (576 + 192 + 768 + 192)


@pytest.mark.parametrize("argv,message", [
    (["params", "--model", "unetr-small", "--method", "lorax"], "unknown method 'lorax'"),
    (["params", "--model", "unetr-small", "--method", "lora", "--rank", "0"], "rank must be >= 1"),
    (["params", "--model", "unet", "--method", "lora"], "unknown model preset 'unet'"),
    (["params", "--model", "unetr-small", "--method", "lora", "--targets", "nothing"], "match no"),
    (["params", "--model", "unetr-small", "--option", "oops"], "expected NAME=VALUE"),
])
def test_user_errors_are_one_line_with_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("tensorpeft: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_config_file_errors(capsys, tmp_path):
    bad = tmp_path / "adapter.json"
    bad.write_text("{oops")
    code, _, err = run_cli(capsys, "params", "--model", "unetr-small", "--config", str(bad))
    assert code == 2 and "adapter.json: not valid JSON" in err
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"method": "ssf", "rank": 1, "trainable": []}))
    code, out, _ = run_cli(capsys, "params", "--model", "unetr-small", "--config", str(good), "--json")
    assert code == 0 and json.loads(out)["method"] == "ssf"


def test_console_entry_point_runs_as_module():
    result = subprocess.run([sys.executable, "-m", "TensorPEFTLib.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "methods" in result.stdout and "params" in result.stdout


def test_params_counts_a_checkpoint_file_as_it_is(capsys, tmp_path):
    """The Slicer panel counts a user's own checkpoint: params loads it instead of assuming the paper preset."""
    from TensorPEFTLib.models import build_model, save_model

    path = str(tmp_path / "mine.safetensors")
    save_model(build_model("unetr-small", out_channels=3), path)
    code, out, _ = run_cli(capsys, "params", "--model", path, "--method", "lora", "--rank", "2", "--json")
    report = json.loads(out)
    assert code == 0 and report["base_total"] == sum(p.numel() for p in build_model("unetr-small", out_channels=3).parameters())


def test_a_sigterm_while_an_error_is_reported_keeps_the_one_line(monkeypatch, capsys):
    """torchrun SIGTERMs the surviving rank right after its collective failed: the signal lands while the survivor
    reports that failure. It must still print its one line and exit 2, not a KeyboardInterrupt traceback (CI saw one:
    the except clause was importing the error classes when the signal came)."""
    import os
    import signal

    from TensorPEFTLib import cli
    from TensorPEFTLib.engine import EngineError

    def failing_command(args):
        raise EngineError("another rank of this job stopped; continue with --resume")

    def report_with_a_signal(args, message, kind):
        os.kill(os.getpid(), signal.SIGTERM)  # delivered before the next bytecode, inside the except clause

    monkeypatch.setattr(cli, "cmd_methods", failing_command)
    monkeypatch.setattr(cli, "_report_error", report_with_a_signal)
    before = signal.getsignal(signal.SIGTERM)
    assert main(["methods"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "tensorpeft: error: another rank of this job stopped; continue with --resume"
    assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler is back
