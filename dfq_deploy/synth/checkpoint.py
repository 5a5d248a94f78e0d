"""Synthesis checkpoints: atomic writes, reading back, and the checks that a resume continues the same run.

A checkpoint holds the rows of the images one process optimises, keyed by their global image indices
(``indices``): the optimised tensor, Adam's moments and the method's per-image targets/priors, with what every
rank shares (iteration, loss history, the method's shared state). One process writes one file (the
``checkpoint_path``, e.g. ``checkpoint.pt``); rank ``r`` of ``W`` processes writes
``checkpoint.rank<r>-of-<W>.it<iteration>.pt`` beside it. A resume takes the newest *complete* set (the
files of one iteration that together hold every image), whatever the world size that wrote it, and
re-shards the images by global index; older files are deleted by rank 0 only once every rank has written
the newer set, so a job killed at any point leaves a complete set behind.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from dfq_deploy.errors import DfqError
from dfq_deploy.utils import atomic_write_bytes

if TYPE_CHECKING:
    from dfq_deploy.synth.method import SynthMethod

logger = logging.getLogger(__name__)


CHECKPOINT_FORMAT = "dfq-synth-checkpoint"


#: 2: per-image rows keyed by global index (``indices``), random draws keyed by image (dfq-deploy 0.2.0 and
#: later); version-1 checkpoints were made with per-batch random draws and cannot be continued.
CHECKPOINT_VERSION = 2


def model_fingerprint(model: nn.Module) -> str:
    """A hash of the model's state dict (names, shapes, dtypes and values), to match checkpoints to models."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """Write a checkpoint dict atomically (temp file + rename)."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a synthesis checkpoint (tensors and plain Python data only; no code is unpickled).

    Raises:
        DfqError: missing, unreadable or not a synthesis checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise DfqError(f"no synthesis checkpoint at {path}")
    try:
        ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DfqError(
            f"synthesis checkpoint {path} could not be read ({type(exc).__name__}): "
            "delete it and start again without --resume"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DfqError(f"{path} is not a dfq-deploy synthesis checkpoint")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise DfqError(
            f"synthesis checkpoint {path} has version {ckpt.get('version')} (this build reads {CHECKPOINT_VERSION}, "
            "whose random draws differ): delete it and start afresh without --resume"
        )
    return ckpt


_SHARD_RE = re.compile(r"\.rank(\d+)-of-(\d+)\.it(\d+)$")


def shard_checkpoint_path(base: str | Path, rank: int | str, world: int, iteration: int) -> Path:
    """Where rank ``rank`` of ``world`` writes its checkpoint at ``iteration`` (``base`` itself for one process)."""
    base = Path(base)
    if world == 1:
        return base
    return base.with_name(f"{base.stem}.rank{rank}-of-{world}.it{iteration}{base.suffix}")


def _shard_key(base: Path, path: Path) -> tuple[int, int, int] | None:
    if not path.name.startswith(base.stem + ".") or not path.name.endswith(base.suffix):
        return None
    m = _SHARD_RE.search(path.name[len(base.stem) : len(path.name) - len(base.suffix)])
    return (int(m.group(3)), int(m.group(2)), int(m.group(1))) if m else None


def checkpoint_files(base: str | Path) -> list[Path]:
    """Every checkpoint file of the run at ``base``: ``base`` itself and the per-rank files beside it."""
    base = Path(base)
    found = [base] if base.is_file() else []
    if base.parent.is_dir():
        found += sorted(p for p in base.parent.glob(f"{base.stem}.rank*-of-*.it*{base.suffix}")
                        if _shard_key(base, p) is not None)
    return found


def find_resume_set(base: str | Path, num_samples: int) -> list[tuple[Path, dict[str, Any]]]:
    """The newest complete checkpoint set of the run at ``base`` (empty if there is none).

    A set is the files of one iteration and world size whose ``indices`` together are every image
    ``0 .. num_samples - 1`` exactly once; newer incomplete sets (a job killed while writing them) are skipped
    with a warning.

    Raises:
        DfqError: an unreadable checkpoint file, or files but no complete set.
    """
    base = Path(base)
    groups: dict[tuple[int, int], list[Path]] = {}
    for p in checkpoint_files(base):
        key = _shard_key(base, p)
        if key is not None:
            groups.setdefault(key[:2], []).append(p)
    single = load_checkpoint(base) if base.is_file() else None
    candidates: list[tuple[int, list[Path]]] = [(it, files) for (it, _), files in groups.items()]
    if single is not None:
        candidates.append((int(single["iteration"]), [base]))
    for it, files in sorted(candidates, key=lambda c: (c[0], c[1] == [base]), reverse=True):
        loaded = [(base, single)] if files == [base] else [(p, load_checkpoint(p)) for p in files]
        seen = sorted(int(i) for _, c in loaded for i in c["indices"])
        if seen == list(range(num_samples)):
            return loaded  # type: ignore[return-value]
        logger.warning("checkpoint set at iteration %d (%s) holds %d of %d images: skipping it", it,
                       ", ".join(p.name for p in files), len(set(seen)), num_samples)
    if candidates:
        raise DfqError(f"no complete checkpoint set at {base} (files of a {num_samples}-image run are missing): "
                       "start afresh without --resume")
    return []


def remove_other_checkpoints(base: str | Path, keep: list[Path]) -> None:
    """Delete the run's checkpoint files other than ``keep`` (rank 0, once every rank has written ``keep``)."""
    keep_set = {Path(p).resolve() for p in keep}
    for p in checkpoint_files(base):
        if p.resolve() not in keep_set:
            p.unlink(missing_ok=True)
            logger.debug("removed older checkpoint %s", p)


def select_rows(loaded: list[tuple[Path, dict[str, Any]]], start: int, stop: int) -> dict[str, Any]:
    """The rows of global images ``[start, stop)`` from a complete checkpoint set, in index order.

    Returns:
        ``params``, ``state`` (the per-image entries), ``exp_avg`` / ``exp_avg_sq`` (None before Adam's first
        step) for those images, and the set's shared ``state`` entries, ``optimizer`` step and param groups.
    """
    where: dict[int, tuple[dict[str, Any], int]] = {}
    for _, c in loaded:
        for row, i in enumerate(c["indices"].tolist()):
            where[int(i)] = (c, row)

    def rows(get: Any) -> torch.Tensor:
        return torch.cat([get(where[i][0])[where[i][1] : where[i][1] + 1] for i in range(start, stop)])

    first = loaded[0][1]
    image_keys = list(first["image_keys"])
    moments = first["optimizer"]["state"].get(0) if first["optimizer"]["state"] else None
    out: dict[str, Any] = {
        "params": rows(lambda c: c["params"]),
        "state": {k: rows(lambda c, k=k: c["state"][k]) for k in image_keys},
        "shared": {k: v for k, v in first["state"].items() if k not in image_keys},
        "optimizer": None,
    }
    if moments is not None:
        out["optimizer"] = {
            "state": {0: {"step": moments["step"],
                          "exp_avg": rows(lambda c: c["optimizer"]["state"][0]["exp_avg"]),
                          "exp_avg_sq": rows(lambda c: c["optimizer"]["state"][0]["exp_avg_sq"])}},
            "param_groups": first["optimizer"]["param_groups"],
        }
    return out


def jsonable_cfg(data_cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in data_cfg.items()}


def check_resumable(ckpt: dict[str, Any], m: SynthMethod, fingerprint: str, path: Path) -> None:
    if ckpt["method"] != m.name:
        raise DfqError(
            f"checkpoint {path} was made by method '{ckpt['method']}', not '{m.name}': use --method {ckpt['method']}"
        )
    saved, now = {**m.opts.replay_defaults, **ckpt["options"]}, m.opts.to_dict()
    if saved.get("iterations") != now.get("iterations"):
        raise DfqError(
            f"checkpoint {path} belongs to a {saved.get('iterations')}-iteration run (at iteration "
            f"{ckpt['iteration']}): resume with --iters {saved.get('iterations')}, or start afresh without --resume"
        )
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if diff:
        detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in diff)
        raise DfqError(f"checkpoint {path} was made with other settings ({detail}): resume with the same settings")
    if ckpt["model_fingerprint"] != fingerprint:
        raise DfqError(f"checkpoint {path} was made with a different model or weights: resume with the same --model")
    saved_cfg = ckpt.get("data_cfg", {})
    for key in ("input_size", "mean", "std"):
        if list(saved_cfg.get(key, [])) != list(m.data_cfg[key]):
            raise DfqError(f"checkpoint {path} has {key}={saved_cfg.get(key)}, the model {m.data_cfg[key]}")
    if not 0 <= int(ckpt["iteration"]) <= m.opts.iterations:
        raise DfqError(f"checkpoint {path} is at iteration {ckpt['iteration']}, beyond {m.opts.iterations}")
