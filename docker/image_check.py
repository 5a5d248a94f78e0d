"""Build-time checks for the Jetson images (docker/Dockerfile.jetson, docker/Dockerfile.thor).

Runs inside the NVIDIA base image during ``docker build``, where there is no GPU: nothing here calls CUDA.

``base`` (before pip): the image's PyTorch is a CUDA build (``torch.version.cuda`` is set) of the expected CUDA
major version and inside pyproject.toml's torch range, and its TensorRT is of the expected major version. Writes
``OUT/constraints.txt`` (the image's torch, torchvision, TensorRT, NumPy, cuda-python... pinned, so that pip
cannot replace them) and ``OUT/requirements.txt`` (what the ``[trt]`` extra needs that the image lacks).

``final`` (after pip): the pinned packages are unchanged, and torch (still a CUDA build), tensorrt,
cuda.bindings and dfq_deploy import together.

Usage: python3 image_check.py {base,final} --out DIR --cuda-major N --trt-major N [--igpu]
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import importlib.util
import re
import sys
from pathlib import Path

# Distributions the image brings and pip must keep (names normalized as in PEP 503).
PINNED = {"torch", "torchvision", "torchaudio", "numpy", "cuda-python", "cuda-bindings", "pytorch-triton", "triton"}

IGPU_HINT = (
    "On a Jetson the -igpu image's CUDA and TensorRT load driver libraries (e.g. libnvdla_compiler.so) that the "
    "NVIDIA container runtime mounts from the host: build with nvidia as Docker's default runtime and the "
    "classic builder (DOCKER_BUILDKIT=0), see docker/README.md."
)


class CheckError(Exception):
    pass


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _installed() -> dict[str, tuple[str, str]]:
    """normalized name -> (name as installed, version), for the distributions to pin."""
    found: dict[str, tuple[str, str]] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"] or ""
        key = _normalize(name)
        if key in PINNED or key.startswith("tensorrt"):
            found.setdefault(key, (name, dist.version))
    return found


def _packaging():
    try:
        from packaging.requirements import Requirement
        from packaging.version import InvalidVersion, Version
    except ImportError:  # pip always vendors it
        from pip._vendor.packaging.requirements import Requirement
        from pip._vendor.packaging.version import InvalidVersion, Version
    return Requirement, Version, InvalidVersion


def _pin_line(name: str, version: str) -> str:
    _, Version, InvalidVersion = _packaging()
    try:
        Version(version)
    except InvalidVersion:
        return f"{name}==={version}"  # PEP 440 arbitrary equality for a non-standard version string
    return f"{name}=={version}"


def _import_torch(args):
    try:
        import torch
    except Exception as exc:
        hint = f" {IGPU_HINT}" if args.igpu else ""
        raise CheckError(f"the image's torch does not import ({type(exc).__name__}: {exc}).{hint}") from exc
    cuda = torch.version.cuda
    if not cuda:
        raise CheckError(
            f"the image's torch {torch.__version__} is a CPU-only build (torch.version.cuda is None), so it cannot "
            f"use the GPU: choose a base image with CUDA PyTorch (see docker/README.md)")
    if cuda.split(".")[0] != str(args.cuda_major):
        raise CheckError(f"the image's torch is built for CUDA {cuda}, want CUDA {args.cuda_major}.x (CUDA_MAJOR)")
    return torch


def _check_torch_range(torch_version: str, pyproject: Path) -> None:
    """torch as installed satisfies pyproject.toml's torch requirement (pre-releases, as NGC's, included)."""
    try:
        import tomllib
    except ImportError:  # Python < 3.11: pip's resolver still checks the range
        print("image_check: no tomllib, torch range left to pip")
        return
    Requirement, _, _ = _packaging()
    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    for line in deps:
        req = Requirement(line)
        if _normalize(req.name) == "torch" and not req.specifier.contains(torch_version, prereleases=True):
            raise CheckError(f"the image's torch {torch_version} is outside dfq-deploy's requirement {line!r}")


def _trt_major_from(version: str, args) -> None:
    if version.split(".")[0] != str(args.trt_major):
        raise CheckError(f"the image's TensorRT is {version}, want {args.trt_major}.x (TRT_MAJOR); engines need "
                         "TensorRT >= 10.0, and TensorRT 11 is not supported on JetPack 6 or 7.0/7.1")


def _tensorrt_module(args):
    """The image's tensorrt module (TensorRT must come from the image, never from PyPI)."""
    hint = f" {IGPU_HINT}" if args.igpu else ""
    try:
        import tensorrt
    except ModuleNotFoundError as exc:
        raise CheckError("the image has no tensorrt Python module; TensorRT must come from the image, never from "
                         "PyPI: choose a base image that ships TensorRT (see docker/README.md)") from exc
    except Exception as exc:
        raise CheckError(f"the image's tensorrt does not import ({type(exc).__name__}: {exc}).{hint}") from exc
    return tensorrt


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def base(args) -> None:
    torch = _import_torch(args)
    _check_torch_range(torch.__version__, Path(args.pyproject))
    have = _installed()
    trt = {name: version for key, (name, version) in have.items() if key.startswith("tensorrt")}
    trt_version = trt.get("tensorrt") or next(iter(trt.values()), None) or _tensorrt_module(args).__version__
    _trt_major_from(trt_version, args)

    # What the [trt] extra needs besides tensorrt. cuda.bindings shares the CUDA major version; no newer minor
    # than the image's own CUDA, whose runtime is the one known to work on the board. An image's cuda-python
    # without cuda.bindings (older than 12.6.1), or of another major version, is not pinned: pip replaces it.
    major, minor = (int(part) for part in torch.version.cuda.split(".")[:2])
    reqs = ["nvidia-ml-py>=12"]
    cuda_python = [key for key, (_, version) in have.items()
                   if key in ("cuda-python", "cuda-bindings") and version.split(".")[0] == str(major)]
    if not cuda_python or importlib.util.find_spec("cuda.bindings") is None:
        reqs.append(f"cuda-python>={major}.0,<{major}.{minor + 1}")
        for key in ("cuda-python", "cuda-bindings"):
            have.pop(key, None)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pins = [_pin_line(name, version) for _, (name, version) in sorted(have.items())]
    (out / "constraints.txt").write_text("".join(f"{line}\n" for line in pins))
    (out / "requirements.txt").write_text("".join(f"{line}\n" for line in reqs))
    print(f"image_check: {args.image or 'base image'}: torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"TensorRT {trt_version}")
    print("image_check: pinned from the image:", ", ".join(pins))
    print("image_check: added:", ", ".join(reqs))


def final(args) -> None:
    out = Path(args.out)
    have = {key: version for key, (_, version) in _installed().items()}
    for line in (out / "constraints.txt").read_text().splitlines():
        name, _, want = line.partition("==")
        want = want.lstrip("=")
        now = have.get(_normalize(name))
        if now != want:
            raise CheckError(f"pip replaced the image's {name} {want} with {now}: the image's build must stay")
    torch = _import_torch(args)
    hint = f" {IGPU_HINT}" if args.igpu else ""
    tensorrt = _tensorrt_module(args)
    _trt_major_from(tensorrt.__version__, args)
    try:
        from cuda.bindings import runtime  # noqa: F401 - dfq_deploy's CUDA backend
    except Exception as exc:
        raise CheckError(f"cuda.bindings does not import ({type(exc).__name__}: {exc}).{hint}") from exc
    try:
        import dfq_deploy  # noqa: F401
    except Exception as exc:
        raise CheckError(f"dfq_deploy does not import ({type(exc).__name__}: {exc})") from exc
    print(f"image_check: ok: torch {torch.__version__} (CUDA {torch.version.cuda}), TensorRT {tensorrt.__version__}, "
          f"cuda-bindings {_version('cuda-bindings')}, numpy {_version('numpy')}, dfq-deploy {_version('dfq-deploy')}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("step", choices=("base", "final"))
    p.add_argument("--out", required=True, help="folder for constraints.txt and requirements.txt")
    p.add_argument("--cuda-major", type=int, required=True, help="CUDA major version the image's torch must have")
    p.add_argument("--trt-major", type=int, required=True, help="TensorRT major version the image must have")
    p.add_argument("--pyproject", default="pyproject.toml", help="dfq-deploy's pyproject.toml (torch range)")
    p.add_argument("--image", default="", help="base image name, for the log")
    p.add_argument("--igpu", action="store_true", help="Jetson -igpu image: hint at the host libraries on failure")
    args = p.parse_args(argv)
    try:
        (base if args.step == "base" else final)(args)
    except CheckError as exc:
        print(f"image_check: FAILED: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
