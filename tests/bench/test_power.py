"""Energy integration on synthetic traces, INA3221 / RAPL fake sysfs trees, and the automatic choice."""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dfq_deploy.bench import power
from dfq_deploy.bench.power import (
    INA3221Sampler,
    RAPLSampler,
    UnavailableSampler,
    auto_sampler,
    choose_total_rail,
    energy_from_counter,
    find_ina3221_channels,
    integrate_power,
    integrate_segments,
    unwrap_counter,
)
from dfq_deploy.errors import DfqError

# -- integration ---------------------------------------------------------------------------------------------


def test_constant_trace():
    t = np.arange(0, 11)  # 1 Hz, 0..10 s
    w = np.full(11, 10.0)
    r = integrate_power(t, w)
    assert r["joules"] == pytest.approx(100.0)
    assert r["avg_watts"] == pytest.approx(10.0)
    assert r["coverage"] == pytest.approx(1.0) and r["gaps"] == []
    assert integrate_power(t, w, 2.0, 5.0)["joules"] == pytest.approx(30.0)
    # A window between two samples is interpolated: 10 W x 0.25 s.
    assert integrate_power(t, w, 3.25, 3.5)["joules"] == pytest.approx(2.5)


def test_ramp_trace():
    t = np.arange(0, 11, dtype=float)
    w = t.copy()  # P(t) = t W: E(a, b) = (b^2 - a^2) / 2
    assert integrate_power(t, w)["joules"] == pytest.approx(50.0)
    assert integrate_power(t, w, 2.0, 4.0)["joules"] == pytest.approx(6.0)
    assert integrate_power(t, w, 2.5, 3.5)["joules"] == pytest.approx(3.0)
    assert integrate_power(t, w, 0.2, 0.7)["joules"] == pytest.approx((0.49 - 0.04) / 2)
    # Shuffled input gives the same answer.
    order = np.random.default_rng(1).permutation(len(t))
    assert integrate_power(t[order], w[order], 2.0, 4.0)["joules"] == pytest.approx(6.0)


def test_window_partly_outside_samples_is_not_extrapolated():
    t = np.arange(0, 11, dtype=float)
    r = integrate_power(t, t, -2.0, 4.0)
    assert r["joules"] == pytest.approx(8.0)  # only 0..4 s is covered
    assert r["coverage"] == pytest.approx(4 / 6)
    r = integrate_power(t, t, 20.0, 30.0)
    assert r["joules"] is None and r["coverage"] == 0.0


def test_gap_is_reported_and_bridged():
    t = np.array([0, 1, 2, 3, 8, 9, 10], dtype=float)
    r = integrate_power(t, np.full(len(t), 5.0))
    assert r["joules"] == pytest.approx(50.0)
    assert r["gaps"] == [{"start": 3.0, "end": 8.0, "seconds": 5.0}]
    assert r["gap_s"] == pytest.approx(5.0)
    # A linear trace across the gap stays exact: integral of t from 0 to 10 = 50 J.
    assert integrate_power(t, t)["joules"] == pytest.approx(50.0)
    # Only the part of the gap inside the window counts; a gap outside the window is not reported.
    assert integrate_power(t, t, 5.0, 9.0)["gaps"][0]["seconds"] == pytest.approx(3.0)
    assert integrate_power(t, t, 0.0, 2.5)["gaps"] == []
    # With the nominal interval given, a 2 s spacing at 0.5 s sampling is a gap (2 > 3 x 0.5).
    t2 = np.array([0.0, 0.5, 1.0, 3.0, 3.5])
    assert len(integrate_power(t2, np.ones(5), interval_s=0.5)["gaps"]) == 1
    assert integrate_power(t2, np.ones(5), interval_s=1.0)["gaps"] == []


def test_segments_sum_and_counter():
    t = np.arange(0, 11, dtype=float)
    r = integrate_segments(t, t, [(1.0, 2.0), (3.0, 5.0)])
    assert r["joules"] == pytest.approx((4 - 1) / 2 + (25 - 9) / 2)
    assert r["window_s"] == pytest.approx(3.0) and r["segments"] == 2
    # A counter E(t) = 10 t J: 10 W everywhere, interpolated at the window edges.
    c = energy_from_counter(t, 10 * t, 1.5, 4.25)
    assert c["joules"] == pytest.approx(27.5) and c["avg_watts"] == pytest.approx(10.0)
    rc = integrate_segments(t, 10 * t, [(0.0, 1.0), (2.0, 2.5)], kind="counter")
    assert rc["joules"] == pytest.approx(15.0)


