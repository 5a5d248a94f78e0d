# dfq-deploy on Jetson Thor with JetPack 7.0/7.1 (Jetson Linux r38, CUDA 13), with a PyTorch that uses the GPU.
#
# JetPack 7 aligns Jetson Thor with SBSA (server Arm), and CUDA 13's Arm unification "also extends to containers"
# (NVIDIA's CUDA 13.0 for Jetson Thor blog, https://developer.nvidia.com/blog/whats-new-in-cuda-toolkit-13-0-for-jetson-thor-unified-arm-ecosystem-and-more),
# so the base is NVIDIA's standard arm64 (SBSA) PyTorch container (-py3, not -igpu), which brings a CUDA PyTorch
# and TensorRT 10.x. NVIDIA's "PyTorch for Jetson Platform" release notes, Table 1 (PyTorch compatibility with
# NVIDIA containers and JetPack),
# https://docs.nvidia.com/deeplearning/frameworks/install-pytorch-jetson-platform-release-notes/pytorch-jetson-rel.html
# pair containers 25.08-25.11 with JetPack 7.0 and 25.12-26.03 with JetPack 7.1 (25.08: PyTorch 2.8.0a0+34c6371d24);
# the table names no tag suffix. 25.08 is on CUDA 13.0.0 ("Triton Inference Server Release 25.08", same monthly
# base, https://docs.nvidia.com/deeplearning/triton-inference-server/release-notes/rel-25-08.html); 25.12 and later
# are on CUDA 13.1 ("PyTorch Release 25.12",
# https://docs.nvidia.com/deeplearning/frameworks/pytorch-release-notes/rel-25-12.html), past JetPack 7.0/7.1's
# CUDA 13.0. TensorRT stays 10.x on JetPack 7.0/7.1: TensorRT 11 needs JetPack 7.2.2 (TensorRT 11.4.1's Jetson
# migration notes, https://docs.nvidia.com/deeplearning/tensorrt/11.4.1/api/migration/tensorrt-10x-to-11x-jetson.html).
# The TensorRT in pytorch:25.08-py3 was not confirmed from NVIDIA's notes (docker/README.md, "Versions"): the build
# prints it and stops unless torch is a CUDA build of CUDA_MAJOR.x and TensorRT is TRT_MAJOR.x.
#
# Engines only run on the TensorRT that built them: build and run them in this image, not with JetPack's TensorRT.
#
# Build on the Thor from the repository root:
#   docker build -f docker/Dockerfile.thor -t dfq-deploy:thor .
#   another month: --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:<yy.mm>-py3
ARG BASE_IMAGE=nvcr.io/nvidia/pytorch:25.08-py3
FROM ${BASE_IMAGE}
ARG BASE_IMAGE

# CUDA major version the image's torch must be built for (JetPack 7: 13) and TensorRT major version (10 for
# JetPack 7.0/7.1; TensorRT 11 needs JetPack 7.2.2 or later).
ARG CUDA_MAJOR=13
ARG TRT_MAJOR=10
# NGC PyTorch images from 25.03 ship NVIDIA's pins of the packages they were built with in
# /etc/pip/constraint.txt, applied through PIP_CONSTRAINT: "keep" honours them next to this build's own pins,
# "drop" leaves only this build's pins (if pip reports a conflict with one of NVIDIA's pins).
ARG NGC_PIP_CONSTRAINTS=keep

# Ubuntu 24.04 marks the system Python as externally managed (PEP 668); the image's torch and TensorRT live in
# it, so install next to them (a venv would not see them).
ENV PIP_BREAK_SYSTEM_PACKAGES=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/dfq-deploy
COPY pyproject.toml README.md ./
COPY dfq_deploy ./dfq_deploy
COPY examples ./examples
COPY docker/image_check.py ./docker/image_check.py

# Before pip: torch is a CUDA build (torch.version.cuda set, provable without a GPU) inside dfq-deploy's torch
# range, TensorRT is TRT_MAJOR.x. Writes image-pins/constraints.txt (the image's torch, torchvision, TensorRT,
# NumPy, ... as installed) and image-pins/requirements.txt (cuda-python of the image's CUDA, nvidia-ml-py).
RUN python3 docker/image_check.py base --image "${BASE_IMAGE}" \
        --cuda-major "${CUDA_MAJOR}" --trt-major "${TRT_MAJOR}" --out image-pins

# dfq-deploy without the [trt] extra's tensorrt (it stays the image's; PyPI's would be another build), the
# image's packages held by the constraints.
RUN if [ "${NGC_PIP_CONSTRAINTS}" = drop ]; then unset PIP_CONSTRAINT; fi \
 && python3 -m pip install -c image-pins/constraints.txt -r image-pins/requirements.txt .

# Smoke test (no GPU at build time, nothing touches CUDA): the pinned packages are unchanged, torch is still a
# CUDA build, tensorrt, cuda.bindings and dfq_deploy import together, then the CLI starts.
RUN python3 docker/image_check.py final --cuda-major "${CUDA_MAJOR}" --trt-major "${TRT_MAJOR}" --out image-pins \
 && dfq-deploy --help > /dev/null \
 && { test -x /opt/nvidia/nvidia_entrypoint.sh \
      || { echo "no /opt/nvidia/nvidia_entrypoint.sh in ${BASE_IMAGE}" >&2; exit 1; }; }

WORKDIR /work
# NVIDIA's entrypoint (banner, driver checks, the image's CUDA setup) runs first, as in the base image, then
# dfq-deploy with the arguments given to docker run.
ENTRYPOINT ["/opt/nvidia/nvidia_entrypoint.sh", "dfq-deploy"]
CMD ["--help"]
