# ctxload's ssm-server on an NVIDIA GPU, with the mamba-ssm and causal-conv1d CUDA kernels
# compiled for the host's GPU only (CUDA_ARCH: 90 for H100/H200, 89 for RTX 4090/L4/L40,
# 80 for A100, 86 for RTX 3090/A10; `nvidia-smi --query-gpu=compute_cap --format=csv`
# prints it as 9.0 → 90).  One architecture instead of all: minutes, not an hour.
# Build context: the repository root.  docker compose build ssm-server
ARG TORCH_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-devel
FROM ${TORCH_IMAGE}
ARG CUDA_ARCH=90
ARG MAMBA_SSM_VERSION=2.3.2.post1
ARG CAUSAL_CONV1D_VERSION=1.7.0
ARG MAX_JOBS=8
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS}
WORKDIR /build
COPY deploy/ssm-server/only_arch.py .
RUN pip install packaging ninja einops \
 && pip download --no-deps --no-binary :all: "causal-conv1d==${CAUSAL_CONV1D_VERSION}" "mamba-ssm==${MAMBA_SSM_VERSION}" \
 && for f in causal_conv1d-*.tar.gz mamba_ssm-*.tar.gz; do tar xzf "$f"; done \
 && python only_arch.py "${CUDA_ARCH}" causal_conv1d-*/setup.py mamba_ssm-*/setup.py \
 && pip install --no-build-isolation --no-deps ./causal_conv1d-*/ \
 && pip install --no-build-isolation --no-deps ./mamba_ssm-*/ \
 && python -c "import causal_conv1d_cuda, selective_scan_cuda; print('kernels built for sm_${CUDA_ARCH}')" \
 && rm -rf /build
WORKDIR /app
COPY pyproject.toml README.md* ./
COPY ctxload ctxload
COPY servers servers
COPY loadgen loadgen
COPY analysis analysis
# NVML; mamba-ssm and its kernels are in place above, so not the gpu extra: pip would resolve
# the installed mamba-ssm's own requirements (tilelang, triton>=3.5) against this image's torch
RUN pip install . "nvidia-ml-py>=12"
EXPOSE 8000
ENTRYPOINT ["python", "-m", "servers.ssm_server"]