def test_unwrap_counter():
    assert list(unwrap_counter([900, 950, 20, 80], 1000)) == [900, 950, 1020, 1080]
    with pytest.raises(ValueError):
        unwrap_counter([5, 3], None)


def test_choose_total_rail():
    assert choose_total_rail(["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"])[0] == "VDD_IN"
    assert choose_total_rail(["VDD_GPU", "VDD_CPU_SOC_MSS", "VIN_SYS_5V0", "VIN"])[0] == "VIN"
    name, note, summed = choose_total_rail(["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"])
    assert name == "sum(VDD_GPU_SOC+VDD_CPU_CV+VIN_SYS_5V0)" and summed == ["VDD_GPU_SOC", "VDD_CPU_CV",
                                                                               "VIN_SYS_5V0"]
    assert "no input rail" in note


# -- INA3221 sysfs --------------------------------------------------------------------------------------------


def _chip(root: Path, device: str, hwmon: str, channels: dict[int, tuple[str, int, int]],
          update_ms: int | None = 430) -> Path:
    dev = root / "bus" / "i2c" / "devices" / device
    hw = dev / "hwmon" / hwmon
    hw.mkdir(parents=True)
    (dev / "name").write_text("ina3221\n")
    (hw / "name").write_text("ina3221\n")
    if update_ms:
        (hw / "update_interval").write_text(f"{update_ms}\n")
    for n, (label, mv, ma) in channels.items():
        (hw / f"in{n}_label").write_text(label + "\n")
        (hw / f"in{n}_input").write_text(f"{mv}\n")
        (hw / f"curr{n}_input").write_text(f"{ma}\n")
    return hw


@pytest.fixture
def agx_orin_sysfs(tmp_path: Path) -> Path:
    """AGX Orin layout: two chips, two NC channels and the sum-of-shunts channel in7."""
    _chip(tmp_path, "1-0040", "hwmon3", {1: ("VDD_GPU_SOC", 19000, 500), 2: ("VDD_CPU_CV", 19000, 200),
                                         3: ("VIN_SYS_5V0", 5000, 600),
                                         7: ("sum of shunt voltages", 19000, 1300)})
    _chip(tmp_path, "1-0041", "hwmon4", {1: ("NC", 5000, 100), 2: ("VDDQ_VDD2_1V8AO", 1800, 250),
                                         3: ("NC", 5000, 100)})
    # An unrelated hwmon device must be ignored.
    other = tmp_path / "bus" / "i2c" / "devices" / "2-0048" / "hwmon" / "hwmon5"
    other.mkdir(parents=True)
    (other / "name").write_text("tmp451\n")
    (other / "in1_label").write_text("VDD_FAKE\n")
    return tmp_path


def test_ina3221_discovery_skips_nc_and_sum_channels(agx_orin_sysfs):
    names = [c["name"] for c in find_ina3221_channels(agx_orin_sysfs)]
    assert names == ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0", "VDDQ_VDD2_1V8AO"]


def test_ina3221_read_and_total_without_input_rail(agx_orin_sysfs):
    s = INA3221Sampler(agx_orin_sysfs, interval_s=0.005)
    assert s.probe() is None
    reading = s.read()
    # V x I: 19 V x 0.5 A, 19 V x 0.2 A, 5 V x 0.6 A, 1.8 V x 0.25 A.
    assert reading["VDD_GPU_SOC"] == pytest.approx(9.5)
    assert reading["VDD_CPU_CV"] == pytest.approx(3.8)
    assert reading["VIN_SYS_5V0"] == pytest.approx(3.0)
    assert reading["VDDQ_VDD2_1V8AO"] == pytest.approx(0.45)
    assert s.total.startswith("sum(") and reading[s.total] == pytest.approx(16.75)
    d = s.describe()
    assert d["sensor_update_interval_ms"] == 430 and "VDD_GPU_SOC" in d["rails"]


