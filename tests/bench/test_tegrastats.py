"""tegrastats parsing (JetPack 6 and 7 formats) and energy from a log, on the lines in ``data/``."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest

from dfq_deploy.bench.power import (
    TegrastatsLogSampler,
    parse_tegrastats_file,
    parse_tegrastats_line,
    tegrastats_energy,
    tegrastats_times,
)
from dfq_deploy.errors import DfqError

DATA = Path(__file__).parent / "data"


def lines(name: str) -> list[str]:
    return (DATA / name).read_text().splitlines()


def test_agx_orin_jp6_line():
    p = parse_tegrastats_line(lines("agx_orin_jp6.log")[1])
    assert p["timestamp"] == datetime(2026, 5, 14, 10, 0, 1).timestamp()
    assert list(p["rails"]) == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"]  # NC dropped
    assert p["rails"]["VDD_GPU_SOC"] == {"mw": 15000, "avg_mw": 9000, "max_mw": None}
    assert p["gpu_load_pct"] == 85 and p["gpu_freq_mhz"] == [1300, 1300]
    assert p["temps_c"]["tj"] == pytest.approx(53.1)
    assert p["ram_mb"] == [18390, 62841]
    idle = parse_tegrastats_line(lines("agx_orin_jp6.log")[0])
    assert "gpu" not in idle["temps_c"] and idle["temps_c"]["cpu"] == pytest.approx(52.562)  # gpu@-256C: off


def test_orin_nano_jp6_line():
    p = parse_tegrastats_line(lines("orin_nano_jp6.log")[1])
    assert set(p["rails"]) == {"VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"}
    assert p["rails"]["VDD_IN"]["mw"] == 7000 and p["rails"]["VDD_IN"]["avg_mw"] == 6000
    assert p["gpu_load_pct"] == 62 and p["gpu_freq_mhz"] == [612]


def test_thor_jp7_line_with_max_and_per_gpc_clocks():
    first, second = (parse_tegrastats_line(x) for x in lines("thor_jp7.log")[:2])
    assert first["rails"]["VDD_GPU"] == {"mw": -392, "avg_mw": -392, "max_mw": -392}  # offset-calibrated idle
    assert second["rails"]["VIN"] == {"mw": 60000, "avg_mw": 40000, "max_mw": 60000}
    assert second["rails"]["VDD_CPU_SOC_MSS"]["max_mw"] == 8000
    assert first["gpu_load_pct"] is None and first["gpu_freq_mhz"] == [1000, 1000, 1000]
    assert second["gpu_freq_mhz"] == [1575, 1575, 1575]
    assert "NVENC0_FREQ" not in second["rails"]


@pytest.mark.parametrize(("field", "load", "freqs"), [
    ("GR3D_FREQ 10%@1300", 10, [1300]),             # JetPack 6
    ("GR3D_FREQ 12%@[1300,1300]", 12, [1300, 1300]),  # JetPack 7: one clock per GPC
    ("GR3D_FREQ @[1000,1000,1000]", None, [1000, 1000, 1000]),  # Thor: no load figure
    ("GR3D_FREQ 0%", 0, []),
])
def test_gpu_load_forms(field, load, freqs):
    p = parse_tegrastats_line(f"RAM 1/2MB {field} VDD_IN 1000mW/1000mW")
    assert p["gpu_load_pct"] == load and p["gpu_freq_mhz"] == freqs
    assert p["rails"]["VDD_IN"]["mw"] == 1000


def test_line_without_timestamp_or_rails():
    p = parse_tegrastats_line("RAM 2690/6854MB (lfb 6x1MB) CPU [3%@1904,off] EMC_FREQ 0% GR3D_FREQ 0%@[510]")
    assert p["timestamp"] is None and p["rails"] == {}


def test_orin_nano_energy_uses_instantaneous_values():
    times, parsed = parse_tegrastats_file(DATA / "orin_nano_jp6.log")
    assert np.allclose(np.diff(times), 1.0)
    r = tegrastats_energy(times, parsed, times[0], times[-1])
    # VDD_IN 5, 7, 9, 9, 5 W one second apart: 6 + 8 + 9 + 7 = 30 J (the running averages would give 26.5 J).
    assert r["rail"] == "VDD_IN" and r["joules"] == pytest.approx(30.0)
    assert r["avg_watts"] == pytest.approx(7.5)
    # Window 0.5..2.5 s: P(0.5) = 6 W, P(2.5) = 9 W -> 3.25 + 8 + 4.5 J.
    assert tegrastats_energy(times, parsed, times[0] + 0.5, times[0] + 2.5)["joules"] == pytest.approx(15.75)
    assert r["per_rail"]["VDD_SOC"]["joules"] == pytest.approx(1.75 + 2.25 + 2.5 + 2.0)


def test_agx_orin_energy_is_the_sum_of_module_rails():
    times, parsed = parse_tegrastats_file(DATA / "agx_orin_jp6.log")
    r = tegrastats_energy(times, parsed, times[0], times[-1])
    # 3 + 1 + 4 + 0.5 = 8.5 W idle, 15 + 2 + 5 + 1 = 23 W busy: 15.75 + 23 + 15.75 J.
    assert r["rail"] == "sum(VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0+VDDQ_VDD2_1V8AO)"
    assert "no input rail" in r["rail_note"]
    assert r["joules"] == pytest.approx(54.5)
    assert "shared GPU + SoC" in r["per_rail"]["VDD_GPU_SOC"]["note"]
    assert r["per_rail"]["VDD_GPU_SOC"]["joules"] == pytest.approx(9 + 15 + 9)


def test_thor_energy_uses_vin():
    times, parsed = parse_tegrastats_file(DATA / "thor_jp7.log")
    r = tegrastats_energy(times, parsed, times[0], times[-1])
    assert r["rail"] == "VIN" and r["joules"] == pytest.approx(40.0 + 60.0)


def test_lines_sharing_a_second_are_spread_by_the_interval():
    parsed = [{"timestamp": 100.0}, {"timestamp": 100.0}, {"timestamp": 101.0}]
    assert list(tegrastats_times(parsed, interval_ms=500)) == [100.0, 100.5, 101.0]
    # Ten lines in one second at a (wrong) 1000 ms interval are still spread within that second.
    many = [{"timestamp": 5.0}] * 10
    assert tegrastats_times(many, interval_ms=1000)[-1] == pytest.approx(5.9)


def test_log_without_timestamps_uses_interval_and_mtime(tmp_path):
    raw = [ln.split(" ", 2)[2] for ln in lines("orin_nano_jp6.log")]  # drop "MM-DD-YYYY HH:MM:SS"
    log = tmp_path / "t.log"
    log.write_text("\n".join(raw) + "\n")
    os.utime(log, (1000.0, 1000.0))
    times, parsed = parse_tegrastats_file(log, interval_ms=250)
    assert list(times) == pytest.approx([999.0, 999.25, 999.5, 999.75, 1000.0])
    r = tegrastats_energy(times, parsed, 999.0, 1000.0, interval_ms=250)
    assert r["joules"] == pytest.approx(30.0 / 4)
    with pytest.raises(DfqError, match="without timestamps"):
        tegrastats_times(parsed, 250)


def test_log_sampler_windows_and_errors(tmp_path):
    s = TegrastatsLogSampler(DATA / "orin_nano_jp6.log", interval_ms=1000)
    s.start()
    s.stop()
    t0 = datetime(2026, 5, 14, 11, 30, 0).timestamp()
    e = s.energy([(t0, t0 + 1.0), (t0 + 3.0, t0 + 4.0)], images=100)
    assert e["available"] and e["rail"] == "VDD_IN" and e["source"] == "tegrastats-log"
    assert e["joules"] == pytest.approx(6.0 + 7.0)
    assert e["joules_per_image"] == pytest.approx(0.13)
    assert e["sample_rate_hz"] == pytest.approx(1.0)
    later = s.energy([(t0 + 3600, t0 + 3601)], images=1)
    assert later["available"] is False and "not the benchmark window" in later["reason"]
    empty = tmp_path / "empty.log"
    empty.write_text("RAM 1/2MB CPU [1%@100]\n")
    with pytest.raises(DfqError, match="no tegrastats power rail"):
        parse_tegrastats_file(empty)


def test_run_benchmark_with_a_tegrastats_log(tmp_path):
    """The --tegrastats-log path: a log recorded around the run gives each artifact its energy."""
    from dfq_deploy.bench.latency import run_benchmark

    from .test_latency import make_onnx

    now = int(datetime.now().timestamp())
    log = tmp_path / "tegrastats.log"
    log.write_text("".join(
        f"{datetime.fromtimestamp(now + k).strftime('%m-%d-%Y %H:%M:%S')} RAM 3162/7620MB GR3D_FREQ 50%@[612] "
        f"VDD_IN 6000mW/5000mW VDD_CPU_GPU_CV 2000mW/1000mW VDD_SOC 1500mW/1500mW\n" for k in range(-3, 8)))
    models = [make_onnx(tmp_path / "a.onnx"), make_onnx(tmp_path / "b.onnx", hidden=32)]
    res = run_benchmark(models, batches=[2], warmup=0, iters=4, rounds=2, progress=False,
                        power_sampler=TegrastatsLogSampler(log))
    assert res["power"]["rail"] == "VDD_IN" and res["power"]["source"] == "tegrastats-log"
    for art in res["artifacts"]:
        e = art["batches"][0]["energy"]
        assert e["available"] and e["avg_watts"] == pytest.approx(6.0)
        assert e["joules_per_image"] == pytest.approx(6.0 * e["window_s"] / 8)
        assert e["per_rail"]["VDD_CPU_GPU_CV"]["avg_watts"] == pytest.approx(2.0)
        assert e["gpu_rail"] == "VDD_CPU_GPU_CV"
    assert res["artifacts"][1]["batches"][0]["vs_baseline"]["energy_per_image_ratio"] > 0
