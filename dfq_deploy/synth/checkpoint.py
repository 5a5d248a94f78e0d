"""Synthesis checkpoints: atomic writes, reading back, and the checks that a resume continues the same run.
"""

from __future__ import annotations

import hashlib
import io
import logging
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


CHECKPOINT_VERSION = 1


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
            f"synthesis checkpoint {path} has version {ckpt.get('version')}: this build reads {CHECKPOINT_VERSION}"
        )
    return ckpt


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
