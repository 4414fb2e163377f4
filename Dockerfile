# Image for the Prefect process worker and the Dask workers.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY flows flows
COPY tasks tasks
COPY models models
COPY configs configs
COPY prefect.yaml ./
RUN pip install --no-cache-dir -e .
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false TF_CPP_MIN_LOG_LEVEL=2
