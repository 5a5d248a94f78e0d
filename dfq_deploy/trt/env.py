"""Finding TensorRT and a GPU, and the one TensorRT logger (:func:`trt_logger`), bridged to Python logging.

Nothing here creates a ``trt.Builder`` or ``trt.Runtime`` to probe: without an NVIDIA driver those raise or
crash the process. The GPU probe goes through cuda-python's ``cudaGetDeviceCount``, which returns an error
code cleanly.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from typing import Any

from dfq_deploy.errors import DfqError, MissingDependencyError
from dfq_deploy.trt.cuda import cuda_error_text, import_cudart

logger = logging.getLogger(__name__)

TRT_MISSING_MESSAGE = (
    'TensorRT is not installed: install JetPack on Jetson or "pip install dfq-deploy[trt]" with NVIDIA\'s '
    "package index"
)


# --- TensorRT and GPU discovery ---------------------------------------------------------------------------
def require_tensorrt() -> Any:
    """Import and return the ``tensorrt`` module.

    Raises:
        MissingDependencyError: TensorRT is not installed (message names how to install it).
    """
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise MissingDependencyError(TRT_MISSING_MESSAGE) from exc
    return trt


def tensorrt_version() -> str | None:
    """Version of the installed TensorRT, or None when it is not installed.

    Imports ``tensorrt`` (which needs no GPU) but never creates a Builder or Runtime. Other modules use this
    instead of importing ``tensorrt`` themselves.
    """
    try:
        trt = require_tensorrt()
    except MissingDependencyError:
        return None
    return str(getattr(trt, "__version__", "unknown"))


def gpu_available() -> tuple[bool, str]:
    """Whether a CUDA GPU is usable, probed without TensorRT.

    Uses cuda-python's ``cudaGetDeviceCount`` (which returns an error code cleanly when there is no driver),
    falling back to pycuda where only that is installed. Never creates ``trt.Builder``/``trt.Runtime``: those
    raise or crash without a driver.

    Returns:
        ``(True, "<n> CUDA device(s)")`` or ``(False, reason)``.
    """
    cudart = import_cudart()
    if cudart is not None:
        try:
            err, count = cudart.cudaGetDeviceCount()
        except Exception as exc:
            return False, f"cudaGetDeviceCount raised {type(exc).__name__}: {exc}"
        if int(err) != 0:
            return False, f"cudaGetDeviceCount failed: {cuda_error_text(cudart, err)}"
        if count < 1:
            return False, "no CUDA device found"
        return True, f"{count} CUDA device(s)"
    try:
        import pycuda.driver as pycuda_driver
    except ImportError:
        return False, "neither cuda-python nor pycuda is installed (pip install cuda-python)"
    try:
        pycuda_driver.init()
        count = pycuda_driver.Device.count()
    except Exception as exc:
        return False, f"pycuda could not initialise CUDA: {exc}"
    return (count > 0), (f"{count} CUDA device(s)" if count > 0 else "no CUDA device found")


def gpu_info() -> dict[str, Any]:
    """Name and compute capability of the current CUDA device (empty dict when unknown)."""
    cudart = import_cudart()
    if cudart is None:
        try:
            import pycuda.driver as drv

            drv.init()
            dev = drv.Device(0)
            major, minor = dev.compute_capability()
            return {"name": dev.name(), "compute_capability": f"{major}.{minor}", "device": 0}
        except Exception:
            return {}
    try:
        err, dev = cudart.cudaGetDevice()
        if int(err) != 0:
            return {}
        err, prop = cudart.cudaGetDeviceProperties(dev)
        if int(err) != 0:
            return {}
        name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
        return {"name": name.rstrip("\x00"), "compute_capability": f"{prop.major}.{prop.minor}",
                "device": int(dev)}
    except Exception:
        return {}


def trt_version_tuple(version: str) -> tuple[int, ...]:
    """``"10.3.0.30"`` -> ``(10, 3, 0, 30)`` (non-numeric suffixes ignored)."""
    parts = []
    for piece in str(version).split("."):
        m = re.match(r"\d+", piece)
        if not m:
            break
        parts.append(int(m.group()))
    if not parts:
        raise DfqError(f"cannot read the TensorRT version {version!r}")
    return tuple(parts)


_SEVERITY_LEVELS = {
    "INTERNAL_ERROR": logging.CRITICAL,
    "ERROR": logging.ERROR,
    "WARNING": logging.WARNING,
    "INFO": logging.DEBUG,  # TensorRT's INFO is build chatter
    "VERBOSE": logging.DEBUG - 5,
}


def trt_severity_level(severity: Any) -> int:
    """Python logging level for a ``tensorrt.Logger.Severity`` (or its name)."""
    name = getattr(severity, "name", str(severity)).rsplit(".", 1)[-1].upper()
    return _SEVERITY_LEVELS.get(name, logging.INFO)


#: Python logger that receives every TensorRT message.
TRT_LOGGER_NAME = "dfq_deploy.trt"
_TRT_LOGGER: Any = None
_TRT_LOGGER_LOCK = threading.Lock()


def trt_logger() -> Any:
    """The process-wide ``tensorrt.ILogger``: created on first use, then the same object for every caller.

    Every ``trt.Builder``, ``trt.Runtime`` and ``trt.OnnxParser`` in dfq-deploy is given this one logger. TensorRT
    10.x: "The logger used to create an instance of IBuilder, IRuntime or IRefitter is used for all objects
    created through that interface. The logger should be valid until all objects created are released"
    (https://docs.nvidia.com/deeplearning/tensorrt/api/python_api/infer/Core/Logger.html); TensorRT before 8.2
    kept a single logger pointer for the whole process and warned when a second one was passed
    (https://github.com/NVIDIA/TensorRT/issues/1475). A module-level logger that is never released satisfies both.
    Messages go to the Python logger :data:`TRT_LOGGER_NAME` (levels from :func:`trt_severity_level`).

    Raises:
        MissingDependencyError: TensorRT is not installed.
    """
    global _TRT_LOGGER
    if _TRT_LOGGER is None:
        with _TRT_LOGGER_LOCK:  # the C++ side requires a thread-safe logger; creation is made race-free too
            if _TRT_LOGGER is None:
                _TRT_LOGGER = _logging_bridge(require_tensorrt(), logging.getLogger(TRT_LOGGER_NAME))
    return _TRT_LOGGER


def _logging_bridge(trt: Any, log: logging.Logger) -> Any:
    """A ``tensorrt.ILogger`` subclass instance forwarding TensorRT messages to ``log``."""

    class LoggingBridge(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)  # the explicit base call of the TensorRT docs' ILogger pattern

        def log(self, severity: Any, msg: str) -> None:
            with contextlib.suppress(Exception):  # a callback from C++ must not raise
                level = trt_severity_level(severity)
                if log.isEnabledFor(level):
                    log.log(level, "TensorRT: %s", msg)

    return LoggingBridge()
