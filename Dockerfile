# jaxrs on an NVIDIA GPU server: JAX's CUDA 12 wheels bring CUDA's libraries; the host brings only the
# driver (NVIDIA Container Toolkit: `docker run --gpus all`). Build: docker build -t jaxrs .
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/data/huggingface \
    JAXRS_CACHE_DIR=/data/jaxrs \
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95

RUN useradd --create-home --uid 1000 jaxrs \
    && mkdir -p /data /app \
    && chown jaxrs:jaxrs /data /app
WORKDIR /app

COPY --chown=jaxrs:jaxrs pyproject.toml README.md ./
COPY --chown=jaxrs:jaxrs jaxrs ./jaxrs
COPY --chown=jaxrs:jaxrs pallas_kernels ./pallas_kernels
COPY --chown=jaxrs:jaxrs server ./server
# the local tree, pinned by its own pyproject
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[cuda12]"

USER 1000:1000
# models (Hub cache, jaxrs's catalog) and compiled steps survive restarts in this volume
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/health', timeout=4)"]
# every `jaxrs serve` flag may follow the image name: docker run ... jaxrs --model org/repo --isq Q4K
ENTRYPOINT ["jaxrs", "serve", "--host", "0.0.0.0", "--port", "8080"]
CMD ["--kv-cache-fraction", "0.9"]
