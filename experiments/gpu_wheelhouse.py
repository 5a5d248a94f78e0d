"""A wheelhouse of the project's Python dependencies that a bare PyTorch image lacks, for a GPU machine offline.

The GPU check (``dfq-deploy acceptance OUTDIR --no-tensorrt``) runs on a machine with an NVIDIA GPU and PyTorch
CUDA, often without network. This script, run where pip reaches a package index, downloads everything else the
check needs as wheels into one folder (under :data:`LIMIT_MIB` MiB, so that it travels with a checkout):

* the requirements, read from ``pyproject.toml`` (never restated here): ``[project] dependencies``, the extras'
  packages in :data:`EXTRA_PACKAGES` (``nvidia-ml-py`` for the energy step, ``pytest`` and ``pytest-xdist`` for the
  CUDA tests; not TensorRT, ruff or matplotlib), and ``[build-system] requires`` (to install the checkout offline);
* resolved for the target (``--python-version``, ``--arch``, ``--glibc``; binary wheels only) with
  ``pip install --dry-run --report``, which reads wheel metadata, not the wheels (where the index serves it);
* minus what the image ships: :data:`PROVIDED` and everything they depend on (torch's sympy, networkx, jinja2,
  its CUDA libraries, ... and torchvision's pillow), computed from the resolved metadata, extras and markers
  followed; the build requirements stay (pip builds the checkout in an isolated environment), and so do the
  pure-Python packages the image ships that the others need too (in case the image's are too old);
* downloaded with ``pip download --no-deps --only-binary=:all:`` at the resolved versions; what the image lacks
  is listed in ``DIR/requirements.txt``.

Usage:
    python experiments/gpu_wheelhouse.py --output wheelhouse [--python-version 3.11] [--arch x86_64] [--glibc 2.28]

Then on the GPU machine (an image with torch, torchvision and numpy for that Python; e.g. the pytorch/pytorch
images), from the source checkout:
    pip install --no-index --find-links wheelhouse -r wheelhouse/requirements.txt
    pip install --no-index --find-links wheelhouse --no-deps -e .
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import subprocess
import sys
import tempfile
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

from dfq_deploy.errors import DfqError
from dfq_deploy.utils import atomic_write_text

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib  # type: ignore[no-redef]

try:
    from packaging.requirements import InvalidRequirement, Requirement
except ModuleNotFoundError:  # pip always has it
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement  # type: ignore[no-redef]

logger = logging.getLogger("experiments.gpu_wheelhouse")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"
#: The packages of each extra the GPU check needs (the rest of the extra is for TensorRT or development).
EXTRA_PACKAGES = {"trt": ("nvidia-ml-py",), "dev": ("pytest", "pytest-xdist")}
#: What a bare PyTorch image ships; these and everything they depend on are left out of the wheelhouse.
PROVIDED = ("torch", "torchvision", "numpy")
#: The wheelhouse must stay under this (a device machine takes at most 64 MiB of carried files).
LIMIT_MIB = 64.0
REQUIREMENTS_FILE = "requirements.txt"


def normalize(name: str) -> str:
    """A project name as PEP 503 compares it (``ML_Dtypes`` -> ``ml-dtypes``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements_from_pyproject(path: str | Path = PYPROJECT,
                                extra_packages: dict[str, Sequence[str]] | None = None) -> list[str]:
    """The requirement strings the wheelhouse resolves, as ``pyproject.toml`` writes them.

    Args:
        path: the project's ``pyproject.toml``.
        extra_packages: extra -> the packages of it to take (default :data:`EXTRA_PACKAGES`).

    Raises:
        DfqError: an extra or one of its packages is not in the file.
    """
    data = tomllib.loads(Path(path).read_text())
    project = data["project"]
    reqs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra, names in (EXTRA_PACKAGES if extra_packages is None else extra_packages).items():
        if extra not in optional:
            raise DfqError(f"{path} has no extra [{extra}]: update EXTRA_PACKAGES in {Path(__file__).name}")
        by_name = {normalize(Requirement(r).name): r for r in optional[extra]}
        for name in names:
            if normalize(name) not in by_name:
                raise DfqError(f"{path}'s extra [{extra}] has no {name}: update EXTRA_PACKAGES in "
                               f"{Path(__file__).name}")
            reqs.append(by_name[normalize(name)])
    reqs += data.get("build-system", {}).get("requires", [])
    return list(dict.fromkeys(reqs))


def platform_tags(arch: str = "x86_64", glibc: str = "2.28") -> list[str]:
    """pip ``--platform`` values for a Linux with this glibc: every ``manylinux_2_<m>`` from 2.17 up to it."""
    major, minor = (int(v) for v in glibc.split("."))
    if major != 2 or minor < 17:
        raise DfqError(f"--glibc {glibc}: give 2.17 or newer (manylinux2014 is glibc 2.17)")
    return [f"manylinux_2_{m}_{arch}" for m in range(minor, 16, -1)] + [f"manylinux2014_{arch}"]


def _target_args(python_version: str, platforms: Iterable[str]) -> list[str]:
    args = ["--only-binary=:all:", "--python-version", python_version, "--implementation", "cp"]
    for p in platforms:
        args += ["--platform", p]
    return args


def resolve_command(requirements: Sequence[str], report: str | Path, python_version: str,
                    platforms: Sequence[str]) -> list[str]:
    """``pip install --dry-run --report`` of ``requirements`` for the target (installs nothing).

    ``--target`` (next to the report; nothing is written there) is what pip before 24 needs to accept
    ``--platform`` with ``--dry-run``; it also keeps this environment's installed packages out of the resolution.
    """
    target = Path(report).parent / "target"
    return [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--target",
            str(target), "--report", str(report), *_target_args(python_version, platforms), *requirements]


def download_command(pins: Sequence[str], dest: str | Path, python_version: str,
                     platforms: Sequence[str]) -> list[str]:
    """``pip download --no-deps`` of exact pins for the target."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest),
            *_target_args(python_version, platforms), *pins]


def target_environment(python_version: str, arch: str = "x86_64") -> dict[str, str]:
    """The PEP 508 marker environment of the GPU machine (Linux, CPython ``python_version``, ``arch``)."""
    return {"python_version": python_version, "python_full_version": f"{python_version}.0", "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": arch,
            "platform_python_implementation": "CPython", "implementation_name": "cpython",
            "implementation_version": f"{python_version}.0", "platform_release": "", "platform_version": ""}


def resolved_packages(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``normalized name -> {"name", "version", "requires_dist", "pure"}`` from a pip installation report
    (``pure``: its wheel is ``*-none-any``, one file for every platform)."""
    out: dict[str, dict[str, Any]] = {}
    for item in report.get("install", []):
        meta = item["metadata"]
        wheel = str((item.get("download_info") or {}).get("url", "")).rsplit("/", 1)[-1].split("#", 1)[0]
        out[normalize(meta["name"])] = {"name": meta["name"], "version": meta["version"],
                                        "requires_dist": list(meta.get("requires_dist") or []),
                                        "pure": wheel.endswith("-none-any.whl")}
    return out


def dependencies(package: dict[str, Any], extras: Iterable[str], env: dict[str, str]) -> list[tuple[str, set[str]]]:
    """``(normalized name, extras asked for)`` of what ``package`` needs with ``extras`` in ``env``."""
    wanted = {""} | {normalize(e) for e in extras}
    out = []
    for text in package["requires_dist"]:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        if req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in wanted):
            out.append((normalize(req.name), set(req.extras)))
    return out


