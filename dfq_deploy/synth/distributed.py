"""Synthesis on several processes with ``torch.distributed`` (launched by ``torchrun``), equal to one process.

Synthesis is parallel over images: every rank optimises a contiguous slice of the global image indices
(:func:`shard_bounds`) with random draws keyed by image (:mod:`~dfq_deploy.synth.draws`), and the few quantities
that couple images go through a collective (:class:`Comm`), so that the gathered result is the one-process
result.

* **Start-up**: :func:`init_from_env` joins the process group ``torchrun`` describes (``RANK``, ``WORLD_SIZE``,
  ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``): NCCL when the work runs on a CUDA device (the rank's GPU
  is ``cuda:LOCAL_RANK``), gloo on the CPU. The group is destroyed at exit. Without those variables nothing is
  initialised and synthesis runs in this process, as it always did. A group the caller initialised is used
  as it is.
* **Sharding** (:func:`shard_bounds`): the shards are made of whole passes of the one-process run (a pass holds
  ``batch_size`` images, by default a fixed number, :data:`~dfq_deploy.synth.options.DEFAULT_PASS_IMAGES`), so
  every forward/backward pass sees the same images as there and the result is bitwise the same on the CPU; when
  there are fewer passes than ranks, or with ``batch_size=0`` (all of a process's images in one pass), the
  images are split evenly and a rank's passes are smaller than the one-process pass, which changes only the
  floating-point summation order of the model's matrix products.
* **What is shared**: the loss history (every rank's per-micro-batch loss values, all-gathered and summed in
  the one-process order), the final images and targets (all-gathered), and per method what
  :meth:`~dfq_deploy.synth.method.SynthMethod.step_context` computes over all images (DFQ-ViT's hard stage).
* **Checks**: more ranks than images, or ranks that disagree on the model (a hash of its weights) or on the
  settings, stop every rank with the same one-line :class:`DfqError`.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
from dataclasses import dataclass, field

import torch

from dfq_deploy.errors import CollectiveError, DfqError

logger = logging.getLogger(__name__)

#: The environment variables ``torchrun`` sets for each worker.
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def env_rank() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from torchrun's environment; ``(0, 1, 0)`` without it."""
    try:
        return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                int(os.environ.get("LOCAL_RANK", 0)))
    except ValueError as exc:
        raise DfqError(f"torchrun's RANK/WORLD_SIZE/LOCAL_RANK are not integers ({exc}): launch with torchrun") from exc


def launched_by_torchrun() -> bool:
    """True in a worker that torchrun started: its environment names the rank and the rendezvous (``RANK``,
    ``MASTER_ADDR``), whatever the number of processes, so that a one-GPU ``torchrun`` job runs in an NCCL group
    as a larger one does (or ``RANK`` with a ``WORLD_SIZE`` above 1)."""
    return "RANK" in os.environ and ("MASTER_ADDR" in os.environ or env_rank()[1] > 1)


def is_main_process() -> bool:
    """True on rank 0, and without torch.distributed (the one process is the main one)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank() == 0
    return env_rank()[0] == 0


def local_device(device: torch.device) -> torch.device:
    """This rank's device: ``cuda:LOCAL_RANK`` for a CUDA device without an index under torchrun, else ``device``."""
    if device.type == "cuda" and device.index is None and launched_by_torchrun():
        local = env_rank()[2]
        if local >= torch.cuda.device_count():
            raise DfqError(f"LOCAL_RANK={local} but this node has {torch.cuda.device_count()} GPU(s): "
                           "start at most one process per GPU (torchrun --nproc-per-node)")
        return torch.device("cuda", local)
    return device


