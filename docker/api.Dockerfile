# vitq API image (CPU): FastAPI + uvicorn, migrations. Build from the repository root:
#   docker build -f docker/api.Dockerfile -t vitq-api .
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VITQ_DATA_DIR=/data

RUN apt-get update \
    && apt-get install -y --no-install-recommends dataset-fashion-mnist curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
# CPU wheels: the API validates models and datasets but never runs a quantization.
RUN pip install torch==2.14.1 torchvision==0.29.1 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml alembic.ini ./
COPY core ./core
COPY service ./service
COPY api ./api
COPY worker ./worker
COPY migrations ./migrations
COPY vitq ./vitq
COPY loadtest ./loadtest
RUN pip install .

RUN useradd --create-home --uid 1000 vitq && mkdir -p /data && chown vitq /data
USER vitq
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --retries=6 CMD curl -fsS http://127.0.0.1:8000/readyz || exit 1
CMD ["vitq", "api", "--host", "0.0.0.0", "--port", "8000"]
