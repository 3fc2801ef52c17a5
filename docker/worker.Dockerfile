# vitq worker image (CUDA): one Celery worker process per GPU. Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t vitq-worker .
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VITQ_DATA_DIR=/data \
    FASHION_MNIST_DIR=/usr/share/datasets/fashion-mnist

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-pip ca-certificates dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /app
RUN pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cu128
COPY pyproject.toml alembic.ini ./
COPY core ./core
COPY service ./service
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
COPY vitq ./vitq
COPY loadtest ./loadtest
RUN pip install .

RUN useradd --create-home --uid 1001 vitq && mkdir -p /data && chown vitq /data
USER vitq
# One process per GPU: compose pins CUDA_VISIBLE_DEVICES; the CUDA context is made in the task process.
HEALTHCHECK --interval=30s --timeout=15s --retries=3 \
    CMD celery --broker "$VITQ_BROKER_URL" inspect ping --timeout 10 || exit 1
CMD ["vitq", "worker", "--concurrency", "1"]