def test_ina3221_sampler_energy_in_window(tmp_path):
    """Orin Nano layout: VDD_IN is the total; a live run integrates a constant 5 W."""
    _chip(tmp_path, "1-0040", "hwmon1", {1: ("VDD_IN", 5000, 1000), 2: ("VDD_CPU_GPU_CV", 5000, 300),
                                         3: ("VDD_SOC", 5000, 200)})
    s = INA3221Sampler(tmp_path, interval_s=0.005)
    assert s.total == "VDD_IN"
    s.start()
    t0 = time.time()
    time.sleep(0.08)
    t1 = time.time()
    s.stop()
    e = s.energy([(t0, t1)], images=16)
    assert e["available"] and e["rail"] == "VDD_IN" and "module input" in e["rail_note"]
    assert e["joules"] == pytest.approx(5.0 * (t1 - t0), rel=1e-9)
    assert e["joules_per_image"] == pytest.approx(e["joules"] / 16)
    assert e["coverage"] == pytest.approx(1.0)
    assert e["sample_rate_hz"] > 10
    assert e["per_rail"]["VDD_CPU_GPU_CV"]["avg_watts"] == pytest.approx(1.5)
    assert "shared CPU + GPU" in e["per_rail"]["VDD_CPU_GPU_CV"]["note"]


def test_ina3221_absent_gives_reason(tmp_path):
    s = INA3221Sampler(tmp_path)
    assert "no INA3221" in s.probe()
    with pytest.raises(DfqError, match="not available"):
        s.start()


# -- RAPL ------------------------------------------------------------------------------------------------------


def _zone(root: Path, name: str, label: str, uj: int, max_uj: int = 1_000_000) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "name").write_text(label + "\n")
    (d / "energy_uj").write_text(f"{uj}\n")
    (d / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return d


def test_rapl_counter_wrap(tmp_path):
    (tmp_path / "intel-rapl").mkdir()  # the control-type folder, no energy_uj
    pkg = _zone(tmp_path, "intel-rapl:0", "package-0", 999_000)
    core = _zone(tmp_path, "intel-rapl:0:0", "core", 100)
    s = RAPLSampler(tmp_path)
    assert s.probe() is None
    assert s.total == "package-0" and "package" in s.total_note
    first = s.read()
    assert first["package-0"] == 0.0 and first["package-0/core"] == 0.0
    (pkg / "energy_uj").write_text("500\n")  # wrapped: 1_000_000 - 999_000 + 500 = 1500 uJ
    (core / "energy_uj").write_text("2100\n")
    second = s.read()
    assert second["package-0"] == pytest.approx(1500e-6)
    assert second["package-0/core"] == pytest.approx(2000e-6)
    (pkg / "energy_uj").write_text("2500\n")
    assert s.read()["package-0"] == pytest.approx(3500e-6)


def test_rapl_two_packages_are_summed(tmp_path):
    _zone(tmp_path, "intel-rapl:0", "package-0", 0)
    _zone(tmp_path, "intel-rapl:1", "package-1", 0)
    s = RAPLSampler(tmp_path)
    assert s.total == "sum(package-0+package-1)"
    s.read()
    (tmp_path / "intel-rapl:0" / "energy_uj").write_text("1000\n")
    (tmp_path / "intel-rapl:1" / "energy_uj").write_text("3000\n")
    assert s.read()[s.total] == pytest.approx(4000e-6)


def test_rapl_missing_root(tmp_path):
    assert "does not exist" in RAPLSampler(tmp_path / "nope").probe()


# -- automatic choice ------------------------------------------------------------------------------------------


def test_auto_sampler_unavailable_with_reason(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)
    s = auto_sampler(sysfs_root=tmp_path, powercap_root=tmp_path / "powercap")
    assert isinstance(s, UnavailableSampler)
    for source in ("ina3221", "tegrastats", "nvml", "rapl"):
        assert f"{source}:" in s.reason
    s.start()
    s.stop()
    assert s.energy([(0.0, 1.0)], 4) == {"available": False, "reason": s.reason}
    assert s.describe()["available"] is False


def test_auto_sampler_picks_first_available(agx_orin_sysfs, monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)
    s = auto_sampler(sysfs_root=agx_orin_sysfs, powercap_root=agx_orin_sysfs / "none")
    assert isinstance(s, INA3221Sampler)


def test_auto_sampler_on_this_machine():
    """Here (no GPU, no RAPL, not a Jetson) the choice must be 'unavailable' with a reason; elsewhere a
    real source is fine."""
    s = auto_sampler()
    if isinstance(s, UnavailableSampler):
        assert s.reason.startswith("no energy source")
        assert s.energy([(0.0, 1.0)], 1)["available"] is False
    else:
        assert s.probe() is None


def test_missing_tegrastats_log_is_an_error(tmp_path):
    with pytest.raises(DfqError, match="does not exist"):
        auto_sampler(tegrastats_log=tmp_path / "none.log")


def test_live_tegrastats_needs_the_binary(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda *_a, **_k: None)
    assert "not on PATH" in power.TegrastatsSampler().probe()
