"""A new user's first hour, run as a user would (the CLI in a subprocess): fail fast with one line, write nothing,
and give the same result for the same command."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file

from tests.conftest import TINY_KWARGS

TINY = ["--model", "deit_t", "--model-kwargs", ",".join(f"{k}={v}" for k, v in TINY_KWARGS.items())]
#: Start-up of the CLI (torch, timm, onnx imports) on a busy 2-core machine is 5-20 s; every failure below must
#: come before any model work, far below a synthesis (minutes).
FAIL_FAST_S = 60


def _cli(*argv: str, env: dict[str, str] | None = None) -> tuple[int, str, str, float]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "dfq_deploy", "-q", *argv], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, timeout=600, stdin=subprocess.DEVNULL)
    return r.returncode, r.stdout, r.stderr, time.perf_counter() - t


def _one_error_line(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dfq-deploy: error:") and needle in lines[0], err


def test_no_network_fails_within_seconds(tmp_path):
    with socket.socket() as hub:  # a "hub" that accepts connections and never answers, like a dead network
        hub.bind(("127.0.0.1", 0))
        hub.listen(8)
        env = {"HF_ENDPOINT": f"http://127.0.0.1:{hub.getsockname()[1]}", "HF_HOME": str(tmp_path / "hf"),
               "HF_HUB_OFFLINE": "0"}
        code, _, err, seconds = _cli("export", "--model", "deit_t", "--bits", "4", "--output", str(tmp_path / "o"),
                                     env=env)
    _one_error_line(code, err, "--checkpoint")
    assert "offline" in err and seconds < FAIL_FAST_S
    assert not (tmp_path / "o").exists()


def test_a_typo_in_a_path_fails_before_any_work(tmp_path):
    # the other paths (--calib-from, --calib-dir, --checkpoint) are in tests/test_cli.py's bad-input list
    code, _, err, seconds = _cli("export", "--bits", "8", "--eval-data", str(tmp_path / "deV"),
                                 "--output", str(tmp_path / "o"))
    _one_error_line(code, err, str(tmp_path / "deV"))
    assert seconds < FAIL_FAST_S
    assert not (tmp_path / "o").exists()


def test_same_synth_command_same_images_and_resume(tmp_path):
    cmd = ["synth", *TINY, "--random-weights", "--seed", "3", "--method", "psaq", "--num-samples", "2", "--iters", "2"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert _cli(*cmd, "--output", str(a))[0] == 0
    assert _cli(*cmd, "--output", str(b))[0] == 0
    ia, ib = (load_file(str(Path(d) / "images.safetensors")) for d in (a, b))
    assert ia.keys() == ib.keys() and all((ia[k] == ib[k]).all() for k in ia)
    code, _, err, _ = _cli(*cmd, "--output", str(a), "--resume")  # a third process builds the same model
    assert code == 0, err
