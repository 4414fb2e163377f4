# Image for the Prefect process worker, the Dask workers and the shop services (count,
# dashboard; the postgres extra: their visitors store on the compose file's PostgreSQL).
# GPU image: docker build --build-arg EXTRAS="[gpu]" -t kface-pipeline:gpu .
# (TensorFlow with its CUDA libraries from pip; the host needs the NVIDIA driver and the
# NVIDIA Container Toolkit; docker-compose.yml's gpu-worker builds and reserves it).
FROM python:3.11-slim
ARG EXTRAS="[postgres]"
WORKDIR /app
COPY pyproject.toml README.md ./
COPY cli cli
COPY flows flows
COPY core core
COPY tasks tasks
COPY inference inference
COPY models models
COPY configs configs
COPY prefect.yaml ./
RUN pip install --no-cache-dir -e ".${EXTRAS}"
ENV PREFECT_SERVER_ANALYTICS_ENABLED=false TF_CPP_MIN_LOG_LEVEL=2
