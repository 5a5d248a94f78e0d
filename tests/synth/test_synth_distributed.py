"""Synthesis on several processes (torch.distributed, gloo on the CPU) equals synthesis on one process.

One 2-process job (``torch.multiprocessing.spawn``) runs every distributed case and saves what it got; the
tests compare that with one-process runs made here, with one thread each (the matrix products of a pass then
sum in the same order in both). Bitwise where no term couples images and the shards are whole passes (with
``batch_size`` set, and by default: passes of a fixed size); within 1e-4 otherwise (DFQ-ViT's hard stage,
``batch_size=0``: all of a rank's images in one pass). Plus one real
``torchrun`` launch of the CLI.
"""

from __future__ import annotations

import datetime
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from dfq_deploy.errors import DfqError
from dfq_deploy.models import ModelSpec, create_model, data_config
from dfq_deploy.synth import synthesize, synthesize_to_dir
from dfq_deploy.synth.checkpoint import load_checkpoint
from dfq_deploy.synth.distributed import shard_bounds

TINY = {"img_size": 32, "patch_size": 4, "depth": 2, "num_classes": 10}
WORLD = 2

#: name -> (method, options); every case runs on 2 processes and on 1.
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "psaq": ("psaq", {"num_samples": 4, "iterations": 4, "seed": 1, "batch_size": 2}),
    "spdfq": ("spdfq", {"num_samples": 4, "iterations": 4, "seed": 1, "batch_size": 2}),
    "dfqvit": ("dfqvit", {"num_samples": 4, "iterations": 4, "seed": 1, "batch_size": 2}),
    "uneven": ("spdfq", {"num_samples": 3, "iterations": 3, "seed": 2, "batch_size": 1}),  # shards of 1 and 2
    "hard": ("dfqvit", {"num_samples": 4, "iterations": 6, "seed": 1, "batch_size": 2, "global_frac": 0.2,
                        "hard_frac": 0.5, "hard_student": "W4A4", "student_refresh": 2}),
    "one_pass": ("psaq", {"num_samples": 4, "iterations": 4, "seed": 1, "batch_size": 0}),  # 2 vs 4 a pass
    "default": ("psaq", {"num_samples": 16, "iterations": 3, "seed": 1}),  # default passes of 8 (CPU): 1 a rank
}
BITWISE = ("psaq", "spdfq", "dfqvit", "uneven", "default")
RESUME = ("psaq", {"num_samples": 4, "iterations": 6, "seed": 3, "batch_size": 2})
#: The same run for synthesize_to_dir (whose num_samples, iters and seed override the options).
TO_DIR = {"num_samples": 4, "iters": 6, "seed": 3, "options": {"batch_size": 2}}