def provided_closure(packages: dict[str, dict[str, Any]], roots: Iterable[str] = PROVIDED,
                     env: dict[str, str] | None = None, stop: Collection[str] = ()) -> set[str]:
    """The roots and every resolved package they depend on, directly or not, extras followed (what the image
    already has: torch's ``cuda-toolkit[cufft,...]`` brings the CUDA libraries through its extras).

    Args:
        packages: :func:`resolved_packages`.
        roots: where to start.
        env: the target's marker environment (default: this interpreter's Python on x86-64 Linux).
        stop: packages that are reached but not followed further.
    """
    env = env or target_environment(f"{sys.version_info.major}.{sys.version_info.minor}")
    seen: dict[str, set[str]] = {}
    todo: list[tuple[str, set[str]]] = [(normalize(r), set()) for r in roots]
    while todo:
        name, extras = todo.pop()
        if name not in packages or (name in seen and extras <= seen[name]):
            continue
        seen[name] = seen.get(name, set()) | extras
        if name not in stop:
            todo += dependencies(packages[name], seen[name], env)
    return set(seen)


def plan_wheelhouse(packages: dict[str, dict[str, Any]], roots: Iterable[str] = PROVIDED,
                    env: dict[str, str] | None = None, keep: Iterable[str] = ()) -> dict[str, list[str]]:
    """What goes into the wheelhouse, as ``name==version`` pins, each list sorted.

    Returns:
        ``requirements``: the resolved packages the image lacks (``requirements.txt``); ``build``: those in
        ``keep`` (the build requirements: pip builds the checkout in an isolated environment that takes them from
        the wheelhouse, even where the image has them); ``fallbacks``: pure-Python packages the image ships that
        the requirements depend on too (``typing_extensions``, ``filelock``, ...), there in case the image's
        version is older than they need (pip keeps the image's where it is new enough); ``left_out``: the names
        of what the image ships and the wheelhouse leaves to it.
    """
    roots = [normalize(r) for r in roots]
    keep = {normalize(k) for k in keep}
    provided = provided_closure(packages, roots, env)
    needed = [n for n in packages if n not in provided]
    shared = provided_closure(packages, needed, env, stop=provided) & provided - set(roots) - keep
    fallbacks = {n for n in shared if packages[n].get("pure")}

    def pins(names: Iterable[str]) -> list[str]:
        return sorted((f"{packages[n]['name']}=={packages[n]['version']}" for n in names), key=str.lower)

    return {"requirements": pins(n for n in needed if n not in keep), "build": pins(keep & set(packages)),
            "fallbacks": pins(fallbacks),
            "left_out": sorted((packages[n]["name"] for n in provided - keep - fallbacks), key=str.lower)}