def init_from_env(device: torch.device) -> torch.device:
    """Join torchrun's process group if this process is a torchrun worker; return the rank's device.

    The backend is NCCL when ``device`` is a CUDA device, gloo otherwise. The CUDA device of the rank is
    ``cuda:LOCAL_RANK`` (also made the current device). Does nothing without torchrun's variables, or when a
    process group already exists. The group is destroyed when the process exits.

    Raises:
        DfqError: torchrun's variables are incomplete, or NCCL is asked for where it is not available.
    """
    device = local_device(device)
    if not launched_by_torchrun() or not torch.distributed.is_available() or torch.distributed.is_initialized():
        return device
    missing = [v for v in TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise DfqError(f"torch.distributed needs {', '.join(missing)} in the environment: launch with torchrun")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        if not torch.distributed.is_nccl_available():
            raise DfqError("this torch has no NCCL: synthesise on the CPU (--device cpu) or install a CUDA build")
        torch.cuda.set_device(device)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    torch.distributed.init_process_group(backend=backend, init_method="env://", **kwargs)
    atexit.register(_destroy)
    rank, world, _ = env_rank()
    if rank == 0:
        logger.info("torch.distributed: %d processes, backend %s", world, backend)
    return device


def _destroy() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def shard_bounds(n: int, world: int, batch_size: int | None) -> list[tuple[int, int]]:
    """Each rank's contiguous slice ``[start, stop)`` of the global image indices ``0 .. n - 1``.

    With ``batch_size`` set and at least ``world`` micro-batches, the slices are made of whole micro-batches
    (``[k * batch_size, (k + 1) * batch_size)``) of a one-process run, balanced by count; otherwise images are
    balanced one by one.

    Raises:
        CollectiveError: more ranks than images.
    """
    if world > n:
        raise CollectiveError(
            f"{world} processes for {n} image(s): every rank needs at least one image; "
            f"use --num-samples {world} or more, or start at most {n} processes")
    unit = batch_size if batch_size is not None and -(-n // batch_size) >= world else 1
    units = -(-n // unit)
    cuts = [min(n, (r * units // world) * unit) for r in range(world + 1)]
    return [(cuts[r], cuts[r + 1]) for r in range(world)]


def digest_ints(text: str) -> list[int]:
    """A 128-bit hash of ``text`` as two signed 64-bit integers (to compare across ranks in one tensor)."""
    d = hashlib.blake2b(text.encode(), digest_size=16).digest()
    return [int.from_bytes(d[:8], "little", signed=True), int.from_bytes(d[8:], "little", signed=True)]


@dataclass
class Comm:
    """The process group as synthesis sees it; with one process every operation is the identity.

    Attributes:
        rank: this process's rank.
        world_size: processes in the job.
        device: where collective tensors live (the rank's GPU for NCCL, the CPU for gloo).
        backend: ``nccl``, ``gloo`` or ``none`` (one process).
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def all_gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``t`` along dim 0 in rank order (ranks may hold different row counts).

        The result is on ``t``'s device, with ``t``'s dtype.
        """
        if not self.active:
            return t
        home = t.device
        x = t.detach().to(self.device).contiguous()
        counts = torch.tensor([x.shape[0]], dtype=torch.int64, device=self.device)
        all_counts = [torch.zeros_like(counts) for _ in range(self.world_size)]
        torch.distributed.all_gather(all_counts, counts)
        rows = [int(c) for c in all_counts]
        pad = max(rows)
        if x.shape[0] < pad:
            x = torch.cat([x, x.new_zeros((pad - x.shape[0], *x.shape[1:]))])
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, x)
        return torch.cat([p[:r] for p, r in zip(parts, rows, strict=True)]).to(home)

    def all_gather_ints(self, values: list[int]) -> list[list[int]]:
        """Every rank's list of integers (the same length on every rank), in rank order."""
        t = torch.tensor(values, dtype=torch.int64, device=self.device)
        if not self.active:
            return [values]
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, t)
        return [[int(v) for v in p.cpu()] for p in parts]

    def any(self, flag: bool) -> bool:
        """True if ``flag`` is true on any rank."""
        return any(v[0] for v in self.all_gather_ints([int(flag)])) if self.active else flag

    def check_same(self, what: str, text: str, fix: str) -> None:
        """Raise the same :class:`CollectiveError` on every rank unless all ranks hold the same ``text``.

        Args:
            what: what is compared, for the message (e.g. "the model").
            text: this rank's value (hashed).
            fix: the fix, for the message.
        """
        if not self.active:
            return
        got = self.all_gather_ints(digest_ints(text))
        odd = [r for r, v in enumerate(got) if v != got[0]]
        if odd:
            ranks = ", ".join(str(r) for r in odd)
            raise CollectiveError(f"rank(s) {ranks} disagree with rank 0 on {what}: {fix}")

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


def current(device: torch.device | None = None) -> Comm:
    """The :class:`Comm` of this process: the initialised process group (joining torchrun's if needed), or one
    process.

    Args:
        device: where the synthesis runs (chooses the backend when the group is joined here).
    """
    if launched_by_torchrun():
        init_from_env(device if device is not None else torch.device("cpu"))
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return Comm()
    backend = str(torch.distributed.get_backend()).lower()
    world = torch.distributed.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device()) if "nccl" in backend else torch.device("cpu")
    return Comm(rank=torch.distributed.get_rank(), world_size=world, device=dev, backend=backend)


@dataclass
class Shard:
    """The images one rank optimises: global indices ``[start, stop)`` of ``total``, and the group.

    Methods use it for the terms that couple images (:meth:`gather`, then :meth:`local` to take back their rows).
    """

    start: int
    stop: int
    total: int
    comm: Comm = field(default_factory=Comm)

    @property
    def indices(self) -> range:
        return range(self.start, self.stop)

    def __len__(self) -> int:
        return self.stop - self.start

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """All images' rows of a per-image tensor whose rows are this shard's images (every rank gets all)."""
        return self.comm.all_gather_rows(t)

    def local(self, t: torch.Tensor) -> torch.Tensor:
        """This shard's rows of a tensor over all images."""
        return t[self.start : self.stop]


__all__ = [
    "CollectiveError",
    "Comm",
    "Shard",
    "current",
    "init_from_env",
    "is_main_process",
    "launched_by_torchrun",
    "local_device",
    "shard_bounds",
]
