# dfq-deploy on Jetson Thor with JetPack 7.0/7.1 (Jetson Linux r38: CUDA 13.0, Ubuntu 24.04, Python 3.12).
# Build on the Thor (or with arm64 emulation) from the repository root:
#   docker build -f docker/Dockerfile.thor -t dfq-deploy:thor .
#
# BASE IMAGE NOT CONFIRMED BY NVIDIA (see docker/README.md, "Versions, and where they come from"). JetPack 7
# aligns Jetson Thor with SBSA and CUDA 13's Arm unification "extends to containers", so the base is the
# standard arm64 (SBSA) NGC TensorRT image, not an l4t-* image (no NVIDIA page found names one for r38).
# 25.08 is the first NGC month on CUDA 13.0 (Triton 25.08 release notes and compatibility matrix), matching
# JetPack 7.0/7.1's CUDA 13.0, and predates TensorRT 11: NVIDIA says Jetson Thor on JetPack 7.x stays on
# TensorRT 10.x until JetPack 7.2.2 (TensorRT 10.x-to-11.x Jetson migration notes); the build checks both.
# No NVIDIA page found says that tensorrt:25.08-py3 supports Thor: confirm the tag on the board before relying
# on it, or pass another one with
#   --build-arg BASE_IMAGE=nvcr.io/nvidia/tensorrt:<yy.mm>-py3
ARG BASE_IMAGE=nvcr.io/nvidia/tensorrt:25.08-py3
FROM ${BASE_IMAGE}
ARG BASE_IMAGE

# TensorRT major version the image must have: 10 for JetPack 7.0/7.1 (r38). TensorRT 11 needs JetPack 7.2.2+.
ARG TRT_MAJOR=10
# CUDA major version the image must have: JetPack 7 drives CUDA 13.
ARG CUDA_MAJOR=13

# Ubuntu 24.04 marks the system Python as externally managed (PEP 668). The NGC image's TensorRT bindings live
# in that Python, so install next to them (as docker/Dockerfile does) instead of in a venv that would not see
# them. The image's pip stays as it is: upgrading a Debian-installed pip fails on Ubuntu 24.04.
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/dfq-deploy
COPY pyproject.toml README.md ./
COPY dfq_deploy ./dfq_deploy
COPY examples ./examples

# Older NGC images ship the TensorRT Python bindings as a setup script rather than installed.
RUN python3 -c "import tensorrt" 2>/dev/null || /opt/tensorrt/python/python_setup.sh

# The image must match the board: TensorRT 10.x and CUDA 13.x for JetPack 7.0/7.1 (checked without a GPU).
RUN python3 -c "import sys, tensorrt; v = tensorrt.__version__; print('${BASE_IMAGE}: TensorRT', v); \
sys.exit(0 if v.split('.')[0] == '${TRT_MAJOR}' else f'TensorRT {v}, want ${TRT_MAJOR}.x (TRT_MAJOR)')" \
 && python3 -c "import json, os, sys; p = '/usr/local/cuda/version.json'; \
j = json.load(open(p)) if os.path.exists(p) else {}; \
v = j.get('cuda', {}).get('version') or os.environ.get('CUDA_VERSION', ''); print('CUDA', v or 'unknown'); \
sys.exit(0 if not v or v.split('.')[0] == '${CUDA_MAJOR}' else f'CUDA {v}, want ${CUDA_MAJOR}.x (CUDA_MAJOR)')"

# TensorRT comes from the image, which pip must not replace: install the package without the [trt] extra's
# tensorrt (from PyPI it would be a different build) plus the rest of that extra, cuda-python for CUDA 13
# (cuda.bindings shares the CUDA major version) and nvidia-ml-py (only a fallback energy source on Jetson).
# The image's TensorRT and NumPy are pinned as constraints, so no dependency can move the NumPy the image's
# TensorRT bindings were built against.
RUN python3 -c "import importlib.metadata as m, sys; \
have = {(d.metadata['Name'] or '').lower(): d.version for d in m.distributions()}; \
sys.stdout.write(''.join(f'{n}=={have[n]}\n' for n in ('tensorrt', 'numpy') if n in have))" \
    > /opt/dfq-deploy/image-pins.txt \
 && cat /opt/dfq-deploy/image-pins.txt \
 && python3 -m pip install -c /opt/dfq-deploy/image-pins.txt . "cuda-python>=13,<14" "nvidia-ml-py>=12"

# Smoke test (no GPU at build time: imports only, nothing touches CUDA): TensorRT, cuda-python and dfq-deploy
# load together, then the CLI starts.
RUN python3 -c "import importlib.metadata as m, tensorrt, cuda.bindings, dfq_deploy; \
print('TensorRT', tensorrt.__version__, '| cuda-bindings', m.version('cuda-bindings'))" \
 && dfq-deploy --help > /dev/null

WORKDIR /work
ENTRYPOINT ["dfq-deploy"]
CMD ["--help"]
