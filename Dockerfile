# The studio on NVIDIA's Triton + TensorRT-LLM image: `--runtime trtllm` (engines built on first
# start into the /data volume) or `--runtime torch`. Image 25.12 carries Triton 2.64, TensorRT-LLM
# 1.1.0, TensorRT 10.13.3, torch 2.9.0a0 (NVIDIA build), CUDA 13.0.2, Python 3.12.3 (NVIDIA's
# compatibility matrix); the project is installed around those (docker/install.sh).
FROM nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    STUDIO_RUNTIME=trtllm \
    STUDIO_DATA_DIR=/data/studio \
    STUDIO_CHECKPOINTS=/data/checkpoints \
    STUDIO_ENGINES=/data/engines \
    HF_HOME=/data/hf

# libsndfile for soundfile, ffmpeg for MP3 downloads. Debian-style unpinned versions: the base
# image's Ubuntu release fixes them.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libsndfile1 ffmpeg \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/studio
# Requirements first, so editing code does not reinstall packages.
COPY requirements.txt ./
COPY docker/install.sh docker/constraints-25.12.txt docker/
RUN sh docker/install.sh

COPY . .

# Non-root; uid 10001 (the base image already has a uid 1000 user). /data is the volume for
# weights, engines and the studio's data.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin studio \
    && mkdir -p /data \
    && chown -R studio:studio /data
USER 10001:10001

VOLUME ["/data"]
EXPOSE 7860
# First start downloads ~5 GB of weights and builds the engines (tens of minutes): a long grace.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60m --retries=3 \
    CMD ["python3", "/opt/studio/docker/healthcheck.py"]
ENTRYPOINT ["/opt/studio/docker/entrypoint.sh"]
