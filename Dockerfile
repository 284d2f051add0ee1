# lightning-protos for CUDA GPU nodes. The PyTorch wheels bring their own CUDA libraries, so a
# slim Python image is enough; the host needs the NVIDIA driver and the container toolkit.
#
#   A6000 (Ampere) and newer:  docker build -t protos .                                (cu130)
#   V100 (Volta, sm_70):       docker build -t protos:v100 --build-arg TORCH_CUDA=cu126 .
#
# PyTorch's CUDA 13 wheels have no sm_70 kernels; its CUDA 12.6 wheels still do. Each `protos`
# process checks its GPU against the build's architectures before any work and names the fix.
FROM python:3.12-slim

# PyTorch wheel index variant: cu130 (Ampere and newer), cu126 (Volta / V100), cpu.
ARG TORCH_CUDA=cu130

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    PROTOS_DATA_DIR=/data

# torch and torchvision from the chosen CUDA index first; the package's own install then finds
# them satisfied and takes the rest from PyPI. Versions follow the ranges in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_CUDA}" torch torchvision

WORKDIR /opt/lightning-protos
COPY pyproject.toml README.md ./
COPY lightning_protos ./lightning_protos
COPY configs ./configs
RUN pip install . && python -c "import lightning_protos.cli"

# Runs start here, so `--config configs/...` finds the bundled configs; the run directories
# (TensorBoard logs, checkpoints, metrics.json) land in the /runs volume through the link.
RUN ln -s /runs lightning_logs
VOLUME ["/data", "/runs"]

ENTRYPOINT ["protos"]
CMD ["--help"]
