# ctxload on CPU: the load generator (Locust master and workers), the GPU exporter (NVML comes
# from the NVIDIA container toolkit at run time) and ssm-server on CPU (the compose cpu profile).
# Build context: the repository root.  docker compose build
FROM python:3.12-slim
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
WORKDIR /app
ARG TORCH_VERSION=2.13.0
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md* ./
COPY ctxload ctxload
COPY servers servers
COPY loadgen loadgen
COPY analysis analysis
# NVML for the GPU exporter; not the gpu extra, whose mamba-ssm (an sdist that imports torch to
# build) this CPU image does not use
RUN pip install . "nvidia-ml-py>=12"
COPY scenarios scenarios
EXPOSE 8089 9400 9646 8000
CMD ["ctxload", "--help"]