def make_model() -> torch.nn.Module:
    from tests.synth.test_synth import sharpen_

    torch.manual_seed(0)
    return sharpen_(create_model(ModelSpec("deit_t", kwargs=dict(TINY), random_weights=True)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error(fn: Any) -> str:
    try:
        fn()
    except DfqError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "no error"


def _worker(rank: int, root: str, port: int) -> None:
    """One rank of the 2-process job: run every case, save the results as ``root/<case>-rank<r>.pt``."""
    import dfq_deploy.quant  # noqa: F401  (registers the fake-quant student of the hard stage)

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=90))
    out = Path(root)
    model = make_model()
    cfg = data_config(model)
    try:
        for name, (method, opts) in CASES.items():
            res = synthesize(model, cfg, method, opts, progress=False)
            torch.save({"images": res.images, "targets": res.targets, "history": res.history,
                        "world_size": res.world_size}, out / f"{name}-rank{rank}.pt")
        method = RESUME[0]
        # a 1-process checkpoint (made by the test) finished on 2 processes
        a = synthesize_to_dir(model, cfg, method, output_dir=out / "from1", resume=True, progress=False,
                              **TO_DIR, checkpoint_every=2)
        # 2 processes stop at iteration 3 (the test finishes it on 1), and a full 2-process run into a folder,
        # recording every file each rank writes
        synthesize_to_dir(model, cfg, method, output_dir=out / "from2", progress=False, **TO_DIR, stop_after=3)
        written: list[str] = []
        real_replace = os.replace

        def spy(src: Any, dst: Any, *args: Any, **kw: Any) -> None:
            written.append(str(dst))
            real_replace(src, dst, *args, **kw)

        os.replace = spy  # type: ignore[assignment]
        try:
            synthesize_to_dir(model, cfg, method, output_dir=out / "full", progress=False, **TO_DIR,
                              checkpoint_every=2)
        finally:
            os.replace = real_replace  # type: ignore[assignment]
        errors = {
            "too_many_ranks": _error(lambda: synthesize(model, cfg, "psaq", {"num_samples": 1, "iterations": 1},
                                                        progress=False)),
            "exists": _error(lambda: synthesize_to_dir(model, cfg, method, output_dir=out / "full", **TO_DIR,
                                                       progress=False)),
        }
        if rank == 1:
            with torch.no_grad():
                model.head.bias[0] += 1e-3  # another model on rank 1 only
        errors["fingerprint"] = _error(lambda: synthesize(model, cfg, "psaq", CASES["psaq"][1], progress=False))
        from dfq_deploy.cli import main  # export --calib psaq: both ranks synthesise, rank 0 exports

        written_export: list[str] = []
        os.replace = lambda src, dst, *a, **k: (written_export.append(str(dst)), real_replace(src, dst))[1]
        try:
            export = main(["export", "--model", "deit_t", "--model-kwargs", "img_size=32,patch_size=4,depth=1",
                           "--random-weights", "--bits", "8", "--calib", "psaq", "--synth-iters", "2",
                           "--num-samples", "4", "--parity-threshold", "0.5", "--device", "cpu",
                           "--output", str(out / "export"), "-q"])
        finally:
            os.replace = real_replace  # type: ignore[assignment]
        torch.save({"from1": a.images, "written": written, "errors": errors, "export": export,
                    "written_export": written_export},
                   out / f"extra-rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the 2-process job once (after a 1-process run stopped at iteration 3, for it to finish)."""
    root = tmp_path_factory.mktemp("dist")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = make_model()
        method = RESUME[0]
        synthesize_to_dir(model, data_config(model), method, output_dir=root / "from1", **TO_DIR, stop_after=3,
                          progress=False)
        torch.multiprocessing.spawn(_worker, args=(str(root), _free_port()), nprocs=WORLD, join=True)
    finally:
        torch.set_num_threads(threads)
    return {"root": root, **{f.stem: torch.load(f, weights_only=False) for f in root.glob("*-rank*.pt")}}


@pytest.fixture
def one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _single(name: str) -> Any:
    import dfq_deploy.quant  # noqa: F401

    method, opts = CASES[name]
    model = make_model()
    return synthesize(model, data_config(model), method, opts, progress=False)


def test_shards_are_whole_micro_batches_when_there_are_enough() -> None:
    assert shard_bounds(8, 2, 2) == [(0, 4), (4, 8)]
    assert shard_bounds(10, 3, 2) == [(0, 2), (2, 6), (6, 10)]  # 5 micro-batches over 3 ranks
    assert shard_bounds(3, 2, 1) == [(0, 1), (1, 3)]
    assert shard_bounds(4, 3, 4) == [(0, 1), (1, 2), (2, 4)]  # one micro-batch: images one by one
    assert shard_bounds(5, 2, None) == [(0, 2), (2, 5)]
    with pytest.raises(DfqError, match="2 processes for 1 image"):
        shard_bounds(1, 2, None)


@pytest.mark.parametrize("name", BITWISE)
def test_two_processes_equal_one_bit_for_bit(job, one_thread, name) -> None:
    one = _single(name)
    for rank in range(WORLD):
        got = job[f"{name}-rank{rank}"]
        assert got["world_size"] == WORLD
        assert torch.equal(got["images"], one.images), (name, rank)
        assert torch.equal(got["targets"], one.targets)
        assert got["history"] == one.history


@pytest.mark.parametrize("name", ["hard", "one_pass"])
def test_two_processes_equal_one_within_tolerance_where_passes_differ(job, one_thread, name) -> None:
    one = _single(name)
    got = job[f"{name}-rank0"]
    assert torch.allclose(got["images"], one.images, atol=1e-4, rtol=0), (got["images"] - one.images).abs().max()
    assert torch.equal(got["targets"], one.targets)
    for a, b in zip(got["history"], one.history, strict=True):
        assert a["total"] == pytest.approx(b["total"], rel=1e-5)
    assert torch.equal(got["images"], job[f"{name}-rank1"]["images"])  # every rank returns the same result


def test_resume_with_another_world_size_equals_a_straight_run(job, one_thread) -> None:
    method, opts = RESUME
    model = make_model()
    cfg = data_config(model)
    straight = synthesize(model, cfg, method, opts, progress=False)
    # stopped on 1 process, finished on 2
    assert torch.equal(job["extra-rank0"]["from1"], straight.images)
    # stopped on 2 processes: one file per rank, finished here on 1
    d = job["root"] / "from2"
    assert sorted(p.name for p in d.iterdir()) == ["checkpoint.rank0-of-2.it3.pt", "checkpoint.rank1-of-2.it3.pt"]
    assert load_checkpoint(d / "checkpoint.rank1-of-2.it3.pt")["indices"].tolist() == [2, 3]
    rest = synthesize_to_dir(model, cfg, method, output_dir=d, resume=True, **TO_DIR, progress=False)
    assert torch.equal(rest.images, straight.images)
    assert sorted(p.name for p in d.iterdir() if p.suffix == ".pt") == ["checkpoint.pt"]  # the 2-rank set is gone


def test_rank0_writes_the_folder_and_the_others_only_their_checkpoint(job) -> None:
    d = job["root"] / "full"
    names = sorted(p.name for p in d.iterdir())
    assert "config.json" in names and "images.safetensors" in names
    assert [n for n in names if n.endswith(".pt")] == ["checkpoint.rank0-of-2.it6.pt", "checkpoint.rank1-of-2.it6.pt"]
    written1 = [Path(p).name for p in job["extra-rank1"]["written"]]
    assert written1 and all(n.startswith("checkpoint.rank1-of-2.it") for n in written1), written1
    assert any(Path(p).name == "config.json" for p in job["extra-rank0"]["written"])


def test_export_under_torch_distributed_is_written_by_rank0(job) -> None:
    import json

    assert job["extra-rank0"]["export"] == 0 and job["extra-rank1"]["export"] == 0
    report = json.loads((job["root"] / "export" / "report.json").read_text())
    assert report["calibration"]["source"] == "psaq" and report["calibration"]["num_samples"] == 4
    assert job["extra-rank1"]["written_export"] == []  # rank 1 synthesised in memory and wrote nothing
    assert any(p.endswith("report.json") for p in job["extra-rank0"]["written_export"])


def test_clear_errors_on_every_rank(job) -> None:
    for rank in range(WORLD):
        errors = job[f"extra-rank{rank}"]["errors"]
        assert errors["too_many_ranks"].startswith("CollectiveError: 2 processes for 1 image(s)")
        assert "already holds a synthesis run" in errors["exists"]
        assert errors["fingerprint"].startswith("CollectiveError: rank(s) 1 disagree with rank 0 on the model")


def test_torchrun_cli_shards_and_rank0_writes(tmp_path) -> None:
    out = tmp_path / "synth"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD),
           "-m", "dfq_deploy", "synth", "--model", "deit_t",
           "--model-kwargs", "img_size=32,patch_size=4,depth=1,num_classes=10", "--random-weights",
           "--method", "psaq", "--iters", "2", "--num-samples", "4", "--device", "cpu", "-q"]
    run = subprocess.run([*cmd, "--output", str(out)], env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("wrote 4 psaq images") == 1  # printed by rank 0 only
    import json

    config = json.loads((out / "config.json").read_text())
    assert config["timing"]["processes"] == WORLD and config["timing"]["backend"] == "gloo"
    assert sorted(p.name for p in out.glob("*.pt")) == ["checkpoint.rank0-of-2.it2.pt", "checkpoint.rank1-of-2.it2.pt"]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_an_error_of_every_rank_is_printed_by_rank0_only(tmp_path, capsys, monkeypatch, rank) -> None:
    from dfq_deploy.cli import main

    (tmp_path / "config.json").write_text("{}")  # a folder that holds a run: an error every rank raises alike
    monkeypatch.setenv("RANK", rank)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = main(["synth", "--model", "deit_t", "--model-kwargs", "img_size=32,patch_size=4,depth=1,num_classes=10",
                 "--random-weights", "--iters", "1", "--num-samples", "2", "--output", str(tmp_path), "-q"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("dfq-deploy: error:") == (1 if rank == "0" else 0), err
