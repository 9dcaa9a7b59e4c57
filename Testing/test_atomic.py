"""One atomic-write helper for models/, data/ and engine/: whole files or none, the format kept by the extension."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from TensorPEFTLib.atomic import (copy_atomically, write_atomically, write_bytes_atomically, write_folder_atomically,
                                  write_text_atomically)

ROOT = Path(__file__).resolve().parents[1]


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path):
    target = tmp_path / "sub" / "report.png"
    seen = []

    def fail(tmp):
        seen.append(tmp)
        Path(tmp).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        write_atomically(target, fail)
    assert seen[0].endswith("-report.png")  # same extension: writers that pick the format by it behave the same
    assert list(target.parent.iterdir()) == []


def test_text_bytes_and_copies_replace_the_target_whole(tmp_path):
    target = tmp_path / "a.json"
    target.write_text("old")
    write_text_atomically(target, "new\n")
    assert target.read_text() == "new\n"
    write_bytes_atomically(tmp_path / "b.bin", b"\x00\x01")
    assert copy_atomically(tmp_path / "b.bin", tmp_path / "c.bin") == str(tmp_path / "c.bin")
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin", "c.bin"]


def test_no_other_temp_then_rename_copies():
    """models/, data/ and engine/ rename nothing by hand: files and whole folders (the trainer's checkpoints, the demo
    cohort) go through atomic.py."""
    found = {}
    for folder in ("models", "data", "engine"):
        for path in (ROOT / "TensorPEFTLib" / folder).rglob("*.py"):
            count = len(re.findall(r"os\.replace\(", path.read_text(encoding="utf-8")))
            if count:
                found[f"{folder}/{path.name}"] = count
    assert found == {}


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
    """write_folder_atomically: nothing of the old folder stays behind; a failed write leaves the old one as it was
    and no half-written folder beside it."""
    final = tmp_path / "run"
    final.mkdir()
    (final / "stale.txt").write_text("old")

    def write(folder: str) -> None:
        (Path(folder) / "new.txt").write_text("new")

    assert write_folder_atomically(final, write) == str(final)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]

    def fail(folder: str) -> None:
        (Path(folder) / "half.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_folder_atomically(final, fail)
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"] and sorted(os.listdir(tmp_path)) == ["run"]


def test_written_files_get_the_permissions_a_plain_write_gives(tmp_path):
    """mkstemp makes its file 0600: masks, adapters and shipped weights written through it were unreadable to the
    other users of a shared folder. A new file gets 0666 less the umask (as ``open`` gives), a replaced one keeps its
    own mode; the same for the adapters' own writer."""
    import os

    import torch
    from torch import nn

    from TensorPEFTLib.adapters import AdapterConfig, save_adapter
    from TensorPEFTLib.adapters.model import inject

    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    expected = plain.stat().st_mode & 0o777
    assert expected != 0o600  # the test's umask lets others read (else it would prove nothing)
    write_text_atomically(tmp_path / "new.json", "{}")
    assert (tmp_path / "new.json").stat().st_mode & 0o777 == expected
    kept = tmp_path / "kept.txt"
    kept.write_text("old")
    os.chmod(kept, 0o640)
    copy_atomically(plain, kept)
    assert kept.stat().st_mode & 0o777 == 0o640

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4))
    inject(model, AdapterConfig(method="lora", rank=1, targets=["0"]))
    save_adapter(model, tmp_path / "adapter")
    for name in ("adapter.safetensors", "adapter_config.json"):
        assert (tmp_path / "adapter" / name).stat().st_mode & 0o777 == expected, name