def build_requirement_names(path: str | Path = PYPROJECT) -> list[str]:
    """The normalized names of ``[build-system] requires``."""
    data = tomllib.loads(Path(path).read_text())
    return [normalize(Requirement(r).name) for r in data.get("build-system", {}).get("requires", [])]


def folder_bytes(path: str | Path) -> int:
    """Total size of the files in ``path`` (recursively)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def check_size(path: str | Path, limit_mib: float = LIMIT_MIB) -> int:
    """The wheelhouse's size in bytes.

    Raises:
        DfqError: over ``limit_mib`` MiB (one line naming the size).
    """
    size = folder_bytes(path)
    if size > limit_mib * 2**20:
        raise DfqError(f"the wheelhouse {path} holds {size / 2**20:.1f} MiB, over the {limit_mib:g} MiB limit: leave "
                       "packages out (EXTRA_PACKAGES) or count more as shipped by the image (--provided)")
    return size


def install_instructions(dest: str | Path) -> str:
    """How to install the wheelhouse on the GPU machine, offline."""
    d = Path(dest)
    return (f"On the GPU machine (torch, {', '.join(p for p in PROVIDED if p != 'torch')} installed), in the source "
            f"checkout, offline:\n"
            f"    pip install --no-index --find-links {d} -r {d / REQUIREMENTS_FILE}\n"
            f"    pip install --no-index --find-links {d} --no-deps -e .\n"
            f"    dfq-deploy acceptance out/gpucheck --no-tensorrt")


def _run(cmd: list[str], what: str) -> None:
    logger.info("%s: %s", what, " ".join(cmd[1:]))
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise DfqError(f"{what} failed (pip exit {proc.returncode}): {last}")


def build(dest: str | Path, python_version: str, arch: str = "x86_64", glibc: str = "2.28",
          provided: Sequence[str] = PROVIDED, limit_mib: float = LIMIT_MIB,
          pyproject: str | Path = PYPROJECT, download: bool = True) -> dict[str, Any]:
    """Resolve, download and size-check the wheelhouse; returns what it holds (only the pins without
    ``download``)."""
    dest = Path(dest)
    platforms = platform_tags(arch, glibc)
    env = target_environment(python_version, arch)
    reqs = requirements_from_pyproject(pyproject)
    with tempfile.TemporaryDirectory() as tmp:
        report_path = Path(tmp) / "report.json"
        _run(resolve_command(reqs, report_path, python_version, platforms), "resolving")
        packages = resolved_packages(json.loads(report_path.read_text()))
    plan = plan_wheelhouse(packages, provided, env, keep=build_requirement_names(pyproject))
    pins = plan["requirements"] + plan["build"] + plan["fallbacks"]
    logger.info("%d packages to download (%d for the checkout's build, %d fallbacks for the image's: %s); shipped "
                "by the image, left out: %s", len(pins), len(plan["build"]), len(plan["fallbacks"]),
                ", ".join(plan["fallbacks"]), ", ".join(plan["left_out"]))
    res: dict[str, Any] = {"pyproject_requirements": reqs, **plan, "pins": pins}
    if not download:
        return res
    dest.mkdir(parents=True, exist_ok=True)
    _run(download_command(pins, dest, python_version, platforms), "downloading")
    atomic_write_text(dest / REQUIREMENTS_FILE, "\n".join(plan["requirements"]) + "\n")
    size = check_size(dest, limit_mib)
    return {**res, "wheels": sorted(f.name for f in dest.glob("*.whl")), "bytes": size}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--output", default="wheelhouse", help="the folder the wheels go to (default wheelhouse)")
    p.add_argument("--python-version", default=f"{sys.version_info.major}.{sys.version_info.minor}",
                   help="the GPU machine's Python (default: this one's, %(default)s)")
    p.add_argument("--arch", default="x86_64", help="x86_64 or aarch64 (default x86_64)")
    p.add_argument("--glibc", default="2.28", help="the GPU machine's oldest glibc to allow wheels for (default 2.28)")
    p.add_argument("--provided", default=",".join(PROVIDED),
                   help=f"packages the image ships, left out with their dependencies (default {','.join(PROVIDED)})")
    p.add_argument("--limit-mib", type=float, default=LIMIT_MIB, help=f"size limit (default {LIMIT_MIB:g} MiB)")
    p.add_argument("--dry-run", action="store_true", help="resolve and list the pins, download nothing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    res = build(args.output, args.python_version, args.arch, args.glibc, [s for s in args.provided.split(",") if s],
                args.limit_mib, download=not args.dry_run)
    if args.dry_run:
        print("\n".join(res["pins"]))
        return res
    for w in res["wheels"]:
        print(f"  {w}")
    print(f"{len(res['wheels'])} wheels, {res['bytes'] / 2**20:.1f} MiB (limit {args.limit_mib:g} MiB) in "
          f"{args.output}")
    print(install_instructions(args.output))
    return res


if __name__ == "__main__":
    try:
        main()
    except DfqError as exc:
        print(f"gpu_wheelhouse: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
