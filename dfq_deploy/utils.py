"""Small helpers shared by every stage: atomic file and folder writes, JSON output, figures as PNG bytes."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
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


def atomic_write_dir(path: str | Path, files: Mapping[str, bytes | Path], staging: str | Path | None = None) -> Path:
    """Write a new folder all at once: its files go into a temp folder beside ``path``, which is then renamed.

    Readers (a server polling its model repository, a pipeline reading its config) see either no folder or the
    whole one; on an error or Ctrl-C the temp folder is removed, and so are the parents this call created.

    Args:
        path: the folder to create; it must not exist yet.
        files: relative path inside the folder -> its bytes, or a file to copy.
        staging: the folder the temp folder goes in (default ``path``'s parent; on the same file system), e.g. the
            parent of a model repository, whose server should not see a half-written model.

    Raises:
        DfqError: ``path`` exists, or the folder cannot be written (one line naming the fix).
    """
    path = Path(path)
    if path.exists() or path.is_symlink():
        raise DfqError(f"{path} already exists: remove it or choose another output")
    stage = Path(staging) if staging is not None else path.parent
    with removed_if_left_empty(path.parent), removed_if_left_empty(stage):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            stage.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=stage))
        except OSError as exc:
            raise DfqError(f"cannot write to {path.parent}: {exc.strerror} (choose a writable output)") from exc
        try:
            for rel, content in files.items():
                dst = tmp / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(content, Path):
                    shutil.copyfile(content, dst)
                else:
                    dst.write_bytes(content)
                os.chmod(dst, 0o666 & ~_UMASK)
            os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes a 0700 folder
            os.rename(tmp, path)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DfqError(f"cannot write {path}: {exc.strerror or exc} (choose a writable output with free "
                           "space)") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


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


def sha256_file(path: str | Path) -> str:
    """The SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
