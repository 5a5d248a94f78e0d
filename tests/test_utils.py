"""utils: a folder written at once (atomic_write_dir) appears whole or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from dfq_deploy.errors import DfqError
from dfq_deploy.utils import atomic_write_dir


def test_a_folder_appears_whole_with_copied_files(tmp_path: Path) -> None:
    src = tmp_path / "weights.bin"
    src.write_bytes(b"\x00\x01")
    out = atomic_write_dir(tmp_path / "a" / "b", {"x.txt": b"hi", "sub/w.bin": src}, staging=tmp_path)
    assert (out / "x.txt").read_text() == "hi" and (out / "sub" / "w.bin").read_bytes() == b"\x00\x01"
    assert (out.stat().st_mode & 0o777) != 0o700  # not mkdtemp's private mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "weights.bin"]  # no staging folder left
    with pytest.raises(DfqError, match="already exists"):
        atomic_write_dir(out, {"y": b""})


def test_a_failed_write_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(DfqError, match="cannot write"):
        atomic_write_dir(tmp_path / "new" / "out", {"ok.txt": b"1", "gone.bin": tmp_path / "missing.bin"})
    assert list(tmp_path.iterdir()) == []  # neither the folder, its new parent nor the temp folder
