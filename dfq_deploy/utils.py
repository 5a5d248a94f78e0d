"""Small helpers shared by every stage: atomic file writes, JSON output, figures as PNG bytes."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dfq_deploy.errors import DfqError

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temp file in the same folder, then rename it over ``path``.

    Raises:
        DfqError: the folder cannot be created or written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise DfqError(f"cannot write to {path.parent}: {exc.strerror} (choose a writable --output)") from exc
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def removed_if_left_empty(path: str | Path) -> Iterator[Path]:
    """On an error or Ctrl-C inside the block, remove the folders of ``path`` that the block created and left empty.

    A command that fails leaves the file system as it found it: a folder that existed before is never removed,
    and neither is one that holds anything (a checkpoint to resume from, say).
    """
    path = Path(path)
    new = [p for p in (path, *path.parents) if not p.exists()]  # innermost first
    try:
        yield path
    except BaseException:
        for p in new:
            try:
                p.rmdir()  # only an empty folder goes
            except OSError:
                break
        raise


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def figure_png(fig: Any, dpi: int = 110, tight: bool = False) -> bytes:
    """A matplotlib figure as PNG bytes (to write atomically); the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, **({"bbox_inches": "tight"} if tight else {}))
    finally:
        plt.close(fig)
    return buf.getvalue()
