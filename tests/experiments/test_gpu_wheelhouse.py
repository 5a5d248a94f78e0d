"""The wheelhouse script (experiments/gpu_wheelhouse.py): its requirements read from pyproject.toml, the pip
commands it would run, what it leaves to the image on a recorded pip report, and its size check. Nothing is
downloaded here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from dfq_deploy.errors import DfqError

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "experiments" / "gpu_wheelhouse.py"


@pytest.fixture(scope="module")
def wh() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_wheelhouse", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_requirements_are_read_from_pyproject(wh: ModuleType) -> None:
    data = wh.tomllib.loads((ROOT / "pyproject.toml").read_text())
    optional = data["project"]["optional-dependencies"]

    def pick(extra: str, name: str) -> str:
        return next(r for r in optional[extra] if wh.normalize(r.split(">")[0].split("=")[0].split("<")[0]) == name)

    reqs = wh.requirements_from_pyproject()
    assert reqs == [*data["project"]["dependencies"], pick("trt", "nvidia-ml-py"), pick("dev", "pytest"),
                    pick("dev", "pytest-xdist"), *data["build-system"]["requires"]]
    names = {wh.normalize(r.split(">")[0].split("<")[0].split("=")[0]) for r in reqs}
    assert {"timm", "onnxruntime", "nvidia-ml-py", "pytest", "pytest-xdist", "setuptools"} <= names
    assert not names & {"tensorrt", "cuda-python", "ruff", "matplotlib"}


def test_a_changed_pyproject_changes_the_requirements(wh: ModuleType, tmp_path: Path) -> None:
    text = (ROOT / "pyproject.toml").read_text()
    timm = next(r for r in wh.requirements_from_pyproject() if r.startswith("timm"))
    changed = tmp_path / "pyproject.toml"
    changed.write_text(text.replace(f'"{timm}"', '"timm>=9.9"'))
    reqs = wh.requirements_from_pyproject(changed)
    assert "timm>=9.9" in reqs and timm not in reqs
    with pytest.raises(DfqError, match=r"has no extra \[gpu\]"):
        wh.requirements_from_pyproject(changed, {"gpu": ("pytest",)})
    with pytest.raises(DfqError, match=r"extra \[dev\] has no pytest-cov"):
        wh.requirements_from_pyproject(changed, {"dev": ("pytest-cov",)})


def test_platform_tags_and_the_pip_commands(wh: ModuleType, tmp_path: Path) -> None:
    tags = wh.platform_tags("x86_64", "2.28")
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags and tags[-1] == "manylinux2014_x86_64"
    assert wh.platform_tags("aarch64", "2.17") == ["manylinux_2_17_aarch64", "manylinux2014_aarch64"]
    with pytest.raises(DfqError, match="--glibc 2.12"):
        wh.platform_tags("x86_64", "2.12")
    resolve = wh.resolve_command(["timm>=1"], tmp_path / "r.json", "3.11", tags)
    assert resolve[1:4] == ["-m", "pip", "install"] and "--dry-run" in resolve and "--only-binary=:all:" in resolve
    assert resolve[resolve.index("--python-version") + 1] == "3.11" and resolve.count("--platform") == len(tags)
    assert resolve[resolve.index("--report") + 1] == str(tmp_path / "r.json") and "--target" in resolve
    download = wh.download_command(["timm==1.0.0"], tmp_path / "w", "3.12", tags[:1])
    assert download[1:4] == ["-m", "pip", "download"] and "--no-deps" in download and download[-1] == "timm==1.0.0"
    assert download[download.index("--dest") + 1] == str(tmp_path / "w")


def _item(name: str, version: str, requires: list[str], wheel: str = "") -> dict[str, Any]:
    wheel = wheel or f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    return {"download_info": {"url": f"https://files.example/{wheel}#sha256=0"},
            "metadata": {"name": name, "version": version, "requires_dist": requires}}


#: A recorded pip report, cut down: what a PyTorch image ships (torch, torchvision, numpy and their dependencies,
#: the CUDA libraries behind cuda-toolkit's extras) and what the project adds on top.
REPORT = {"install": [
    _item("torch", "2.14.1", ["filelock", "typing-extensions>=4.10", "sympy>=1.13", "cuda-toolkit[cufft]==13.0",
                              "setuptools; python_version >= '3.12'", "optree>=0.13; extra == 'optree'"],
          "torch-2.14.1-cp311-cp311-manylinux_2_28_x86_64.whl"),
    _item("cuda-toolkit", "13.0.3", ["nvidia-cufft==12.*; extra == 'cufft'", "nvidia-curand; extra == 'curand'"]),
    _item("nvidia-cufft", "12.0.0", [], "nvidia_cufft-12.0.0-py3-none-manylinux_2_17_x86_64.whl"),
    _item("sympy", "1.14.0", ["mpmath<1.4,>=1.1"]),
    _item("mpmath", "1.3.0", []),
    _item("torchvision", "0.29.1", ["numpy", "torch==2.14.1", "pillow!=8.3.*,>=5.3.0"],
          "torchvision-0.29.1-cp311-cp311-manylinux_2_28_x86_64.whl"),
    _item("numpy", "2.4.6", [], "numpy-2.4.6-cp311-cp311-manylinux_2_28_x86_64.whl"),
    _item("Pillow", "13.0.0", [], "pillow-13.0.0-cp311-cp311-manylinux_2_28_x86_64.whl"),
    _item("filelock", "4.3.2", []),
    _item("typing_extensions", "4.16.0", []),
    _item("timm", "1.0.31", ["torch", "torchvision", "pyyaml", "huggingface_hub"]),
    _item("huggingface_hub", "2.4.0", ["filelock", "typing-extensions>=4.16", "pyyaml>=5.1", "pytest; extra == 'dev'"]),
    _item("PyYAML", "6.0.4", [], "pyyaml-6.0.4-cp311-cp311-manylinux_2_28_x86_64.whl"),
    _item("onnx", "1.23.2", ["numpy>=1.23", "protobuf>=4"], "onnx-1.23.2-cp311-cp311-manylinux_2_28_x86_64.whl"),
    _item("protobuf", "7.36.2", [], "protobuf-7.36.2-cp310-abi3-manylinux2014_x86_64.whl"),
    _item("setuptools", "84.2.1", []),
    _item("wheel", "0.48.0", []),
]}


def test_the_plan_leaves_to_the_image_what_it_ships(wh: ModuleType) -> None:
    packages = wh.resolved_packages(REPORT)
    assert packages["torch"]["pure"] is False and packages["filelock"]["pure"] is True
    env = wh.target_environment("3.11")
    closure = wh.provided_closure(packages, env=env)
    # cuda-toolkit's extra brought nvidia-cufft; the 'optree' extra and the Python 3.12 marker did not count
    assert closure == {"torch", "torchvision", "numpy", "pillow", "cuda-toolkit", "nvidia-cufft", "sympy", "mpmath",
                       "filelock", "typing-extensions"}
    assert "setuptools" in wh.provided_closure(packages, env=wh.target_environment("3.12"))
    plan = wh.plan_wheelhouse(packages, env=env, keep=["setuptools", "wheel"])
    assert plan["requirements"] == ["huggingface_hub==2.4.0", "onnx==1.23.2", "protobuf==7.36.2", "PyYAML==6.0.4",
                                    "timm==1.0.31"]
    assert plan["build"] == ["setuptools==84.2.1", "wheel==0.48.0"]
    # pure-Python packages of the image that the project's need too, in case the image's are older
    assert plan["fallbacks"] == ["filelock==4.3.2", "typing_extensions==4.16.0"]
    assert set(plan["left_out"]) == {"torch", "torchvision", "numpy", "Pillow", "cuda-toolkit", "nvidia-cufft", "sympy",
                                     "mpmath"}
    # with the build requirements shipped by the image (Python 3.12: torch needs setuptools), they still come along
    assert wh.plan_wheelhouse(packages, env=wh.target_environment("3.12"), keep=["setuptools", "wheel"])["build"] == \
        plan["build"]
    # an image that ships timm too leaves it (and what only it needs) out
    more = wh.plan_wheelhouse(packages, roots=[*wh.PROVIDED, "timm"], env=env)
    assert more["requirements"] == ["onnx==1.23.2", "protobuf==7.36.2", "setuptools==84.2.1", "wheel==0.48.0"]


def test_the_size_check_names_the_size(wh: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "a.whl").write_bytes(b"0" * 2**20)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.whl").write_bytes(b"0" * 2**19)
    assert wh.check_size(tmp_path, limit_mib=2) == 3 * 2**19
    with pytest.raises(DfqError) as err:
        wh.check_size(tmp_path, limit_mib=1)
    assert f"the wheelhouse {tmp_path} holds 1.5 MiB, over the 1 MiB limit" in str(err.value)
    assert "\n" not in str(err.value)
    assert wh.LIMIT_MIB == 64


def test_the_install_instructions_are_offline(wh: ModuleType, tmp_path: Path) -> None:
    text = wh.install_instructions(tmp_path / "wh")
    assert f"pip install --no-index --find-links {tmp_path / 'wh'} -r {tmp_path / 'wh' / 'requirements.txt'}" in text
    assert f"pip install --no-index --find-links {tmp_path / 'wh'} --no-deps -e ." in text
    assert "dfq-deploy acceptance out/gpucheck --no-tensorrt" in text
