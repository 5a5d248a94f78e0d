"""Desktop / server NVIDIA GPU energy through NVML (``pynvml``, package ``nvidia-ml-py``).

Three things a naive sampler gets wrong, and this one does not:

* **Which GPU.** NVML numbers GPUs in PCI order, CUDA by default fastest first (``CUDA_DEVICE_ORDER=FASTEST_FIRST``)
  and through ``CUDA_VISIBLE_DEVICES``, so "device 0" can be two different boards. The handle is opened by the
  CUDA device's PCI bus id (``cudaDeviceGetPCIBusId``, then ``nvmlDeviceGetHandleByPciBusId``, which accepts
  ``domain:bus:device.function`` in hex: https://docs.nvidia.com/deploy/nvml-api/group__nvmlDeviceQueries.html).
  Without a CUDA runtime to ask, it falls back to NVML's index and says so in a warning.
* **Errors while sampling.** ``pynvml.NVMLError`` is not an ``OSError``: a failed read in the sampler thread is
  counted and dropped like any other failed reading, instead of ending the thread.
* **Counter or power.** Volta and newer GPUs have a total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``,
  mJ since the driver loaded), which is differenced over the window; where it is not supported, the board power
  (``nvmlDeviceGetPowerUsage``, mW) is sampled and integrated. :meth:`NVMLSampler.describe` and every energy
  result name the method. The counter updates every 20-100 ms, so windows under a second are flagged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from dfq_deploy.bench.energy import DEFAULT_GAP_FACTOR
from dfq_deploy.bench.sampler import PowerSampler

logger = logging.getLogger(__name__)

#: ``method`` of an NVML sampler: what it reads.
METHODS = {"counter": "total-energy counter (nvmlDeviceGetTotalEnergyConsumption), differenced",
           "power": "board power (nvmlDeviceGetPowerUsage), sampled and integrated"}


def cuda_pci_bus_id(index: int) -> str | None:
    """The PCI bus id (``"0000:01:00.0"``) of CUDA device ``index``, or None when no CUDA runtime can say.

    Asks cuda-python's runtime (``cudaDeviceGetPCIBusId``), which honours ``CUDA_VISIBLE_DEVICES`` and
    ``CUDA_DEVICE_ORDER`` exactly as the benchmarked process sees them.
    """
    from dfq_deploy.trt.cuda import import_cudart

    cudart = import_cudart()
    if cudart is None:
        return None
    try:
        err, bus_id = cudart.cudaDeviceGetPCIBusId(32, index)
    except (RuntimeError, TypeError, ValueError):
        return None
    if int(err) != 0:
        return None
    text = bus_id.decode() if isinstance(bus_id, bytes) else str(bus_id)
    return text.split("\x00", 1)[0] or None


class NVMLSampler(PowerSampler):
    """Energy of the NVIDIA GPU a benchmark runs on, from NVML (see the module docstring).

    Args:
        index: the CUDA device index (the ``cuda:N`` the benchmark uses), not NVML's.
        interval_s: polling period.
        gap_factor: spacings above ``gap_factor * interval_s`` are reported as gaps.
        nvml: the ``pynvml`` module (default: imported on first use).
        pci_bus_id: maps a CUDA index to its PCI bus id or None (default :func:`cuda_pci_bus_id`).
    """

    source = "nvml"

    def __init__(self, index: int = 0, interval_s: float = 0.02, gap_factor: float = DEFAULT_GAP_FACTOR,
                 nvml: Any = None, pci_bus_id: Callable[[int], str | None] = cuda_pci_bus_id) -> None:
        super().__init__(interval_s, gap_factor)
        self.index = index
        self._nvml = nvml
        self._pci_bus_id = pci_bus_id
        self._handle: Any = None
        self.kind = "counter"
        self.bus_id: str | None = None
        self.gpu_name = ""
        self.total = f"gpu{index}"
        self.total_note = "GPU board (NVML); CPU, memory and the rest of the host not included"

    def _init(self) -> None:
        if self._handle is not None:
            return
        if self._nvml is None:
            import pynvml  # nvidia-ml-py; optional

            self._nvml = pynvml
        nvml = self._nvml
        nvml.nvmlInit()
        if hasattr(nvml, "NVMLError"):
            self.read_error_types = (*self.read_error_types, nvml.NVMLError)
        self.bus_id = self._pci_bus_id(self.index)
        handle, why = None, f"no CUDA runtime to map cuda:{self.index} to its PCI bus id"
        if self.bus_id is not None:
            try:
                handle = nvml.nvmlDeviceGetHandleByPciBusId(self.bus_id)
            except (*self.read_error_types, TypeError) as exc:  # not found, or an old pynvml wanting bytes
                why = f"NVML could not open PCI bus id {self.bus_id} ({exc})"
        if handle is None:
            self.warnings.append(f"{why}: NVML device {self.index} was used, which is cuda:{self.index} only in "
                                 "PCI order (CUDA_DEVICE_ORDER=PCI_BUS_ID)")
            self.bus_id = None
            handle = nvml.nvmlDeviceGetHandleByIndex(self.index)
        try:
            nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            self.kind = "counter"
        except self.read_error_types:  # e.g. NVML_ERROR_NOT_SUPPORTED before Volta
            nvml.nvmlDeviceGetPowerUsage(handle)  # raises too when the GPU reports no power at all
            self.kind = "power"
        name = nvml.nvmlDeviceGetName(handle)
        self.gpu_name = name.decode() if isinstance(name, bytes) else str(name)
        self._handle = handle

    def probe(self) -> str | None:
        try:
            self._init()
        except ImportError:
            return "pynvml is not installed (pip install nvidia-ml-py)"
        except Exception as exc:  # NVMLError subclasses vary by pynvml version
            return f"NVML energy and power readings unavailable: {exc}"
        return None

    def read(self) -> dict[str, float]:
        if self.kind == "counter":
            return {self.total: self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0}
        return {self.total: self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0}

    def energy(self, segments: Sequence[tuple[float, float]], images: int) -> dict[str, Any]:
        res = super().energy(segments, images)
        if res.get("available"):
            res["method"] = METHODS[self.kind]
            if self.kind == "counter" and res["window_s"] < 1.0:
                res["warnings"].append("window shorter than 1 s: NVML's energy counter updates only every "
                                       "20-100 ms, so this figure is coarse")
        return res

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        d.update(gpu=self.gpu_name, pci_bus_id=self.bus_id, cuda_index=self.index, method=METHODS[self.kind])
        return d
