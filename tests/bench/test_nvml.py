"""NVMLSampler against a recorded double of pynvml's responses (no GPU here; never a stand-in for tensorrt)."""
# ruff: noqa: N801, N802, N818 - the double keeps pynvml's own names (nvmlInit, NVMLError_NotSupported, ...)

from __future__ import annotations

import sys
import time

import pytest

from dfq_deploy.bench.nvml import METHODS, NVMLSampler, cuda_pci_bus_id


class NVMLError(Exception):
    """pynvml's error base class (``pynvml.NVMLError``), which is not an OSError."""


class NVMLError_NotSupported(NVMLError):
    pass


class FakeNVML:
    """pynvml's calls and return values for two GPUs whose NVML (PCI) order differs from CUDA's.

    GPU "0000:01:00.0" is an A100 with an energy counter (50 mJ more per reading); "0000:02:00.0" a Pascal card
    without one (``NVML_ERROR_NOT_SUPPORTED``), drawing 120.5 W. ``fail_reads`` counter reads raise NVMLError.
    """

    NVMLError = NVMLError

    def __init__(self, fail_reads: int = 0) -> None:
        self.by_bus = {"0000:01:00.0": "a100", "0000:02:00.0": "p100"}
        self.by_index = ["p100", "a100"]  # NVML index 0 is not CUDA's device 0
        self.mj = 1_000_000
        self.fail_reads = fail_reads
        self.inits = 0

    def nvmlInit(self) -> None:
        self.inits += 1

    def nvmlDeviceGetHandleByPciBusId(self, bus_id: str) -> str:
        if bus_id not in self.by_bus:
            raise NVMLError("Not Found")
        return self.by_bus[bus_id]

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return self.by_index[index]

    def nvmlDeviceGetName(self, handle: str) -> bytes:
        return {"a100": b"NVIDIA A100-SXM4-40GB", "p100": b"Tesla P100-PCIE-16GB"}[handle]

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: str) -> int:
        if handle == "p100":
            raise NVMLError_NotSupported("Not Supported")
        if self.fail_reads:
            self.fail_reads -= 1
            raise NVMLError("GPU is lost")
        self.mj += 50
        return self.mj

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        return 120_500  # mW


def test_handle_is_opened_by_the_cuda_devices_pci_bus_id():
    s = NVMLSampler(index=0, nvml=FakeNVML(), pci_bus_id={0: "0000:01:00.0", 1: "0000:02:00.0"}.get)
    assert s.probe() is None
    d = s.describe()
    assert d["gpu"] == "NVIDIA A100-SXM4-40GB" and d["pci_bus_id"] == "0000:01:00.0"  # not NVML index 0
    assert d["method"] == METHODS["counter"] and d["kind"] == "counter" and not s.warnings


def test_without_a_cuda_runtime_nvml_index_is_used_with_a_warning():
    s = NVMLSampler(index=1, nvml=FakeNVML(), pci_bus_id=lambda _i: None)
    assert s.probe() is None and s.describe()["gpu"] == "NVIDIA A100-SXM4-40GB"
    assert any("PCI bus id" in w and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in w for w in s.warnings)


def test_counter_is_differenced_and_short_windows_flagged():
    s = NVMLSampler(nvml=FakeNVML(), pci_bus_id=lambda _i: "0000:01:00.0")
    assert s.probe() is None
    s.times = [100.0, 100.5, 101.0]
    s.values = [{"gpu0": 10.0}, {"gpu0": 12.0}, {"gpu0": 15.0}]
    e = s.energy([(100.0, 101.0)], images=10)
    assert e["joules"] == pytest.approx(5.0) and e["joules_per_image"] == pytest.approx(0.5)
    assert e["method"] == METHODS["counter"]
    assert not any("shorter than 1 s" in w for w in e["warnings"])
    assert any("shorter than 1 s" in w for w in s.energy([(100.0, 100.5)], images=1)["warnings"])


def test_gpu_without_an_energy_counter_integrates_power():
    s = NVMLSampler(nvml=FakeNVML(), pci_bus_id=lambda _i: "0000:02:00.0", interval_s=0.005)
    assert s.probe() is None and s.kind == "power" and s.describe()["method"] == METHODS["power"]
    assert s.read() == {"gpu0": pytest.approx(120.5)}  # mW -> W
    s.start()
    time.sleep(0.05)
    s.stop()
    e = s.energy([(s.times[0], s.times[-1])], images=2)
    assert e["avg_watts"] == pytest.approx(120.5) and e["method"] == METHODS["power"]
    assert e["joules"] == pytest.approx(120.5 * (s.times[-1] - s.times[0]))


def test_nvml_errors_in_the_sampler_thread_drop_samples_instead_of_ending_it(caplog):
    fake = FakeNVML()
    s = NVMLSampler(nvml=fake, pci_bus_id=lambda _i: "0000:01:00.0", interval_s=0.005)
    assert s.probe() is None
    fake.fail_reads = 3  # the GPU falls off the bus for three readings, then comes back
    s.start()
    time.sleep(0.08)
    s.stop()
    assert s._read_errors == 3 and len(s.times) >= 3  # the thread lived on and kept sampling
    assert any("reading failed" in r.getMessage() for r in caplog.records)
    e = s.energy([(s.times[0], s.times[-1])], images=1)
    assert e["joules"] == pytest.approx((len(s.times) - 1) * 0.05)


def test_without_pynvml(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert "pynvml is not installed" in NVMLSampler().probe()


def test_cuda_pci_bus_id_without_a_usable_gpu_is_none():
    assert cuda_pci_bus_id(0) is None  # no driver on this machine: NVMLSampler then warns and uses NVML's index


def test_a_bus_id_nvml_cannot_open_falls_back_to_the_index_with_a_warning():
    s = NVMLSampler(index=1, nvml=FakeNVML(), pci_bus_id=lambda _i: "0000:09:00.0")  # not a bus NVML knows
    assert s.probe() is None and s.describe()["gpu"] == "NVIDIA A100-SXM4-40GB" and s.bus_id is None
    assert any("could not open PCI bus id 0000:09:00.0" in w for w in s.warnings)
