"""Report writers (json / csv / md / png), accuracy lookup, environment, and merging runs."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from dfq_deploy.bench.latency import run_benchmark
from dfq_deploy.bench.report import (
    COLUMNS,
    attach_accuracy,
    collect_environment,
    cpu_model,
    merge_reports,
    read_top1,
    table_rows,
    write_reports,
)
from dfq_deploy.errors import DfqError

from .test_latency import ConstantSampler, make_onnx

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_env(board: str | None = None) -> dict:
    return {"cpu_model": "Test CPU", "cpu_count": 2, "machine": "x86_64", "os": "Linux", "python": "3.11",
            "onnxruntime": {"version": "1.0", "providers": ["CPUExecutionProvider"]}, "tensorrt": None,
            "gpus": [], "board": board, "l4t": None, "power_mode": "MAXN" if board else None}


@pytest.fixture
def bench_result(tmp_path: Path) -> dict:
    (tmp_path / "fp32").mkdir()
    (tmp_path / "int8").mkdir()
    arts = [make_onnx(tmp_path / "fp32" / "model.onnx"), make_onnx(tmp_path / "int8" / "model.onnx", qdq=True)]
    (tmp_path / "fp32" / "report.json").write_text(json.dumps(
        {"artifact": str(arts[0]), "accuracy": {"top1": 0.812, "n": 500}, "parity": {}}))
    (tmp_path / "int8" / "report.json").write_text(json.dumps(
        {"artifact": str(arts[1]), "parity": {"held_back": {"top1_agreement": 0.995, "n": 64}}}))
    return run_benchmark(arts, batches=[1, 4], warmup=1, iters=4, rounds=2, threads=1, progress=False,
                         power_sampler=ConstantSampler())


def test_read_top1_keys():
    assert read_top1({"accuracy": {"top1": 0.8, "n": 10}}) == {"top1": 0.8, "key": "accuracy.top1",
                                                               "kind": "accuracy", "n": 10}
    assert read_top1({"top1": 0.7})["key"] == "top1"
    p = read_top1({"parity": {"held_back": {"top1_agreement": 0.99}, "calibration": {"top1_agreement": 0.5}}})
    assert p["key"] == "parity.held_back.top1_agreement" and p["kind"] == "agreement" and p["top1"] == 0.99
    assert read_top1({"parity": {"calibration": {"top1_agreement": 0.5}}})["top1"] == 0.5
    assert read_top1({"accuracy": {"top1": "high"}, "parity": {"passed": True}}) is None
    assert read_top1({"accuracy": {"top1": True}}) is None
    assert read_top1([]) is None


def test_cpu_model_and_environment(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel\t\t: 85\nmodel name\t: Test Xeon @ 2GHz\n")
    assert cpu_model(x86) == "Test Xeon @ 2GHz"
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 62.50\nCPU implementer\t: 0x41\n\nModel\t: NVIDIA Orin Nano\n")
    assert cpu_model(arm) == "NVIDIA Orin Nano"
    board = tmp_path / "model"
    board.write_text("NVIDIA Jetson Orin Nano Developer Kit\x00")

    def run(cmd):
        return {"nvidia-smi": "NVIDIA RTX 4090, 550.54.14, 450.00 W",
                "nvpmodel": "NV Power Mode: 15W\n0"}.get(cmd[0])

    env = collect_environment(cpuinfo=x86, run=run, device_tree=board, tegra_release=tmp_path / "none")
    assert env["cpu_model"] == "Test Xeon @ 2GHz"
    assert env["gpus"] == [{"name": "NVIDIA RTX 4090", "driver": "550.54.14", "power_limit": "450.00 W"}]
    assert env["power_mode"] == "15W"
    assert env["board"] == "NVIDIA Jetson Orin Nano Developer Kit" and env["l4t"] is None
    assert env["onnxruntime"]["version"]


def test_write_reports(tmp_path, bench_result):
    reports = [tmp_path / "fp32" / "report.json", tmp_path / "int8" / "report.json"]
    out = tmp_path / "out"
    written = write_reports(bench_result, out, accuracy_from=reports, environment=fake_env(), plots=True)
    assert set(written) == {"json", "csv", "md", "latency_png", "tradeoff_png"}

    data = json.loads((out / "bench.json").read_text())
    assert data["environment"]["cpu_model"] == "Test CPU"
    a0 = data["artifacts"][0]
    assert a0["accuracy"]["key"] == "accuracy.top1" and a0["accuracy"]["top1"] == 0.812
    assert data["artifacts"][1]["accuracy"]["kind"] == "agreement"
    for art in data["artifacts"]:
        for b in art["batches"]:
            assert len(b["samples_s"]) == b["latency"]["n"] == 4  # raw samples kept
    assert data["power"]["trace"]["channels"]["FAKE_IN"][0] == 10.0

    rows = list(csv.DictReader(io.StringIO((out / "bench.csv").read_text())))
    assert len(rows) == 4 and list(rows[0]) == list(COLUMNS)
    by = {(r["artifact"], r["batch"]): r for r in rows}
    assert float(by[("fp32", "1")]["p50_ratio_vs_baseline"]) == 1.0
    int8 = data["artifacts"][1]["batches"][1]
    assert float(by[("int8", "4")]["p50_ratio_vs_baseline"]) == pytest.approx(int8["vs_baseline"]["p50_ratio"])
    assert float(by[("int8", "4")]["avg_watts"]) == pytest.approx(10.0)
    assert by[("int8", "1")]["qdq_fused"] == "True" and "MatMulIntegerToFloat" in by[("int8", "1")]["integer_kernels"]
    assert float(by[("fp32", "4")]["top1"]) == 0.812 and by[("int8", "4")]["top1_key"].startswith("parity")

    md = (out / "bench.md").read_text()
    assert "| fp32 | 1 |" in md and "| int8 | 4 |" in md
    assert "81.20%" in md and "99.50% (agreement)" in md
    assert "FAKE_IN" in md and "QDQ fused into integer kernels" in md
    assert "baseline for ratios: **fp32**" in md

    for key in ("latency_png", "tradeoff_png"):
        assert written[key].read_bytes()[:8] == PNG_MAGIC
        import matplotlib.image

        assert matplotlib.image.imread(written[key]).shape[0] > 100


def test_attach_accuracy_errors(tmp_path, bench_result):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(DfqError, match="not valid JSON"):
        attach_accuracy(bench_result, [broken])
    empty = tmp_path / "fp32" / "report.json"
    empty.write_text(json.dumps({"artifact": "x"}))
    with pytest.raises(DfqError, match="no accuracy.top1"):
        attach_accuracy(bench_result, [empty])
    elsewhere = tmp_path / "other"
    elsewhere.mkdir()
    for name in ("a.json", "b.json", "c.json"):
        (elsewhere / name).write_text(json.dumps({"artifact": "/nowhere/model.onnx", "accuracy": {"top1": 0.5}}))
    with pytest.raises(DfqError, match="cannot tell which artifact"):
        attach_accuracy(bench_result, [elsewhere / "a.json", elsewhere / "b.json", elsewhere / "c.json"])


def test_text_reports_without_plots(tmp_path, bench_result):
    written = write_reports(bench_result, tmp_path / "o", environment=fake_env(), plots=False)
    assert set(written) == {"json", "csv", "md"}
    assert not list((tmp_path / "o").glob("*.png"))
    assert not list((tmp_path / "o").glob(".*.tmp"))  # atomic writes leave no temp files


def test_merge_reports(tmp_path, bench_result):
    jetson, desktop = tmp_path / "jetson", tmp_path / "desktop"
    write_reports(bench_result, jetson, accuracy_from=[tmp_path / "fp32" / "report.json"],
                  environment=fake_env("NVIDIA Jetson AGX Orin"), plots=False)
    second = json.loads((jetson / "bench.json").read_text())
    second.pop("environment")
    write_reports(second, desktop, environment=fake_env(), plots=False)
    export_only = tmp_path / "export-int4"
    export_only.mkdir()
    (export_only / "report.json").write_text(json.dumps(
        {"artifact": str(export_only / "model.onnx"), "accuracy": {"top1": 0.75}}))

    rows, md, plot = merge_reports([jetson, desktop, export_only], output=tmp_path / "merged")
    assert len(rows) == 4 + 4 + 1
    assert {r["source"] for r in rows} == {"jetson", "desktop", "export-int4"}
    assert {r["machine"] for r in rows if r["source"] == "jetson"} == {"NVIDIA Jetson AGX Orin [MAXN]"}
    assert {r["machine"] for r in rows if r["source"] == "desktop"} == {"Test CPU"}
    assert [r["top1"] for r in rows if r["source"] == "export-int4"] == [0.75]
    assert "| jetson | NVIDIA Jetson AGX Orin [MAXN] | fp32 | 1 |" in md
    assert (tmp_path / "merged" / "report.md").read_text() == md
    merged_csv = list(csv.DictReader(io.StringIO((tmp_path / "merged" / "report.csv").read_text())))
    assert len(merged_csv) == len(rows)
    assert plot is not None and plot.read_bytes()[:8] == PNG_MAGIC

    rows_only, _, no_plot = merge_reports([desktop])
    assert no_plot is None and rows_only == table_rows(json.loads((desktop / "bench.json").read_text()),
                                                       source="desktop")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DfqError, match="neither bench.json nor report.json"):
        merge_reports([tmp_path / "empty"])
    with pytest.raises(DfqError, match="not a folder"):
        merge_reports([tmp_path / "missing"])


def test_agreement_and_accuracy_never_share_an_axis(tmp_path):
    """An export without --eval-data (99.31% agreement) and one with a real top-1 (77.66%) are plotted in separate
    panels with their own y labels, and the table says which is which."""
    import matplotlib.pyplot as plt

    from dfq_deploy.bench.report import TOP1_KINDS, plot_tradeoff, rows_to_markdown, tradeoff_figure

    base = {"batch": 1, "p50_ms": 1.0, "p90_ms": 1.2, "p99_ms": 1.3, "mean_ms": 1.0, "std_ms": 0.1,
            "throughput_ips": 1000.0, "latency_per_image_ms": 1.0}
    rows = [{**base, "artifact": "no-eval", "top1": 0.9931, "top1_key": "parity.held_back.top1_agreement"},
            {**base, "artifact": "with-eval", "top1": 0.7766, "top1_key": "accuracy.top1", "p50_ms": 1.1,
             "latency_per_image_ms": 1.1}]
    fig = tradeoff_figure(rows)
    try:
        axes = fig.get_axes()
        assert [ax.get_ylabel() for ax in axes] == [TOP1_KINDS["accuracy"], TOP1_KINDS["agreement"]]
        labels = [[t.get_text() for t in ax.texts] for ax in axes]
        assert labels == [["with-eval"], ["no-eval"]]
        assert [ax.collections[0].get_offsets()[0][1] for ax in axes] == pytest.approx([77.66, 99.31])
    finally:
        plt.close(fig)
    only_accuracy = tradeoff_figure(rows[1:])
    assert len(only_accuracy.get_axes()) == 1
    plt.close(only_accuracy)
    assert plot_tradeoff(rows, tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    md = rows_to_markdown(rows)
    assert "99.31% (agreement)" in md and "77.66% (accuracy)" in md
